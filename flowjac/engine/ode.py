"""Fixed-grid ODE solvers for the flow dx/dt = velocity(x, t).

Only fixed grids (``euler``, ``midpoint``, ``heun``, ``rk4``): an adaptive
solver chooses its step sizes from the state, so under forward-mode AD the
tangents would leak into the step-size control and the "JVP" would no longer
be the derivative of one fixed map. Every solver here is a composition of the
velocity with linear combinations, so it works under ``torch.no_grad``,
``torch.func.jvp`` and ``torch.func.vmap``.

Explained in :ref:`sec_neural_gaussian` (``book/neural_gaussian.md``).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from flowjac._checks import check_choice, check_int

__all__ = ["METHODS", "integrate", "rk_solve", "time_grid", "check_solver_args",
           "check_velocity_output"]

#: Fixed-grid Runge-Kutta methods: name -> (c, a, b) Butcher tableau.
METHODS = {
    "euler": ((0.0,), ((),), (1.0,)),
    "midpoint": ((0.0, 0.5), ((), (0.5,)), (0.0, 1.0)),
    "heun": ((0.0, 1.0), ((), (1.0,)), (0.5, 0.5)),
    "rk4": ((0.0, 0.5, 0.5, 1.0),
            ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
            (1 / 6, 1 / 3, 1 / 3, 1 / 6)),
}


def _check_time(name: str, value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_solver_args(steps, method, t0=0.0, t1=1.0):
    """Validate ``steps``, ``method``, ``t0`` and ``t1``; :ref:`sec_neural_gaussian`."""
    steps = check_int("steps", steps, minimum=1)
    check_choice("method", method, tuple(METHODS))
    return steps, method, _check_time("t0", t0), _check_time("t1", t1)


def time_grid(steps: int, t0: float = 0.0, t1: float = 1.0,
              dtype=torch.float64, device=None) -> torch.Tensor:
    """The ``steps + 1`` grid times t0, ..., t1 of ``integrate``; :ref:`sec_neural_gaussian`."""
    steps, _, t0, t1 = check_solver_args(steps, "euler", t0, t1)
    return torch.tensor([t0 + (t1 - t0) * i / steps for i in range(steps + 1)],
                        dtype=dtype, device=device)


def check_velocity_output(v, x: torch.Tensor) -> torch.Tensor:
    """Raise ValueError unless velocity(x, t) is a tensor shaped like x; :ref:`sec_neural_gaussian`."""
    if not torch.is_tensor(v):
        raise ValueError("velocity(x, t) must return a tensor, got "
                         f"{type(v).__name__}")
    if v.shape != x.shape:
        raise ValueError("velocity(x, t) must return the shape of x, "
                         f"{tuple(x.shape)}; got {tuple(v.shape)}")
    return v


def _check_x0(x0) -> torch.Tensor:
    if not torch.is_tensor(x0):
        raise ValueError(f"x0 must be a torch tensor, got {type(x0).__name__}")
    if not x0.is_floating_point():
        raise ValueError(f"x0 must be a floating tensor, got dtype {x0.dtype}")
    return x0


def _rk_stages(fn: Callable, state: tuple, t: float, h: float,
               method: str) -> tuple:
    """One explicit Runge-Kutta step of a tuple state; fn(state, t) -> derivatives.

    The one stage loop of the package: ``integrate`` runs it on (x,) and
    ``flowjac.engine.jvp.flow_jvp`` on (x, x_dot), so the tangent is
    discretised by exactly the stages of the primal.
    """
    c, a, b = METHODS[method]
    ks = []
    for ci, ai in zip(c, a):
        si = state
        for aij, kj in zip(ai, ks):
            if aij != 0.0:
                si = tuple(s + (h * aij) * k for s, k in zip(si, kj))
        ti = torch.tensor(t + ci * h, dtype=state[0].dtype,
                          device=state[0].device)
        ks.append(tuple(fn(si, ti)))
    for bi, ki in zip(b, ks):
        if bi != 0.0:
            state = tuple(s + (h * bi) * k for s, k in zip(state, ki))
    return state


def rk_solve(fn: Callable, state: tuple, steps: int, method: str = "rk4",
             t0: float = 0.0, t1: float = 1.0, return_path: bool = False):
    """Solve d(state)/dt = fn(state, t) on the fixed grid of ``integrate``; :ref:`sec_neural_gaussian`.

    ``state`` is a tuple of tensors and ``fn(state, t)`` returns a tuple of
    their derivatives (``t`` a 0-dim tensor of the first tensor's dtype).
    Returns the final state, or with ``return_path=True`` the list of
    states at every grid time.
    """
    steps, method, t0, t1 = check_solver_args(steps, method, t0, t1)
    state = tuple(state)
    path = [state] if return_path else None
    for i in range(steps):
        ti = t0 + (t1 - t0) * i / steps
        h = t0 + (t1 - t0) * (i + 1) / steps - ti
        state = _rk_stages(fn, state, ti, h, method)
        if return_path:
            path.append(state)
    return path if return_path else state


def _primal(velocity):
    def fn(state, t):
        return (check_velocity_output(velocity(state[0], t), state[0]),)
    return fn


def integrate(velocity: Callable, x0: torch.Tensor, steps: int,
              method: str = "rk4", t0: float = 0.0, t1: float = 1.0,
              return_path: bool = False) -> torch.Tensor:
    """Solve dx/dt = velocity(x, t) from t0 to t1 on a fixed grid; :ref:`sec_neural_gaussian`.

    ``velocity(x, t)`` receives the batch ``x`` and ``t`` as a 0-dim tensor
    of x's dtype and device, and must return a tensor of x's shape. The grid
    has ``steps`` equal steps (``time_grid``); ``method`` is one of
    ``euler``, ``midpoint``, ``heun`` (2nd order) or ``rk4``. Returns x(t1),
    or with ``return_path=True`` the states at all grid times stacked into a
    tensor of shape ``(steps + 1, *x0.shape)`` (``path[0]`` is x0,
    ``path[-1]`` is x(t1)). Pure tensor code: differentiable in reverse and
    forward mode and vmappable.
    """
    x = _check_x0(x0)
    out = rk_solve(_primal(velocity), (x,), steps, method, t0, t1, return_path)
    return torch.stack([s[0] for s in out]) if return_path else out[0]
