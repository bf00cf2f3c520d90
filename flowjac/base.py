"""The ground floor: seeding, devices, atomic files, JSON and the hardware.

What the engine, the models, the estimators, the pipelines and the tools
may use; it imports nothing of flowjac but the argument checks
(``flowjac._checks``). The chapter kit (``flowjac.chapter``: ``setup``,
``Run``, glue, tables, claims, heap control) sits on top of it;
``flowjac.utils`` re-exports both under their old names.

Defined in the landing page, :ref:`sec_how_to_run` (``book/index.md``).
"""
from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from flowjac._checks import check_int

__all__ = ["DEVICES", "repo_root", "seed_everything", "get_device",
           "atomic_write_bytes", "save_json", "load_results", "hardware",
           "hardware_text"]

DEVICES = ("auto", "cpu", "cuda")


def repo_root() -> Path:
    """The repository root (parent of the package); see :ref:`sec_how_to_run`."""
    return Path(__file__).resolve().parent.parent


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA); see :ref:`sec_how_to_run`."""
    seed = check_int("seed", seed, minimum=0)
    if seed >= 2 ** 63:
        raise ValueError(f"seed must be < 2**63 (torch's limit), got {seed}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def get_device(device: str = "auto") -> torch.device:
    """Resolve "auto", "cpu" or "cuda"; "auto" falls back to the CPU; :ref:`sec_how_to_run`."""
    if isinstance(device, torch.device):
        device = device.type
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    has_cuda = torch.cuda.is_available()
    if device == "cuda" and not has_cuda:
        raise ValueError(
            "device='cuda' was requested but torch sees no CUDA GPU; "
            "use device='auto' (falls back to the CPU) or device='cpu'")
    if device == "auto":
        return torch.device("cuda" if has_cuda else "cpu")
    return torch.device(device)


# the infix of a write's temporary file, .NAME.flowjac-tmp-XXXXXXXX
_TMP_INFIX = ".flowjac-tmp-"


def _umask() -> int:
    """The process's umask, read without changing it where Linux allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)      # elsewhere: read by setting, then restore
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write bytes to ``path`` through a temporary file and ``os.replace``; :ref:`sec_how_to_run`.

    The temporary file, ``.NAME.flowjac-tmp-XXXXXXXX`` beside ``path`` (a
    unique random name), is this call's own: it is the only file removed on
    a failure, and no other file is ever deleted, so concurrent writers of
    one path each replace it with a whole file. The result has the mode a
    new file gets under the user's umask (0o666 & ~umask), not mkstemp's
    0o600. A killed process can leave its temporary behind; nothing
    removes it, since it cannot be told from a write still in progress."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{_TMP_INFIX}")
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o666 & ~_umask())
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(err, OSError) and err.filename is None:
            err.filename = str(path)     # e.g. disk full: name the file
        raise
    return path


def atomic_torch_save(path: str | os.PathLike, obj) -> Path:
    """``torch.save(obj)`` to ``path`` through :func:`atomic_write_bytes`; :ref:`sec_how_to_run`.

    The whole file appears at once or not at all: a run killed mid-write
    leaves the previous file (a checkpoint, a stored run) as it was."""
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def resume_state(out: str | os.PathLike, settings: dict, fresh: dict, *,
                 force: bool = False, log=None) -> tuple[Path, dict]:
    """The ``OUT.partial`` companion of a stored run and the state to go on from; :ref:`sec_how_to_run`.

    A finished ``out`` is never replaced without ``force`` (``SystemExit``
    naming ``--force``). A partial file is resumed only if its
    ``state["meta"]["settings"]`` equal ``settings`` (another run's partial
    is refused, not overwritten); otherwise ``fresh`` (whose
    ``meta["settings"]`` should be ``settings``) is the state. Returns
    ``(partial_path, state)``; write the state there with
    :func:`atomic_torch_save` after every batch and remove it at the end.
    """
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    if out.exists() and not force:
        raise SystemExit(f"{out} exists; pass --force to replace it")
    if not partial.exists():
        return partial, fresh
    state = torch.load(partial, map_location="cpu", weights_only=True)
    if state["meta"]["settings"] != settings:
        raise SystemExit(f"{partial} holds a run of other settings or weights; move it "
                         "away to start afresh")
    if log is not None:
        log(f"resuming from {partial}: {state['done']} done")
    return partial, state


def save_json(path: str | os.PathLike, obj: dict) -> Path:
    """Write ``obj`` as indented JSON, atomically; :ref:`sec_how_to_run`."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default)
    return atomic_write_bytes(path, (text + "\n").encode())


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.detach().cpu().tolist()
    if isinstance(o, (np.ndarray, np.generic)):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot serialise {type(o).__name__} to JSON")


def load_results(name: str | os.PathLike) -> dict | None:
    """A stored result: ``results/<name>.json`` (None if not stored) or the JSON file at a path; :ref:`sec_how_to_run`.

    A bare name (no folder, no ``.json``), e.g. ``"scm_cli"``, reads the
    repository's ``results/scm_cli.json`` and gives None when it is not
    there. A path (a ``Path``, or text with a folder or ending in
    ``.json``), e.g. the ``--out`` of ``flowjac probe``, reads that file;
    a missing path is a FileNotFoundError, a file that is not JSON a
    ValueError naming it.
    """
    text = os.fspath(name) if isinstance(name, os.PathLike) else name
    if not isinstance(text, str) or not text:
        raise ValueError(f"name must be a result name or a path to a JSON "
                         f"file, got {name!r}")
    is_path = isinstance(name, os.PathLike) or text.endswith(".json") or \
        "/" in text or os.sep in text
    if is_path:
        path = Path(text).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"results file {text!r} does not exist"
                                    + (" (it is a directory)" if path.is_dir()
                                       else ""))
    else:
        path = repo_root() / "results" / f"{text}.json"
        if not path.exists():
            return None
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"results file {str(path)!r} is not valid JSON "
                         f"({err})") from None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def hardware() -> dict:
    """Describe the machine (CPU/GPU, torch version) for results files; :ref:`sec_how_to_run`."""
    info = {"torch": str(torch.__version__), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cpu": _cpu_model()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def hardware_text(hw: dict) -> str:
    """A ``hardware()`` record in words: the GPU, else the CPU with its torch threads; :ref:`sec_how_to_run`."""
    if not isinstance(hw, dict) or not (hw.get("gpu") or hw.get("cpu")):
        raise ValueError(f"hw must be a hardware() record with 'gpu' or 'cpu', got {hw!r}")
    if hw.get("gpu"):
        return str(hw["gpu"])
    threads = hw.get("torch_threads")
    if threads is None:
        return str(hw["cpu"])
    return f"{hw['cpu']} ({threads} thread{'' if threads == 1 else 's'})"
