"""The stored run of the hybrid sampler (book/empirical.md): u* on [0, tau], then the flow of fives or a null, on a dense grid of tau.

    python tools/run_hybrid.py --out results/hybrid_run.pt [--n 500] [--device cpu]

Everything that decides the chapter's verdict is fixed in
``flowjac.pipelines.hybrid.HYBRID_STUDY`` before the run: the grid of
tau (spacing 0.05 on [0, 1]), the number of latents per tau (500, the same
latents at every tau), the pairs for u*'s collapse time (1,000 per t) and
the rule with its bootstrap (applied by
``flowjac.pipelines.hybrid.hybrid_verdict``); the solver is the flow's
own (midpoint, steps of at most 0.1) with the switch exactly at tau, and
the continuations are the shipped flow of fives, the Gaussian null and the
stop null. The file keeps, per sample, the distances that the chapter
turns into bands, and a ``meta`` dict (the design, seconds, hardware, the
weights' sha256).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from flowjac.closedform import empirical  # noqa: E402
from flowjac.models import pretrained  # noqa: E402
from flowjac.pipelines import hybrid  # noqa: E402
from flowjac.base import atomic_torch_save, hardware  # noqa: E402

DESIGN = hybrid.HYBRID_STUDY


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=DESIGN["n"])
    ap.add_argument("--n-pairs", type=int, default=DESIGN["n_pairs"])
    ap.add_argument("--seed", type=int, default=DESIGN["seed"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--taus", default=None,
                    help="comma-separated grid (a smoke test; the study uses the design's)")
    args = ap.parse_args(argv)
    taus = list(DESIGN["taus"]) if args.taus is None else [float(v) for v in args.taus.split(",")]
    fives = pretrained.load("mnist-fives", device=args.device)
    tr5 = pretrained.training_data("mnist-fives")[0].to(args.device)
    te5 = pretrained.training_data("mnist-fives", "test")[0].to(args.device)
    sampler = dict(fives.sampler)
    conts = {"network": fives.velocity,
             "Gaussian": empirical.gaussian_velocity(tr5),
             "stop": lambda x, t: torch.zeros_like(x)}
    x0 = torch.randn(args.n, *fives.latent_shape,
                     generator=torch.Generator().manual_seed(args.seed)).to(args.device)
    seconds = {}
    t0 = time.perf_counter()
    with torch.no_grad():
        study = hybrid.hybrid_study(conts, x0, tr5, te5, taus, sampler["steps"],
                                    method=sampler["method"],
                                    exact_tau=DESIGN["exact_tau"], keep=DESIGN["keep"])
    seconds["hybrid"] = time.perf_counter() - t0
    print(f"hybrid: {len(taus)} taus x {args.n} latents in {seconds['hybrid']:.0f} s",
          flush=True)
    t0 = time.perf_counter()
    t_pairs = [tq for tq in taus if tq < 1.0]
    lam = empirical.target_cosines(tr5, t_pairs, args.n_pairs,
                                   torch.Generator().manual_seed(args.seed + 1))[1]
    seconds["collapse"] = time.perf_counter() - t0
    study["collapse_taus"] = t_pairs
    study["collapse_weight"] = torch.stack(lam).float()
    study["meta"] = dict(taus=taus, n=args.n, n_pairs=args.n_pairs, seed=args.seed,
                         latent="torch.randn(n, 1, 28, 28) from a generator seeded "
                                "with seed; the collapse pairs from seed + 1",
                         sampler=sampler, exact_tau=DESIGN["exact_tau"], keep=DESIGN["keep"],
                         rule=DESIGN["rule"],
                         seconds=seconds, hardware=hardware(),
                         torch_threads=torch.get_num_threads(),
                         weights_sha256=fives.manifest["mnist-fives"]["sha256"])
    atomic_torch_save(args.out, study)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
