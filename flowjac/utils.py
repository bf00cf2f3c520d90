"""Small utilities shared by every chapter: seeding, devices, parameters, files.

Defined in the landing page, "How to run the book" (``book/index.md``).
"""
from __future__ import annotations

import json
import os
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from flowjac._checks import check_choice, check_int

PROFILES = ("quick", "full")
DEVICES = ("auto", "cpu", "cuda")


def repo_root() -> Path:
    """The repository root (parent of the package); see "How to run the book"."""
    return Path(__file__).resolve().parent.parent


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA); see "How to run the book"."""
    seed = check_int("seed", seed, minimum=0)
    if seed >= 2 ** 63:
        raise ValueError(f"seed must be < 2**63 (torch's limit), got {seed}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def get_device(device: str = "auto") -> torch.device:
    """Resolve "auto", "cpu" or "cuda"; "auto" falls back to the CPU; "How to run the book"."""
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


@dataclass
class Run:
    """A chapter's validated run settings (profile, seed, device, output_dir); "How to run the book"."""

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


def setup(chapter: str, profile: str = "quick", seed: int = 0,
          device: str = "auto", output_dir: str | os.PathLike | None = None,
          **counts) -> Run:
    """Validate a chapter's parameters, seed everything, make output_dir; "How to run the book".

    ``counts`` are further integer parameters that must be positive, e.g.
    ``n_samples=10_000``; a bad one raises ValueError naming it.
    Defined in "How to run the book".
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


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write bytes to ``path`` through a temporary file and ``os.replace``; "How to run the book".

    The temporary file is removed on every failure; temporaries that a
    killed process left beside ``path`` are removed by the next write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*"):   # left by a killed write
        try:
            stale.unlink()
        except OSError:
            pass
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_json(path: str | os.PathLike, obj: dict) -> Path:
    """Write ``obj`` as indented JSON, atomically; "How to run the book"."""
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


def load_results(name: str) -> dict | None:
    """Load ``results/<name>.json`` (stored full-profile numbers) or None; "How to run the book"."""
    path = repo_root() / "results" / f"{name}.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


def bound_heap(threshold: int = 1 << 20) -> bool:
    """Serve allocations of ``threshold`` bytes and more by mmap, so that freed tensors go back to the OS; "How to run the book".

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
    """Return freed heap memory to the OS (gc, then glibc's malloc_trim where available); "How to run the book".

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
    """Describe the machine (CPU/GPU, torch version) for results files; "How to run the book"."""
    info = {"torch": str(torch.__version__), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cpu": _cpu_model()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
