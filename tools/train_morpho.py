"""Train a Morpho-MNIST part (flowjac.models.morpho_models.MORPHO_RECIPES) and measure its gates.

    python tools/train_morpho.py morpho-conditional --out DIR [--resume] [--chunk 500]
        [--n-gate 4000] [--gate-seed 2] [--device cpu] [--force]

Writes ``DIR/<part>.pt`` (a flowjac checkpoint of the trained network, the
recipe as its config) and ``DIR/<part>.json`` (the recipe, the hardware,
training seconds and s/step, the gates with intervals, limits and status);
flows also write ``DIR/<part>_samples.pt`` (the gate samples as uint8 grey
levels, with their conditioning values). Every part trains in chunks with
exact resume (flows through ``train_flow``, the regressor through
``train_classifier``): the work file ``DIR/.<part>-training.pt`` (and
``DIR/.<part>-finetune-training.pt`` for a second stage) is written every
chunk and kept, so after an interruption the same command with ``--resume``
continues where it stopped (and, once training is finished, only measures
the gates). ``DIR/.<part>-clock.json`` keeps the training seconds up to the
last checkpoint, so the record's ``train_seconds`` counts every run that
made the network (``train_seconds_this_run`` this one's; 0 for a run that
found the training finished and only measured the gates); a clock without
its work file is ignored. The record holds the sha256 of ``DIR/<part>.pt``,
which ``tools/ship_part.py`` requires of a Morpho part.

Nothing is overwritten silently: an existing output, or a work file without
``--resume``, stops the command unless ``--force`` is given. Gates that decide
a shipped model need ``--n-gate`` >= quality.GATE_MIN_N (4,000) on a seed no
stopping rule has seen (no recipe here has one; the default gate seed is 2).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from flowjac.models import morpho_models, quality  # noqa: E402
from flowjac.models.morpho_models import to_grey  # noqa: E402
from flowjac.base import atomic_torch_save, save_json  # noqa: E402
from flowjac.models.recipe_settings import sha256  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("part", choices=sorted(morpho_models.MORPHO_RECIPES))
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--resume", action="store_true",
                   help="continue the work file DIR/.<part>-training.pt")
    p.add_argument("--force", action="store_true",
                   help="replace existing outputs (and, without --resume, the work file)")
    p.add_argument("--chunk", type=int, default=500, help="steps between checkpoints")
    p.add_argument("--n-gate", type=int, default=quality.GATE_MIN_N,
                   help="gate samples (flows; the regressor reads the whole published set)")
    p.add_argument("--gate-seed", type=int, default=morpho_models.GATE_SEED)
    p.add_argument("--device", default="cpu")
    p.add_argument("--progress", action="store_true", help="show training bars")
    p.add_argument("--train-steps", type=int, default=None,
                   help="override the recipe's steps (smoke runs only; recorded)")
    return p


def _refuse(args, outputs, work) -> str | None:
    """Why the command must stop before training, or None."""
    there = [str(p) for p in outputs if p.exists()]
    if there and not args.force:
        return f"{', '.join(there)} exist; pass --force to replace them"
    if work.exists() and not args.resume and not args.force:
        return (f"{work} holds an unfinished or earlier training; pass --resume to "
                "continue it or --force to start afresh")
    if args.chunk < 1 or args.n_gate < 2 or args.gate_seed < 0 or (
            args.train_steps is not None and args.train_steps < 1):
        return "--chunk and --train-steps must be >= 1, --n-gate >= 2 and --gate-seed >= 0"
    return None


def _earlier_seconds(clock: Path, args, works) -> tuple:
    """(seconds, step) of earlier runs of this work file by its clock (written at every
    checkpoint), so that a training spread over several runs reports its whole time;
    (0, None) unless resuming a work file that exists (a clock without one is stale)."""
    if not (args.resume and clock.is_file() and any(w.is_file() for w in works)):
        return 0.0, None
    c = json.loads(clock.read_text())
    return float(c["seconds"]), int(c["step"])


def _save_samples(path: Path, gates: dict) -> None:
    keep = {"samples": torch.from_numpy(to_grey(gates["samples"]))}
    for key in ("t", "i", "digits"):
        if key in gates:
            keep[key] = torch.as_tensor(gates[key])
    atomic_torch_save(path, keep)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    part, out = args.part, args.out
    rec = morpho_models.recipe(part)
    is_flow = isinstance(rec, morpho_models.MorphoFlowRecipe)
    outputs = [out / f"{part}.pt", out / f"{part}.json"] + (
        [out / f"{part}_samples.pt"] if is_flow else [])
    work = out / f".{part}-training.pt"
    why = _refuse(args, outputs, work)
    if why:
        print(f"train_morpho: {why}", file=sys.stderr)
        return 2
    works = (work, out / f".{part}-finetune-training.pt")
    clock = out / f".{part}-clock.json"
    if args.force and not args.resume:
        for w in (*works, clock):
            w.unlink(missing_ok=True)
    before, before_step = _earlier_seconds(clock, args, works)
    t0 = time.perf_counter()

    def report(model, step):        # one line a chunk, for the log of a long run
        spent = time.perf_counter() - t0
        save_json(clock, {"step": step, "seconds": before + spent})
        print(f"{part}: step {step} checkpointed, {spent:.0f} s this run, "
              f"{before + spent:.0f} s in all", flush=True)

    model, record = rec.train(out, device=args.device, chunk=args.chunk,
                              progress=args.progress, resume=True,
                              train_steps=args.train_steps, on_chunk=report)
    # the training time of every run that made this network, not only this one's; a run
    # that found the training finished (it only measures the gates) adds nothing
    trained = before_step is None or record["train_steps"] != before_step
    record["train_seconds_this_run"] = record["train_seconds"] if trained else 0.0
    record["train_seconds"] = before + record["train_seconds_this_run"]
    record["seconds_per_step"] = record["train_seconds"] / max(1, record["train_steps"])
    save_json(clock, {"step": record["train_steps"], "seconds": record["train_seconds"]})
    print(part, json.dumps({k: record[k] for k in ("train_steps", "train_seconds",
                                                    "seconds_per_step", "loss_tail")}),
          flush=True)
    t0 = time.perf_counter()
    if is_flow:
        gates = rec.gates(model, device=args.device, n=args.n_gate, seed=args.gate_seed)
    else:
        gates = rec.gates(model, device=args.device)
    gates["gate_seconds"] = time.perf_counter() - t0
    gates["decides_shipping"] = bool(gates["n"] >= quality.GATE_MIN_N)
    there = [str(p) for p in outputs if p.exists()]
    if there and not args.force:        # written by another run since the start
        print(f"train_morpho: {', '.join(there)} appeared while this run trained; "
              "nothing written (pass --force to replace them)", file=sys.stderr)
        return 2
    if is_flow:
        _save_samples(outputs[2], gates)
    record["gates"] = {k: v for k, v in gates.items()
                       if k not in ("samples", "t", "i", "digits")}
    rec.save(model, outputs[0], step=record["train_steps"])
    record["sha256"] = sha256(outputs[0])     # ties the record's gates to this file
    save_json(outputs[1], json.loads(json.dumps(record, default=float)))
    for row in morpho_models.gate_table(gates):
        low, high = (f"{v:.4g}" if v is not None else "undefined" for v in (row["low"], row["high"]))
        print(f"{row['gate']:>16} {row['value']:.4g} [{low}, {high}] "
              f"{row['limit']:>10}  {row['status']}")
    print(part, "PASSED" if gates["passed"] else "NOT PASSED", f"(n = {gates['n']}, "
          f"seed {args.gate_seed if is_flow else 'none: the published set'})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
