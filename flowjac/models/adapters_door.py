"""The one door: any source as one ``Flow``.

``open_flow(source, ...)`` turns any source into one ``Flow`` (velocity
with exact tangents, latent shape, value range, sampler settings,
provenance): a shipped name (through ``pretrained.load``, whose recipes
open their files through their kind's class), a checkpoint of ``flowjac
train``, a torchcfm checkpoint (its UNet or its README MLP), a
flow_matching state dict of the user's class (``import_class`` checks a
``MODULE:CLASS`` before anything runs; ``wrapper`` builds the
``WrappedModel(model)`` pattern), a network or a plain callable. Every file
is read once, by ``checkpoints.read_checkpoint``; the command line and the
chapters use the same door. ``read_flowjac_payload`` and
``build_from_config`` are the door's reading of flowjac's own checkpoints,
shared with the classifiers' loader. It dispatches to the velocities
(``adapters_velocity``), the peers' loaders (``adapters_checkpoints``) and
the user's class (``adapters_user_class``); ``flowjac.models.adapters``
re-exports every name. Explained in :ref:`sec_byom`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from flowjac._checks import check_choice
from flowjac.models.adapters_checkpoints import (
    load_flow_matching_checkpoint,
    load_torchcfm_checkpoint,
)
from flowjac.models.adapters_user_class import _user_network, parse_arch
from flowjac.models.adapters_velocity import (
    _torchcfm_mlp,
    from_callable,
    from_flow_matching,
    from_torchcfm,
)

__all__ = ["Flow", "open_flow", "FORMATS", "read_flowjac_payload", "build_from_config"]

#: what ``open_flow`` reads: a path of each format, a network or a callable
FORMATS = ("flowjac", "torchcfm", "flow_matching", "callable")
_DEFAULT_SAMPLER = dict(method="midpoint", steps=10)


@dataclass
class Flow:
    """One flow, whatever its source: the velocity, the latent shape, the value range, the sampler and where it came from; :ref:`sec_byom`.

    ``velocity(x, t)`` has an exact ``velocity.jvp``; ``latent_shape`` is
    the shape of one latent; ``value_range`` the (lo, hi) of the flow's
    space that pixel values 0 and 1 map to; ``sampler`` the solver settings
    (``method``, ``steps``; the gates' for a shipped flow, the checkpoint's
    for ``flowjac train``'s, else midpoint with 10 steps); ``source`` the
    provenance (``kind``: shipped, flowjac, torchcfm, flow_matching or
    callable; ``path``, ``step``, ``config`` where known); ``model`` the
    network (None for a plain function). ``open_flow`` returns one.
    """

    velocity: object
    latent_shape: tuple
    value_range: tuple = (0.0, 1.0)
    sampler: dict = field(default_factory=lambda: dict(_DEFAULT_SAMPLER))
    source: dict = field(default_factory=dict)
    model: nn.Module | None = None

    def sample(self, n: int, *, seed: int = 0, batch_size: int = 500,
               device=None, **solver) -> torch.Tensor:
        """n samples phi(z) with the flow's sampler (``method``/``steps`` override it), as ``pretrained.sample``; :ref:`sec_byom`."""
        from flowjac.models.pretrained import sample

        settings = {k: v for k, v in self.sampler.items() if k in ("method", "steps")}
        settings.update(solver)
        return sample(self.velocity, self.latent_shape, n, seed=seed,
                      batch_size=batch_size, device=self.device if device is None
                      else device, **settings)

    @property
    def device(self) -> torch.device:
        """Where the network's weights are (the CPU without a network)."""
        w = next(self.model.parameters(), None) if isinstance(self.model, nn.Module) else None
        return torch.device("cpu") if w is None else w.device

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Flow-space samples as pixels in [0, 1]: (x - lo) / (hi - lo); :ref:`sec_byom`."""
        from flowjac.models.pretrained import to_pixels

        return to_pixels(x, self.value_range)


def _count(name, value, minimum=1):
    from flowjac._checks import check_int

    return check_int(name, value, minimum=minimum)



def _a(name) -> str:
    """'a FlowUNet', 'an AttributeNet', or 'no network' for a missing class."""
    if not name:
        return "no network"
    return f"{'an' if str(name)[0] in 'AEIOU' else 'a'} {name}"


def read_flowjac_payload(path, what: str = "checkpoint") -> dict:
    """A flowjac checkpoint's payload by the one safe read, its format tag checked; :ref:`sec_byom`."""
    from pathlib import Path

    from flowjac.engine.checkpoints import read_checkpoint

    path = Path(path)
    payload = read_checkpoint(path, what)
    if not isinstance(payload, dict) or payload.get("format") != \
            "flowjac-checkpoint-1":
        raise ValueError(f"{what} {str(path)!r} is not a flowjac checkpoint "
                         "(no 'flowjac-checkpoint-1' format tag)")
    return payload


def build_from_config(cls, cfg: dict, what: str, path):
    """``cls(**cfg)`` from a checkpoint's stored config, or one clear ValueError naming the file; :ref:`sec_byom`."""
    try:
        return cls(**cfg)
    except (TypeError, ValueError, AssertionError) as err:
        raise ValueError(f"{what} {str(path)!r} stores a {cls.__name__} config "
                         f"that does not build one ({type(err).__name__}: "
                         f"{err})") from None


def _flowjac_file(path, device, dtype) -> Flow:
    """A checkpoint of ``flowjac train`` (FlowUNet or MLPFlow, EMA weights
    where stored), read once."""
    from flowjac.engine.checkpoints import check_finite_weights, load_checkpoint
    from flowjac.engine.velocity import velocity_fn
    from flowjac.models.nets import FlowUNet, MLPFlow

    payload = read_flowjac_payload(path)
    arch = payload.get("arch") or {}
    cls = {"FlowUNet": FlowUNet, "MLPFlow": MLPFlow}.get(arch.get("class"))
    if cls is None or not isinstance(arch.get("config"), dict):
        raise ValueError(f"checkpoint {str(path)!r} holds "
                         f"{_a(arch.get('class'))}, not a flow (FlowUNet or "
                         "MLPFlow); give a flow checkpoint, e.g. the "
                         "checkpoint.pt of flowjac train")
    cfg = dict(arch["config"])
    if "channel_mult" in cfg:
        cfg["channel_mult"] = tuple(cfg["channel_mult"])
    model = build_from_config(cls, cfg, "checkpoint", path)
    load_checkpoint(path, model, payload=payload, ema=True)
    check_finite_weights(payload["model"], f"checkpoint {str(path)!r}")
    if payload.get("ema") is not None:
        check_finite_weights(payload["ema"], f"checkpoint {str(path)!r} (EMA weights)")
    model.to(device, dtype or torch.float32).eval().requires_grad_(False)
    config = payload.get("config") or {}
    velocity = velocity_fn(model, config.get("parameterization", "velocity"))
    shape = ((cfg["in_channels"], cfg["image_size"], cfg["image_size"])
             if cls is FlowUNet else (cfg["dim"],))
    value_range = (-1.0, 1.0) if config.get("data") == "scm" else (0.0, 1.0)
    return Flow(velocity, shape, value_range,
                dict(config.get("sampler") or _DEFAULT_SAMPLER),
                dict(kind="flowjac", path=str(path), step=payload.get("step"),
                     config=config), model)


def _torchcfm_file(path, arch, label, raw_weights) -> tuple:
    """(velocity, latent shape) of a torchcfm checkpoint with ``arch``."""
    if "dim" not in arch:
        raise ValueError("arch for torchcfm must give dim, e.g. [1, 28, 28] "
                         "for its UNet or 2 for its MLP")
    dim = arch["dim"]
    if isinstance(dim, bool) or not (isinstance(dim, int) or (
            isinstance(dim, (list, tuple)) and len(dim) == 3
            and all(isinstance(d, int) and not isinstance(d, bool) for d in dim))):
        raise ValueError(f"arch's dim must be [C, H, W] (torchcfm's UNet) or "
                         f"an integer (torchcfm's MLP), got {dim!r}")
    if isinstance(dim, int):
        shape = (_count("arch dim", dim),)
    else:
        arch["dim"] = tuple(dim)
        shape = tuple(_count("arch dim", d) for d in dim)
    velocity = load_torchcfm_checkpoint(path, ema=not raw_weights, y=label, **arch)
    return velocity, shape



def open_flow(source, *, format: str | None = None, device="cpu", dtype=None,
              arch=None, model_class=None, wrapper=None, latent_shape=None,
              label=None, raw_weights: bool = False, order: str | None = None,
              value_range=None, sampler: dict | None = None,
              weights_dir=None) -> Flow:
    """The one door: any source as a ``Flow`` (velocity with exact tangents, latent shape, value range, sampler, provenance); :ref:`sec_byom`.

    ``source`` is a shipped name (``pretrained.available()``'s flows), a
    checkpoint path of ``format`` ``"flowjac"`` (the default for a path:
    ``flowjac train``'s or a shipped file; its EMA weights where stored),
    ``"torchcfm"`` (its image scripts' dict or a bare state dict of its
    README MLP; ``arch`` the network's arguments, ``label`` a class,
    ``raw_weights`` the non-EMA ones) or ``"flow_matching"`` (a state dict
    of ``model_class(**arch)``, optionally wrapped as ``wrapper(model)``;
    ``latent_shape`` required), a network (``format`` ``"torchcfm"`` or
    ``"flow_matching"``) or a plain callable (``order`` ``"x,t"`` or
    ``"t,x"``; ``latent_shape`` required). ``arch`` is a dict, an inline
    JSON object or a .json file; ``model_class`` and ``wrapper`` are
    classes or ``MODULE:CLASS`` strings (checked before anything is
    built). ``value_range`` and ``sampler`` override what the source says.
    Every file is read by ``checkpoints.read_checkpoint``; NaN or inf
    weights are refused naming the file. The network is moved to
    ``device`` in ``dtype`` (float32 unless given).
    """
    from pathlib import Path

    from flowjac.engine.checkpoints import check_finite_weights

    named = isinstance(source, str) and format in (None, "flowjac") and \
        not Path(source).exists()
    if named:
        from flowjac.models import pretrained
        if source in pretrained.NAMES:
            flow = pretrained.load(source, device=device,
                                   weights_dir=weights_dir).as_flow()
            if dtype is not None and flow.model is not None:
                _place(flow.model, device, dtype)
            return _override(flow, value_range, sampler)
    path_like = isinstance(source, (str, Path)) or hasattr(source, "__fspath__")
    fmt = format or ("flowjac" if path_like else "callable")
    check_choice("format", fmt, FORMATS)
    foreign = dict(arch=arch, model_class=model_class, wrapper=wrapper,
                   latent_shape=latent_shape, label=label,
                   raw_weights=raw_weights or None, order=order)
    if not path_like:
        return _override(_from_object(source, fmt, foreign, device, dtype),
                         value_range, sampler)
    if fmt == "callable":
        raise ValueError(f"format callable takes a function, not the path {str(source)!r}")
    if order is not None:
        raise ValueError("order applies to a plain callable only")
    if fmt == "flowjac":
        given = [k for k, v in foreign.items() if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} apply to --format torchcfm or "
                             "flow_matching only; a flowjac checkpoint stores its "
                             "architecture")
        return _override(_flowjac_file(source, device, dtype), value_range, sampler)
    dtype = dtype or torch.float32
    arch = parse_arch(arch)
    if arch is None:
        raise ValueError(f"format {fmt} needs arch: the network's constructor "
                         "arguments (a JSON file or an inline JSON object)")
    if not Path(source).exists():
        raise FileNotFoundError(f"checkpoint {str(source)!r} does not exist")
    if fmt == "torchcfm":
        for key in ("model_class", "wrapper", "latent_shape"):
            if foreign[key] is not None:
                raise ValueError(f"{key} applies to --format flow_matching only "
                                 "(torchcfm's shape is arch's dim)")
        velocity, shape = _torchcfm_file(source, arch, label, raw_weights)
        step = velocity.step
    else:
        for key in ("label", "raw_weights"):
            if foreign[key] is not None:
                raise ValueError(f"{key} applies to --format torchcfm only")
        if model_class is None:
            raise ValueError("format flow_matching needs model_class "
                             "(MODULE:CLASS, your network's class)")
        if not latent_shape:
            raise ValueError("format flow_matching needs latent_shape, the "
                             "shape of one sample, e.g. 1 28 28")
        net = _user_network(model_class, wrapper, arch)
        velocity = load_flow_matching_checkpoint(net, source)
        shape = tuple(_count("latent_shape", d) for d in latent_shape)
        step = None
    model = velocity.model
    check_finite_weights(model.state_dict(), f"checkpoint {str(source)!r}")
    _place(model, device, dtype)
    flow = Flow(velocity, shape, source=dict(kind=fmt, path=str(source), step=step,
                                             config={}), model=model)
    return _override(flow, value_range, sampler)


def _place(model, device, dtype) -> None:
    model.to(device, dtype).requires_grad_(False)
    if isinstance(getattr(model, "dtype", None), torch.dtype):
        model.dtype = dtype      # torchcfm's UNet casts x to model.dtype


def _from_object(obj, fmt, foreign, device, dtype) -> Flow:
    """A network or a function (no file) as a Flow."""
    shape = foreign["latent_shape"]
    for key in ("arch", "model_class", "wrapper", "raw_weights"):
        if foreign[key] is not None:
            raise ValueError(f"{key} applies to a checkpoint file, not to a "
                             f"{type(obj).__name__}")
    if fmt == "flowjac":
        raise ValueError(f"format flowjac takes a checkpoint path or a shipped "
                         f"name, got a {type(obj).__name__}")
    if fmt == "torchcfm":
        if foreign["order"] is not None:
            raise ValueError("order applies to a plain callable only")
        velocity = from_torchcfm(obj, y=foreign["label"])
        m = velocity.model
        if shape is None and _torchcfm_mlp(m) is not None:
            shape = (m.net[0].in_features - int(bool(m.time_varying)),)
        elif shape is None and isinstance(getattr(m, "image_size", None), int) \
                and isinstance(getattr(m, "in_channels", None), int):
            shape = (m.in_channels, m.image_size, m.image_size)
    else:
        if foreign["label"] is not None:
            raise ValueError("label applies to torchcfm networks only")
        if fmt == "flow_matching":
            if foreign["order"] is not None:
                raise ValueError("order applies to a plain callable only")
            velocity = from_flow_matching(obj)
        else:
            if foreign["order"] is None:
                raise ValueError("order must be given for a plain callable: "
                                 "'x,t' for fn(x, t) or 't,x' for fn(t, x)")
            velocity = from_callable(obj, order=foreign["order"])
    if shape is None:
        raise ValueError(f"latent_shape must be given for a {fmt} source, the "
                         "shape of one sample, e.g. (1, 28, 28)")
    shape = tuple(_count("latent_shape", d) for d in shape)
    model = velocity.model
    if isinstance(model, nn.Module):
        from flowjac.engine.checkpoints import check_finite_weights

        check_finite_weights(model.state_dict(), f"the {type(model).__name__} given")
        w = next(model.parameters(), None)
        if w is not None and (dtype is not None or torch.device(device) != w.device):
            _place(model, device, dtype or w.dtype)
    return Flow(velocity, shape, source=dict(kind=fmt, path=None, step=None,
                                             config={}), model=model)


def _override(flow: Flow, value_range, sampler) -> Flow:
    """The caller's value range and sampler over the source's."""
    if value_range is not None:
        lo, hi = (float(v) for v in value_range)
        if not hi > lo:
            raise ValueError(f"value_range must be (lo, hi) with hi > lo, got "
                             f"{value_range!r}")
        flow.value_range = (lo, hi)
    if sampler is not None:
        if not isinstance(sampler, dict):
            raise ValueError(f"sampler must be a dict with method and steps, got "
                             f"{sampler!r}")
        flow.sampler = dict(flow.sampler, **sampler)
    return flow
