"""Cost of the attribute chapters' flows on the CPU: MLPFlow against FlowUNet.

The attribute chapters' quick profile must run in minutes on a 2-core CPU.
This script times, in one run and interleaved (median of repeats), for each
flow on 32x32 RGB SCM images:

* one CFM training step (batch 64, Adam);
* the probes of ``scm.probe_flow`` for a batch of latents: the attribute JVPs
  (k probes, exact forward mode) and one reverse-mode gradient norm.

It prints each time as a ratio to the MLPFlow's, as JSON; absolute seconds
on a shared machine mean little. See "Attribute dependencies through a
classifier".

    python benchmarks/attribute_flows.py [--batch 50] [--probes 4]
        [--ode-steps 5] [--repeats 3] [--threads 2] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from _timing import bench  # benchmarks/_timing.py
from flowjac import estimators as E
from flowjac import scm
from flowjac.classifiers import AttributeNet
from flowjac.train import cfm_loss, velocity_fn
from flowjac.utils import hardware


def flows(size: int) -> dict:
    """The quick profile's flows, built as ``scm.prepare_models`` builds them."""
    out = {}
    for arch in ("mlp", "unet"):
        m = dict(scm.profile_settings("quick", arch=arch)["models"], size=size)
        torch.manual_seed(0)
        out[arch] = scm.build_flow(**{k: m[k] for k in scm.FLOW_NET_KEYS
                                      if k in m})
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=50, help="latents probed")
    p.add_argument("--probes", type=int, default=4)
    p.add_argument("--ode-steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="also write the JSON here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    size = 32
    data = (scm.SCMImages(128, size, seed=0).images * 2 - 1)
    quick = scm.profile_settings("quick")["models"]
    clf = AttributeNet(n_attr=len(scm.ATTRIBUTES), width=quick["clf_width"],
                       stem_stride=quick["clf_stem_stride"]).requires_grad_(False)
    cases, params = {}, {}
    for arch, (net, shape) in flows(size).items():
        params[arch] = sum(p.numel() for p in net.parameters())
        x1 = data[:64].reshape(64, *shape)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(0)

        def step(net=net, opt=opt, x1=x1, g=g):
            opt.zero_grad()
            x0 = torch.randn(x1.shape, generator=g)
            t = torch.rand(len(x1), generator=g)
            cfm_loss(net, x0, x1, t).backward()
            opt.step()

        vel = velocity_fn(net)
        comp = scm.compose_classifier(clf, shape)
        z = torch.randn(a.batch, *shape, generator=g)
        v = torch.randn(a.batch, a.probes, *shape, generator=g)

        def jvps(vel=vel, comp=comp, z=z, v=v):
            with torch.no_grad():
                E.attribute_jvp(vel, comp, z, tangents=v, steps=a.ode_steps)

        def norm(vel=vel, comp=comp, z=z):
            E.attribute_grad_norm(vel, comp, z, 0, steps=a.ode_steps)

        cases[f"{arch}/train_step"] = step
        cases[f"{arch}/attribute_jvp"] = jvps
        cases[f"{arch}/grad_norm"] = norm
    secs = bench(cases, a.repeats)
    ratios = {what: secs[f"unet/{what}"] / secs[f"mlp/{what}"]
              for what in ("train_step", "attribute_jvp", "grad_norm")}
    result = dict(hardware=hardware(), threads=a.threads, batch=a.batch,
                  probes=a.probes, ode_steps=a.ode_steps, params=params,
                  unet_over_mlp=ratios,
                  mlp_seconds={k.split("/")[1]: v for k, v in secs.items()
                               if k.startswith("mlp/")})
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        from flowjac.utils import atomic_write_bytes
        atomic_write_bytes(a.out, (text + "\n").encode())
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
