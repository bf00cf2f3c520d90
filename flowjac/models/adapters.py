"""Bring your own model: torchcfm, flow_matching and plain callables as flowjac velocities.

``from_torchcfm(net, y=...)``, ``from_flow_matching(wrapper, **extras)`` and
``from_callable(fn, order=...)`` return an ``AdaptedVelocity``: a callable
``velocity(x, t)`` (``t`` a Python number, a 0-dim tensor or a (B,) tensor)
with an exact ``jvp(x, t, tangents)``, so every solver, JVP, spectrum and
log-likelihood routine of flowjac accepts the third-party network as it is.
``load_torchcfm_checkpoint`` reads torchcfm's training checkpoints and
``load_flow_matching_checkpoint`` loads weights into a flow_matching
``ModelWrapper`` (or its wrapped network).

The one door. ``open_flow(source, ...)`` turns any source into one
``Flow`` (velocity with exact tangents, latent shape, value range, sampler
settings, provenance): a shipped name (through ``pretrained.load``, whose
recipes open their files through their kind's class), a checkpoint of
``flowjac train``, a torchcfm checkpoint (its UNet or its README MLP), a
flow_matching state dict of the user's class (``import_class`` checks a
``MODULE:CLASS`` before anything runs; ``wrapper`` builds the
``WrappedModel(model)`` pattern), a network or a plain callable. Every file
is read once, by ``checkpoints.read_checkpoint``; the command line and the
chapters use the same door.

Fast exact tangents without touching the model. ``AdaptedVelocity.jvp``
runs the user's own forward code through ``joint_jvp`` of
``flowjac.engine.tangents`` (re-exported here), the engine's tangent-carrying
value and its table of exact rules; ``benchmarks/interop.py`` measures it
against ``torch.func.jvp``.

Safety: the first ``jvp`` call for each input signature (shapes, dtype,
device, form of t) is checked against ``torch.func.jvp`` of the original
model on one direction; an operation without a rule (``torch.cumsum``, an
in-place write into an x-dependent tensor, ...) or a mismatch (code that
tests ``isinstance(x, torch.Tensor)``) makes that signature fall back to
``torch.func.jvp`` with a warning; ``velocity.last_path`` says which path
ran. Like ``torch.func.jvp``, the fast path follows Python branches on
x-dependent comparisons by the primal's values.

torchcfm, flow_matching and torchdiffeq are optional (the ``interop``
extra); this module imports them only inside the functions that need them.

Longer than 400 lines because the adapters, the loaders that build them
and the door that picks the loader belong together: the door dispatches to
every loader and every loader builds an adapter.
Explained in :ref:`sec_byom`.
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from flowjac._checks import check_choice
from flowjac.engine.tangents import NoRule as _NoRule
from flowjac.engine.tangents import check_tangents as _check_tangents
from flowjac.engine.tangents import joint_jvp
from flowjac.engine.velocity import func_jvp

__all__ = ["AdaptedVelocity", "joint_jvp", "from_torchcfm",
           "from_flow_matching", "from_callable", "load_torchcfm_checkpoint",
           "load_flow_matching_checkpoint", "INSTALL_HINT", "Flow", "open_flow",
           "FORMATS", "parse_arch", "import_class", "read_flowjac_payload",
           "build_from_config"]

#: How to install the optional peers (the ``interop`` extra).
INSTALL_HINT = ("pip install --no-deps torchcfm==1.0.7 flow-matching==1.0.10 "
                "torchdiffeq==0.2.5 pot==0.9.6.post1 (or pip install "
                "'flowjac[interop]', which also pulls torchcfm's training stack)")


# ---------------------------------------------------------------------------
# velocities

def _check_x(x, model) -> None:
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise ValueError("x must be a floating torch tensor, got "
                         f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"x must have a batch dimension (B, ...), got shape "
                         f"{tuple(x.shape)}")
    if not isinstance(model, nn.Module):
        return
    w = next(model.parameters(), None)
    if w is not None and (w.dtype != x.dtype or w.device != x.device):
        raise ValueError(f"x has dtype {x.dtype} on {x.device} but the model's "
                         f"weights are {w.dtype} on {w.device}; move one of them "
                         f"(x.to(...) or model.to(...))")
    want = getattr(model, "dtype", None)   # torchcfm's UNet casts x to it
    if isinstance(want, torch.dtype) and want != x.dtype:
        raise ValueError(f"this {type(model).__name__} computes in {want} (its "
                         f"forward casts x to model.dtype); pass x of dtype {want}")


def _time(t, x: torch.Tensor) -> torch.Tensor:
    """t as a 0-dim tensor or a (B,) tensor of x's dtype and device."""
    bsz = x.shape[0]
    if isinstance(t, bool) or not (torch.is_tensor(t) or isinstance(t, numbers.Real)):
        raise ValueError(f"t must be a number, a 0-dim tensor or a ({bsz},) "
                         f"tensor, got {t!r}")
    if isinstance(t, numbers.Real) and not math.isfinite(t):
        raise ValueError(f"t must be finite, got {t!r}")
    if torch.is_tensor(t) and t.device.type == "cpu" and t.is_floating_point() \
            and not bool(torch.isfinite(t).all()):     # no sync on a GPU
        raise ValueError(f"t must be finite, got {int((~torch.isfinite(t)).sum())} "
                         "NaN or inf entries")
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 0 or (t.ndim == 1 and t.shape[0] == bsz):
        return t
    raise ValueError(f"t must be a number, a 0-dim tensor or a ({bsz},) tensor, "
                     f"got shape {tuple(t.shape)}")


def _check_eval(model) -> None:
    """Dropout or batch statistics in training mode make the velocity random
    or couple the rows: refuse them rather than switch the user's model."""
    if not isinstance(model, nn.Module):
        return
    for name, m in model.named_modules():
        if not m.training:
            continue
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            raise ValueError(f"the model is in training mode and {name or 'it'} "
                             f"is a dropout with p={m.p}: the velocity would be "
                             "random; call model.eval() first")
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            raise ValueError(f"the model is in training mode and {name} is a "
                             "batch norm using batch statistics: call "
                             "model.eval() first")


def _tolerance(dtype) -> float:
    return {torch.float64: 1e-8, torch.float32: 1e-3}.get(dtype, 3e-2)


class AdaptedVelocity:
    """A third-party network as velocity(x, t), with an exact fast ``jvp``; :ref:`sec_byom`.

    ``velocity(x, t)`` calls the network (``t`` a number, a 0-dim tensor or
    a (B,) tensor, converted to x's dtype and device). ``jvp(x, t,
    tangents)`` returns (velocity(x, t), D_x velocity(x, t) tangents), for
    tangents shaped like x or (B, k, ...), by ``joint_jvp`` on the network's
    own code (``fast=True``) or by ``torch.func.jvp``. The first fast call
    for each input signature is checked against ``torch.func.jvp`` on one
    direction; a missing rule or a mismatch switches that signature to
    ``torch.func.jvp`` with a warning (a model torch.func.jvp cannot
    differentiate, such as fused attention on CPU, keeps the fast path, with
    a warning that it went unchecked). ``last_path`` is ``"fast"`` or
    ``"torch.func"`` after each ``jvp``; ``fallbacks`` maps signatures to
    the reason they fell back. Built by ``from_torchcfm``,
    ``from_flow_matching`` or ``from_callable``; the network is never
    modified.
    """

    def __init__(self, call: Callable, *, model=None, source: str = "callable",
                 fast: bool = True):
        if not isinstance(fast, bool):
            raise ValueError(f"fast must be True or False, got {fast!r}")
        self._call, self.model, self.source, self.fast = call, model, source, fast
        self.last_path = None
        self.fallbacks: dict = {}
        self._checked: set = set()

    def __repr__(self) -> str:
        name = type(self.model).__name__ if self.model is not None else "callable"
        return f"AdaptedVelocity({self.source}: {name}, fast={self.fast})"

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        _check_x(x, self.model)
        return self._call(x, _time(t, x))

    def jvp(self, x: torch.Tensor, t, tangents: torch.Tensor):
        """(velocity(x, t), D_x velocity(x, t) tangents): fast joint tangents, else torch.func."""
        _check_x(x, self.model)
        tt = _time(t, x)
        _check_tangents(x, tangents)
        key = (tuple(x.shape), tuple(tangents.shape), x.dtype, str(x.device), tt.ndim)
        if self.fast and key not in self.fallbacks:
            try:
                out = joint_jvp(lambda z: self._call(z, tt), x, tangents)
            except (_NoRule, RuntimeError, TypeError, AttributeError, IndexError) as err:
                # a missing rule, or model code the rules cannot follow
                self._fall_back(key, f"{type(err).__name__}: {err}")
            else:
                if key in self._checked or self._agrees(key, x, tt, tangents, out):
                    self.last_path = "fast"
                    return out
        self.last_path = "torch.func"
        return func_jvp(self, x, tt, tangents)

    def _fall_back(self, key, reason: str) -> None:
        self.fallbacks[key] = reason
        warnings.warn(f"{self!r}: exact tangents by torch.func.jvp (slower) for "
                      f"inputs of shape {key[0]}: {reason}", RuntimeWarning,
                      stacklevel=3)

    def _agrees(self, key, x, tt, tangents, out) -> bool:
        """Check the fast path once per signature against torch.func.jvp."""
        v1 = tangents if tangents.shape == x.shape else tangents[:, 0]
        d1 = out[1] if tangents.shape == x.shape else out[1][:, 0]
        try:
            with torch.no_grad():
                ref = func_jvp(lambda z, s: self._call(z, s), x, tt, v1)
        except (NotImplementedError, RuntimeError) as err:
            # e.g. fused attention, which forward-mode AD cannot differentiate
            warnings.warn(f"{self!r}: the fast tangents for inputs of shape {key[0]} "
                          f"could not be checked, torch.func.jvp fails on this model "
                          f"({type(err).__name__}: {str(err)[:200]})", RuntimeWarning,
                          stacklevel=3)
            self._checked.add(key)
            return True
        tol = _tolerance(x.dtype)
        for name, a, b in (("velocity", out[0], ref[0]), ("tangent", d1, ref[1])):
            err = float((a.detach() - b).norm() / b.norm().clamp_min(1e-30))
            if not err <= tol:
                self._fall_back(key, f"the fast {name} differs from torch.func's "
                                     f"by {err:.1e} (relative)")
                return False
        self._checked.add(key)
        return True


def _unwrap(model):
    return model.module if isinstance(
        model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def _labels(y, model):
    """torchcfm labels: None, an int, or a (B,)/(1,)/0-dim integer tensor."""
    num_classes = getattr(model, "num_classes", None)
    if y is None:
        if num_classes is not None:
            raise ValueError(f"this {type(model).__name__} is class-conditional "
                             f"(num_classes={num_classes}): pass y, a label in "
                             f"[0, {num_classes}) or a (B,) tensor of labels")
        return None
    if num_classes is None and hasattr(model, "num_classes"):
        raise ValueError(f"y was given but this {type(model).__name__} is not "
                         "class-conditional (num_classes is None)")
    if isinstance(y, bool) or not (isinstance(y, numbers.Integral) or (
            torch.is_tensor(y) and not y.is_floating_point() and y.ndim <= 1)):
        raise ValueError(f"y must be an integer label or a 1-dim integer tensor, "
                         f"got {y!r}")
    y = torch.as_tensor(y, dtype=torch.long)
    if num_classes is not None and y.numel() and (
            int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"y must hold labels in [0, {num_classes}), got values in "
                         f"[{int(y.min())}, {int(y.max())}]")
    return y


def _batch_labels(y, x) -> torch.Tensor:
    bsz = x.shape[0]
    if y.ndim == 0 or y.shape[0] == 1:
        return y.reshape(()).expand(bsz).to(x.device)
    if y.shape[0] != bsz:
        raise ValueError(f"y must hold one label or {bsz} labels (one per row "
                         f"of x), got {y.shape[0]}")
    return y.to(x.device)


def _torchcfm_mlp(model):
    """torchcfm's README ``MLP`` (called ``net(cat([x, t], 1))``), itself or
    inside torchcfm's ``torch_wrapper``; None for any other module."""
    if type(model).__name__ == "torch_wrapper" and \
            type(model).__module__ == "torchcfm.utils":
        model = model.model
    try:
        from torchcfm.models.models import MLP
    except ImportError:
        return None
    return model if isinstance(model, MLP) else None


def from_torchcfm(model: nn.Module, *, y=None, fast: bool = True) -> AdaptedVelocity:
    """A torchcfm network (``UNetModelWrapper``, called ``net(t, x, y=None)``, or the README's ``MLP``) as a flowjac velocity; :ref:`sec_byom`.

    ``y``: the class label(s) of a class-conditional UNet (an int for every
    row, or a (B,) tensor), required exactly when the UNet has
    ``num_classes``. Any module with torchcfm's calling convention
    ``net(t, x)`` works. The model must be in eval mode if it has dropout
    (``model.eval()``; this function does not change it), and x must have
    its dtype (torchcfm's UNet computes in ``model.dtype``, float32).
    DistributedDataParallel wrappers are unwrapped. torchcfm's README model
    ``MLP(dim, w=64, time_varying=True)`` (and its ``torch_wrapper``) is
    called as torchcfm trains it, ``net(cat([x, t], dim=1))`` for x of shape
    (B, dim) (``net(x)`` when it is not ``time_varying``).
    """
    model = _unwrap(model)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_eval(model)
    mlp = _torchcfm_mlp(model)
    if mlp is not None:
        if y is not None:
            raise ValueError("y was given but torchcfm's MLP is not "
                             "class-conditional")

        def call_mlp(x, t):
            if x.ndim != 2:
                raise ValueError(f"torchcfm's MLP takes x of shape (B, dim), got "
                                 f"{tuple(x.shape)}")
            if not mlp.time_varying:
                return mlp(x)
            tb = t.reshape(1, 1).expand(x.shape[0], 1) if t.ndim == 0 else t[:, None]
            return mlp(torch.cat([x, tb], 1))

        return AdaptedVelocity(call_mlp, model=mlp, source="torchcfm", fast=fast)
    labels = _labels(y, model)

    def call(x, t):
        if labels is None:
            return model(t, x)
        return model(t, x, y=_batch_labels(labels, x))

    return AdaptedVelocity(call, model=model, source="torchcfm", fast=fast)


def from_flow_matching(model, *, fast: bool = True, **extras) -> AdaptedVelocity:
    """A flow_matching velocity model (a ``ModelWrapper``, called ``model(x=x, t=t, **extras)``) as a flowjac velocity; :ref:`sec_byom`.

    ``extras`` are passed to every call (e.g. a class label), as
    ``ODESolver.sample(..., **model_extras)`` does; t reaches the model as
    ``ODESolver`` gives it, a 0-dim tensor (or the (B,) tensor passed in).
    """
    if not callable(model):
        raise ValueError(f"model must be callable, got {type(model).__name__}")
    _check_eval(model)

    def call(x, t):
        return model(x=x, t=t, **extras)

    return AdaptedVelocity(call, model=model if isinstance(model, nn.Module) else None,
                           source="flow_matching", fast=fast)


def from_callable(fn: Callable, *, order: str, fast: bool = True) -> AdaptedVelocity:
    """A plain callable as a flowjac velocity, its argument order named explicitly; :ref:`sec_byom`.

    ``order="x,t"`` for ``fn(x, t)``, ``order="t,x"`` for ``fn(t, x)`` (the
    torchdiffeq convention); never guessed. t reaches fn as a 0-dim tensor
    (or the (B,) tensor passed in) of x's dtype.
    """
    if not callable(fn):
        raise ValueError(f"fn must be callable, got {type(fn).__name__}")
    check_choice("order", order, ("x,t", "t,x"))
    if order == "x,t":
        def call(x, t):
            return fn(x, t)
    else:
        def call(x, t):
            return fn(t, x)
    _check_eval(fn)
    return AdaptedVelocity(call, model=fn if isinstance(fn, nn.Module) else None,
                           source=f"callable({order})", fast=fast)


# ---------------------------------------------------------------------------
# checkpoints

def _read(path):
    """The checkpoint's contents by flowjac's one safe read (weights only;
    an ``args`` Namespace, as flow_matching's example scripts save, allowed)."""
    import argparse

    from flowjac.engine.checkpoints import read_checkpoint

    return read_checkpoint(path, "checkpoint", allow=[argparse.Namespace])


def _strip(state: dict) -> dict:
    """Drop the DDP ('module.') and torch.compile ('_orig_mod.') prefixes."""
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _mismatch(model: nn.Module, state: dict) -> list:
    own = model.state_dict()
    missing = [f"missing {k}" for k in own if k not in state]
    extra = [f"unexpected {k}" for k in state if k not in own]
    shape = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state and torch.is_tensor(state[k])
             and state[k].shape != own[k].shape]
    return missing + extra + shape


def _state(payload, key: str, path) -> dict:
    if not isinstance(payload, dict):
        raise ValueError(f"checkpoint {str(path)!r} holds a {type(payload).__name__}, "
                         "not a dict")
    if key is None or all(torch.is_tensor(v) for v in payload.values()):
        state = payload
    elif key in payload and isinstance(payload[key], dict):
        state = payload[key]
    else:
        raise ValueError(f"checkpoint {str(path)!r} has no {key!r} entry; its "
                         f"entries are {sorted(payload)}")
    return _strip(dict(state))


def load_torchcfm_checkpoint(path, *, ema: bool = True, y=None,
                             **unet_kwargs) -> AdaptedVelocity:
    """The velocity of a torchcfm checkpoint (``UNetModelWrapper(**unet_kwargs)``, or the README's ``MLP``); :ref:`sec_byom`.

    Reads the dict torchcfm's image scripts save (``net_model``,
    ``ema_model``, ``sched``, ``optim``, ``step``) with ``weights_only=True``,
    takes the EMA weights (``ema=True``) or the raw ones, strips the
    ``module.`` prefix of DistributedDataParallel, builds
    ``UNetModelWrapper(**unet_kwargs)`` (the training script's arguments,
    e.g. ``dim=(3, 32, 32), num_channels=128, num_res_blocks=2,
    channel_mult=[1, 2, 2, 2], num_heads=4, num_head_channels=64,
    attention_resolutions="16", dropout=0.1``), loads the weights in eval
    mode and returns ``from_torchcfm(net, y=y)``; ``velocity.step`` is the
    checkpoint's training step. A checkpoint of another architecture is one
    ValueError naming the mismatched keys. An integer ``dim`` builds
    torchcfm's README model instead, ``MLP(dim, out_dim=None, w=64,
    time_varying=False)`` (the README trains it with ``time_varying=True``);
    its file may also be a bare state dict (``torch.save(model.state_dict(),
    path)``, of the MLP or of its ``torch_wrapper``).
    """
    if not isinstance(ema, bool):
        raise ValueError(f"ema must be True or False, got {ema!r}")
    mlp = isinstance(unet_kwargs.get("dim"), numbers.Integral)
    name = "MLP" if mlp else "UNetModelWrapper"
    try:
        if mlp:
            from torchcfm.models.models import MLP as build
        else:
            from torchcfm.models.unet.unet import UNetModelWrapper as build
    except ImportError as err:
        raise ImportError(f"load_torchcfm_checkpoint needs torchcfm ({err}); "
                          f"install the interop extra: {INSTALL_HINT}") from None
    payload = _read(path)
    state = _state(payload, "ema_model" if ema else "net_model", path)
    try:
        net = build(**unet_kwargs)
    except (TypeError, ValueError, AssertionError) as err:
        what = ("MLP (dim, out_dim, w, time_varying)" if mlp else
                "UNetModelWrapper (dim a list [C, H, W] for its images, an "
                "integer for torchcfm's MLP)")
        raise ValueError(f"unet_kwargs (--arch) do not describe a torchcfm "
                         f"{what}: {err}") from None
    if mlp and state and all(k.startswith("model.") for k in state) and \
            _mismatch(net, state):      # saved from torch_wrapper(model)
        state = {k[len("model."):]: v for k, v in state.items()}
    bad = _mismatch(net, state)
    if bad:
        raise ValueError(f"checkpoint {str(path)!r} does not match "
                         f"{name}({', '.join(f'{k}={v!r}' for k, v in unet_kwargs.items())}); "
                         f"mismatched keys ({len(bad)}): {bad[:8]}")
    net.load_state_dict(state)
    net.eval()
    velocity = from_torchcfm(net, y=y)
    velocity.step = payload.get("step") if isinstance(payload, dict) and \
        not torch.is_tensor(payload.get("step")) else None
    return velocity


def load_flow_matching_checkpoint(model: nn.Module, path, *, key: str | None = "model",
                                  **extras) -> AdaptedVelocity:
    """Load weights into a flow_matching ``ModelWrapper`` (or its network) and wrap it; :ref:`sec_byom`.

    ``model`` is a freshly built instance of the user's own class (a
    ``ModelWrapper`` subclass, or any module called ``model(x=x, t=t,
    **extras)``). The checkpoint is read with ``weights_only=True`` (an
    ``args`` Namespace, as flow_matching's example scripts save, is
    allowed); its ``key`` entry (``"model"``; ``None`` for a bare state
    dict) is loaded, after stripping ``module.``/``_orig_mod.`` prefixes,
    into ``model`` itself or, when the keys are those of the wrapped
    network, into ``model.model``. The model is put in eval mode and
    returned as ``from_flow_matching(model, **extras)``; a checkpoint of
    another architecture is one ValueError naming the mismatched keys.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    state = _state(_read(path), key, path)
    targets = [model] + ([model.model] if isinstance(getattr(model, "model", None),
                                                     nn.Module) else [])
    reports = [(_mismatch(m, state), m) for m in targets]
    bad, target = min(reports, key=lambda r: len(r[0]))
    if bad:
        raise ValueError(f"checkpoint {str(path)!r} does not match "
                         f"{type(target).__name__}; mismatched keys ({len(bad)}): "
                         f"{bad[:8]}")
    target.load_state_dict(state)
    model.eval()
    return from_flow_matching(model, **extras)


# ---------------------------------------------------------------------------
# the one door: any source as a Flow

#: what ``open_flow`` reads: a path of each format, a network or a callable
FORMATS = ("flowjac", "torchcfm", "flow_matching", "callable")
_DOTTED = r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*"
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


def parse_arch(text) -> dict | None:
    """A network's constructor arguments from a dict, an inline JSON object or a .json file (``--arch``); :ref:`sec_byom`."""
    import json
    from pathlib import Path

    if text is None or isinstance(text, dict):
        return None if text is None else dict(text)
    text = str(text)
    if text.lstrip().startswith("{"):
        source, raw = "--arch", text
    else:
        path = Path(text)
        if not path.is_file():
            raise FileNotFoundError(f"arch {text!r} is neither an inline JSON "
                                    "object nor an existing .json file")
        source, raw = f"arch file {text!r}", path.read_text()
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{source} is not valid JSON ({err.msg} at line "
                         f"{err.lineno} column {err.colno})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{source} must be a JSON object of constructor "
                         f"arguments, got {type(value).__name__}")
    return value


def _class_statement(tree, qualname: str) -> bool:
    """Whether a parsed module defines ``qualname`` (``Outer.Inner`` for a
    nested class) by ``class`` statements at its top level (also inside
    if, try and with blocks), read without running the module."""
    import ast

    compound = tuple(getattr(ast, n) for n in ("If", "Try", "TryStar", "With")
                     if hasattr(ast, n))

    def find(stmts, name):
        for stmt in stmts:
            if isinstance(stmt, ast.ClassDef) and stmt.name == name:
                return stmt
            if isinstance(stmt, compound):
                blocks = [stmt.body, getattr(stmt, "orelse", []),
                          getattr(stmt, "finalbody", [])]
                blocks += [h.body for h in getattr(stmt, "handlers", [])]
                for block in blocks:
                    hit = find(block, name)
                    if hit is not None:
                        return hit
        return None

    node = tree
    for name in qualname.split("."):
        node = find(node.body, name)
        if node is None:
            return False
    return True


def import_class(spec, what: str = "model_class"):
    """The ``torch.nn.Module`` subclass that ``MODULE:CLASS`` names, defined in MODULE itself, or one clear ValueError; nothing is called; :ref:`sec_byom`.

    The working folder is put on the import path first (as ``python -m``
    does), so that a class beside the user's command imports under both
    entry points. A module not yet imported is read and parsed before it
    is imported: unless its source defines CLASS with a ``class``
    statement, it is refused without running it. Importing it runs its
    import-time code; after the import the object must be a class, a
    ``torch.nn.Module`` subclass, and defined in MODULE (not re-exported
    there, as ``subprocess:Popen``-like names of other modules would be).
    The caller builds it only after these checks.
    """
    import ast
    import importlib
    import importlib.util
    import os
    import re
    import sys

    module, sep, name = str(spec).partition(":")
    if not (sep and re.fullmatch(_DOTTED, module) and re.fullmatch(_DOTTED, name)):
        raise ValueError(f"{what} must be MODULE:CLASS (dotted Python names, e.g. "
                         f"mypackage.models:MyNet), got {spec!r}")
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        if module not in sys.modules:
            try:
                found = importlib.util.find_spec(module)
            except Exception as err:   # a parent package failed to import
                raise ValueError(f"{what} {spec!r}: cannot find {module!r} "
                                 f"({type(err).__name__}: {err})") from None
            if found is None:
                raise ValueError(f"{what} {spec!r}: no module {module!r} in the "
                                 f"working folder {cwd!r} or the installed "
                                 "packages")
            try:
                source = found.loader.get_source(module)
            except Exception:
                source = None
            if source is None:
                raise ValueError(f"{what} {spec!r}: {module!r} has no Python "
                                 "source that flowjac can check before "
                                 "importing it; give a class of a .py module")
            try:
                tree = ast.parse(source)
            except SyntaxError as err:
                raise ValueError(f"{what} {spec!r}: {module!r} is not valid "
                                 f"Python ({err.msg}, line {err.lineno})") from None
            if not _class_statement(tree, name):
                raise ValueError(f"{what} {spec!r}: {module!r} has no class "
                                 f"statement for {name!r}; name a class defined "
                                 "in the module itself (it was not imported)")
        try:
            obj = importlib.import_module(module)
        except Exception as err:
            raise ValueError(f"{what} {spec!r}: importing {module!r} failed "
                             f"({type(err).__name__}: {err})") from None
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)
    for part in name.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what} {spec!r}: {module!r} has no {name!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, type):
        raise ValueError(f"{what} {spec!r} is a {type(obj).__name__}, not a "
                         "class; give your network's torch.nn.Module class")
    if not issubclass(obj, nn.Module):
        raise ValueError(f"{what} {spec!r} is not a torch.nn.Module subclass; "
                         "flowjac builds only networks (it was not called)")
    if obj.__module__ != module or obj.__qualname__ != name:
        raise ValueError(f"{what} {spec!r} is defined in {obj.__module__!r}, "
                         f"not in {module!r}; name it where it is defined, "
                         f"{obj.__module__}:{obj.__qualname__}")
    return obj


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


def _user_network(model_class, wrapper, arch) -> nn.Module:
    """The user's --model-class built with ``arch`` (checked before it is
    called), wrapped as ``wrapper(model)`` when a wrapper is named."""
    cls = import_class(model_class) if isinstance(model_class, str) else model_class
    wrap = None if wrapper is None else (
        import_class(wrapper, "wrapper") if isinstance(wrapper, str) else wrapper)
    for what, c in (("model_class", cls), ("wrapper", wrap)):
        if c is not None and not (isinstance(c, type) and issubclass(c, nn.Module)):
            raise ValueError(f"{what} must be a torch.nn.Module subclass, got {c!r}")
    try:
        net = cls(**arch)
    except TypeError as err:
        raise ValueError(f"arch does not fit {model_class}: {err}") from None
    except Exception as err:    # the user's constructor failed
        raise ValueError(f"model_class {model_class} failed to build "
                         f"from arch ({type(err).__name__}: {err})") from None
    if wrap is not None:
        try:
            net = wrap(net)
        except Exception as err:
            raise ValueError(f"wrapper {wrapper} failed to wrap the "
                             f"{model_class} network as wrapper(model) "
                             f"({type(err).__name__}: {err})") from None
    return net


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
