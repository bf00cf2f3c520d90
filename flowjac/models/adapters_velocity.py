"""Third-party networks and plain callables as flowjac velocities, with fast exact tangents.

``from_torchcfm(net, y=...)``, ``from_flow_matching(wrapper, **extras)`` and
``from_callable(fn, order=...)`` return an ``AdaptedVelocity``: a callable
``velocity(x, t)`` (``t`` a Python number, a 0-dim tensor or a (B,) tensor)
with an exact ``jvp(x, t, tangents)``, so every solver, JVP, spectrum and
log-likelihood routine of flowjac accepts the third-party network as it is.

Fast exact tangents without touching the model. ``AdaptedVelocity.jvp``
runs the user's own forward code through ``joint_jvp`` of
``flowjac.engine.tangents``, the engine's tangent-carrying value and its
table of exact rules; ``benchmarks/interop.py`` measures it against
``torch.func.jvp``.

Safety: the first ``jvp`` call for each input signature (shapes, dtype,
device, form of t) is checked against ``torch.func.jvp`` of the original
model on one direction; an operation without a rule (``torch.cumsum``, an
in-place write into an x-dependent tensor, ...) or a mismatch (code that
tests ``isinstance(x, torch.Tensor)``) makes that signature fall back to
``torch.func.jvp`` with a warning; ``velocity.last_path`` says which path
ran. Like ``torch.func.jvp``, the fast path follows Python branches on
x-dependent comparisons by the primal's values.

The velocity room of ``flowjac.models.adapters`` (which re-exports every
name): no files are read here (``adapters_checkpoints`` reads them), and
torchcfm is imported only to recognise its README ``MLP``.
Explained in :ref:`sec_byom`.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Callable

import torch
from torch import nn

from flowjac._checks import check_choice
from flowjac.engine.tangents import NoRule as _NoRule
from flowjac.engine.tangents import check_tangents as _check_tangents
from flowjac.engine.tangents import joint_jvp
from flowjac.engine.velocity import func_jvp

__all__ = ["AdaptedVelocity", "from_torchcfm", "from_flow_matching", "from_callable"]


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
