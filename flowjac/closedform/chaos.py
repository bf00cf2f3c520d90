"""The Hermite (Wiener) chaos of a map of Gaussian latents: its spectra by Gauss-Hermite quadrature, and what they say about the normalised JVP second moment.

For Z ~ N(0, I_d) and f: R^d -> R^p, expand f = sum_alpha c_alpha H_alpha /
alpha! in the products H_alpha of probabilists' Hermite polynomials, with
c_alpha = E[f(Z) H_alpha(Z)]. The order-q block

    ``C_q = sum_{|alpha| = q} c_alpha c_alpha^T / alpha!``        (p, p), PSD,

is the covariance that order q carries: Cov f(Z) = sum_q C_q, and the JVP
second moment is E[J J^T] = sum_q q C_q (:ref:`sec_exact_covariances_identity`).
So the normalised E[J J^T] equals the correlation of f(Z) whenever the
spectra are proportional, C_q = w_q C for one matrix C, and ``chaos_gap``
measures how far a pair of outputs is from that and splits the gap
(:ref:`sec_exact_cov_proportional`).

``chaos_spectra`` computes C_1, ..., C_Q of any map given as a function of
a batch of latents (a closed form, or a flow map that the caller solves:
this module imports no engine) on a tensor Gauss-Hermite grid;
``close_spectrum`` lumps the orders above Q into one block when the
covariance and E[J J^T] are known exactly.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from flowjac._checks import check_int

__all__ = ["gauss_hermite", "hermite_functions", "chaos_spectra", "close_spectrum",
           "chaos_gap"]


def gauss_hermite(n: int, dim: int = 1, dtype=torch.float64):
    """Nodes (n**dim, dim) and weights (n**dim,) summing to 1 of the tensor Gauss-Hermite rule for N(0, I_dim); :ref:`sec_exact_cov_proportional`.

    Exact for polynomials of degree up to 2 n - 1 in each coordinate.
    """
    n = check_int("n", n, minimum=1)
    dim = check_int("dim", dim, minimum=1)
    x, w = np.polynomial.hermite_e.hermegauss(n)
    x = torch.tensor(x, dtype=dtype)
    w = torch.tensor(w / w.sum(), dtype=dtype)
    grids = torch.meshgrid(*([x] * dim), indexing="ij")
    weights = torch.meshgrid(*([w] * dim), indexing="ij")
    nodes = torch.stack([g.reshape(-1) for g in grids], 1)
    return nodes, torch.stack([g.reshape(-1) for g in weights], 1).prod(1)


def hermite_functions(z: torch.Tensor, order: int) -> torch.Tensor:
    """He_q(z) / sqrt(q!) for q = 0..order, shape ``(*z.shape, order + 1)``, by the three-term recurrence; :ref:`sec_exact_cov_proportional`.

    These are orthonormal under N(0, 1), and the recurrence never forms
    q! or z^q, so high orders do not overflow.
    """
    order = check_int("order", order, minimum=0)
    out = [torch.ones_like(z), z]
    for q in range(1, order):
        out.append((z * out[q] - math.sqrt(q) * out[q - 1]) / math.sqrt(q + 1))
    return torch.stack(out[:order + 1], -1)


def chaos_spectra(fn: Callable, dim: int, order: int, nodes: int = 60) -> torch.Tensor:
    """The chaos blocks C_1..C_order (order, p, p) of ``fn`` by tensor Gauss-Hermite quadrature; :ref:`sec_exact_cov_proportional`.

    ``fn`` maps latents (B, dim) in float64 to outputs (B, p); it is called
    once, on the ``nodes**dim`` grid points. The coefficient of each
    multi-index alpha with ``|alpha| <= order`` is c_alpha = E[f H_alpha] /
    sqrt(alpha!), and C_q sums c_alpha c_alpha^T over ``|alpha| = q``.
    Orders above ``order`` are left out: compare ``blocks.sum(0)`` with the
    covariance to see what they carry. A grid of n nodes per coordinate
    resolves a smooth map's orders well below 2 n.
    """
    dim = check_int("dim", dim, minimum=1)
    order = check_int("order", order, minimum=1)
    nodes = check_int("nodes", nodes, minimum=1)
    z, w = gauss_hermite(nodes, dim)
    f = fn(z)
    if not torch.is_tensor(f) or f.ndim != 2 or f.shape[0] != z.shape[0]:
        got = tuple(f.shape) if torch.is_tensor(f) else type(f).__name__
        raise ValueError(f"fn must map latents (B, {dim}) to outputs (B, p); got {got}")
    f = f.to(torch.float64)
    if not torch.isfinite(f).all():
        raise ValueError("fn returned non-finite outputs at the quadrature nodes")
    herm = hermite_functions(z, order)                      # (B, dim, order + 1)
    wf = w[:, None] * f                                     # (B, p)
    blocks = torch.zeros(order, f.shape[1], f.shape[1], dtype=torch.float64)

    def walk(prefix: tuple, basis: torch.Tensor, left: int):
        # every multi-index alpha of total order <= ``order``, coordinate by coordinate
        i = len(prefix)
        if i == dim:
            q = sum(prefix)
            if q > 0:
                c = basis @ wf                              # (p,)
                blocks[q - 1] += torch.outer(c, c)
            return
        for a in range(left + 1):
            walk(prefix + (a,), basis * herm[:, i, a], left - a)

    walk((), torch.ones_like(w), order)
    return blocks


def close_spectrum(blocks, cov, second_moment):
    """C_1..C_Q with the orders above Q lumped into one block, for a map whose Cov and E[J J^T] are known exactly: ``(blocks (Q + 1, p, p), orders (Q + 1,))``; :ref:`sec_exact_cov_proportional`.

    The last block is the rest of the covariance, Cov - sum_q C_q, and its
    order the rest's mean order,
    (tr E[J J^T] - sum_q q tr C_q) / tr(Cov - sum_q C_q). That is exact when
    the orders above Q share one matrix up to scale (then q times the rest
    is the rest of E[J J^T]); check it by comparing that product with
    ``second_moment - sum_q q C_q``.
    """
    blocks = torch.as_tensor(blocks, dtype=torch.float64)
    cov = torch.as_tensor(cov, dtype=torch.float64)
    second_moment = torch.as_tensor(second_moment, dtype=torch.float64)
    if blocks.ndim != 3 or cov.shape != blocks.shape[1:] or second_moment.shape != cov.shape:
        raise ValueError(f"blocks must be (Q, p, p) and cov, second_moment (p, p); got "
                         f"{tuple(blocks.shape)}, {tuple(cov.shape)}, {tuple(second_moment.shape)}")
    q = torch.arange(1, blocks.shape[0] + 1, dtype=torch.float64)
    rest = cov - blocks.sum(0)
    rest_moment = second_moment - (q[:, None, None] * blocks).sum(0)
    if not float(rest.trace()) > 0:
        raise ValueError("cov leaves no variance above the resolved orders "
                         f"(trace of the rest {float(rest.trace()):.3g}); use the blocks as they are")
    order = float(rest_moment.trace() / rest.trace())
    if not order > blocks.shape[0]:
        raise ValueError(f"the rest's mean order must exceed the {blocks.shape[0]} resolved "
                         f"orders, got {order:.3g}: cov or second_moment do not match the blocks")
    return torch.cat([blocks, rest[None]]), torch.cat([q, q.new_tensor([order])])


def chaos_gap(blocks, orders=None, pair=(0, 1)) -> dict:
    """How far the spectra of two outputs are from proportional, and the gap it makes between the normalised E[J J^T] and the correlation; :ref:`sec_exact_cov_proportional`.

    ``blocks`` (m, p, p): C_q for the orders ``orders`` (m,) (default 1..m;
    a remainder of several orders may enter as one block with its mean
    order). For the outputs ``pair`` = (i, j), with a_q, d_q their
    variances and b_q their covariance in order q, A = sum a_q, D = sum d_q:
    the shares alpha_q = a_q / A and delta_q = d_q / D, their mean
    pi_q = (alpha_q + delta_q) / 2, the per-order correlation
    rho_q = b_q / (sqrt(A D) pi_q), the mean orders q1 = sum q alpha_q,
    q2 = sum q delta_q, q_mean = sum q pi_q and qg = sqrt(q1 q2). Then

        corr_data = sum b_q / sqrt(A D) = sum pi_q rho_q,
        corr_jvp  = sum q b_q / sqrt(sum q a_q sum q d_q),
        gap = corr_jvp - corr_data = spread_term + mismatch_term,
        spread_term = sum pi_q (q - q_mean) rho_q / qg,
        mismatch_term = corr_data (q_mean / qg - 1),

    exactly. Both terms vanish for proportional spectra (rho_q constant,
    alpha = delta); ``spread`` is the pi-weighted standard deviation of
    rho_q. Returns floats and the per-order tensors ``shares`` (pi) and
    ``rho``.
    """
    blocks = torch.as_tensor(blocks, dtype=torch.float64)
    if blocks.ndim != 3 or blocks.shape[1] != blocks.shape[2] or blocks.shape[0] < 1:
        raise ValueError(f"blocks must be (m, p, p) with m >= 1, got {tuple(blocks.shape)}")
    m, p = blocks.shape[0], blocks.shape[1]
    q = (torch.arange(1, m + 1, dtype=torch.float64) if orders is None
         else torch.as_tensor(orders, dtype=torch.float64).flatten())
    if q.shape != (m,) or not torch.isfinite(q).all() or (q <= 0).any():
        raise ValueError(f"orders must be {m} positive numbers, got {q.tolist()}")
    i, j = (int(v) for v in pair)
    if not (0 <= i < p and 0 <= j < p and i != j):
        raise ValueError(f"pair must be two different outputs in [0, {p}), got {pair!r}")
    a, d, b = blocks[:, i, i], blocks[:, j, j], 0.5 * (blocks[:, i, j] + blocks[:, j, i])
    A, D = float(a.sum()), float(d.sum())
    if not (A > 0 and D > 0):
        raise ValueError("both outputs of pair must have positive variance in the blocks")
    scale = math.sqrt(A * D)
    alpha, delta, beta = a / A, d / D, b / scale
    pi = 0.5 * (alpha + delta)
    rho = torch.where(pi > 0, beta / pi.clamp_min(1e-300), torch.full_like(pi, float("nan")))
    q1, q2, q_mean = float(q @ alpha), float(q @ delta), float(q @ pi)
    qg = math.sqrt(q1 * q2)
    corr_data = float(beta.sum())
    corr_jvp = float((q * b).sum()) / math.sqrt(float((q * a).sum()) * float((q * d).sum()))
    ok = pi > 0
    spread_term = float((pi[ok] * (q[ok] - q_mean) * rho[ok]).sum()) / qg
    mismatch_term = corr_data * (q_mean / qg - 1)
    spread = math.sqrt(float((pi[ok] * (rho[ok] - corr_data) ** 2).sum()))
    return dict(corr_data=corr_data, corr_jvp=corr_jvp, gap=corr_jvp - corr_data,
                spread_term=spread_term, mismatch_term=mismatch_term, spread=spread,
                mean_order=q_mean, mean_orders=(q1, q2), shares=pi, rho=rho,
                orders=q)
