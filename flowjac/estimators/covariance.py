"""Covariances from JVPs: the Gaussian interpolation identity, estimated by unbiased Monte Carlo.

For Z, Z' independent N(0, I) in the latent space, rho in [0, 1],
Z_rho = rho Z + sqrt(1 - rho^2) Z' and a map f with Jacobian J,

    Cov(f(Z)) = int_0^1 h(rho) d rho,     h(rho) = E[J(Z) J(Z_rho)^T].

For a probe v with E[v v^T] = I, independent of everything,
E_v[(J(Z) v)(J(Z_rho) v)^T] = J(Z) J(Z_rho)^T, so two JVPs that share one
probe give an unbiased term of the integrand. The endpoints are the known
bounds: h(1) = E[J J^T] (the JVP second moment, the Gaussian Poincare upper
bound) and h(0) = E[J] E[J]^T (Stein's lower bound, E[J] = Cov(f(Z), Z)).
In the Hermite (Wiener chaos) expansion of f the integrand h weights the
order-q part by q rho^(q - 1), so h is non-decreasing in rho on the
diagonal, flat exactly when f is affine, and its integral is the covariance.

The estimator (``draw_pairs``, ``covariance_from_pairs``):

* n pairs (Z_i, Z_rho_i), k probes per pair; the rho of each pair comes from
  a quadrature rule on [0, 1] with weights w_i (mean 1 for the unbiased
  rules), and ``cov`` = (1/n) sum_i w_i sym(J(Z_i) v_ij (J(Z_rho_i) v_ij)^T)
  averaged over the k probes (sym(A) = (A + A^T) / 2; the expectation is
  symmetric because (Z, Z_rho) is exchangeable).
* ``upper`` = E[J J^T] from the same 2 n JVPs (Z_i and Z_rho_i are both
  N(0, I)). ``lower`` = E[J] E[J]^T from cross terms between *different*
  pairs that share a probe: consecutive blocks of ``probe_block`` pairs use
  the same probes, and for i != j in a block E[(J(Z_i) v)(J(Z_j) v)^T] =
  E[J] E[J]^T exactly, because Z_i and Z_j are independent.
* Standard errors are taken over the probe blocks (independent units), so
  they ignore the small gain from stratifying rho (conservative). They
  assume a finite variance: with heavy-tailed terms (``hill_index`` below
  2) they understate, and no standard error can show contributions that
  the sample missed.

The design (the probes and the rho rule, with their measurements) is in
``flowjac.estimators.covariance_pairs``, the reduction in
``flowjac.estimators.covariance_reduction``; this module holds the
estimators of Cov f(Z) for a map and for a flow, and every public name of the
three is importable from here.

Explained in :ref:`sec_exact_covariances` (``book/exact_covariances.md``).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch.func import jvp as _func_jvp

from flowjac._checks import check_int
from flowjac.engine.jvp import flow_jvp
from flowjac.engine.ode import check_solver_args
from flowjac.estimators.covariance_pairs import (
    GL_NODES,  # noqa: F401  (the chapter reads it here)
    PROBES,
    QUADRATURES,
    PairDesign,
    draw_pairs,
)
from flowjac.estimators.covariance_reduction import (
    CovarianceEstimate,
    _reduce,
    covariance_from_pairs,
    sample_covariance,
    summarize_probe,
)

__all__ = ["QUADRATURES", "PROBES", "PairDesign", "PairJVPs",
           "CovarianceEstimate", "draw_pairs", "covariance_from_pairs",
           "sample_covariance", "jvp_covariance",
           "flow_jvp_covariance", "flow_pair_jvps", "summarize_probe"]


def _check_outputs(f, jv, bsz: int, k: int, name: str):
    """Validate (f (B, p), jv (B, k, p)) returned for a batch of B points."""
    if not torch.is_tensor(f) or f.ndim != 2 or f.shape[0] != bsz:
        got = tuple(f.shape) if torch.is_tensor(f) else type(f).__name__
        raise ValueError(f"{name} must map a batch (B, ...) to outputs of "
                         f"shape (B, p) with B = {bsz}; got {got}")
    if not torch.is_tensor(jv) or jv.shape != (bsz, k, f.shape[1]):
        got = tuple(jv.shape) if torch.is_tensor(jv) else type(jv).__name__
        raise ValueError(f"the JVPs of {name} must have shape "
                         f"{(bsz, k, f.shape[1])}, got {got}")
    if not (torch.isfinite(f).all() and torch.isfinite(jv).all()):
        raise ValueError(f"{name} returned non-finite outputs or JVPs (nan "
                         "or inf); check the map and its input range")
    return f, jv


def _map_jvp(fn, x: torch.Tensor, tangents: torch.Tensor, name: str):
    """(fn(x) as (B, p), JVPs (B, k, p)) by fn.jvp or torch.func.jvp."""
    bsz, k = x.shape[0], tangents.shape[1]
    if callable(getattr(fn, "jvp", None)):
        f, jv = fn.jvp(x, tangents)
    else:
        outs = [_func_jvp(fn, (x,), (tangents[:, j],)) for j in range(k)]
        f = outs[0][0]
        jv = (torch.stack([o[1] for o in outs], 1)
              if all(torch.is_tensor(o[1]) for o in outs) else outs[0][1])
    return _check_outputs(f, jv, bsz, k, name)


def _batches(n: int, batch_size):
    bs = n if batch_size is None else check_int("batch_size", batch_size,
                                                minimum=1)
    return [(s, min(n, s + bs)) for s in range(0, n, bs)]


class PairJVPs(NamedTuple):
    """The outputs (n, p) and JVPs (n, k, p) at both latents of every pair of a design; :ref:`sec_exact_cov_convergence`."""

    fz: torch.Tensor
    fzr: torch.Tensor
    jz: torch.Tensor
    jzr: torch.Tensor


def _pair_outputs(design: PairDesign, batch_size, jvps) -> PairJVPs:
    """Run ``jvps(x, tangents)`` on [Z; Z_rho] batches and split the halves."""
    parts = []
    for s, e in _batches(design.n, batch_size):
        x = torch.cat([design.z[s:e], design.zr[s:e]])
        t = torch.cat([design.v[s:e], design.v[s:e]])
        f, jv = jvps(x, t)
        b = e - s
        parts.append((f[:b], f[b:], jv[:b], jv[b:]))
    return PairJVPs(*(torch.cat(c) for c in zip(*parts)))


def _estimate(design: PairDesign, batch_size, jvps) -> CovarianceEstimate:
    """Run ``jvps(x, tangents)`` on [Z; Z_rho] batches and reduce."""
    out = _pair_outputs(design, batch_size, jvps)
    return _reduce(out.jz, out.jzr, design.rho, design.weights, design.probe_block,
                   out.fz, out.fzr, None, design.integrates, design.quadrature)


def jvp_covariance(fn: Callable, latent_shape, n: int, *, k: int = 1,
                   rho=None, generator: torch.Generator | None = None,
                   batch_size: int | None = None,
                   quadrature: str = "stratified", probes: str = "rademacher",
                   dtype: torch.dtype | None = None, device=None
                   ) -> CovarianceEstimate:
    """Cov f(Z) by the Gaussian interpolation identity from 2 n k JVPs; :ref:`sec_exact_covariances`.

    ``fn`` maps a batch of latents ``(B, *latent_shape)`` to outputs (B, p) and
    is differentiable by forward mode (``torch.func.jvp``, one call per
    probe). Fast path: an object with a method ``fn.jvp(z, tangents) ->
    (f, jv)``, tangents ``(B, k, *latent_shape)``, f (B, p), jv (B, k, p), is
    called once per batch instead. Z and Z_rho of ``batch_size`` pairs
    (default: all n) go through ``fn`` together in one batch of 2 B rows.
    ``rho``, ``quadrature``, ``probes``, ``generator``, ``dtype`` and
    ``device`` are as in ``draw_pairs``. Runs under ``torch.no_grad()``.
    Returns a ``CovarianceEstimate`` (``cov``, ``stderr``, ``upper``,
    ``lower``, ``integrand``, ...).
    """
    design = draw_pairs(latent_shape, n, k=k, rho=rho, quadrature=quadrature,
                        probes=probes, probe_block=2, generator=generator,
                        dtype=dtype, device=device)
    with torch.no_grad():
        return _estimate(design, batch_size,
                         lambda x, t: _map_jvp(fn, x, t, "fn"))


def flow_jvp_covariance(velocity: Callable, latent_shape, n: int, *,
                        readout: Callable | None = None, k: int = 1,
                        steps: int = 100, method: str = "rk4", rho=None,
                        generator: torch.Generator | None = None,
                        batch_size: int | None = None,
                        quadrature: str = "stratified",
                        probes: str = "rademacher", t0: float = 0.0,
                        t1: float = 1.0, dtype: torch.dtype | None = None,
                        device=None) -> CovarianceEstimate:
    """Cov of readout(phi(Z)) for the flow map phi of ``velocity``, one forward-mode solve per batch; :ref:`sec_exact_covariances`.

    Z and Z_rho of ``batch_size`` pairs (default: all n) are stacked into
    one batch with their shared probes and solved together by
    ``flowjac.engine.jvp.flow_jvp`` (``steps``, ``method``, ``t0``, ``t1``; a
    velocity with a ``jvp`` method uses it). ``readout`` (optional) maps
    the solved states ``(B, *latent_shape)`` to outputs (B, p), e.g. a
    classifier's logits or a pixel selector; it is applied to the state and
    its tangents by ``torch.func.jvp`` (or its own ``jvp(x, tangents)``
    method, as for ``jvp_covariance``). Without it the output is the
    flattened state. Runs under ``torch.no_grad()`` (flow_jvp records
    autograd graphs otherwise). ``evaluations`` counts JVPs of the whole
    flow map (2 n k), not velocity calls.
    """
    jvps = _flow_jvps(velocity, readout, steps, method, t0, t1)
    design = draw_pairs(latent_shape, n, k=k, rho=rho, quadrature=quadrature,
                        probes=probes, probe_block=2, generator=generator,
                        dtype=dtype, device=device)
    with torch.no_grad():
        return _estimate(design, batch_size, jvps)


def _flow_jvps(velocity, readout, steps, method, t0, t1):
    """``jvps(x, tangents)`` of readout(phi(x)) by ``flow_jvp``."""
    steps, method, t0, t1 = check_solver_args(steps, method, t0, t1)

    def jvps(x, t):
        x1, xd = flow_jvp(velocity, x, t, steps=steps, method=method, t0=t0,
                          t1=t1)
        if readout is None:
            bsz, k = x.shape[0], t.shape[1]
            return _check_outputs(x1.reshape(bsz, -1), xd.reshape(bsz, k, -1),
                                  bsz, k, "the flow map")
        return _map_jvp(readout, x1, xd, "readout")

    return jvps


def flow_pair_jvps(velocity: Callable, design: PairDesign, *,
                   readout: Callable | None = None, steps: int = 100,
                   method: str = "rk4", t0: float = 0.0, t1: float = 1.0,
                   batch_size: int | None = None) -> PairJVPs:
    """The outputs and JVPs of readout(phi(.)) at both latents of every pair of ``design``, Z and Z_rho in one forward-mode solve per batch; :ref:`sec_exact_cov_convergence`.

    What ``flow_jvp_covariance`` reduces at once, kept apart, so that
    disjoint subsets of the pairs can be reduced one by one
    (``covariance_from_pairs(out.jz[sl], out.jzr[sl], design.rho[sl], ...)``),
    as replications at a smaller budget. Arguments as for
    ``flow_jvp_covariance``; runs under ``torch.no_grad()``.
    """
    if not isinstance(design, PairDesign):
        raise ValueError(f"design must be a PairDesign (draw_pairs), got {type(design).__name__}")
    with torch.no_grad():
        return _pair_outputs(design, batch_size,
                             _flow_jvps(velocity, readout, steps, method, t0, t1))
