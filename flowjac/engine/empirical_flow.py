"""The empirical flow: u* integrated by the engine, alone or before a network (the hybrid sampler).

``empirical_sample`` follows the closed form u*
(``flowjac.closedform.empirical.optimal_velocity``) from noise to t = 1 on
a grid refined towards the stiff end, where every path lands on a training
point (:ref:`sec_empirical_memorisation`); ``hybrid_sample`` follows u* on
[0, tau] and a given velocity on [tau, 1] (:ref:`sec_empirical_hybrid`).
The study of the hybrid sampler on a grid of tau, with its bands and its
rule, is ``flowjac.pipelines.hybrid``.
"""
from __future__ import annotations

import math

import torch

from flowjac._checks import check_int
from flowjac.closedform.empirical import _check_data, _check_x, optimal_velocity
from flowjac.engine.ode import integrate

__all__ = ["empirical_sample", "hybrid_sample"]


def empirical_sample(x0, data, steps=20, decades=3, method="midpoint",
                     chunk_size=None) -> torch.Tensor:
    """Integrate u* from x0 to t = 1 on a grid refined geometrically towards 1; :ref:`sec_empirical_memorisation`.

    The segments [0, 0.9], [0.9, 0.99], ..., [1 - 10^-decades, 1] get
    ``steps`` steps each, so that the stiff end of the path, where the
    weights collapse at the scale of the data's spacing, is resolved.
    ``method`` must never evaluate at t = 1: "euler" or "midpoint".
    """
    steps = check_int("steps", steps, minimum=1)
    decades = check_int("decades", decades, minimum=0)
    if method not in ("euler", "midpoint"):
        raise ValueError(f"method must be 'euler' or 'midpoint' (u* is "
                         f"singular at t = 1), got {method!r}")
    data = _check_data(data)
    x = _check_x(x0, data, "x0")

    def u_star(z, t):
        return optimal_velocity(z, t, data, chunk_size)

    knots = [0.0] + [1.0 - 10.0 ** -k for k in range(1, decades + 1)] + [1.0]
    for lo, hi in zip(knots[:-1], knots[1:]):
        x = integrate(u_star, x, steps, method=method, t0=lo, t1=hi)
    return x


def _switch_plan(tau, steps, exact_tau):
    """(steps of u*, steps of the continuation, switch time) for one tau."""
    steps = check_int("steps", steps, minimum=1)
    try:
        tau = float(tau)
    except (TypeError, ValueError):
        raise ValueError(f"tau must be a number in [0, 1], got {tau!r}") from None
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must lie in [0, 1], got {tau}")
    if not exact_tau:
        n_emp = int(round(tau * steps))
        return n_emp, steps - n_emp, n_emp / steps
    # ceil, robust to tau * steps = 3.0000000000000004
    n_emp = math.ceil(round(tau * steps, 9))
    n_model = math.ceil(round((1.0 - tau) * steps, 9))
    return n_emp, n_model, tau


def hybrid_sample(velocity, x0, data, tau, steps, method="midpoint",
                  chunk_size=None, exact_tau=False) -> torch.Tensor:
    """Follow u* on [0, tau], then ``velocity`` on [tau, 1]; :ref:`sec_empirical_hybrid`.

    ``steps`` is the number of grid steps on [0, 1]; round(tau * steps) of
    them follow u*. With ``exact_tau`` the switch is at tau itself:
    ceil(tau * steps) equal steps of u* on [0, tau] and
    ceil((1 - tau) * steps) of ``velocity`` on [tau, 1], none longer than
    1 / steps (so tau = 0 is the flow's own sampler). ``velocity(x, t)``
    may be None when no model segment is left. As u* is undefined at
    t = 1, a segment of u* that ends at 1 needs a method that never
    evaluates there: "euler" or "midpoint".
    """
    n_emp, n_model, t_switch = _switch_plan(tau, steps, exact_tau)
    if velocity is None and n_model > 0:
        raise ValueError("velocity must be a callable velocity(x, t) unless "
                         "tau rounds to 1 (no model segment)")
    if n_model == 0 and method not in ("euler", "midpoint"):
        raise ValueError(f"method must be 'euler' or 'midpoint' when u* is "
                         f"followed up to t = 1 (u* is singular there), "
                         f"got {method!r}")
    data = _check_data(data)
    x = _check_x(x0, data, "x0")
    if n_emp > 0:
        def u_star(z, t):
            return optimal_velocity(z, t, data, chunk_size)
        x = integrate(u_star, x, n_emp, method=method, t0=0.0, t1=t_switch)
    if n_model > 0:
        x = integrate(velocity, x, n_model, method=method,
                      t0=t_switch, t1=1.0)
    return x
