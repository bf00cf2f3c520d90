"""The chapter kit: a chapter's run settings, glue, page printing, tables, claims and heap control.

``setup`` validates a chapter's parameters and returns its ``Run``;
``glue``, ``page_print``, ``show_table`` and ``quiet_warnings`` shape what a
page shows; ``Run.claim`` records a scorecard verdict; ``bound_heap`` and
``release_memory`` keep a chapter's resident memory down. Chapters only:
nothing in the engine, the closed forms, the estimators or the models
imports it (``tests/test_layers.py``); they use the ground floor,
``flowjac.base``. ``flowjac.utils`` re-exports every name under its old
address (``fj.setup``, ``from flowjac.utils import ...``).

Defined in the landing page, :ref:`sec_how_to_run` (``book/index.md``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from flowjac._checks import check_choice, check_int
from flowjac.base import get_device, repo_root, save_json, seed_everything

__all__ = ["PROFILES", "Run", "setup", "display_path", "glue", "page_print",
           "quiet_warnings", "show_table", "bound_heap", "release_memory"]

PROFILES = ("quick", "full")


@dataclass
class Run:
    """A chapter's validated run settings (profile, seed, device, output_dir); :ref:`sec_how_to_run`."""

    chapter: str
    profile: str
    seed: int
    device: torch.device
    output_dir: Path
    extra: dict = field(default_factory=dict)

    def pick(self, quick, full):
        """Return ``quick`` or ``full`` according to the profile."""
        return quick if self.profile == "quick" else full

    def save_json(self, name: str, obj: dict) -> Path:
        """Write ``obj`` as JSON under ``output_dir`` (atomically)."""
        return save_json(self.output_dir / name, obj)

    def rel(self, path: str | os.PathLike) -> str:
        """``path`` as the reader should see it: relative to ``output_dir``'s parent, never absolute."""
        return display_path(path, self.output_dir.parent)

    def claim(self, key: str, holds: bool | None, value: str = "", *,
              detail: str = "", section: str | None = None) -> dict:
        """Record the verdict on one claim of ``flowjac.scorecard.CLAIMS``; :ref:`sec_scorecard`.

        ``holds`` True or False is the verdict the chapter computed (None: untested
        here; "inconclusive": its power is too low; reasons in ``detail``); ``value`` is the
        number behind it as text, rounded as the page prints it;
        ``section`` the label of the section that decides it. The record
        is merged into ``output_dir/claims.json`` and glued into the
        notebook as ``claim:<key>`` (and ``verdict:<key>``, the verdict
        word, for the prose), where the scorecard page reads it.
        """
        from flowjac import scorecard

        if key not in {c.key for c in scorecard.CLAIMS}:
            raise ValueError(f"key must be one of flowjac.scorecard.CLAIMS, "
                             f"got {key!r}")
        if isinstance(holds, str) and holds != "inconclusive":
            raise ValueError(f"holds must be a bool, None or 'inconclusive', got {holds!r}")
        verdict = holds if isinstance(holds, str) else {True: "holds", False: "fails", None:
                                                        "untested-here"}[holds if holds is None else bool(holds)]
        rec = scorecard.ClaimRecord(key=key, verdict=verdict,
                                    value=str(value), detail=str(detail),
                                    section=section, chapter=self.chapter)
        path = self.output_dir / "claims.json"
        try:
            known = json.loads(path.read_text()) if path.exists() else {}
        except ValueError:
            known = {}
        known[key] = dict(rec)
        save_json(path, known)
        try:
            from myst_nb import glue
        except ImportError:        # outside a notebook toolchain
            return dict(rec)
        try:
            glue(f"claim:{key}", rec, display=False)
            glue(f"verdict:{key}", _Plain(verdict), display=False)
        except Exception:          # no IPython kernel (a plain script)
            pass
        return dict(rec)


def setup(chapter: str, profile: str = "quick", seed: int = 0,
          device: str = "auto", output_dir: str | os.PathLike | None = None,
          **counts) -> Run:
    """Validate a chapter's parameters, seed everything, make output_dir; :ref:`sec_how_to_run`.

    ``counts`` are further integer parameters that must be positive, e.g.
    ``n_samples=10_000``; a bad one raises ValueError naming it.
    Defined in :ref:`sec_how_to_run`.
    """
    check_choice("profile", profile, PROFILES)
    check_int("seed", seed, minimum=0)
    for name, value in counts.items():
        check_int(name, value, minimum=1)
    bound_heap()
    dev = get_device(device)
    if output_dir in (None, ""):
        output_dir = os.environ.get("FLOWJAC_OUTPUT_DIR") or (
            repo_root() / "_build" / "outputs")
    out = Path(output_dir) / chapter
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(seed)
    return Run(chapter, profile, seed, dev, out, dict(counts))


def display_path(path: str | os.PathLike, base: str | os.PathLike | None = None) -> str:
    """A path for a page: relative to ``base`` (or the repository root) when inside it, else its file name; :ref:`sec_how_to_run`."""
    path = Path(path)
    for root in ([Path(base)] if base is not None else []) + [repo_root()]:
        try:
            return path.resolve().relative_to(Path(root).resolve()).as_posix()
        except ValueError:
            continue
    return path.name


class _Plain(str):
    """A string whose repr is itself, so that a glued word reads without quotes.

    MyST-NB's text role reads a glued text/plain back with ``ast.literal_eval``;
    where that would turn the bare text into something else ("3,000" into the
    tuple ``(3, 0)``), the repr is the quoted string, which reads back intact.
    """

    def __repr__(self):
        from ast import literal_eval

        text = str(self)
        try:
            parsed = literal_eval(text)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return text
        return text if str(parsed) == text else str.__repr__(self)


def glue(name: str, value, display: bool = False):
    """``myst_nb.glue`` for the prose of a chapter: strings without quotes, nothing displayed; :ref:`sec_how_to_run`.

    ``{glue:text}`name:.3f``` in the markdown then shows the number that
    the cell computed. Returns ``value``.
    """
    from myst_nb import glue as _glue

    shown = _Plain(value) if isinstance(value, str) else value
    if isinstance(value, (np.generic, torch.Tensor)):
        shown = float(value)
    _glue(name, shown, display=display)
    return value


def page_print(*args, sep: str = " ", end: str = "\n", width: int = 78, **kwargs) -> None:
    """``print``, with lines longer than ``width`` wrapped at spaces, so that an output fits the page; :ref:`sec_how_to_run`.

    A chapter binds it as ``print`` in its hidden set-up cell; shorter
    lines (tables, matrices) are printed unchanged, and a wrapped line keeps
    its indent, continuing two spaces further in.
    """
    import builtins
    import textwrap

    text = sep.join(str(a) for a in args)
    lines = []
    for line in text.split("\n"):
        if len(line) <= width:
            lines.append(line)
            continue
        indent = line[:len(line) - len(line.lstrip())]
        lines.append(textwrap.fill(line.strip(), width, initial_indent=indent,
                                   subsequent_indent=indent + "  ",
                                   break_long_words=False,
                                   break_on_hyphens=False))
    builtins.print("\n".join(lines), end=end, **kwargs)


def quiet_warnings() -> None:
    """Silence the known, harmless warnings that chapters would otherwise print; :ref:`sec_how_to_run`.

    torch.func's import of torch.jit.script (a FutureWarning), and
    PyTorch's and scikit-learn's deprecation notices that say nothing about
    a chapter's numbers.
    """
    import warnings

    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*",
                            category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=r".*IProgress not found.*")


def show_table(rows, columns=None, digits: int = 3, index=None):
    """Display rows (dicts or sequences) as a rounded HTML table in a notebook, and return the DataFrame; :ref:`sec_how_to_run`."""
    import pandas as pd

    df = pd.DataFrame(rows, columns=columns)
    if index is not None:
        df = df.set_index(index)
    df = df.round(digits)
    try:
        from IPython.display import display
    except ImportError:
        return df
    with pd.option_context("display.precision", digits):
        display(df)
    return df


def bound_heap(threshold: int = 1 << 20) -> bool:
    """Serve allocations of ``threshold`` bytes and more by mmap, so that freed tensors go back to the OS; :ref:`sec_how_to_run`.

    glibc raises its mmap threshold dynamically after large frees, after
    which big tensors come from the heap and their freed pages keep adding
    to the resident peak (one chapter peaked at 2.0 GB with it, 1.2 GB
    without). ``setup`` calls this for every chapter. Returns False where
    the C library is not glibc.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return bool(name) and ctypes.CDLL(name).mallopt(-3, int(threshold)) == 1  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def release_memory() -> None:
    """Return freed heap memory to the OS (gc, then glibc's malloc_trim where available); :ref:`sec_how_to_run`.

    A transient allocation (a training step's activations, say) leaves the
    allocator holding its pages; later allocations of other sizes then add
    to the resident peak instead of reusing them.
    """
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):     # not glibc
            pass
