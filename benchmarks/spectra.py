"""Cost of spectra, divergences and log-likelihoods, as ratios to a plain sample.

For an MLPFlow and a FlowUNet (the shipped "mnist-fives" flow by default),
times (in one run, interleaved, median of repeats) a plain sample
(``integrate`` under ``torch.no_grad``), one exact JVP (``flow_jvp``) and
one VJP (reverse mode through ``integrate``) of the flow map, the top-r
spectrum (``flow_spectrum``), the squared Frobenius norm by plain probes
and by Hutch++ at equal numbers of products, and the log-likelihood
(``log_likelihood``) with the exact divergence (d JVPs per stage) and with
Hutchinson and Hutch++ estimates, and prints every time divided by the
sample's as JSON. Ratios only: the absolute times of a shared machine mean
little. See "The Jacobian of the flow map: spectra and volumes".

    python benchmarks/spectra.py [--steps 2] [--repeats 3] [--threads 1]
                                 [--r 4] [--unet shipped|small] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
from _timing import bench  # benchmarks/_timing.py

from flowjac.engine.jvp import flow_jvp, random_probes
from flowjac.engine.ode import integrate
from flowjac.engine.velocity import velocity_fn
from flowjac.estimators import spectra
from flowjac.models.nets import FlowUNet, MLPFlow
from flowjac.utils import hardware


def vjp_once(vel, x0, steps, method, u):
    with torch.enable_grad():
        z = x0.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(integrate(vel, z, steps, method), z, u)
    return g


def model_cases(vel, x0, args, with_exact=True):
    steps, method, r, k, kf = args.steps, args.method, args.r, args.k, args.k_frob
    g = torch.Generator().manual_seed(0)
    v = random_probes(x0, generator=g)
    ks = dict(steps=steps, method=method)
    cases = {
        "sample": lambda: integrate(vel, x0, steps, method),
        "JVP, 1 probe": lambda: flow_jvp(vel, x0, v, steps, method),
        "VJP, 1 cotangent": lambda: vjp_once(vel, x0, steps, method, v),
        f"spectrum top-{r}, oversample {args.oversample}, passes {args.passes}":
            lambda: spectra.flow_spectrum(vel, x0, r, passes=args.passes,
                                          oversample=args.oversample,
                                          generator=g, **ks),
        f"||J||_F^2, Hutchinson, k={kf}": lambda: spectra.flow_frobenius_sq(
            vel, x0, kf, generator=g, **ks),
        f"||J||_F^2, Hutch++, k={kf}": lambda: spectra.flow_frobenius_sq(
            vel, x0, kf, estimator="hutch++", generator=g, **ks),
        "log-likelihood, Hutchinson, k=1": lambda: spectra.log_likelihood(
            vel, x0, divergence="hutchinson", kind="rademacher", generator=g,
            **ks),
        f"log-likelihood, Hutch++, k={k}": lambda: spectra.log_likelihood(
            vel, x0, divergence="hutch++", k=k, generator=g, **ks),
    }
    if with_exact:
        d = x0[0].numel()
        cases[f"log-likelihood, exact divergence (d={d} JVPs)"] = \
            lambda: spectra.log_likelihood(vel, x0, **ks)
    return cases


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--method", default="midpoint")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is stable on a shared machine)")
    p.add_argument("--r", type=int, default=4)
    p.add_argument("--oversample", type=int, default=4)
    p.add_argument("--passes", type=int, default=1)
    p.add_argument("--k", type=int, default=3,
                   help="products per stochastic divergence (a multiple of 3)")
    p.add_argument("--k-frob", type=int, default=4,
                   help="products per ||J||_F^2 estimate (a multiple of 4)")
    p.add_argument("--mlp-dim", type=int, default=16)
    p.add_argument("--mlp-batch", type=int, default=256)
    p.add_argument("--unet", choices=["shipped", "small"], default="shipped",
                   help="the shipped mnist-fives FlowUNet, or a small fresh one")
    p.add_argument("--unet-channels", type=int, default=8,
                   help="base channels of the small FlowUNet")
    p.add_argument("--unet-batch", type=int, default=1)
    p.add_argument("--no-unet-exact", action="store_true",
                   help="skip the UNet's exact divergence (784 JVPs a stage)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    mlp = MLPFlow(args.mlp_dim, hidden=128, depth=3).eval()
    if args.unet == "shipped":
        from flowjac.models import pretrained
        unet = pretrained.load("mnist-fives").flow
        unet_name = "FlowUNet, shipped mnist-fives (base_channels=32)"
    else:
        unet = FlowUNet(1, base_channels=args.unet_channels,
                        channel_mult=(1, 2, 2), time_dim=64).eval()
        unet_name = f"FlowUNet(base_channels={args.unet_channels})"
    models = {
        f"MLPFlow({args.mlp_dim}, hidden=128, depth=3)": (
            mlp, torch.randn(args.mlp_batch, args.mlp_dim), True),
        unet_name: (unet, torch.rand(args.unet_batch, 1, 28, 28),
                    not args.no_unet_exact),
    }
    result = {"steps": args.steps, "method": args.method, "r": args.r,
              "oversample": args.oversample, "passes": args.passes,
              "k": args.k, "k_frob": args.k_frob, "repeats": args.repeats, "threads": args.threads,
              "hardware": hardware(), "dtype": "float32", "models": {}}
    for name, (model, x0, exact) in models.items():
        model.requires_grad_(False)
        vel = velocity_fn(model)
        secs = bench(model_cases(vel, x0, args, exact), args.repeats)
        base = secs["sample"]
        result["models"][name] = {
            "batch": x0.shape[0],
            "sample_seconds": round(base, 4),
            "ratio_to_sample": {n: round(s / base, 2) for n, s in secs.items()}}
        print(f"done: {name}", file=sys.stderr)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        from flowjac.utils import save_json
        save_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
