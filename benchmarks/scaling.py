"""Probing on 1 and 2 CPU processes (torchrun, gloo): the speed-up and the agreement, measured in one run.

Saves a FlowUNet with random weights (the cost of a solve does not depend on
training), then runs ``torchrun --standalone --nproc_per_node=P -m flowjac
-- probe ...`` for P = 1 and 2, interleaved, ``--repeats`` times each, and
prints as JSON the median seconds of the solves (the probe's own
``seconds.solves``: the slowest rank's loop, without start-up) and of the
whole command, their ratios 1-process / 2-process (the speed-up; 2 is
perfect), and the largest absolute difference between the two runs'
estimates (sharded probing is exact up to float round-off). Ratios only: on
a shared machine the absolute times mean little, and 2 processes need 2
free cores to approach 2. See "Running at scale".

    python benchmarks/scaling.py [--n 64] [--k 2] [--batch-size 16]
        [--size 16] [--base-channels 16] [--steps 4] [--repeats 3]
        [--threads 1] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from flowjac.cli import flow_config
from flowjac.engine.checkpoints import save_checkpoint
from flowjac.models.nets import FlowUNet
from flowjac.utils import hardware, repo_root, save_json


def estimates(res: dict) -> torch.Tensor:
    """Every estimate of a probe JSON, flattened (None as NaN)."""
    parts = [res["second_moment"], res["mean_output"]]
    for key in sorted(res.get("covariance") or {}):
        parts.append(res["covariance"][key])
    text = json.dumps(parts).replace("null", "NaN")
    flat = []

    def walk(x):
        if isinstance(x, list):
            for y in x:
                walk(y)
        else:
            flat.append(x)
    walk(json.loads(text))
    return torch.tensor(flat, dtype=torch.float64)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=64, help="latents")
    p.add_argument("--k", type=int, default=2, help="probes per latent")
    p.add_argument("--batch-size", type=int, default=16,
                   help="latents per batch (the unit of sharding)")
    p.add_argument("--size", type=int, default=16, help="image side (SCM-like, 3 channels)")
    p.add_argument("--base-channels", type=int, default=16)
    p.add_argument("--steps", type=int, default=4, help="solver steps")
    p.add_argument("--estimator", choices=("moment", "covariance"),
                   default="moment")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process (OMP_NUM_THREADS)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if -(-args.n // args.batch_size) < 2:
        p.error("--n must span at least 2 batches of --batch-size, so that "
                "each of 2 processes has work")

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    env["PYTHONPATH"] = os.pathsep.join(
        [str(repo_root())] + [x for x in [env.get("PYTHONPATH")] if x])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        net = flow_config("scm", args.size, args.base_channels)
        model = FlowUNet(**dict(net, channel_mult=tuple(net["channel_mult"])))
        save_checkpoint(tmp / "flow.pt", model)
        times = {1: {"solves": [], "wall": []}, 2: {"solves": [], "wall": []}}
        results = {}
        for rep in range(args.repeats):
            for procs in (1, 2):
                out = tmp / f"p{procs}_{rep}.json"
                cmd = [sys.executable, "-m", "torch.distributed.run",
                       "--standalone", f"--nproc_per_node={procs}", "-m",
                       "flowjac", "--", "probe", "--checkpoint",
                       str(tmp / "flow.pt"), "--patch", "0", "0", "4",
                       "--n", str(args.n), "--k", str(args.k),
                       "--batch-size", str(args.batch_size), "--steps",
                       str(args.steps), "--estimator", args.estimator,
                       "--device", "cpu", "--seed", "0", "--no-progress",
                       "--out", str(out)]
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True,
                                      env=env)
                wall = time.perf_counter() - t0
                if proc.returncode:
                    sys.exit(f"probing on {procs} process(es) failed:\n"
                             + proc.stderr[-3000:])
                res = json.loads(out.read_text())
                times[procs]["solves"].append(res["seconds"]["solves"])
                times[procs]["wall"].append(wall)
                results[procs] = res
    med = {procs: {key: statistics.median(v) for key, v in t.items()}
           for procs, t in times.items()}
    diff = (estimates(results[1]) - estimates(results[2])).nan_to_num().abs()
    result = {
        "settings": dict(n=args.n, k=args.k, batch_size=args.batch_size,
                         size=args.size, base_channels=args.base_channels,
                         steps=args.steps, estimator=args.estimator,
                         repeats=args.repeats, threads_per_process=args.threads,
                         outputs=results[1]["p"]),
        "median_seconds": {f"{procs} process(es)": m for procs, m in med.items()},
        "speedup_2_over_1": {key: med[1][key] / med[2][key]
                             for key in ("solves", "wall")},
        "max_abs_diff_1_vs_2": float(diff.max()),
        "hardware": hardware(),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        save_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
