"""The old address of the ground floor and the chapter kit: every name of both, re-exported.

Chapters write ``from flowjac.utils import ...`` and ``fj.setup``; those
names now live in two rooms: ``flowjac.base`` (seeding, devices, atomic
files, JSON, hardware: what the package itself uses) and
``flowjac.chapter`` (``setup``, ``Run``, glue, page printing, tables,
claims, heap control: for chapters only). The ground floor's names are
imported here at once; the chapter kit's on first use (PEP 562), so that
importing this module for a ground-floor name does not load the kit. New
package code imports from ``flowjac.base``.

Defined in the landing page, :ref:`sec_how_to_run` (``book/index.md``).
"""
from __future__ import annotations

import importlib
import os  # noqa: F401  (tests patch flowjac.utils.os.replace and .fsync)

from flowjac.base import (  # noqa: F401  (re-exported)
    _TMP_INFIX,
    DEVICES,
    _cpu_model,
    _json_default,
    _umask,
    atomic_torch_save,
    atomic_write_bytes,
    get_device,
    hardware,
    load_results,
    repo_root,
    save_json,
    seed_everything,
)

#: The chapter kit's names (``flowjac.chapter``), imported on first use.
_CHAPTER = ("PROFILES", "Run", "setup", "display_path", "_Plain", "glue",
            "page_print", "quiet_warnings", "show_table", "bound_heap",
            "release_memory")


def __getattr__(name):
    if name in _CHAPTER:
        return getattr(importlib.import_module("flowjac.chapter"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_CHAPTER))
