"""Spectra, divergences and log-likelihoods of flow maps from JVPs and VJPs.

* ``spectrum`` / ``flow_spectrum``: the top-r singular values and left and
  right singular vectors of the Jacobian of a map (of the flow map
  phi(z) = x(t1), x(t0) = z, on the fixed grid of ``integrate``), per
  latent, by randomized subspace iteration: J V from forward mode
  (``flow_jvp`` with k tangents for the flow), J^T U from reverse mode
  through the same solver, a QR after every product.
* ``trace_estimate``: Hutchinson and Hutch++ estimates of tr A from
  products A V only (A need not be symmetric).
* ``divergence``: tr D_x u(x, t) exactly (d JVPs) or stochastically.
* ``volume_change`` / ``log_likelihood``: the divergence integrated jointly
  with the state by the same Runge-Kutta stages (``rk_solve`` on the tuple
  state (x, logdet)), and log p_1(x) = log N(z; 0, I) - int_0^1 tr D_x u dt.
* ``frobenius_sq`` / ``flow_frobenius_sq``: the per-latent sensitivity
  ||J||_F^2 = E||J v||^2, by plain probes or Hutch++.

Probes are ``random_probes`` directions (``kind="gaussian"`` or
``"rademacher"``). Every function works on batches: latents or points
(B, ...) whose rows the map treats independently.

Explained in :ref:`sec_spectra`
(``book/spectra.md``).

Longer than 400 lines because the spectra, the trace estimators and the
log-likelihood share the product helpers and the argument checks; split,
each part would re-derive them.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from flowjac._checks import check_choice, check_finite, check_int
from flowjac.engine.jvp import flow_jvp, random_probes
from flowjac.engine.ode import check_solver_args, integrate, rk_solve
from flowjac.engine.velocity import func_jvp, has_exact_jvp

__all__ = ["PROBE_KINDS", "DIVERGENCES", "TRACE_ESTIMATORS", "Spectrum",
           "spectrum", "flow_spectrum", "trace_estimate", "divergence",
           "volume_change", "log_likelihood", "standard_normal_log_density",
           "frobenius_sq", "flow_frobenius_sq"]

#: Probe distributions (``random_probes(kind=...)``); both have E[v v^T] = I.
PROBE_KINDS = ("gaussian", "rademacher")
#: Stochastic trace estimators.
TRACE_ESTIMATORS = ("hutchinson", "hutch++")
#: How ``divergence`` and ``log_likelihood`` compute tr D_x u.
DIVERGENCES = ("exact",) + TRACE_ESTIMATORS
_EXACT_CHUNK = 64   # basis tangents per JVP call of the exact divergence


class Spectrum(NamedTuple):
    """Top-r singular triplets per latent; :ref:`sec_spectra`.

    ``values`` (B, r), decreasing; ``left`` ``(B, r, *out_shape)``, the output
    directions u_i; ``right`` ``(B, r, *in_shape)``, the input directions v_i;
    J v_i = s_i u_i and J^T u_i = s_i v_i. Each right vector's entry of
    largest magnitude is positive (a fixed sign).
    """

    values: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor


# -- checks ------------------------------------------------------------------

def _check_batch(name: str, x) -> torch.Tensor:
    check_finite(name, x)
    if x.ndim < 2:
        raise ValueError(f"{name} must have shape (B, ...) with at least one "
                         f"non-batch dimension, got {tuple(x.shape)}")
    if x.shape[0] < 1:
        raise ValueError(f"{name} must hold at least one point, got "
                         f"{tuple(x.shape)}")
    return x


def _dim(x: torch.Tensor) -> int:
    return math.prod(x.shape[1:])


def _check_products(name: str, out: torch.Tensor, want: tuple) -> torch.Tensor:
    if not torch.is_tensor(out) or tuple(out.shape) != tuple(want):
        got = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise ValueError(f"{name} must return a tensor of shape {tuple(want)}, "
                         f"got {got}")
    return check_finite(name + " output", out)


def _check_probes(probes, x: torch.Tensor, m: int | None) -> torch.Tensor:
    check_finite("probes", probes)
    if probes.dtype != x.dtype:
        raise ValueError(f"probes must have dtype {x.dtype}, got {probes.dtype}")
    if (probes.ndim != x.ndim + 1 or probes.shape[0] != x.shape[0]
            or probes.shape[2:] != x.shape[1:] or probes.shape[1] < 1):
        raise ValueError(f"probes must have shape (B, m, *x.shape[1:]) = "
                         f"({x.shape[0]}, m, {', '.join(map(str, x.shape[1:]))})"
                         f", got {tuple(probes.shape)}")
    if m is not None and probes.shape[1] != m:
        raise ValueError(f"probes must hold {m} directions per point, got "
                         f"{probes.shape[1]}")
    return probes.to(x.device)


# -- products ----------------------------------------------------------------

def _velocity_jvp(velocity, x, t, tangents):
    """(velocity(x, t), D_x velocity tangents): the exact jvp if present."""
    if has_exact_jvp(velocity):
        v, vd = velocity.jvp(x, t, tangents)
    else:
        v, vd = func_jvp(velocity, x, t, tangents)
    if vd.shape != tangents.shape:
        raise ValueError("velocity.jvp(x, t, tangents) must return tangents of "
                         f"shape {tuple(tangents.shape)}, got {tuple(vd.shape)}")
    return v, vd


def _func_jvp_k(fn, z, tangents):
    """fn(z) and J_fn(z) tangents for (B, k, ...) tangents, by torch.func."""
    from torch.func import jvp as _jvp
    from torch.func import vmap

    return vmap(lambda v: _jvp(fn, (z,), (v,)), in_dims=1,
                out_dims=(None, 1))(tangents)


class _Reverse:
    """J^T U for (B, k, *out) cotangents: one recorded graph, k backward passes."""

    def __init__(self, fn, z):
        with torch.enable_grad():
            self.z = z.detach().clone().requires_grad_(True)
            self.out = fn(self.z)
        if not torch.is_tensor(self.out) or self.out.shape[0] != z.shape[0]:
            raise ValueError("fn(z) must return a tensor of shape (B, ...) "
                             f"with B = {z.shape[0]}")
        check_finite("fn(z)", self.out.detach())

    def __call__(self, cot):
        k = cot.shape[1]
        rows = []
        for j in range(k):
            (g,) = torch.autograd.grad(self.out, self.z, cot[:, j].to(self.out),
                                       retain_graph=True, allow_unused=True)
            rows.append(torch.zeros_like(self.z) if g is None else g)
        return torch.stack(rows, 1).detach()


def _check_spectrum_args(z, r, passes, oversample) -> None:
    """The cheap checks, before any solve: r within the input dimension."""
    r = check_int("r", r, minimum=1)
    check_int("passes", passes, minimum=0)
    check_int("oversample", oversample, minimum=0)
    if r > _dim(z):
        raise ValueError(f"r must be <= the input dimension {_dim(z)}, got {r}")


def _orth(a: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of a (B, n, m), n >= m: reduced QR."""
    return torch.linalg.qr(a, mode="reduced")[0]


def _subspace_svd(jvp_fn, vjp_fn, z, out_shape, r, passes, oversample,
                  generator) -> Spectrum:
    """Randomized subspace iteration (Halko, Martinsson and Tropp, Alg. 4.4)."""
    bsz, in_shape = z.shape[0], tuple(z.shape[1:])
    d, p = _dim(z), math.prod(out_shape)
    rank = min(d, p)
    r = check_int("r", r, minimum=1)
    if r > rank:
        raise ValueError(f"r must be <= min(input dimension, output dimension)"
                         f" = {rank}, got {r}")
    passes = check_int("passes", passes, minimum=0)
    oversample = check_int("oversample", oversample, minimum=0)
    ell = min(r + oversample, rank)

    def jmul(w):            # w (B, d, l) -> J w (B, p, l)
        v = w.mT.reshape(bsz, w.shape[2], *in_shape).contiguous()
        jv = _check_products("the JVP", jvp_fn(v), (bsz, w.shape[2], *out_shape))
        return jv.reshape(bsz, w.shape[2], p).mT

    def jtmul(q):           # q (B, p, l) -> J^T q (B, d, l)
        u = q.mT.reshape(bsz, q.shape[2], *out_shape).contiguous()
        ju = _check_products("the VJP", vjp_fn(u), (bsz, q.shape[2], *in_shape))
        return ju.reshape(bsz, q.shape[2], d).mT

    omega = random_probes(z, ell, generator=generator).reshape(bsz, ell, d).mT
    q = _orth(jmul(omega))
    for _ in range(passes):
        w = _orth(jtmul(q))
        q = _orth(jmul(w))
    small = jtmul(q).mT                              # Q^T J, (B, l, d)
    u_s, s, vh = torch.linalg.svd(small, full_matrices=False)
    u = q @ u_s                                      # (B, p, l)
    u, s, vh = u[..., :r], s[:, :r], vh[:, :r, :]
    idx = vh.abs().argmax(-1, keepdim=True)
    sign = torch.sign(torch.gather(vh, -1, idx))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    vh = vh * sign
    u = u * sign.mT
    return Spectrum(s, u.mT.reshape(bsz, r, *out_shape),
                    vh.reshape(bsz, r, *in_shape))


def spectrum(fn: Callable, z: torch.Tensor, r: int, *, jvp: Callable | None = None,
             passes: int = 2, oversample: int = 5,
             generator: torch.Generator | None = None) -> Spectrum:
    """Top-r singular values and vectors of J_fn(z) per latent, by randomized subspace iteration; :ref:`sec_spectra`.

    ``fn`` maps a batch (B, ...) to (B, ...) row by row (e.g. a classifier
    composed with the flow, c o phi). J V uses ``jvp(z, V) -> J V`` for V of
    shape ``(B, l, *z.shape[1:])`` when given, else ``torch.func.jvp`` vmapped
    over the l tangents; J^T U uses reverse mode through ``fn`` (one
    recorded graph, one backward pass per column). l = r + ``oversample``
    (at most the rank bound) Gaussian starting vectors, ``passes`` rounds of
    J^T then J with a QR after each product. Cost: (1 + passes) l JVPs and
    (1 + passes) l VJPs per latent.
    """
    if not callable(fn):
        raise ValueError(f"fn must be callable, got {type(fn).__name__}")
    if jvp is not None and not callable(jvp):
        raise ValueError(f"jvp must be None or callable, got {type(jvp).__name__}")
    _check_batch("z", z)
    _check_spectrum_args(z, r, passes, oversample)
    reverse = _Reverse(fn, z)
    out_shape = tuple(reverse.out.shape[1:])
    if len(out_shape) == 0:
        raise ValueError("fn(z) must return (B, ...) with at least one "
                         "non-batch dimension; reshape a scalar output to (B, 1)")
    zz = z.detach().contiguous()

    def jvp_fn(v):
        check_finite("tangents", v)
        if jvp is not None:
            return jvp(zz, v)
        with torch.no_grad():
            return _func_jvp_k(fn, zz, v)[1]

    return _subspace_svd(jvp_fn, reverse, zz, out_shape, r, passes, oversample,
                         generator)


def flow_spectrum(velocity: Callable, z: torch.Tensor, r: int, *, steps: int,
                  method: str = "rk4", t0: float = 0.0, t1: float = 1.0,
                  passes: int = 2, oversample: int = 5,
                  generator: torch.Generator | None = None) -> Spectrum:
    """Top-r singular values and vectors of the flow map's Jacobian J_phi(z); :ref:`sec_spectra`.

    phi is the fixed-grid map z = x(t0) -> x(t1) of ``integrate(velocity,
    z, steps, method, t0, t1)``; J V comes from ``flow_jvp`` (exact forward
    mode, all l tangents in one solve) and J^T U from reverse mode through
    ``integrate``, so the result is the spectrum of the discrete map.
    Returns a ``Spectrum``: values (B, r) decreasing, left (B, r, ...) the
    directions in x(t1), right (B, r, ...) the directions in z.
    """
    steps, method, t0, t1 = check_solver_args(steps, method, t0, t1)
    _check_batch("z", z)
    _check_spectrum_args(z, r, passes, oversample)
    zz = z.detach().contiguous()

    def phi(y):
        return integrate(velocity, y, steps, method, t0, t1)

    def jvp_fn(v):
        check_finite("tangents", v)
        return flow_jvp(velocity, zz, v, steps, method, t0, t1)[1]

    return _subspace_svd(jvp_fn, _Reverse(phi, zz), zz, tuple(zz.shape[1:]), r,
                         passes, oversample, generator)


# -- traces and divergences --------------------------------------------------

def _trace_parts(matvec, probes, estimator):
    """Hutchinson or Hutch++ from flat probes (B, m, d); matvec (B, n, d) -> (B, n, d)."""
    m = probes.shape[1]
    if estimator == "hutchinson":
        av = matvec(probes)
        return (probes * av).sum(-1).mean(1)
    half = m // 2
    s, g = probes[:, :half], probes[:, half:]
    q = _orth(matvec(s).mT)                                 # (B, d, m/2)
    gp = g - (g @ q) @ q.mT                                 # (I - QQ^T) g
    out = matvec(torch.cat([q.mT, gp], 1))
    aq, ag = out[:, :half], out[:, half:]
    return (q.mT * aq).sum((-1, -2)) + (gp * ag).sum(-1).mean(1)


def _n_probes(estimator: str, k: int) -> int:
    """Random directions drawn for k products per trace estimate."""
    if estimator == "hutchinson":
        return k
    if k % 3:
        raise ValueError(f"k must be a multiple of 3 for hutch++ (k/3 sketch, "
                         f"k/3 projected and k/3 residual products), got {k}")
    return 2 * (k // 3)


def _resolve_probes(x, estimator, probes, k, kind, generator):
    """The fixed random directions (B, m, ...) of a stochastic estimate."""
    check_choice("kind", kind, PROBE_KINDS)
    if probes is not None:
        if k is not None:
            raise ValueError("give either probes or k, not both")
        probes = _check_probes(probes, x, None)
        if estimator == "hutch++" and probes.shape[1] % 2:
            raise ValueError("hutch++ probes must hold an even number of "
                             "directions (sketch half, residual half), got "
                             f"{probes.shape[1]}")
        return probes
    if k is None:
        k = 1 if estimator == "hutchinson" else 3
    k = check_int("k", k, minimum=1)
    return random_probes(x, _n_probes(estimator, k), generator=generator,
                         kind=kind)


def trace_estimate(matvec: Callable, probes: torch.Tensor, *,
                   estimator: str = "hutchinson") -> torch.Tensor:
    """Hutchinson or Hutch++ estimates of tr A per batch row, from products A V only; :ref:`sec_spectra`.

    ``probes`` (B, m, d) are random directions with E[v v^T] = I and
    ``matvec(V)`` returns A V row by row for V (B, n, d). Hutchinson:
    mean_j v_j^T A v_j (m products). Hutch++ (Meyer, Musco, Musco and
    Woodruff 2021) with m even: the first m/2 directions S sketch the range,
    Q = orth(A S), and tr A = tr(Q^T A Q) + tr((I - QQ^T) A (I - QQ^T)) is
    estimated with the last m/2 directions G on the second part; 3m/2
    products. Unbiased for any square A; its variance vanishes when A has
    rank <= m/2.
    """
    check_choice("estimator", estimator, TRACE_ESTIMATORS)
    check_finite("probes", probes)
    if probes.ndim != 3 or probes.shape[1] < 1:
        raise ValueError("probes must have shape (B, m, d) with m >= 1, got "
                         f"{tuple(probes.shape)}")
    if estimator == "hutch++" and probes.shape[1] % 2:
        raise ValueError("hutch++ probes must hold an even number of "
                         f"directions, got {probes.shape[1]}")

    def checked(v):
        return _check_products("matvec", matvec(v), tuple(v.shape))

    return _trace_parts(checked, probes, estimator)


def _velocity_and_divergence(velocity, x, t, estimator, probes):
    """(u(x, t), tr D_x u(x, t)) with fixed flat-able probes (B, m, ...);
    one ValueError naming the velocity when either is NaN or inf."""
    v, tr = _raw_velocity_and_divergence(velocity, x, t, estimator, probes)
    for what, val in (("velocity", v), ("divergence", tr)):
        if not bool(torch.isfinite(val).all()):
            bad = int((~torch.isfinite(val)).sum())
            raise ValueError(f"the velocity {type(velocity).__name__} gives a NaN "
                             f"or inf {what} ({bad} entries) at t = {float(t):.4g} "
                             f"on finite x; its weights or its code give "
                             "non-finite values there")
    return v, tr


def _raw_velocity_and_divergence(velocity, x, t, estimator, probes):
    bsz, rest, d = x.shape[0], tuple(x.shape[1:]), _dim(x)
    if estimator == "exact":
        eye = torch.eye(d, dtype=x.dtype, device=x.device)
        total, v = 0.0, None
        for lo in range(0, d, _EXACT_CHUNK):
            basis = eye[lo:lo + _EXACT_CHUNK]
            tang = basis.reshape(1, -1, *rest).expand(bsz, -1, *rest).contiguous()
            v, vd = _velocity_jvp(velocity, x, t, tang)
            total = total + (vd.reshape(bsz, -1, d) * basis).sum((-1, -2))
        return v, total
    state = {}

    def matvec(w):
        tang = w.reshape(bsz, w.shape[1], *rest)
        state["v"], vd = _velocity_jvp(velocity, x, t, tang)
        return vd.reshape(bsz, w.shape[1], d)

    tr = _trace_parts(matvec, probes.reshape(bsz, probes.shape[1], d), estimator)
    return state["v"], tr


def divergence(velocity: Callable, x: torch.Tensor, t, *,
               estimator: str = "exact", probes: torch.Tensor | None = None,
               k: int | None = None, kind: str = "gaussian",
               generator: torch.Generator | None = None) -> torch.Tensor:
    """tr D_x u(x, t) per point (B,): exact (d JVPs) or Hutchinson / Hutch++; :ref:`sec_spectra`.

    ``estimator="exact"`` pushes the d basis vectors through the velocity's
    JVP (in chunks); the stochastic estimators use ``k`` JVPs (default 1 for
    Hutchinson, 3 for Hutch++, which needs a multiple of 3) along
    ``random_probes`` directions of ``kind``, or the given ``probes``
    ``(B, m, *x.shape[1:])``: m = k for Hutchinson, m = 2k/3 for Hutch++ (first
    half sketch, second half residual).
    """
    check_choice("estimator", estimator, DIVERGENCES)
    _check_batch("x", x)
    tt = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    check_finite("t", tt)
    if tt.ndim != 0:
        raise ValueError(f"t must be a number or a 0-dim tensor, got shape "
                         f"{tuple(tt.shape)}")
    if estimator != "exact":
        probes = _resolve_probes(x, estimator, probes, k, kind, generator)
    elif probes is not None or k is not None:
        raise ValueError("probes and k apply to the stochastic estimators "
                         "only, not to estimator='exact'")
    with torch.no_grad():
        return _velocity_and_divergence(velocity, x.detach().contiguous(), tt,
                                        estimator, probes)[1]


def _segments(t0: float, t1: float, knots) -> list:
    """The times t0, knots..., t1 of a piecewise-uniform grid, checked."""
    if knots is None:
        knots = ()
    try:
        knots = [float(kn) for kn in knots]
    except (TypeError, ValueError):
        raise ValueError(f"knots must be a sequence of numbers, got {knots!r}"
                         ) from None
    lo, hi = min(t0, t1), max(t0, t1)
    bad = [kn for kn in knots if not (math.isfinite(kn) and lo < kn < hi)]
    if bad or len(set(knots)) != len(knots):
        raise ValueError(f"knots must be distinct times strictly between "
                         f"{lo} and {hi}, got {knots}")
    return [t0, *sorted(knots, reverse=t1 < t0), t1]


def volume_change(velocity: Callable, x: torch.Tensor, *, steps: int,
                  method: str = "rk4", t0: float = 0.0, t1: float = 1.0,
                  knots=(), divergence: str = "exact",
                  probes: torch.Tensor | None = None, k: int | None = None,
                  kind: str = "gaussian",
                  generator: torch.Generator | None = None):
    """(x(t1), int_{t0}^{t1} tr D_x u(x_t, t) dt) from x(t0) = x, state and integral solved jointly; :ref:`sec_spectra`.

    The tuple state (x, logdet) goes through ``rk_solve`` on the grid of
    ``integrate``, so x(t1) is the flow map exactly as ``integrate`` computes
    it and logdet is the same Runge-Kutta discretisation of
    d/dt log det J_t = tr D_x u(x_t, t). t1 < t0 integrates backwards.
    ``knots`` (times strictly between t0 and t1) split the path into
    segments of ``steps`` equal steps each: a fixed grid refined where the
    velocity is stiff (near t = 1 for a flow trained on discrete data); no
    knots is the grid of ``integrate``. Stochastic divergences hold their
    probes fixed along the whole path (an unbiased estimate of the
    integral); see ``divergence`` for ``divergence``, ``probes``, ``k`` and
    ``kind``.
    """
    check_choice("divergence", divergence, DIVERGENCES)
    steps, method, t0, t1 = check_solver_args(steps, method, t0, t1)
    times = _segments(t0, t1, knots)
    _check_batch("x", x)
    if divergence != "exact":
        probes = _resolve_probes(x, divergence, probes, k, kind, generator)
    elif probes is not None or k is not None:
        raise ValueError("probes and k apply to the stochastic divergences "
                         "only, not to divergence='exact'")

    def joint(state, t):
        return _velocity_and_divergence(velocity, state[0], t, divergence,
                                        probes)

    logdet = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    state = (x.detach().contiguous(), logdet)
    with torch.no_grad():
        for a, b in zip(times[:-1], times[1:]):
            state = rk_solve(joint, state, steps, method, a, b)
    return state


def standard_normal_log_density(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) per row of z (B, ...); :ref:`sec_spectra`."""
    _check_batch("z", z)
    d = _dim(z)
    return -0.5 * z.reshape(z.shape[0], -1).pow(2).sum(1) \
        - 0.5 * d * math.log(2 * math.pi)


def log_likelihood(velocity: Callable, x: torch.Tensor, *, steps: int,
                   method: str = "rk4", knots=(), divergence: str = "exact",
                   probes: torch.Tensor | None = None, k: int | None = None,
                   kind: str = "gaussian",
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """log p_1(x) per data point (B,) under the flow from an N(0, I) base; :ref:`sec_spectra`.

    Integrates (x, logdet) backwards from t = 1 to t = 0 (``volume_change``
    with t0 = 1, t1 = 0) and returns
    log N(z; 0, I) - int_0^1 tr D_x u(x_t, t) dt with z = x(0). Exact for
    the continuous flow up to the solver's error; with a stochastic
    ``divergence`` an unbiased estimate of the same discretised quantity.
    ``knots`` (times in (0, 1)) refine the grid piecewise, as in
    ``volume_change``.
    """
    z, logdet = volume_change(velocity, x, steps=steps, method=method, t0=1.0,
                              t1=0.0, knots=knots, divergence=divergence,
                              probes=probes,
                              k=k, kind=kind, generator=generator)
    return standard_normal_log_density(z) + logdet


# -- Frobenius norms ---------------------------------------------------------

def _frobenius(jvp_fn, make_reverse, z, k, estimator, kind, generator):
    """||J||_F^2 per row: k JVPs (Hutchinson) or Hutch++ on J^T J (3k/4 JVPs, k/4 VJPs)."""
    check_choice("estimator", estimator, TRACE_ESTIMATORS)
    check_choice("kind", kind, PROBE_KINDS)
    k = check_int("k", k, minimum=1)
    bsz, rest, d = z.shape[0], tuple(z.shape[1:]), _dim(z)

    def jv(w):   # flat (B, n, d) -> J w, flat (B, n, p)
        out = jvp_fn(w.reshape(bsz, w.shape[1], *rest).contiguous())
        check_finite("the JVP output", out)
        return out.reshape(bsz, w.shape[1], -1)

    if estimator == "hutchinson":
        v = random_probes(z, k, generator=generator, kind=kind)
        return jv(v.reshape(bsz, k, d)).pow(2).sum(-1).mean(1)
    if k % 4:
        raise ValueError(f"k must be a multiple of 4 for hutch++ (k/4 JVPs and "
                         f"k/4 VJPs for the sketch J^T J S, k/4 JVPs on it and "
                         f"k/4 on the residual), got {k}")
    m = k // 4
    reverse = make_reverse()
    s_dir = random_probes(z, m, generator=generator, kind=kind).reshape(bsz, m, d)
    w = jv(s_dir).reshape(bsz, m, *reverse.out.shape[1:])          # J S
    jt = _check_products("the VJP", reverse(w), (bsz, m, *rest))   # J^T J S
    q = _orth(jt.reshape(bsz, m, d).mT)                  # (B, d, m)
    g = random_probes(z, m, generator=generator, kind=kind).reshape(bsz, m, d)
    gp = g - (g @ q) @ q.mT                              # (I - QQ^T) g
    out = jv(torch.cat([q.mT, gp], 1))
    return out[:, :m].pow(2).sum((-1, -2)) + out[:, m:].pow(2).sum(-1).mean(1)


def frobenius_sq(fn: Callable, z: torch.Tensor, k: int, *,
                 estimator: str = "hutchinson", kind: str = "gaussian",
                 jvp: Callable | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """||J_fn(z)||_F^2 = E||J v||^2 per latent (B,), plain probes or Hutch++, k products; :ref:`sec_spectra`.

    ``estimator="hutchinson"``: the mean of ||J v||^2 over k probes of
    ``kind`` (k JVPs), the trace of the paper's estimator (J v)(J v)^T.
    ``"hutch++"`` is Hutch++ on J^T J (k a multiple of 4): Q = orth(J^T J S)
    from m = k/4 probes S (m JVPs, m VJPs) spans the top right singular
    space, and ||J||_F^2 = ||J Q||_F^2 + ||J (I - QQ^T)||_F^2, the first
    term exact from m JVPs and the second estimated with m probes (m JVPs).
    Both unbiased. ``jvp`` as in ``spectrum``.
    """
    if not callable(fn):
        raise ValueError(f"fn must be callable, got {type(fn).__name__}")
    _check_batch("z", z)
    zz = z.detach().contiguous()

    def jvp_fn(v):
        if jvp is not None:
            return jvp(zz, v)
        with torch.no_grad():
            return _func_jvp_k(fn, zz, v)[1]

    return _frobenius(jvp_fn, lambda: _Reverse(fn, zz), zz, k, estimator,
                      kind, generator)


def flow_frobenius_sq(velocity: Callable, z: torch.Tensor, k: int, *,
                      steps: int, method: str = "rk4", t0: float = 0.0,
                      t1: float = 1.0, estimator: str = "hutchinson",
                      kind: str = "gaussian",
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """||J_phi(z)||_F^2 per latent (B,) for the fixed-grid flow map, plain probes or Hutch++; :ref:`sec_spectra`.

    As ``frobenius_sq`` with JVPs from ``flow_jvp`` and VJPs by reverse
    mode through ``integrate``.
    """
    steps, method, t0, t1 = check_solver_args(steps, method, t0, t1)
    _check_batch("z", z)
    zz = z.detach().contiguous()

    def jvp_fn(v):
        return flow_jvp(velocity, zz, v, steps, method, t0, t1)[1]

    def make_reverse():
        return _Reverse(lambda y: integrate(velocity, y, steps, method, t0, t1),
                        zz)

    return _frobenius(jvp_fn, make_reverse, zz, k, estimator, kind, generator)
