"""The stored run of "Interventions and counterfactuals": its three studies at sizes too slow for the quick profile.

    python tools/run_interventions.py --out results/interventions_run.pt \
        [--n-images 600] [--n-cf 48] [--n-latent 24] [--device cpu]

Loads the shipped label-conditional flow and classifier, runs
``flowjac.pipelines.interventions_study.seeing_doing``, ``counterfactuals``
and ``label_free`` with the chapter's seeds and sampler (the recipe's
method and steps, no guidance), and writes one file with their tensors and a
``meta`` dict (sizes, seed, sampler, seconds per study, hardware). The
chapter's quick profile loads it and recomputes a few images live.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from flowjac.causal.scm import default_scm  # noqa: E402
from flowjac.models import pretrained  # noqa: E402
from flowjac.pipelines import interventions_study as study  # noqa: E402
from flowjac.base import atomic_torch_save, hardware  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n-images", type=int, default=600)
    ap.add_argument("--n-cf", type=int, default=48)
    ap.add_argument("--n-latent", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    cond = pretrained.load("scm-conditional", device=args.device)
    smp = dict(cond.sampler, guidance=1.0)
    scm = default_scm()
    res, seconds = {}, {}
    for name, fn, n in (("seeing_doing", study.seeing_doing, args.n_images),
                        ("counterfactuals", study.counterfactuals, args.n_cf),
                        ("label_free", study.label_free, args.n_latent)):
        t0 = time.perf_counter()
        res[name] = fn(cond.velocity, cond.classifier, scm, n, seed=args.seed,
                       sampler=smp, device=args.device)
        seconds[name] = time.perf_counter() - t0
        print(f"{name}: n = {n} in {seconds[name]:.0f} s", flush=True)
    res["meta"] = dict(n_images=args.n_images, n_cf=args.n_cf, n_latent=args.n_latent,
                       seed=args.seed, sampler=smp, seconds=seconds, hardware=hardware(),
                       torch_threads=torch.get_num_threads(),
                       weights_sha256=cond.manifest["scm-conditional"]["sha256"])
    atomic_torch_save(args.out, res)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
