"""The stored run of the CFM-against-EFM memorisation study (book/empirical.md): small training sets, three widths, five seeds.

    python tools/run_memorisation.py --out results/memorisation_run.pt [--device cpu] [--resume]
    python tools/run_memorisation.py --out PART --sizes 50      # one part of it
    python tools/run_memorisation.py --out results/memorisation_run.pt --merge PART

Everything that decides the chapter's verdict is fixed in
``flowjac.engine.small_flows.COPY_STUDY`` before the run: training sets of
20 and 50 two-moons points, MLPs of widths 32, 128 and 512 (depth 3),
seeds 0 to 4 (the network's initialisation and the minibatches, shared by
CFM and EFM), 8,000 Adam steps at batch 256 and learning rate 2e-3, 1,000
samples from the same latents (RK4, 50 steps), 2,000 held-out and 1,000
fresh points, and the memorisation criterion
(``flowjac.engine.small_flows.memorises``) read by
``flowjac.engine.small_flows.copy_verdict``. The training length was set
from a pilot on seed 100 (its own training set, network and minibatches,
none of the study's) at 4,000 steps, in which the widest networks on 20
points came near the criterion: the study doubles it so that a network
can copy. The file keeps every flow's samples and memorisation measures,
the references (fresh points and u*'s samples) and ``meta`` (the design,
seconds, hardware); it is written after every flow, and ``--resume``
skips the flows already in it; ``--sizes`` runs one part (two processes
on two cores) and ``--merge`` adds a part's flows to ``--out``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from flowjac.closedform import empirical  # noqa: E402
from flowjac.engine import empirical_flow, small_flows  # noqa: E402
from flowjac.models.nets import MLPFlow  # noqa: E402
from flowjac.base import atomic_torch_save, hardware  # noqa: E402

DESIGN = small_flows.COPY_STUDY


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--train-steps", type=int, default=DESIGN["train_steps"],
                    help="a smoke test only; the study uses COPY_STUDY's")
    ap.add_argument("--sizes", default=None,
                    help="comma-separated training-set sizes of the design to run")
    ap.add_argument("--merge", type=Path, default=None,
                    help="a part written with --sizes: add its flows to --out")
    args = ap.parse_args(argv)
    n_runs = len(DESIGN["sizes"]) * len(DESIGN["widths"]) * len(DESIGN["seeds"]) * 2
    if args.merge is not None:
        res = torch.load(args.out, weights_only=True)
        part = torch.load(args.merge, weights_only=True)
        if part["meta"]["train_steps"] != res["meta"]["train_steps"]:
            raise SystemExit("the part was trained for another number of steps")
        res["runs"].update(part["runs"])
        res["meta"].update(seconds=sum(r["seconds"] for r in res["runs"].values()),
                           complete=len(res["runs"]) == n_runs)
        atomic_torch_save(args.out, res)
        print(f"merged {len(part['runs'])} flows: {len(res['runs'])} of {n_runs}")
        return
    sizes = (DESIGN["sizes"] if args.sizes is None
             else [int(v) for v in args.sizes.split(",")])
    if not set(sizes) <= set(DESIGN["sizes"]):
        raise SystemExit(f"--sizes must be among {DESIGN['sizes']}")
    rule = DESIGN["rule"]
    train, held, fresh, z = small_flows.study_data(DESIGN)
    res = {"runs": {}, "refs": {}}
    if args.resume and args.out.exists():
        res = torch.load(args.out, weights_only=True)
    for n in DESIGN["sizes"]:
        res["refs"][n] = {
            "fresh": empirical.memorisation(fresh, train[n], held, rule["radius"]),
            "u* samples": empirical.memorisation(
                empirical_flow.empirical_sample(z.double(), train[n].double(), 25).float(),
                train[n], held, rule["radius"])}
    for n in sizes:
        for width in DESIGN["widths"]:
            for seed in DESIGN["seeds"]:
                for target in small_flows.TARGETS:
                    key = f"n{n}_w{width}_s{seed}_{target}"
                    if key in res["runs"]:
                        continue
                    t0 = time.perf_counter()
                    smp, losses, _ = small_flows.train_and_sample(
                        lambda: MLPFlow(2, hidden=width, depth=DESIGN["depth"]),
                        train[n].to(args.device), target, z, args.train_steps, seed,
                        **DESIGN["sampler"], **DESIGN["fit"])
                    memo = empirical.memorisation(smp, train[n], held, rule["radius"])
                    res["runs"][key] = dict(
                        n=n, width=width, seed=seed, target=target, samples=smp,
                        losses=torch.tensor(losses[::100]), memo=memo,
                        memorises=small_flows.memorises(memo, res["refs"][n]["fresh"],
                                                        rule["ratio"], rule["margin"]),
                        seconds=time.perf_counter() - t0)
                    res["meta"] = dict(
                        DESIGN, train_steps=args.train_steps, hardware=hardware(),
                        torch_threads=torch.get_num_threads(),
                        seconds=sum(r["seconds"] for r in res["runs"].values()),
                        complete=len(res["runs"]) == n_runs)
                    atomic_torch_save(args.out, res)
                    print(f"{key}: NN ratio {memo['nn_ratio']:.3f}, near share "
                          f"{memo['near_share']:.3f}, copy share {memo['copy_share']:.3f}, "
                          f"{res['runs'][key]['seconds']:.0f} s", flush=True)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
