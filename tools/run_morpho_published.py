"""The stored run of the Morpho chapter's readouts: every published test digit read three ways.

    OMP_NUM_THREADS=1 python tools/run_morpho_published.py \\
        [--out results/morpho_readings.pt] [--root DIR] [--force]

Reads the 10,000 digits of the published DSCM Morpho-MNIST test set
(``morpho.load_published``; by default ``../shared/morpho-mnist-dscm``) with
the measurement, the shipped readout and the shipped regressor alone
(``flowjac.pipelines.morpho_published``) and writes, atomically, the
per-digit ``predictions`` (not the labels: the project does not ship the
set), their ``summaries`` against the labels and ``meta``: the set's
source, n, seconds, hardware and the shipped regressor's sha256. An
existing output is replaced only with ``--force``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from flowjac.base import atomic_torch_save, hardware, repo_root  # noqa: E402
from flowjac.data import morpho  # noqa: E402
from flowjac.models import morpho_models, pretrained  # noqa: E402
from flowjac.pipelines import morpho_published as mp  # noqa: E402


def run(out, root=None, force: bool = False, n: int | None = None) -> dict:
    """Read the published set (its first n digits; all by default) and store the result in ``out``."""
    out = Path(out)
    if out.exists() and not force:
        raise SystemExit(f"{out} exists; pass --force to replace it")
    data = morpho.load_published(root)
    k = len(data) if n is None else min(int(n), len(data))
    readout = morpho_models.load_readout()
    t0 = time.perf_counter()
    pred = mp.predictions(data.images[:k], readout)
    seconds = time.perf_counter() - t0
    result = {"predictions": {name: {key: torch.from_numpy(v.astype("float64"))
                                     for key, v in p.items()} for name, p in pred.items()},
              "summaries": mp.summaries(pred, data.t[:k], data.i[:k]),
              "meta": dict(data=data.source, n=k, seconds=seconds, hardware=hardware(),
                           regressor_sha256=pretrained.manifest()["morpho-regressor"]["sha256"])}
    atomic_torch_save(out, result)
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=repo_root() / "results" / "morpho_readings.pt")
    ap.add_argument("--root", type=Path, default=None,
                    help="the published test set's folder (default ../shared/morpho-mnist-dscm)")
    ap.add_argument("--force", action="store_true", help="replace an existing --out")
    args = ap.parse_args(argv)
    result = run(args.out, args.root, args.force)
    print(mp.table(result["summaries"]).to_string())
    print(f"wrote {args.out} ({result['meta']['seconds']:.0f} s for {result['meta']['n']:,} digits)")


if __name__ == "__main__":
    main()
