"""The cost of exact JVPs of the shipped flows, as ratios: one direction to one sample, k probes to (1 + k) samples.

For the shipped flowjac ``FlowUNet`` (``pretrained.load("mnist-fives")``)
and torchcfm's ``UNetModelWrapper`` (``pretrained.load("mnist-fives-torchcfm")``),
times in one run (cases interleaved, median of repeats) a sample (the flow
map: ``integrate`` of the flow's velocity under ``torch.no_grad``), the exact
JVP of the flow map along one direction (``flow_jvp``: the velocity's exact
tangents at every stage, the engine's rules of ``flowjac.engine.tangents``
for both networks) and along k probes at once (the primal path computed once
for all k). Prints, as JSON with the hardware, ``exact_jvp_per_sample`` =
exact JVP / sample and ``k_probes_per_1_plus_k_samples`` = k probes /
((1 + k) samples), beside issue 31's targets (2.2 and 1.0), and which
tangent path ran. It also times one sample of the (1 + k) B latents in a
single batch (``joint sample``): k probes carry (1 + k) B images' worth of
activations through every layer, as that batch does, so
``k_probes_per_joint_sample`` is the tangents' own cost and
``joint_sample_per_1_plus_k_samples`` what the larger working set alone
costs on this machine's caches. Ratios only: the absolute times of a shared machine mean
little. Stored as ``results/jvp_cost.json``.

    python benchmarks/jvp_cost.py [--batch 32] [--k 4] [--steps 2]
                                  [--method midpoint] [--repeats 3]
                                  [--threads 1] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
from _timing import bench  # benchmarks/_timing.py

from flowjac.base import hardware, save_json
from flowjac.engine.jvp import flow_jvp, random_probes
from flowjac.engine.ode import integrate
from flowjac.models import pretrained

TARGETS = {"exact_jvp_per_sample": 2.2, "k_probes_per_1_plus_k_samples": 1.0}
#: which tangents ran: a network's forward_jvp, or an adapter's last_path
PATHS = {"forward_jvp": "FlowUNet.forward_jvp: the engine's rules on the network's code",
         "fast": "the adapter's joint_jvp: the engine's rules on the network's code",
         "torch.func": "torch.func.jvp (the adapter fell back)"}
FLOWS = {"flowjac FlowUNet": "mnist-fives",
         "torchcfm UNetModelWrapper": "mnist-fives-torchcfm"}


def measure(name: str, batch: int, k: int, steps: int, method: str,
            repeats: int) -> dict:
    """One shipped flow's ratios, its cases timed interleaved."""
    shipped = pretrained.load(name)
    vel = shipped.velocity
    g = torch.Generator().manual_seed(0)
    z = torch.randn(batch, *shipped.latent_shape, generator=g)
    v1 = random_probes(z, generator=g)
    vk = random_probes(z, k=k, generator=g)
    zk = z.repeat(1 + k, *([1] * (z.ndim - 1)))     # (1 + k) B latents in one batch
    secs = bench({
        "sample": lambda: integrate(vel, z, steps, method=method),
        "exact JVP": lambda: flow_jvp(vel, z, v1, steps, method=method),
        f"exact JVP, k={k} probes": lambda: flow_jvp(vel, z, vk, steps, method=method),
        "joint sample": lambda: integrate(vel, zk, steps, method=method),
    }, repeats)
    base = secs["sample"]
    return {
        "shipped": name, "network": type(shipped.flow).__name__,
        "parameters": sum(p.numel() for p in shipped.flow.parameters()),
        "tangent_path": PATHS[getattr(vel, "last_path", "forward_jvp")],
        "sample_seconds": round(base, 4),
        "exact_jvp_per_sample": round(secs["exact JVP"] / base, 2),
        "k_probes_per_sample": round(secs[f"exact JVP, k={k} probes"] / base, 2),
        "k_probes_per_1_plus_k_samples": round(
            secs[f"exact JVP, k={k} probes"] / ((1 + k) * base), 2),
        # the same work in one batch of (1 + k) B latents: how much of the
        # gap to (1 + k) samples is the larger working set, not the tangents
        "joint_sample_per_1_plus_k_samples": round(
            secs["joint sample"] / ((1 + k) * base), 2),
        "k_probes_per_joint_sample": round(
            secs[f"exact JVP, k={k} probes"] / secs["joint sample"], 2),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--method", default="midpoint")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is stable on a shared machine)")
    p.add_argument("--only", default=None, help="only the flows whose name holds this text")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"batch": args.batch, "k": args.k, "steps": args.steps,
              "method": args.method, "repeats": args.repeats,
              "threads": args.threads, "dtype": "float32", "targets": TARGETS,
              "hardware": hardware(), "flows": {}}
    with torch.no_grad():
        for label, name in FLOWS.items():
            if args.only and args.only not in label:
                continue
            result["flows"][label] = measure(name, args.batch, args.k, args.steps,
                                             args.method, args.repeats)
            print(f"done: {label}", file=sys.stderr)
    for row in result["flows"].values():
        row["within_targets"] = {key: row[key] <= limit for key, limit in TARGETS.items()}
    print(json.dumps(result, indent=2))
    if args.out:
        save_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
