"""The velocity protocol: what the solvers and JVP routines accept.

A velocity is any callable ``velocity(x, t) -> tensor shaped like x``, with
``t`` a 0-dim tensor of x's dtype and device (``Velocity``). It may also
have an exact tangent method ``jvp(x, t, tangents) -> (velocity(x, t),
D_x velocity(x, t) tangents)`` for tangents shaped like x or (B, k, ...)
(``TangentVelocity``); ``flowjac.engine.jvp.flow_jvp`` uses it when present
and ``torch.func.jvp`` otherwise. ``velocity_fn(model)`` makes one from a
trained network; third-party models plug in by satisfying the protocol.
Explained in :ref:`sec_neural_gaussian`.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from flowjac._checks import check_choice

__all__ = ["Velocity", "TangentVelocity", "has_exact_jvp", "func_jvp",
           "PARAMETERIZATIONS",
           "ModelVelocity", "velocity_fn"]

PARAMETERIZATIONS = ("velocity", "x1")


@runtime_checkable
class Velocity(Protocol):
    """``velocity(x, t)``: the drift of dx/dt, shaped like x; :ref:`sec_neural_gaussian`."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class TangentVelocity(Velocity, Protocol):
    """A velocity with an exact ``jvp(x, t, tangents) -> (v, v_dot)``; :ref:`sec_neural_gaussian`."""

    def jvp(self, x: torch.Tensor, t: torch.Tensor,
            tangents: torch.Tensor) -> tuple: ...


def func_jvp(velocity, x: torch.Tensor, t, tangents: torch.Tensor):
    """(velocity(x, t), D_x velocity(x, t) tangents) by ``torch.func.jvp``; :ref:`sec_jvp_diagnostics`.

    The generic path for a velocity without its own ``jvp``: one forward-mode
    call, vmapped over k tangents (B, k, ...) with the primal computed once.
    """
    from torch.func import jvp as _func_jvp
    from torch.func import vmap

    from flowjac.engine.ode import check_velocity_output

    def f(y):
        return check_velocity_output(velocity(y, t), y)

    if tangents.shape == x.shape:
        return _func_jvp(f, (x,), (tangents,))
    return vmap(lambda td: _func_jvp(f, (x,), (td,)), in_dims=1,
                out_dims=(None, 1))(tangents)


def has_exact_jvp(velocity) -> bool:
    """Whether ``velocity`` provides its own exact ``jvp``; :ref:`sec_neural_gaussian`."""
    return callable(getattr(velocity, "jvp", None))


def _bcast_t(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        return t
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t must be a scalar or have shape ({x.shape[0]},), "
                         f"got {tuple(t.shape)}")
    return t.view(-1, *([1] * (x.ndim - 1)))


class ModelVelocity:
    """The drift velocity(x, t) of a trained model, with a fast exact ``jvp``; :ref:`sec_neural_gaussian`.

    For ``"x1"`` the drift is (g(x, t') - x) / (1 - t') at
    t' = min(t, t_max): the drift is evaluated at t_max for t > t_max
    (only the last stage of a solver that reaches t = 1, e.g. rk4 or heun,
    sees this), which keeps it finite; the error is O(1 - t_max) on that
    stage only. ``jvp(x, t, tangents)`` uses the model's ``forward_jvp``
    when it has one (the engine's exact tangent rules), otherwise
    ``torch.func.jvp`` (``func_jvp``): every ModelVelocity satisfies
    ``TangentVelocity``.
    """

    def __init__(self, model: nn.Module, parameterization: str = "velocity",
                 t_max: float = 0.999):
        check_choice("parameterization", parameterization, PARAMETERIZATIONS)
        if not (isinstance(t_max, (int, float)) and 0 < t_max < 1):
            raise ValueError(f"t_max must be a number in (0, 1), got {t_max!r}")
        self.model, self.parameterization = model, parameterization
        self.t_max = float(t_max)
        self._fast = callable(getattr(model, "forward_jvp", None))

    def _t(self, t, x):
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        return t.clamp(max=self.t_max)

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        if self.parameterization == "velocity":
            return self.model(x, t)
        tc = self._t(t, x)
        return (self.model(x, tc) - x) / (1 - _bcast_t(tc, x))

    def jvp(self, x: torch.Tensor, t, tangents: torch.Tensor):
        """(velocity(x, t), D_x velocity(x, t) tangents): the model's forward_jvp, else torch.func."""
        if not self._fast:
            return func_jvp(self, x, t, tangents)
        if self.parameterization == "velocity":
            return self.model.forward_jvp(x, t, tangents)
        tc = self._t(t, x)
        g, gd = self.model.forward_jvp(x, tc, tangents)
        den = 1 - _bcast_t(tc, x)
        dend = den.unsqueeze(1) if gd.shape != x.shape and den.ndim else den
        return (g - x) / den, (gd - tangents) / dend


def velocity_fn(model: nn.Module, parameterization: str = "velocity",
                t_max: float = 0.999) -> ModelVelocity:
    """The ODE drift velocity(x, t) of a CFM-trained model; :ref:`sec_neural_gaussian`."""
    return ModelVelocity(model, parameterization, t_max)
