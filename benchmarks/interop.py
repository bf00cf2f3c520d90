"""Exact JVPs through third-party networks, as ratios to a plain sample.

For torchcfm's ``UNetModelWrapper`` (its MNIST example configuration, and
its CIFAR-10 recipe at a reduced width), a flow_matching MLP (its 2-D
example's network in a ``ModelWrapper``) and, beside them, flowjac's own
``FlowUNet`` and ``MLPFlow``, times in one run (interleaved, median of
repeats) a plain sample (``integrate``), the exact JVP of the flow map
(``flow_jvp``: the adapters' tangent-carrying path for the third-party
networks, the same engine run on flowjac's own code), the same with
``torch.func.jvp`` per stage, and k-probe JVPs, and prints every time
divided by the sample's as JSON, with the hardware and which tangent path
ran. Networks whose package is not installed are listed as skipped. See
"Bring your own model".

    python benchmarks/interop.py [--steps 2] [--repeats 3] [--threads 1]
                                 [--cifar-channels 32] [--device cpu] [--only TEXT]
                                 [--out FILE.json]
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
from flowjac.models.adapters import from_flow_matching, from_torchcfm
from flowjac.models.nets import FlowUNet, MLPFlow
from flowjac.utils import hardware


def _flow_matching_mlp(hidden: int):
    """The velocity network of flow_matching's examples/2d_flow_matching.ipynb."""
    from flow_matching.utils import ModelWrapper
    from torch import nn

    class Swish(nn.Module):
        def forward(self, x):
            return torch.sigmoid(x) * x

    class MLP(nn.Module):
        def __init__(self, input_dim=2, time_dim=1, hidden_dim=128):
            super().__init__()
            self.input_dim, self.time_dim = input_dim, time_dim
            self.main = nn.Sequential(
                nn.Linear(input_dim + time_dim, hidden_dim), Swish(),
                nn.Linear(hidden_dim, hidden_dim), Swish(),
                nn.Linear(hidden_dim, hidden_dim), Swish(),
                nn.Linear(hidden_dim, hidden_dim), Swish(),
                nn.Linear(hidden_dim, input_dim))

        def forward(self, x, t):
            sz = x.size()
            x = x.reshape(-1, self.input_dim)
            t = t.reshape(-1, self.time_dim).float()
            t = t.reshape(-1, 1).expand(x.shape[0], 1)
            return self.main(torch.cat([x, t], dim=1)).reshape(*sz)

    class WrappedModel(ModelWrapper):
        def forward(self, x, t, **extras):
            return self.model(x, t, **extras)

    return WrappedModel(MLP(hidden_dim=hidden))


def _models(args, device):
    """name -> (velocity or None, x0 or the reason it was skipped)."""
    g = torch.Generator().manual_seed(0)
    mnist = torch.randn(args.batch, 1, 28, 28, generator=g)
    cifar = torch.randn(args.batch, 3, 32, 32, generator=g)
    points = torch.randn(args.mlp_batch, 2, generator=g)
    out = {}
    out["flowjac FlowUNet(base_channels=32, channel_mult=(1, 2, 2)), 28x28"] = (
        velocity_fn(FlowUNet(1, base_channels=32, channel_mult=(1, 2, 2)).eval()),
        mnist)
    try:
        from torchcfm.models.unet.unet import UNetModelWrapper
    except ImportError as err:
        reason = f"torchcfm not installed ({err})"
        out["torchcfm UNetModelWrapper, MNIST example"] = (None, reason)
        out["torchcfm UNetModelWrapper, CIFAR-10 recipe"] = (None, reason)
    else:
        net = UNetModelWrapper(dim=(1, 28, 28), num_channels=32, num_res_blocks=1,
                               num_classes=10, class_cond=True).eval()
        labels = torch.arange(args.batch) % 10
        out["torchcfm UNetModelWrapper(dim=(1, 28, 28), num_channels=32, "
            "num_res_blocks=1, class_cond=True): MNIST example"] = (
            from_torchcfm(net.to(device), y=labels), mnist)
        net = UNetModelWrapper(dim=(3, 32, 32), num_res_blocks=2,
                               num_channels=args.cifar_channels,
                               channel_mult=[1, 2, 2, 2], num_heads=4,
                               num_head_channels=64, attention_resolutions="16",
                               dropout=0.1).eval()
        out[f"torchcfm UNetModelWrapper(dim=(3, 32, 32), num_channels="
            f"{args.cifar_channels}, num_res_blocks=2, channel_mult=[1, 2, 2, 2], "
            f"attention at 16x16): CIFAR-10 recipe, width {args.cifar_channels} "
            f"of 128"] = (from_torchcfm(net.to(device)), cifar)
    try:
        wrapped = _flow_matching_mlp(args.mlp_hidden).eval()
    except ImportError as err:
        out["flow_matching MLP"] = (None, f"flow_matching not installed ({err})")
    else:
        out[f"flow_matching MLP (hidden_dim={args.mlp_hidden}, 4 Swish layers) "
            f"in a ModelWrapper"] = (from_flow_matching(wrapped.to(device)), points)
    out[f"flowjac MLPFlow(2, hidden={args.mlp_hidden}, depth=4)"] = (
        velocity_fn(MLPFlow(2, hidden=args.mlp_hidden, depth=4).eval()), points)
    return {name: (vel, x0 if vel is None else x0.to(device))
            for name, (vel, x0) in out.items()}


def _cases(vel, x0, steps, k, sync):
    g = torch.Generator().manual_seed(1)
    v = random_probes(x0.cpu(), generator=g).to(x0.device)
    vk = random_probes(x0.cpu(), k=k, generator=g).to(x0.device)

    def timed(fn):
        def run():
            out = fn()
            sync()
            return out
        return run

    return {
        "sample": timed(lambda: integrate(vel, x0, steps)),
        "exact JVP": timed(lambda: flow_jvp(vel, x0, v, steps)),
        "exact JVP, torch.func per stage": timed(
            lambda: flow_jvp(vel, x0, v, steps, jvp_mode="func")),
        f"exact JVP, k={k} probes": timed(lambda: flow_jvp(vel, x0, vk, steps)),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is stable on a shared machine)")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--batch", type=int, default=4, help="images per batch")
    p.add_argument("--mlp-batch", type=int, default=512)
    p.add_argument("--mlp-hidden", type=int, default=512,
                   help="hidden width of the MLPs (flow_matching's example: 512)")
    p.add_argument("--cifar-channels", type=int, default=32,
                   help="num_channels of the CIFAR-10 recipe (the recipe: 128)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--only", default=None,
                   help="time only the networks whose name contains this text")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    result = {"steps": args.steps, "method": "rk4", "k": args.k,
              "repeats": args.repeats, "threads": args.threads,
              "device": args.device, "hardware": hardware(), "dtype": "float32",
              "models": {}}
    with torch.no_grad():
        for name, (vel, x0) in _models(args, device).items():
            if args.only and args.only not in name:
                continue
            if vel is None:
                result["models"][name] = {"skipped": x0}
                continue
            secs = bench(_cases(vel, x0, args.steps, args.k, sync), args.repeats)
            base = secs["sample"]
            entry = {"batch": x0.shape[0], "sample_seconds": round(base, 4),
                     "ratio_to_sample": {n: round(s / base, 2) for n, s in secs.items()}}
            if hasattr(vel, "last_path"):
                flow_jvp(vel, x0, torch.ones_like(x0), 1)
                entry["tangent_path"] = vel.last_path
                if vel.fallbacks:
                    entry["fallbacks"] = list(vel.fallbacks.values())
            result["models"][name] = entry
            print(f"done: {name}", file=sys.stderr)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        from flowjac.utils import save_json
        save_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
