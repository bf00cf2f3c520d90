"""Probe the flows of the training-set-size study on the MNIST patch and store one run per flow.

    python tools/size_study.py --out DIR NAME=CHECKPOINT [NAME=CHECKPOINT ...]
        [--n 1000] [--k 2] [--n-fd 320] [--batch 500]
    python tools/size_study.py --out DIR fives-400=stored     # the shipped flow of fives

For each flow (a flowjac checkpoint, opened through ``adapters.open_flow``
with its recipe's sampler) it stores ``DIR/size_<NAME>.pt``: the patch
pixels and exact JVPs of N latents and their partners (``probing.probe``,
seed 0, float32, k probes), 6N plain samples' patch pixels at equal compute
(seed 1), and the paper's own estimator (``patch_study.paper_fd``: float32
forward difference, eps 1e-3, Euler 99 steps) on the first ``n_fd``
latents along their first probe. ``fives-400=stored`` takes the shipped
flow of fives' stored run (``results/mnist_probes.pt``, N = 10,000 drawn
with the same seed and batches): its first N pairs and 6N plain samples,
and computes the forward differences at the same latents.
Every probe batch goes to ``DIR/.<NAME>-<SHA>-probe.partial`` (and plain
samples to ``.<NAME>-<SHA>-plain.partial``; SHA the first 12 hex digits of the
checkpoint's sha256, so that another checkpoint under the same name never
resumes them): an interrupted run started again with the
same arguments continues where it stopped. An existing output is kept
(the flow is skipped) unless ``--force``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from flowjac.engine import probing  # noqa: E402
from flowjac.models import pretrained  # noqa: E402
from flowjac.models.adapters import open_flow  # noqa: E402
from flowjac.pipelines import patch_study  # noqa: E402
from flowjac.base import atomic_torch_save, hardware, repo_root  # noqa: E402


def stored_run(n):
    """The shipped flow of fives' stored probe run, cut to its first n pairs."""
    p = torch.load(repo_root() / "results" / "mnist_probes.pt", map_location="cpu",
                   weights_only=True)
    meta = dict(p["meta"])
    if n > meta["n"]:
        raise SystemExit(f"--n {n} is more than the stored run's {meta['n']} pairs")
    per_pair = meta["plain_n"] // meta["n"]
    # clones: a slice saved as it is would carry the whole stored run's storage
    res = {k: v[:n].clone() for k, v in p.items() if torch.is_tensor(v) and k != "plain"}
    res["plain"] = p["plain"][:per_pair * n].clone()
    # n stays the run's own: probing.redraw draws the latents from it
    meta.update(cut_to=n, cut_from=meta["n"], plain_n=per_pair * n,
                plain_cut_from=meta["plain_n"])
    res["meta"] = meta
    return res


def probe_flow(name, flow, n, k, batch, out_dir):
    smp = {k_: flow.sampler[k_] for k_ in ("method", "steps")}
    readout = patch_study.Patch(flow.value_range)
    t0 = time.perf_counter()
    res = probing.probe(flow.velocity, readout, flow.latent_shape, n, k=k, seed=0,
                        dtype=torch.float32, batch_size=batch, progress=True,
                        partial_path=out_dir / f".{name}-probe.partial", **smp)
    res["meta"]["total_seconds"] = time.perf_counter() - t0
    n_plain = 2 * n * (1 + k)
    plain, secs = probing.plain_outputs(flow.velocity, readout, flow.latent_shape, n_plain,
                                        seed=1, dtype=torch.float32, batch_size=2 * batch,
                                        partial_path=out_dir / f".{name}-plain.partial",
                                        **smp)
    res["plain"] = plain
    res["meta"].update(plain_n=n_plain, plain_seconds=secs, sampler=smp)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("flows", nargs="+", metavar="NAME=CHECKPOINT")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--n-fd", type=int, default=320)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    for name, v in (("--n", args.n), ("--k", args.k), ("--n-fd", args.n_fd),
                    ("--batch", args.batch)):
        if v < 1:
            ap.error(f"{name} must be a positive integer, got {v}")
    if args.n_fd > args.n:
        ap.error(f"--n-fd ({args.n_fd}) must be at most --n ({args.n})")
    flows = []
    for item in args.flows:
        name, sep, src = item.partition("=")
        if not sep or not name.replace("-", "").isalnum():
            ap.error(f"each flow is NAME=CHECKPOINT (NAME letters, digits and -), got {item!r}")
        if src != "stored" and not Path(src).is_file():
            ap.error(f"{name}: no checkpoint file {src!r}")
        flows.append((name, src))
    args.out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    for name, src in flows:
        out = args.out / f"size_{name}.pt"
        if out.exists() and not args.force:
            print(f"{name}: {out} exists, kept (--force to redo)", flush=True)
            continue
        if src == "stored":
            flow = open_flow("mnist-fives")
            res = stored_run(args.n)
            source = dict(kind="stored", file="results/mnist_probes.pt",
                          sha256=pretrained.manifest()["mnist-fives"]["sha256"])
        else:
            flow = open_flow(src)
            sha = pretrained.sha256(src)
            res = probe_flow(f"{name}-{sha[:12]}", flow, args.n, args.k, args.batch,
                             args.out)
            source = dict(kind="checkpoint", file=Path(src).name, sha256=sha)
        meta = res["meta"]
        z, v, _ = probing.redraw(meta, flow.latent_shape, range(args.n_fd))
        t0 = time.perf_counter()
        res["fd"] = patch_study.paper_fd(flow.velocity, patch_study.Patch(flow.value_range),
                                         z, v[:, 0], batch_size=min(args.batch, 100)).float()
        meta.update(fd_seconds=time.perf_counter() - t0, fd_n=args.n_fd,
                    fd=dict(patch_study.PAPER_FD, dtype="float32"), flow=name,
                    source=source, hardware=hardware())
        res["plain"] = res["plain"].half()
        atomic_torch_save(out, res)
        for what in ("probe", "plain"):
            (args.out / f".{name}-{source['sha256'][:12]}-{what}.partial").unlink(
                missing_ok=True)
        print(name, {k: meta[k] for k in ("n", "k", "fd_n", "fd_seconds") if k in meta},
              flush=True)


if __name__ == "__main__":
    main()
