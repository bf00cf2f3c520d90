"""Argument checks shared by every module: one message style.

Every check raises one ``ValueError`` whose message names the argument and
says what is allowed. Numbers may be Python, NumPy or 0-dim torch scalars;
data tensors must be finite where NaN or inf would otherwise flow through
silently. Private: the public modules call these, users see their messages.
Explained in :ref:`sec_how_to_run` (``book/index.md``).
"""
from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["check_int", "check_number", "check_choice", "check_finite",
           "value_range", "available_bytes", "check_memory", "check_no_file_above",
           "check_out_file"]


def check_int(name: str, value: Any, minimum: int | None = None) -> int:
    """Raise ValueError unless ``value`` is an int >= ``minimum``; :ref:`sec_how_to_run`."""
    if torch.is_tensor(value) and value.ndim == 0 and not (
            value.is_floating_point() or value.is_complex()
            or value.dtype == torch.bool):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def value_range(value: Any, name: str) -> tuple[float, float] | None:
    """(min, max) of a number or tensor, None if empty; ValueError unless numeric and finite; :ref:`sec_how_to_run`."""
    if torch.is_tensor(value):
        if value.numel() == 0:
            return None
        v = value.detach().double()
        if not torch.isfinite(v).all():
            raise ValueError(f"{name} must be finite, got a tensor with "
                             "nan or inf entries")
        return float(v.min()), float(v.max())
    try:
        lo = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number or a tensor, got "
                         f"{value!r}") from None
    if not math.isfinite(lo):
        raise ValueError(f"{name} must be finite, got {lo}")
    return lo, lo


def check_choice(name: str, value: Any, choices) -> Any:
    """Raise ValueError unless ``value`` is one of ``choices``; :ref:`sec_how_to_run`."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_number(name: str, value: Any, *, minimum=None, maximum=None,
                 strict_min: bool = False, strict_max: bool = False) -> float:
    """A finite real number (Python, NumPy or 0-dim tensor) as a float, within bounds; :ref:`sec_how_to_run`."""
    if torch.is_tensor(value) and value.numel() == 1 and value.ndim == 0 \
            and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and (value <= minimum if strict_min else value < minimum):
        raise ValueError(f"{name} must be {'>' if strict_min else '>='} "
                         f"{minimum}, got {value}")
    if maximum is not None and (value >= maximum if strict_max else value > maximum):
        raise ValueError(f"{name} must be {'<' if strict_max else '<='} "
                         f"{maximum}, got {value}")
    return value


def check_finite(name: str, x) -> torch.Tensor:
    """A floating tensor with no NaN or inf entries; :ref:`sec_how_to_run`."""
    if not torch.is_tensor(x):
        raise ValueError(f"{name} must be a torch tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got dtype {x.dtype}")
    if x.numel() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} must be finite; it has {bad} NaN or inf "
                         "entries")
    return x


def available_bytes(device=None):
    """Memory free for new tensors: the GPU's free memory on a CUDA device, else the machine's available memory (None where it cannot be read); :ref:`sec_running_at_scale`."""
    if device is not None and getattr(device, "type", device) == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(what: str, nbytes: float, hint: str, device=None) -> None:
    """Raise ValueError, before allocating, for work whose tensors alone (``nbytes``, a lower estimate) exceed the memory available; :ref:`sec_running_at_scale`."""
    free = available_bytes(device)
    if free is not None and nbytes > free:
        where = "GPU memory" if getattr(device, "type", device) == "cuda" \
            else "memory"
        raise ValueError(f"{what} needs at least {nbytes / 2 ** 30:.3g} GiB of "
                         f"{where}, more than the {free / 2 ** 30:.3g} GiB "
                         f"available; {hint}")


def check_no_file_above(name: str, path) -> None:
    """Raise ValueError for a path one of whose existing parents is a file, not a folder; :ref:`sec_running_at_scale`."""
    for parent in Path(path).parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{name} {str(path)!r}: {str(parent)!r} is a "
                                 "file, not a folder")
            return


def check_out_file(name: str, path, suffixes, force: bool = False, inputs=()) -> None:
    """Raise ValueError for an output file that cannot or must not be written; :ref:`sec_running_at_scale`.

    Refused: a suffix not in ``suffixes``, a directory, a file among its
    parents, an existing file without ``force``, and any of ``inputs``
    (``(flag, path)`` pairs: the same file, even by another path or a
    link) even with ``force``.
    """
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise ValueError(f"{name} must end with {' or '.join(suffixes)}, got "
                         f"{str(path)!r}")
    if path.is_dir():
        raise ValueError(f"{name} {str(path)!r} is a directory; give a file")
    check_no_file_above(name, path)
    for flag, given in inputs:
        if given is None or not Path(given).exists():
            continue
        same = Path(given).resolve() == path.resolve()
        if not same and path.exists():
            try:
                same = os.path.samefile(given, path)
            except OSError:
                pass
        if same:
            raise ValueError(f"{name} {str(path)!r} is the input {flag} "
                             f"{str(given)!r}; flowjac never writes over its "
                             "input, even with --force; choose another --out")
    if path.exists() and not force:
        raise ValueError(f"{name} {str(path)!r} exists; pass --force to replace "
                         "it, or choose another --out")
