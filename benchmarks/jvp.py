"""Cost of JVP estimators of the flow map, as ratios to a plain sample.

For an MLPFlow and a small FlowUNet, times (in one run, interleaved, median
of repeats) a plain sample (``integrate`` under ``torch.no_grad``), the exact
JVP (``flow_jvp``: the engine's tangent rules, and ``jvp_mode="func"``:
``torch.func.jvp`` per stage), ``torch.func.jvp`` through the whole solver,
forward and central finite differences (``fd_jvp``) and k-probe exact JVPs,
and prints every time divided by the sample's as JSON. Ratios only: the
absolute times of a shared machine mean little. See "JVP diagnostics".

    python benchmarks/jvp.py [--steps 4] [--repeats 3] [--threads 1]
                             [--unet-channels 16] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
from _timing import bench  # benchmarks/_timing.py

from flowjac.engine.jvp import fd_jvp, flow_jvp, random_probes, reference_jvp
from flowjac.engine.ode import integrate
from flowjac.engine.velocity import velocity_fn
from flowjac.models.nets import FlowUNet, MLPFlow
from flowjac.utils import hardware


def model_cases(model, x0, steps, k, with_reference):
    vel = velocity_fn(model)
    g = torch.Generator().manual_seed(0)
    v = random_probes(x0, generator=g)
    vk = random_probes(x0, k=k, generator=g)
    cases = {
        "sample": lambda: integrate(vel, x0, steps),
        "exact JVP": lambda: flow_jvp(vel, x0, v, steps),
        "exact JVP, torch.func per stage": lambda: flow_jvp(
            vel, x0, v, steps, jvp_mode="func"),
        "forward FD": lambda: fd_jvp(vel, x0, v, 1e-3, steps),
        "central FD": lambda: fd_jvp(vel, x0, v, 1e-3, steps,
                                     scheme="central"),
        f"exact JVP, k={k} probes": lambda: flow_jvp(vel, x0, vk, steps),
        f"exact JVP, {k} separate calls": lambda: [
            flow_jvp(vel, x0, vk[:, j], steps) for j in range(k)],
    }
    if with_reference:
        cases["torch.func.jvp through the solver"] = lambda: reference_jvp(
            vel, x0, v, steps)
    return cases


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is stable on a shared machine)")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--mlp-batch", type=int, default=512)
    p.add_argument("--unet-batch", type=int, default=4)
    p.add_argument("--unet-channels", type=int, default=16)
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {
        "MLPFlow(2, hidden=128, depth=3)": (
            MLPFlow(2, hidden=128, depth=3), torch.randn(args.mlp_batch, 2)),
        f"FlowUNet(base_channels={args.unet_channels}, "
        f"channel_mult=(1, 2, 2), time_dim=64)": (
            FlowUNet(1, base_channels=args.unet_channels,
                     channel_mult=(1, 2, 2), time_dim=64),
            torch.rand(args.unet_batch, 1, 28, 28)),
    }
    result = {"steps": args.steps, "method": "rk4", "k": args.k,
              "repeats": args.repeats, "threads": args.threads,
              "hardware": hardware(), "dtype": "float32", "models": {}}
    with torch.no_grad():
        for name, (model, x0) in models.items():
            model.eval()
            secs = bench(model_cases(model, x0, args.steps, args.k, True),
                         args.repeats)
            base = secs["sample"]
            result["models"][name] = {
                "batch": x0.shape[0],
                "sample_seconds": round(base, 4),
                "ratio_to_sample": {n: round(s / base, 2)
                                    for n, s in secs.items()}}
            print(f"done: {name}", file=sys.stderr)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        from flowjac.utils import save_json
        save_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
