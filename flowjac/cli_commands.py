"""The commands of ``flowjac``: train, sample and probe, thin over the library.

``flowjac train`` trains a FlowUNet by ``distributed.train_flow_distributed``
on the recipe of its data; ``flowjac sample`` and ``flowjac probe`` open the
flow named by ``--checkpoint`` and the format flags through
``flowjac.models.adapters.open_flow`` (the one door), sample it by
``flowjac.models.pretrained.sample`` and probe it by
``flowjac.engine.probing.probe`` (reduced by
``flowjac.estimators.covariance.summarize_probe``). Each command takes the
parsed arguments and the process context, checks its numbers and files,
and writes its output on rank 0. ``flow_config``, ``load_flow``,
``load_any_flow`` and ``load_classifier`` are the loaders they share, kept
public for older code. torch and the library are imported inside the
commands, so that ``flowjac --help`` starts at once. The parser is
``flowjac.cli_parser``, the entry point ``flowjac.cli.main``.
Explained in :ref:`sec_running_at_scale` (``book/running_at_scale.md``).
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

__all__ = ["flow_config", "load_flow", "load_classifier", "load_any_flow"]

DATA = ("mnist", "scm")
METHODS = ("euler", "midpoint", "heun", "rk4")
# what flowjac probe's numbers are for: its help and its JSON file say so
_WHAT_TO_READ = {
    "covariances and correlations of the outputs": (
        "sample_covariance (standard error sample_covariance_stderr) and "
        "sample_correlation, the plain sample covariance of r(phi(z)) over "
        "the n latents. Read these for covariances: the book measures the "
        "paper's E[J J^T] several times further from the flow's correlation "
        "than plain samples at equal compute (book/byom.md), and when the "
        "identity below wins (book/exact_covariances.md)."),
    "local sensitivity, spectra, likelihoods, the integrand h(rho)": (
        "the JVPs. second_moment = E[(Jv)(Jv)^T] = E[J J^T] (standard error "
        "second_moment_stderr) says how strongly the outputs move with the "
        "latent, averaged over z; it is not their covariance (it bounds it "
        "from above). Spectra, divergences, log-likelihoods and the "
        "covariance identity's integrand h(rho) are built from JVPs by "
        "flowjac.estimators.spectra and flowjac.estimators.covariance."),
    "the interpolation identity (--estimator covariance)": (
        "covariance.cov (standard error covariance.stderr), an unbiased Monte "
        "Carlo estimate of the covariance from 2 n k JVPs, not an exact value; "
        "compare its standard error with sample_covariance_stderr before "
        "preferring it."),
}


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
    from flowjac.base import hardware, save_json
    from flowjac.data.images import training_images
    from flowjac.engine import distributed
    from flowjac.models.nets import FlowUNet
    from flowjac.models.pretrained import RECIPES

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
    from flowjac._checks import check_memory, check_out_file
    from flowjac.base import atomic_torch_save, hardware
    from flowjac.engine import distributed
    from flowjac.models.pretrained import sample
    from flowjac.plotting import save_image_grid

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
            atomic_torch_save(out, {"x": x, "meta": meta})
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
    from flowjac.base import hardware, save_json
    from flowjac.engine import distributed, probing
    from flowjac.estimators.covariance import summarize_probe

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

