"""The ``flowjac`` command line: train, sample and probe, on one process or many (torchrun).

    flowjac train  --data {mnist,scm} --train-steps N --out DIR [--resume]
    flowjac sample --checkpoint PATH --n N --out FILE.{pt,png}
    flowjac probe  --checkpoint PATH [--classifier PATH] --n N --k K --out FILE.json

``sample`` and ``probe`` also read flows trained with the peers' libraries:
``--format torchcfm --arch ARCH`` (a torchcfm training checkpoint; ARCH the
``UNetModelWrapper`` arguments, or the README ``MLP``'s with an integer
``dim``, a JSON file or an inline JSON object) and ``--format flow_matching
--model-class MODULE:CLASS [--wrapper MODULE:CLASS] --arch ARCH
--latent-shape C H W`` (the user's own network class, optionally wrapped as
flow_matching's examples wrap it), both through ``flowjac.models.adapters``.

The same commands run under ``torchrun --nproc_per_node=N -m flowjac ...``:
training becomes DDP (the global batch split over the ranks), sampling and
probing shard the seeded draw by batches and reduce exactly, and rank 0
alone writes files (``flowjac.engine.distributed``). Bad input prints one
line on stderr and exits with status 1 (2 for a malformed command line).
``--steps`` always means solver steps; optimiser steps are
``--train-steps``. Explained in :ref:`sec_running_at_scale` (``book/running_at_scale.md``).

Every flow is opened by ``flowjac.models.adapters.open_flow`` (the one
door), sampled by ``flowjac.models.pretrained.sample`` and probed by
``flowjac.engine.probing.probe`` (reduced by
``flowjac.estimators.covariance.summarize_probe``); the parser
(``flowjac.cli_parser``) and the thin commands over them
(``flowjac.cli_commands``) have rooms of their own, and this module holds
the entry point, ``main``, with its one error path; every public name of
the three is importable from here. What they share with the library lives
there: the checks of ``--out`` and of memory in ``flowjac._checks``, the
PNG grid in ``flowjac.plotting.save_image_grid``, the pixel readout with
its outputs' names in ``flowjac.engine.probing.PixelReadout``.
"""
from __future__ import annotations

import sys

from flowjac.cli_commands import (  # noqa: F401  (the command line's names, as before)
    _WHAT_TO_READ,
    DATA,
    METHODS,
    flow_config,
    load_any_flow,
    load_classifier,
    load_flow,
)
from flowjac.cli_parser import ESTIMATORS, FORMATS, build_parser  # noqa: F401

__all__ = ["main", "build_parser", "flow_config", "load_flow",
           "load_classifier", "load_any_flow"]


# flags whose values may start with "-", which argparse takes for a flag
_SIGNED = ("--value-range",)


def _join_negative_values(argv):
    """``--value-range -1,1`` as ``--value-range=-1,1``: argparse reads a
    value that starts with "-" (and is no plain number) as another flag."""
    out, i = [], 0
    while i < len(argv):
        arg = str(argv[i])
        if arg in _SIGNED and i + 1 < len(argv) and str(argv[i + 1]).startswith("-") \
                and not str(argv[i + 1]).startswith("--"):
            out.append(f"{arg}={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def _message(err: BaseException) -> str:
    """The one line a failure prints: the message of a ValueError or a
    missing file; disk full, permissions and out-of-memory named as such;
    anything else as an unexpected error of its type."""
    import errno

    if isinstance(err, (ValueError, FileNotFoundError)):
        return str(err)
    where = f" ({err.filename!r})" if getattr(err, "filename", None) else ""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return f"disk full: no space left on the device while writing{where}"
    if isinstance(err, OSError):
        return f"{err.strerror or err}{where}"
    text = str(err)
    if isinstance(err, MemoryError) or "out of memory" in text.lower() \
            or "can't allocate memory" in text:
        return (f"out of memory ({type(err).__name__}: {text[:200]}); give a "
                "smaller --batch-size or --n")
    return (f"unexpected {type(err).__name__}: {text[:300]} (set "
            "FLOWJAC_DEBUG=1 for the traceback)")


def main(argv=None) -> int:
    """Run ``flowjac COMMAND ...`` and return the exit status (0, 1 for bad input, 2 for a bad command line); :ref:`sec_running_at_scale`."""
    import os
    import warnings

    # torch.func's import warns that torch.jit.script is deprecated
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*",
                            category=FutureWarning)
    parser = build_parser()
    if argv is None:
        argv = sys.argv[1:]
    argv = list(argv)
    if argv[:1] == ["--"]:      # torchrun ... -m flowjac -- COMMAND ...
        argv = argv[1:]
    argv = _join_negative_values(argv)
    if argv[:1] == ["train"] and any(a == "--steps" or a.startswith("--steps=")
                                     for a in argv):
        print("flowjac train: error: --steps means solver steps; give the "
              "optimiser steps as --train-steps", file=sys.stderr)
        return 2
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:
        return int(stop.code or 0)
    ctx = None
    try:
        from flowjac.engine import distributed

        ctx = distributed.init(args.device)
        return args.func(args, ctx)
    except KeyboardInterrupt:
        return 130
    except Exception as err:
        if os.environ.get("FLOWJAC_DEBUG"):
            raise
        msg = " ".join(_message(err).split())
        if ctx is None and os.environ.get("RANK", "0") not in ("", "0"):
            # setting up this process failed, perhaps on this rank only
            print(f"flowjac {args.command}: error on rank "
                  f"{os.environ['RANK']}: {msg}", file=sys.stderr)
        elif ctx is None or ctx.is_main:   # the others fail alike, or wait
            print(f"flowjac {args.command}: error: {msg}", file=sys.stderr)
        return 1
    finally:
        if ctx is not None:
            from flowjac.engine import distributed

            distributed.shutdown(ctx)
