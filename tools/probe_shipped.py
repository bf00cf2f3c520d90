"""Probe the shipped models at the paper's N and store the raw tensors under results/.

    python tools/probe_shipped.py --device cuda --out DIR [--n 10000]

Writes ``DIR/attributes_probes.pt`` (the SCM flow read by its classifier:
outputs, JVPs, pair JVPs for the covariance identity, true gradient norms,
the paper's one-direction change, and plain samples' logits at equal
compute) and ``DIR/mnist_probes.pt`` (the flow of fives read on the 6x6
patch of the MNIST chapter), each with a ``meta`` dict naming the hardware.
``--only mnist-torchcfm`` writes ``DIR/mnist_torchcfm_probes.pt``: the flow
of fives trained with torchcfm's own code, on the same patch (its flow lives
in [-1, 1], the readout maps it to pixels), latents and probes (float32:
torchcfm's UNet computes its time embedding in float32).
Runs in float64 by default (``--dtype float32`` for speed; TF32 is off either way).
Every batch is written to ``DIR/.<model>-probe.partial`` and
``DIR/.<model>-plain.partial``: an interrupted run, started again with the
same arguments, continues where it stopped and ends with the same tensors;
the partial files are removed when the result is written.
The chapters load these files and compute every number from them.
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
from flowjac.pipelines.patch_study import Patch  # noqa: E402
from flowjac.base import atomic_torch_save, hardware  # noqa: E402


def run(name, readout_of, k, n, n_plain, device, batch, grad_outputs,
        dtype, weights_dir, out_dir, grad_batch=250):
    pre = pretrained.load({"mnist": "mnist-fives"}.get(name, name),
                          device=device, weights_dir=weights_dir)
    pre.flow.to(dtype)
    readout = readout_of().to(device, dtype)
    smp = pre.sampler
    t0 = time.perf_counter()
    res = probing.probe(pre.velocity, readout, pre.latent_shape, n, k=k,
                        steps=smp["steps"], method=smp["method"], seed=0,
                        device=device, dtype=dtype, batch_size=batch,
                        grad_outputs=grad_outputs, grad_batch=grad_batch,
                        progress=True,
                        partial_path=out_dir / f".{name}-probe.partial")
    res["meta"]["total_seconds"] = time.perf_counter() - t0
    plain, secs = probing.plain_outputs(pre.velocity, readout, pre.latent_shape,
                                        n_plain, steps=smp["steps"],
                                        method=smp["method"], seed=1,
                                        device=device, dtype=dtype,
                                        batch_size=2 * batch,
                                        partial_path=out_dir / f".{name}-plain.partial")
    res["plain"] = plain
    res["meta"].update(plain_n=n_plain, plain_seconds=secs, model=name,
                       hardware=hardware(), sampler=smp,
                       cuda=torch.version.cuda)
    print(name, {k_: v for k_, v in res["meta"].items() if k_ != "hardware"},
          flush=True)
    return res


def done(out_dir, name):
    """Remove the run's own partial files once its result is written."""
    for what in ("probe", "plain"):
        (out_dir / f".{name}-{what}.partial").unlink(missing_ok=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--only", choices=("scm", "mnist", "mnist-torchcfm"), default=None)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--grad-batch", type=int, default=250,
                    help="latents per backward pass of the gradient norms (their memory "
                         "grows with it: on a CPU with 24 GiB, 250 SCM latents with RK4 "
                         "10 steps do not fit; 20 do); the results do not depend on it")
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    ap.add_argument("--weights-dir", type=Path, default=None)
    args = ap.parse_args(argv)
    # exact float32 arithmetic on a GPU: no TF32 in the probes
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dtype = getattr(torch, args.dtype)
    wd = args.weights_dir
    args.out.mkdir(parents=True, exist_ok=True)
    if args.only in (None, "scm"):
        pre = pretrained.load("scm", weights_dir=wd)
        k = args.k
        res = run("scm", lambda: pre.classifier, k, args.n,
                  args.n * (1 + k), args.device, args.batch,
                  [pre.attr_names.index(a) for a in ("C_warm", "Z_framed", "M_marker")],
                  dtype, wd, args.out, grad_batch=args.grad_batch)
        atomic_torch_save(args.out / "attributes_probes.pt", res)
        done(args.out, "scm")
    if args.only in (None, "mnist"):
        k = args.k
        res = run("mnist", lambda: Patch(), k, args.n,
                  2 * args.n * (1 + k), args.device, args.batch, (), dtype, wd,
                  args.out)
        res["plain"] = res["plain"].half()
        atomic_torch_save(args.out / "mnist_probes.pt", res)
        done(args.out, "mnist")
    if args.only == "mnist-torchcfm":
        k = args.k
        vr = pretrained.value_range_of("mnist-fives-torchcfm")    # [-1, 1]: pixels (x + 1) / 2
        res = run("mnist-fives-torchcfm", lambda: Patch(vr), k, args.n,
                  2 * args.n * (1 + k), args.device, args.batch, (), torch.float32, wd,
                  args.out)
        res["plain"] = res["plain"].half()
        atomic_torch_save(args.out / "mnist_torchcfm_probes.pt", res)
        done(args.out, "mnist-fives-torchcfm")


if __name__ == "__main__":
    main()
