"""Faster training, sampling and exact JVPs of the shipped FlowUNets on a CPU? Ratios from one run.

For a shipped flow (default the SCM FlowUNet), times, interleaved in one
run (median of repeats), each variant of

* a training step (CFM loss, AdamW, clipping) at ``--batch``;
* a sample (``integrate`` under ``torch.no_grad``, midpoint ``--steps``);
* an exact JVP (``flow_jvp`` with the network's exact tangents, the engine's rules);

with these variants: the plain model (contiguous NCHW, float32) — the
baseline —, the channels-last memory format, ``torch.compile`` (inductor,
the network only), and each of them under 1 and under ``--threads`` torch
threads. Every variant's outputs are compared with the baseline's (largest
relative difference), and the JSON says which variant the project adopts:
one at least ``ADOPT`` times faster than the baseline whose outputs stay
within ``TOL`` (both fixed here, before any measurement). A variant that
fails (e.g. compile on a machine without a compiler) is reported with its
error, never hidden. Ratios only: absolute times on a shared machine mean
little.

    python benchmarks/cpu_speed.py [--part scm-flow] [--batch 64] [--steps 10]
                                   [--repeats 3] [--threads 2] [--no-compile]
                                   [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from _timing import bench  # benchmarks/_timing.py

from flowjac.engine.jvp import flow_jvp, random_probes
from flowjac.engine.ode import integrate
from flowjac.engine.train import cfm_loss
from flowjac.engine.velocity import velocity_fn
from flowjac.models import pretrained
from flowjac.utils import hardware

ADOPT = 1.3      # adopt a variant at least this many times faster than the baseline
TOL = 1e-4       # whose outputs stay within this relative difference of the baseline's


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def variants(part: str, compile_: bool) -> dict:
    """name -> (model for sampling/JVPs, model for training, memory format)."""
    base = pretrained.load_weights(part, pretrained.WEIGHTS_DIR / pretrained.RECIPES[part]["file"])
    out = {"baseline": (base, torch.contiguous_format)}
    cl = pretrained.load_weights(part, pretrained.WEIGHTS_DIR / pretrained.RECIPES[part]["file"])
    out["channels_last"] = (cl.to(memory_format=torch.channels_last), torch.channels_last)
    if compile_:
        comp = pretrained.load_weights(part, pretrained.WEIGHTS_DIR / pretrained.RECIPES[part]["file"])
        out["torch.compile"] = (torch.compile(comp), torch.contiguous_format)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", default="scm-flow",
                   choices=[k for k, r in pretrained.RECIPES.items() if r["kind"] == "flow"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--sample-batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    net = pretrained.RECIPES[args.part]["net"]
    shape = (net["in_channels"], net["image_size"], net["image_size"])
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(args.batch, *shape, generator=g)
    x0 = torch.randn(args.batch, *shape, generator=g)
    t = torch.rand(args.batch, generator=g)
    z = torch.randn(args.sample_batch, *shape, generator=g)
    v = random_probes(z, generator=g)
    found = {"variants": {}, "errors": {}}
    cases, outputs = {}, {}
    for name, (model, fmt) in variants(args.part, not args.no_compile).items():
        try:
            zz, vv = z.to(memory_format=fmt), v.to(memory_format=fmt)
            model.eval().requires_grad_(False)
            vel = velocity_fn(model)
            t0 = time.perf_counter()
            with torch.no_grad():
                outputs[name] = (integrate(vel, zz, args.steps, "midpoint"),
                                 flow_jvp(vel, zz, vv, args.steps, "midpoint")[1])
            found["variants"][name] = dict(first_call_seconds=time.perf_counter() - t0)
            train_model = model
            opt = torch.optim.AdamW(train_model.parameters(), lr=0.0)   # lr 0: weights stay

            def step(m=train_model, o=opt, fmt=fmt):
                m.train().requires_grad_(True)
                loss = cfm_loss(m, x0.to(memory_format=fmt), x1.to(memory_format=fmt), t)
                o.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
                o.step()
                m.eval().requires_grad_(False)

            def sample(vel=vel, zz=zz):
                with torch.no_grad():
                    integrate(vel, zz, args.steps, "midpoint")

            def jvp(vel=vel, zz=zz, vv=vv):
                with torch.no_grad():
                    flow_jvp(vel, zz, vv, args.steps, "midpoint")
            for threads in sorted({1, args.threads}):
                def at(fn, n=threads):
                    def run():
                        torch.set_num_threads(n)
                        fn()
                    return run
                cases[(name, threads, "train step")] = at(step)
                cases[(name, threads, "sample")] = at(sample)
                cases[(name, threads, "exact JVP")] = at(jvp)
        except Exception as err:       # a variant this machine cannot run: say so
            found["errors"][name] = f"{type(err).__name__}: {err}"[:300]
            found["variants"].pop(name, None)
    times = bench(cases, args.repeats)
    base = {(th, what): times[("baseline", th, what)] for (n, th, what) in times if n == "baseline"}
    ref_sample, ref_jvp = outputs["baseline"]
    for name in found["variants"]:
        s, j = outputs[name]
        rec = found["variants"][name]
        rec["rel_diff_sample"] = _rel(s.contiguous(), ref_sample)
        rec["rel_diff_jvp"] = _rel(j.contiguous(), ref_jvp)
        rec["speedup"] = {f"{what}, {th} thread(s)": base[(th, what)] / times[(name, th, what)]
                          for (n, th, what) in times if n == name}
        rec["seconds"] = {f"{what}, {th} thread(s)": times[(name, th, what)]
                          for (n, th, what) in times if n == name}
    adopt = {}
    for what in ("train step", "sample", "exact JVP"):
        best = None
        for name, rec in found["variants"].items():
            if name == "baseline":
                continue
            within = max(rec["rel_diff_sample"], rec["rel_diff_jvp"]) <= TOL
            worst = min(r for k, r in rec["speedup"].items() if k.startswith(what))
            if within and worst >= ADOPT and (best is None or worst > best[1]):
                best = (name, worst)
        adopt[what] = best[0] if best else "baseline"
    result = dict(part=args.part, batch=args.batch, sample_batch=args.sample_batch,
                  steps=args.steps, method="midpoint", repeats=args.repeats,
                  threads=[1, args.threads], adopt_rule=dict(min_speedup=ADOPT, max_rel_diff=TOL),
                  adopt=adopt, hardware=hardware(), **found)
    text = json.dumps(result, indent=1, default=str)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
