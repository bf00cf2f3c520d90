"""Jacobian-vector products of the flow map phi(z) = x(t1), x(t0) = z.

* ``flow_jvp``: exact forward-mode AD through the fixed-grid solver. The
  state (x, x_dot) is propagated jointly: every Runge-Kutta stage makes one
  ``torch.func.jvp`` call of the velocity, so the primal path is computed once
  however many probes there are (k probes are a ``vmap`` over the tangents
  with an unbatched primal).
* ``fd_jvp``: finite differences, (phi(z + eps v) - phi(z)) / eps (forward)
  or (phi(z + eps v) - phi(z - eps v)) / (2 eps) (central), with the base and
  the perturbed points in *one* batched solve, and the division by eps done
  (the authors' code returned J (eps v) and ran two solves).
* ``random_probes``: N(0, I) directions. For v ~ N(0, I) independent of z,
  E[(Jv)(Jv)^T | z] = J J^T, so the second moment of the JVPs estimates
  E_z[J J^T]; no rescaling of v is needed (a probe eps * v gives eps^2 J J^T).
* ``jvp_cost``: what an exact JVP costs against a sample on the same grid,
  as a ratio of median times (``median_seconds``, cases interleaved).

Explained in :ref:`sec_jvp_diagnostics` (``book/jvp_diagnostics.md``); used in
:ref:`sec_neural_gaussian`.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import torch
from torch.func import jvp as _func_jvp

from flowjac._checks import check_choice, check_int
from flowjac.engine.ode import (
    _check_x0,
    check_solver_args,
    check_velocity_output,
    integrate,
    rk_solve,
)
from flowjac.engine.velocity import func_jvp, has_exact_jvp

__all__ = ["flow_jvp", "fd_jvp", "random_probes", "reference_jvp",
           "check_tangents", "median_seconds", "jvp_cost"]

SCHEMES = ("forward", "central")
JVP_MODES = ("auto", "func")


def check_tangents(x0: torch.Tensor, tangents) -> int | None:
    """Validate tangents against x0; return k for (B, k, ...) or None; :ref:`sec_jvp_diagnostics`.

    Allowed shapes: ``x0.shape`` (one direction per point) or
    ``(B, k, *x0.shape[1:])`` (k directions per point).
    """
    _check_x0(x0)
    if x0.ndim < 1:
        raise ValueError("x0 must have a batch dimension, got a 0-dim tensor")
    if not torch.is_tensor(tangents):
        raise ValueError("tangents must be a torch tensor, got "
                         f"{type(tangents).__name__}")
    if tangents.dtype != x0.dtype or tangents.device != x0.device:
        raise ValueError("tangents must have x0's dtype and device "
                         f"({x0.dtype}, {x0.device}), got ({tangents.dtype}, "
                         f"{tangents.device})")
    if tangents.shape == x0.shape:
        return None
    if (tangents.ndim == x0.ndim + 1 and tangents.shape[0] == x0.shape[0]
            and tangents.shape[2:] == x0.shape[1:] and tangents.shape[1] >= 1):
        return tangents.shape[1]
    k_shape = (x0.shape[0], "k", *x0.shape[1:])
    raise ValueError(f"tangents must have shape {tuple(x0.shape)} or "
                     f"{k_shape}, got {tuple(tangents.shape)}")


def _stage_jvp(velocity, x, xdot, t, k, mode):
    """(velocity(x, t), d/ds velocity(x + s xdot, t)) with k batched tangents."""
    if mode == "auto" and has_exact_jvp(velocity):
        v, vd = velocity.jvp(x, t, xdot)
        check_velocity_output(v, x)
        if vd.shape != xdot.shape:
            raise ValueError("velocity.jvp(x, t, tangents) must return "
                             f"tangents of shape {tuple(xdot.shape)}, got "
                             f"{tuple(vd.shape)}")
        return v, vd

    return func_jvp(velocity, x, t, xdot)


def flow_jvp(velocity: Callable, x0: torch.Tensor, tangents: torch.Tensor,
             steps: int = 100, method: str = "rk4", t0: float = 0.0,
             t1: float = 1.0, jvp_mode: str = "auto",
             create_graph: bool = False):
    """Exact J_phi(x0) tangents by forward-mode AD through the solver; :ref:`sec_jvp_diagnostics`.

    Returns ``(x1, jvp)``: x1 = phi(x0) exactly as ``flowjac.engine.ode.integrate``
    computes it, and jvp of the shape of ``tangents`` (``x0.shape``, or
    ``(B, k, *x0.shape[1:])`` for k probes per point). The tangent obeys the
    variational equation d(x_dot)/dt = D_x velocity(x, t) x_dot discretised
    by the same Runge-Kutta stages as x, so jvp is the exact derivative of
    the discrete flow map; the primal path is computed once for all k.

    Each stage differentiates the velocity with ``torch.func.jvp`` (vmapped
    over the k tangents). With ``jvp_mode="auto"`` a velocity that has a
    ``jvp(x, t, tangents) -> (v, v_dot)`` method (``flowjac.engine.velocity.velocity_fn``
    of an ``MLPFlow`` or ``FlowUNet``) uses it instead: the engine's exact
    tangent rules (``flowjac.engine.tangents``), much faster on CPU;
    ``jvp_mode="func"`` forces ``torch.func.jvp``.

    Runs without recording an autograd graph (inference mode, memory
    independent of ``steps``) unless ``create_graph=True``, which records
    every stage so that the result can be differentiated in reverse mode
    (as when training with a Jacobian penalty).
    """
    if not isinstance(create_graph, bool):
        raise ValueError(f"create_graph must be True or False, got "
                         f"{create_graph!r}")
    with torch.set_grad_enabled(create_graph):
        return _flow_jvp(velocity, x0, tangents, steps, method, t0, t1,
                         jvp_mode)


def _flow_jvp(velocity, x0, tangents, steps, method, t0, t1, jvp_mode):
    steps, method, t0, t1 = check_solver_args(steps, method, t0, t1)
    k = check_tangents(x0, tangents)
    check_choice("jvp_mode", jvp_mode, JVP_MODES)

    def joint(state, t):
        return _stage_jvp(velocity, state[0], state[1], t, k, jvp_mode)

    return rk_solve(joint, (x0, tangents), steps, method, t0, t1)


def reference_jvp(velocity: Callable, x0: torch.Tensor, tangents: torch.Tensor,
                  steps: int = 100, method: str = "rk4", t0: float = 0.0,
                  t1: float = 1.0):
    """``torch.func.jvp`` of the whole ``integrate`` call (the tests' reference); :ref:`sec_jvp_diagnostics`.

    Same contract as ``flow_jvp``; k probes are k separate calls, so the
    primal path is recomputed k times.
    """
    steps, method, t0, t1 = check_solver_args(steps, method, t0, t1)
    k = check_tangents(x0, tangents)

    def phi(z):
        return integrate(velocity, z, steps, method, t0, t1)

    if k is None:
        return _func_jvp(phi, (x0,), (tangents,))
    outs = [_func_jvp(phi, (x0,), (tangents[:, j],)) for j in range(k)]
    return outs[0][0], torch.stack([o[1] for o in outs], dim=1)


def _check_eps(eps) -> float:
    try:
        eps = float(eps)
    except (TypeError, ValueError):
        raise ValueError(f"eps must be a positive real number, got {eps!r}"
                         ) from None
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a positive finite number, got {eps}")
    return eps


def fd_jvp(velocity: Callable, x0: torch.Tensor, tangents: torch.Tensor,
           eps: float, steps: int = 100, method: str = "rk4",
           scheme: str = "forward", t0: float = 0.0, t1: float = 1.0):
    """Finite-difference J_phi(x0) tangents, divided by eps, one batched solve; :ref:`sec_jvp_diagnostics`.

    ``scheme="forward"``: (phi(x0 + eps v) - phi(x0)) / eps, error O(eps)
    plus round-off O(u / eps). ``scheme="central"``:
    (phi(x0 + eps v) - phi(x0 - eps v)) / (2 eps), error O(eps^2) plus
    O(u / eps). The base points and all perturbed points are stacked into
    one batch and solved together (B (1 + k) rows for forward, B (1 + 2k)
    for central, which also returns the exact x1). Returns ``(x1, jvp)``
    like ``flow_jvp``. The velocity must treat batch rows independently.
    """
    steps, method, t0, t1 = check_solver_args(steps, method, t0, t1)
    k = check_tangents(x0, tangents)
    eps = _check_eps(eps)
    check_choice("scheme", scheme, SCHEMES)
    bsz, rest = x0.shape[0], x0.shape[1:]
    tv = tangents.unsqueeze(1) if k is None else tangents
    kk = tv.shape[1]
    base = x0.unsqueeze(1)
    plus = (base + eps * tv).reshape(bsz * kk, *rest)
    parts = [x0, plus]
    if scheme == "central":
        parts.append((base - eps * tv).reshape(bsz * kk, *rest))
    out = integrate(velocity, torch.cat(parts), steps, method, t0, t1)
    x1 = out[:bsz]
    y_plus = out[bsz:bsz * (1 + kk)].reshape(bsz, kk, *rest)
    if scheme == "forward":
        jv = (y_plus - x1.unsqueeze(1)) / eps
    else:
        y_minus = out[bsz * (1 + kk):].reshape(bsz, kk, *rest)
        jv = (y_plus - y_minus) / (2 * eps)
    return x1, (jv.squeeze(1) if k is None else jv)


def random_probes(x0: torch.Tensor, k: int | None = None,
                  generator: torch.Generator | None = None,
                  kind: str = "gaussian") -> torch.Tensor:
    """N(0, I) (or Rademacher) directions shaped like x0, or (B, k, ...) for k probes; :ref:`sec_jvp_diagnostics`.

    For v ~ N(0, I), E[(Jv)(Jv)^T] = J J^T, so no rescaling is needed.
    ``kind="rademacher"`` draws independent +-1 entries instead, which also
    have E[v v^T] = I (so the same identity holds) with a smaller variance of
    quadratic forms (see :ref:`sec_spectra`). Drawn on the generator's device (CPU by default) and moved to
    x0's; ``kind="gaussian"`` draws exactly the stream it always did.
    """
    _check_x0(x0)
    if x0.ndim < 1:
        raise ValueError("x0 must have a batch dimension, got a 0-dim tensor")
    check_choice("kind", kind, ("gaussian", "rademacher"))
    shape = tuple(x0.shape)
    if k is not None:
        k = check_int("k", k, minimum=1)
        shape = (shape[0], k, *shape[1:])
    gdev = generator.device if generator is not None else x0.device
    if kind == "rademacher":
        bits = torch.randint(0, 2, shape, generator=generator, device=gdev)
        v = (2 * bits - 1).to(x0.dtype)
    else:
        v = torch.randn(shape, generator=generator, dtype=x0.dtype,
                        device=gdev)
    return v.to(x0.device)


def median_seconds(cases: dict, repeats: int = 3, warmup: bool = True) -> dict:
    """Median wall seconds of each callable in ``cases`` (after one warm-up call of each unless ``warmup=False``), the cases interleaved so that load drifts hit all alike; :ref:`sec_byom_cost`."""
    repeats = check_int("repeats", repeats, minimum=1)
    for fn in cases.values() if warmup else ():
        fn()
    times = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def jvp_cost(velocity: Callable, x0: torch.Tensor, tangents: torch.Tensor, *,
             steps: int, method: str = "rk4", repeats: int = 3,
             torch_func: bool = False) -> dict:
    """What an exact JVP of the flow map costs against a sample on the same grid: ``{"exact": ratio}`` (and ``"torch_func"``); :ref:`sec_byom_cost`.

    Times ``integrate`` (a sample) and ``flow_jvp`` along ``tangents`` (one
    direction, or k probes: ``(B, k, ...)``) with ``median_seconds``, under
    ``torch.no_grad()`` and after one warm-up call of the velocity, and
    returns their ratio; with ``torch_func=True``
    also the ratio for ``torch.func.jvp`` at every stage
    (``jvp_mode="func"``), what a user without the engine's rules would run.
    Ratios only: the absolute times of a shared machine mean little.
    """
    cases = {"sample": lambda: integrate(velocity, x0, steps, method),
             "exact": lambda: flow_jvp(velocity, x0, tangents, steps, method)}
    if torch_func:
        cases["torch_func"] = lambda: flow_jvp(velocity, x0, tangents, steps, method,
                                               jvp_mode="func")
    with torch.no_grad():
        velocity(x0, torch.tensor(0.5, dtype=x0.dtype, device=x0.device))   # warm-up
        secs = median_seconds(cases, repeats, warmup=False)
    return {name: secs[name] / secs["sample"] for name in cases if name != "sample"}
