"""Covariances from JVPs: the Gaussian interpolation identity, estimated by unbiased Monte Carlo.

For Z, Z' independent N(0, I) in the latent space, rho in [0, 1],
Z_rho = rho Z + sqrt(1 - rho^2) Z' and a map f with Jacobian J,

    Cov(f(Z)) = int_0^1 h(rho) d rho,     h(rho) = E[J(Z) J(Z_rho)^T].

For a probe v with E[v v^T] = I, independent of everything,
E_v[(J(Z) v)(J(Z_rho) v)^T] = J(Z) J(Z_rho)^T, so two JVPs that share one
probe give an unbiased term of the integrand. The endpoints are the known
bounds: h(1) = E[J J^T] (the JVP second moment, the Gaussian Poincare upper
bound) and h(0) = E[J] E[J]^T (Stein's lower bound, E[J] = Cov(f(Z), Z)).
In the Hermite (Wiener chaos) expansion of f the profile h weights the
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

Probes: Rademacher (+-1 entries) by default. Any probe with E[v v^T] = I is
unbiased; Rademacher probes have no fourth-moment excess. Measured with a
stand-alone script on a smooth nonlinear map of 4 latents to 3 outputs
(1,500 replications of n = 400 stratified pairs, float64), the standard
deviations of the entries of ``cov`` were 0.73-0.88 times those with
Gaussian probes. ``probes="basis"`` uses exact Jacobians (d JVPs per point).

Quadrature, measured by the quadrature study of the chapter with 4,000
replications of n = 500 pairs (the same latents and probes for every rule,
Rademacher probes, float64): the standard deviation of ``cov`` for the
smooth map f(z) = tanh(3 z) + 0.3 z^2 (Var f = 0.925) and for the quantile
map of N(0, 1) onto the two-component mixture (N(-s, 1/4) + N(s, 1/4)) / 2
of :ref:`sec_mixture` at s = 0.5 and s = 1 (Var = 0.5 and 1.25):

    rule                     tanh     mix s=0.5  mix s=1   sd / stratified
    stratified (default)     0.0823   0.00438    0.0625    1
    uniform                  0.0830   0.00436    0.0632    0.995-1.011
    Gauss-Legendre, 8 nodes  0.0875   0.00460    0.0653    1.045-1.063
    importance toward 1      0.0935   0.00480    0.0681    1.090-1.136

(a standard deviation from 4,000 replications is known to about 1%; every
bias was within 1.9 of its standard error). The rho rule hardly matters at
fixed cost: the variance of a term comes from the latents and the probe
given rho, not from the spread of h over rho. Stratified sampling removes
the rho part, is never worse than uniform sampling in theory (tied in the
measurement) and stays unbiased; 8 Gauss-Legendre nodes are 4-6% worse and
biased when f has high Hermite orders (for the order-50 chaos they give
0.9763 instead of 1); importance sampling towards rho = 1 is 9-14% worse;
sampling away from rho = 1 must weight up the pairs near 1, where h is
largest (without bound if its density vanishes at 1). Hence
``"stratified"``.

Explained in :ref:`sec_exact_covariances` (``book/exact_covariances.md``).

Longer than 400 lines because it is one estimator: the pair design, the
reduction with its per-probe blocks and bins, and the entry points share
one derivation and one set of invariants (tested together).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch.func import jvp as _func_jvp

from flowjac._checks import check_choice, check_finite, check_int
from flowjac.engine.jvp import flow_jvp
from flowjac.engine.ode import check_solver_args

__all__ = ["QUADRATURES", "PROBES", "PairDesign",
           "CovarianceEstimate", "draw_pairs", "covariance_from_pairs",
           "sample_covariance", "jvp_covariance",
           "flow_jvp_covariance", "summarize_probe"]

QUADRATURES = ("stratified", "uniform", "gauss-legendre", "importance")
PROBES = ("rademacher", "gaussian", "basis")
GL_NODES = 8
# elements of one chunk of per-pair (p, p) matrices in the reduction
_CHUNK_ELEMENTS = 1 << 22


# -- validation ----------------------------------------------------------

def _check_n(n) -> int:
    return check_int("n", n, minimum=2)


def _check_latent_shape(latent_shape) -> tuple:
    if isinstance(latent_shape, (int, np.integer)) and not isinstance(
            latent_shape, bool):
        latent_shape = (int(latent_shape),)
    if isinstance(latent_shape, torch.Size):
        latent_shape = tuple(latent_shape)
    if (not isinstance(latent_shape, (tuple, list)) or len(latent_shape) == 0
            or any(isinstance(s, bool) or not isinstance(s, (int, np.integer))
                   or s < 1 for s in latent_shape)):
        raise ValueError("latent_shape must be a non-empty tuple of positive "
                         f"integers, e.g. (2,) or (1, 28, 28); got "
                         f"{latent_shape!r}")
    return tuple(int(s) for s in latent_shape)


def _rho_tensor(rho, name: str = "rho") -> torch.Tensor:
    try:
        r = torch.as_tensor(rho, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be a number or a 1D sequence of numbers "
                         f"in [0, 1], got {rho!r}") from None
    r = r.detach().to("cpu", torch.float64)
    r = r.reshape(-1) if r.ndim == 0 else r
    if r.ndim != 1 or r.numel() == 0:
        raise ValueError(f"{name} must be a number or a non-empty 1D sequence, "
                         f"got shape {tuple(r.shape)}")
    if not torch.isfinite(r).all():
        raise ValueError(f"{name} must be finite, got nan or inf entries")
    if (r < 0).any() or (r > 1).any():
        raise ValueError(f"{name} must lie in [0, 1], got values in "
                         f"[{float(r.min()):.6g}, {float(r.max()):.6g}]")
    return r


def _check_dtype(dtype) -> torch.dtype:
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype, got {dtype!r}")
    return dtype


# -- the design: latents, probes, rho and weights --------------------------

@dataclass
class PairDesign:
    """Latent pairs (Z, Z_rho), shared probes, rho and quadrature weights; :ref:`sec_exact_covariances`.

    ``z``, ``zr``: ``(n, *latent_shape)``; ``v``: ``(n, k, *latent_shape)``, equal
    within each block of ``probe_block`` consecutive pairs; ``rho``,
    ``weights``: (n,) float64 on the CPU. ``integrates`` is False when
    explicit rho values do not span [0, 1] (then only the profile is
    estimated).
    """

    z: torch.Tensor
    zr: torch.Tensor
    v: torch.Tensor
    rho: torch.Tensor
    weights: torch.Tensor
    probe_block: int
    quadrature: str
    integrates: bool = True

    @property
    def n(self) -> int:
        """The number of pairs."""
        return self.z.shape[0]

    @property
    def k(self) -> int:
        """The number of probes per pair."""
        return self.v.shape[1]


def _uniform(n: int, generator) -> torch.Tensor:
    """n uniforms on [0, 1), float64 on the CPU, from a generator on any device."""
    dev = generator.device if generator is not None else None
    return torch.rand(n, generator=generator, dtype=torch.float64,
                      device=dev).cpu()


def _stratified(n: int, generator) -> torch.Tensor:
    dev = generator.device if generator is not None else None
    perm = torch.randperm(n, generator=generator, device=dev).cpu()
    return (perm.to(torch.float64) + _uniform(n, generator)) / n


def _node_weights(nodes: torch.Tensor, w_node: torch.Tensor, n: int):
    """Spread n pairs cyclically over the nodes; per-pair weights of mean 1."""
    m = nodes.numel()
    idx = torch.arange(n) % m
    counts = torch.bincount(idx, minlength=m).to(torch.float64)
    return nodes[idx], w_node[idx] * n / counts[idx]


def _rho_design(n: int, rho, quadrature: str, generator):
    """(rho (n,), weights (n,), integrates) on the CPU, float64."""
    if rho is not None:
        nodes = torch.unique(_rho_tensor(rho))          # sorted
        m = nodes.numel()
        if m > n:
            raise ValueError(f"n must be at least the number of distinct rho "
                             f"values ({m}) so that each gets a pair, got {n}")
        spans = m >= 2 and float(nodes[0]) == 0.0 and float(nodes[-1]) == 1.0
        if spans:
            gaps = nodes[1:] - nodes[:-1]
            w_node = torch.zeros(m, dtype=torch.float64)
            w_node[:-1] += gaps / 2
            w_node[1:] += gaps / 2
        else:
            w_node = torch.ones(m, dtype=torch.float64)
        r, w = _node_weights(nodes, w_node, n)
        return r, w, spans
    if quadrature == "uniform":
        return _uniform(n, generator), torch.ones(n, dtype=torch.float64), True
    if quadrature == "stratified":
        return _stratified(n, generator), torch.ones(n, dtype=torch.float64), True
    if quadrature == "importance":
        # density q(rho) = (1 - rho)^(-1/2) / 2 puts more pairs near rho = 1
        u = _stratified(n, generator)
        r = 1 - (1 - u) ** 2
        return r, 2 * torch.sqrt(1 - r), True
    # gauss-legendre: GL_NODES nodes on [0, 1] (fewer when n is smaller)
    m = min(GL_NODES, n)
    x, wq = np.polynomial.legendre.leggauss(m)
    nodes = torch.tensor((x + 1) / 2, dtype=torch.float64)
    r, w = _node_weights(nodes, torch.tensor(wq / 2, dtype=torch.float64), n)
    return r, w, True


def draw_pairs(latent_shape, n: int, *, k: int = 1, rho=None,
               quadrature: str = "stratified", probes: str = "rademacher",
               probe_block: int = 2, generator: torch.Generator | None = None,
               dtype: torch.dtype | None = None, device=None) -> PairDesign:
    """Draw n latent pairs (Z, Z_rho), shared probes and the rho quadrature; :ref:`sec_exact_covariances`.

    Use it to compute the JVPs elsewhere (big batches on a GPU) and reduce
    them with ``covariance_from_pairs(jz, jzr, design.rho,
    weights=design.weights, probe_block=design.probe_block)``.

    ``rho=None`` draws the rho of each pair by ``quadrature``: "stratified"
    (one pair per stratum [i/n, (i+1)/n), the default, see the module
    docstring for the measurement), "uniform", "gauss-legendre" (8 nodes,
    pairs spread evenly over them; biased for high Hermite orders) or
    "importance" (density (1 - rho)^(-1/2) / 2, weights 2 sqrt(1 - rho)).
    A number or a sequence ``rho`` puts the pairs on those values
    (cyclically); ``cov`` is then the trapezoid rule over them, which needs
    0 and 1 among the values (otherwise only the profile is estimated).
    ``probes``: "rademacher" (+-1 entries, default), "gaussian", or
    "basis": the d = prod(latent_shape) vectors sqrt(d) e_j as the k = d
    probes of every pair, so that the average over probes is J(Z) J(Z_rho)^T
    exactly (no probe noise; d JVPs per point, for small latents). The k
    probes of a pair are shared by its block of ``probe_block`` consecutive
    pairs, which gives ``lower`` (use ``probe_block=1`` for independent
    probes). Latents and probes are drawn with ``generator`` on its device
    (the CPU by default) in ``dtype`` and moved to ``device``.
    """
    shape = _check_latent_shape(latent_shape)
    n = _check_n(n)
    k = check_int("k", k, minimum=1)
    probe_block = check_int("probe_block", probe_block, minimum=1)
    check_choice("quadrature", quadrature, QUADRATURES)
    check_choice("probes", probes, PROBES)
    dtype = _check_dtype(dtype)
    gdev = generator.device if generator is not None else torch.device("cpu")
    device = gdev if device is None else torch.device(device)
    r, w, spans = _rho_design(n, rho, quadrature, generator)
    z = torch.randn((n, *shape), generator=generator, dtype=dtype, device=gdev)
    zp = torch.randn((n, *shape), generator=generator, dtype=dtype, device=gdev)
    view = (n,) + (1,) * len(shape)
    a = r.to(gdev).view(view)
    zr = (a * z.double() + torch.sqrt(1 - a * a) * zp.double()).to(dtype)
    nb = -(-n // probe_block)
    pshape = (nb, k, *shape)
    if probes == "basis":
        d = math.prod(shape)
        if k not in (1, d):
            raise ValueError(f"k must be 1 or the latent dimension {d} with "
                             f"probes='basis' (which uses all {d} scaled "
                             f"basis vectors), got {k}")
        k = d
        eye = math.sqrt(d) * torch.eye(d, dtype=dtype, device=gdev)
        vb = eye.reshape(1, d, *shape).expand(nb, d, *shape)
    elif probes == "gaussian":
        vb = torch.randn(pshape, generator=generator, dtype=dtype, device=gdev)
    else:
        vb = torch.randint(0, 2, pshape, generator=generator,
                           device=gdev).to(dtype) * 2 - 1
    v = vb.repeat_interleave(probe_block, dim=0)[:n]
    return PairDesign(z.to(device), zr.to(device), v.to(device), r, w,
                      probe_block, "explicit" if rho is not None else quadrature,
                      spans)


# -- the reduction ---------------------------------------------------------

@dataclass
class CovarianceEstimate:
    """Result of the interpolation-identity estimator; :ref:`sec_exact_covariances`.

    ``cov`` (p, p): the identity's estimate of Cov f(Z), symmetric, with
    entrywise standard errors ``stderr``; ``corr``: ``cov`` normalised by its
    diagonal (nan where a diagonal entry is not positive). ``upper``:
    E[J J^T], the JVP second moment from the same JVPs (Poincare bound),
    with ``upper_stderr``; ``lower``: E[J] E[J]^T (Stein bound), with
    ``lower_stderr`` (nan when the design has no cross terms). ``rho`` (m,)
    and ``profile`` (m, p, p): the integrand h on the rho grid (bin means
    for drawn rho), with ``profile_stderr`` and ``profile_count``.
    ``sample``/``sample_stderr``: the plain sample covariance of the primal
    outputs f(Z) and f(Z_rho) when they were available (a free by-product;
    None otherwise). ``cov_terms``/``upper_terms`` (n,): per-pair
    contributions to trace(cov) and trace(upper), for tail diagnostics.
    ``evaluations``: JVPs spent, 2 n k (one JVP = one evaluation of f at one
    latent with one tangent; see the chapter for its cost in forward passes).
    """

    cov: torch.Tensor
    stderr: torch.Tensor
    corr: torch.Tensor
    upper: torch.Tensor
    upper_stderr: torch.Tensor
    lower: torch.Tensor
    lower_stderr: torch.Tensor
    rho: torch.Tensor
    profile: torch.Tensor
    profile_stderr: torch.Tensor
    profile_count: torch.Tensor
    n: int
    k: int
    evaluations: int
    quadrature: str
    cov_terms: torch.Tensor
    upper_terms: torch.Tensor
    sample: torch.Tensor | None = None
    sample_stderr: torch.Tensor | None = None

    def __repr__(self) -> str:
        p = self.cov.shape[0]
        return (f"CovarianceEstimate(p={p}, n={self.n}, k={self.k}, "
                f"quadrature={self.quadrature!r}, "
                f"evaluations={self.evaluations})")


def _as_jvps(name: str, x, n_expected=None) -> torch.Tensor:
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise ValueError(f"{name} must be a floating torch tensor of shape "
                         f"(n, k, p), got {type(x).__name__}"
                         + (f" of dtype {x.dtype}" if torch.is_tensor(x) else ""))
    if x.ndim == 2:
        x = x.unsqueeze(1)
    if x.ndim != 3 or min(x.shape) < 1:
        raise ValueError(f"{name} must have shape (n, k, p) (or (n, p) for "
                         f"k = 1), got {tuple(x.shape)}")
    if n_expected is not None and x.shape != n_expected:
        raise ValueError(f"{name} must have the shape of jz, "
                         f"{tuple(n_expected)}, got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} must be finite; it has nan or inf entries "
                         "(check the map and its JVPs)")
    return x


def _bins(r: torch.Tensor, bins):
    """Bin index per pair and the number of bins."""
    uniq = torch.unique(r)
    if bins is None and uniq.numel() <= 64:
        return torch.searchsorted(uniq, r), uniq.numel()
    if bins is None:
        bins = min(16, max(1, r.numel() // 64))
    bins = check_int("bins", bins, minimum=1)
    return (r * bins).floor().clamp(max=bins - 1).long(), bins


def _block_stats(s1, s2, nblocks, n):
    """Mean over n pairs from block sums, and its standard error."""
    if nblocks < 2:
        return torch.full_like(s1, math.nan)
    var = (s2 - s1 * s1 / nblocks).clamp_min(0) / (nblocks - 1)
    return (nblocks * var).sqrt() / n


def _reduce(jz, jzr, rho, weights, probe_block, fz, fzr, bins, integrates,
            quadrature) -> CovarianceEstimate:
    n, k, p = jz.shape
    dev, f64 = jz.device, torch.float64
    r = rho.to(dev, f64)
    w = weights.to(dev, f64)
    bin_idx, m = _bins(r, bins)
    block = torch.arange(n, device=dev) // probe_block
    nblocks = int(block[-1]) + 1
    zeros = lambda *s: torch.zeros(*s, dtype=f64, device=dev)  # noqa: E731
    acc = {key: zeros(p, p) for key in ("c1", "c2", "u1", "u2", "l1", "l2")}
    prof1, prof2 = zeros(m, p, p), zeros(m, p, p)
    count = torch.zeros(m, dtype=f64, device=dev)
    n_lower = 0
    cov_terms, upper_terms = zeros(n), zeros(n)
    step = max(1, _CHUNK_ELEMENTS // (p * p)) * probe_block
    for start in range(0, n, step):
        sl = slice(start, min(n, start + step))
        a, b = jz[sl].to(f64), jzr[sl].to(f64)
        ab = torch.einsum("ckp,ckq->cpq", a, b) / k
        g = 0.5 * (ab + ab.mT)                         # unweighted terms
        u = (torch.einsum("ckp,ckq->cpq", a, a)
             + torch.einsum("ckp,ckq->cpq", b, b)) / (2 * k)
        cov_terms[sl] = w[sl] * (a * b).sum((1, 2)) / k
        upper_terms[sl] = ((a * a).sum((1, 2)) + (b * b).sum((1, 2))) / (2 * k)
        bi = bin_idx[sl]
        prof1.index_add_(0, bi, g)
        prof2.index_add_(0, bi, g * g)
        count.index_add_(0, bi, torch.ones_like(bi, dtype=f64))
        bl = block[sl] - block[sl][0]
        nbl = int(bl[-1]) + 1
        gb = zeros(nbl, p, p).index_add_(0, bl, g * w[sl, None, None])
        ub = zeros(nbl, p, p).index_add_(0, bl, u)
        acc["c1"] += gb.sum(0)
        acc["c2"] += (gb * gb).sum(0)
        acc["u1"] += ub.sum(0)
        acc["u2"] += (ub * ub).sum(0)
        if probe_block >= 2:
            # cross terms between different pairs of a block (shared probes)
            c = 0.5 * (a + b)
            sizes = torch.bincount(bl, minlength=nbl)
            full = sizes == probe_block
            if full.any():
                sb = zeros(nbl, k, p).index_add_(0, bl, c)
                diag = zeros(nbl, p, p).index_add_(
                    0, bl, torch.einsum("ckp,ckq->cpq", c, c))
                cross = torch.einsum("bkp,bkq->bpq", sb, sb) - diag
                lb = cross[full] / (k * probe_block * (probe_block - 1))
                lb = 0.5 * (lb + lb.mT)
                acc["l1"] += lb.sum(0)
                acc["l2"] += (lb * lb).sum(0)
                n_lower += int(full.sum())
    if probe_block == 1:
        # independent probes: lower from the pairs at rho = 0, if any
        at0 = r == 0
        n_lower = int(at0.sum())
        if n_lower:
            a, b = jz[at0].to(f64), jzr[at0].to(f64)
            ab = torch.einsum("ckp,ckq->cpq", a, b) / k
            g0 = 0.5 * (ab + ab.mT)
            acc["l1"], acc["l2"] = g0.sum(0), (g0 * g0).sum(0)
    cov = acc["c1"] / n
    stderr = _block_stats(acc["c1"], acc["c2"], nblocks, n)
    if not integrates:
        cov = torch.full_like(cov, math.nan)
        stderr = torch.full_like(cov, math.nan)
    upper = acc["u1"] / n
    upper_se = _block_stats(acc["u1"], acc["u2"], nblocks, n)
    if n_lower:
        lower = acc["l1"] / n_lower
        lower_se = _block_stats(acc["l1"], acc["l2"], n_lower, n_lower)
    else:
        lower = torch.full_like(cov, math.nan)
        lower_se = torch.full_like(cov, math.nan)
    keep = count > 0
    cnt = count[keep][:, None, None]
    profile = prof1[keep] / cnt
    pvar = (prof2[keep] / cnt - profile ** 2).clamp_min(0) * cnt / (cnt - 1)
    profile_se = torch.where(cnt > 1, (pvar / cnt).sqrt(),
                             torch.full_like(profile, math.nan))
    rho_grid = zeros(m).index_add_(0, bin_idx, r)[keep] / count[keep]
    d = torch.diagonal(cov)
    scale = torch.where(d > 0, d, torch.full_like(d, math.nan)).sqrt()
    corr = cov / (scale[:, None] * scale[None, :])
    sample = sample_se = None
    if fz is not None:
        sample, sample_se = _sample_cov(fz.to(f64), fzr.to(f64))
    return CovarianceEstimate(
        cov=cov, stderr=stderr, corr=corr, upper=upper, upper_stderr=upper_se,
        lower=lower, lower_stderr=lower_se, rho=rho_grid, profile=profile,
        profile_stderr=profile_se, profile_count=count[keep].long(), n=n, k=k,
        evaluations=2 * n * k, quadrature=quadrature, cov_terms=cov_terms,
        upper_terms=upper_terms, sample=sample, sample_stderr=sample_se)


def _sample_cov(fz: torch.Tensor, fzr: torch.Tensor):
    """Average of the two unbiased sample covariances, and its standard error."""
    n, p = fz.shape
    xc, yc = fz - fz.mean(0), fzr - fzr.mean(0)
    cov = (xc.T @ xc + yc.T @ yc) / (2 * (n - 1))
    s1 = torch.zeros(p, p, dtype=fz.dtype, device=fz.device)
    s2 = torch.zeros_like(s1)
    step = max(1, _CHUNK_ELEMENTS // max(1, p * p))
    for start in range(0, n, step):
        x, y = xc[start:start + step], yc[start:start + step]
        t = 0.5 * (x[:, :, None] * x[:, None, :] + y[:, :, None] * y[:, None, :])
        s1 += t.sum(0)
        s2 += (t * t).sum(0)
    return cov, _block_stats(s1, s2, n, n)


def sample_covariance(f: torch.Tensor, f2: torch.Tensor | None = None):
    """``(cov, stderr)``: the plain sample covariance of outputs ``f`` (n, p), with entrywise standard errors; :ref:`sec_exact_covariances`.

    The unbiased (n - 1) estimate in float64; with ``f2``, a second sample of
    the same law row for row (f(Z_rho) beside f(Z)), the average of the two,
    as ``covariance_from_pairs`` reports it as ``sample``. The standard
    errors are over the n rows (the mean's estimation is neglected).
    """
    def rows(name, x):
        if not torch.is_tensor(x) or x.ndim != 2:
            raise ValueError(f"{name} must be a (n, p) tensor of outputs, got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        return check_finite(name, x.detach().double())

    f = rows("f", f)
    _check_n(f.shape[0])
    f2 = f if f2 is None else rows("f2", f2)
    if f2.shape != f.shape:
        raise ValueError(f"f2 must have the shape of f, {tuple(f.shape)}, got "
                         f"{tuple(f2.shape)}")
    return _sample_cov(f, f2.to(f.device))


def covariance_from_pairs(jz: torch.Tensor, jzr: torch.Tensor | None, rho,
                          *, weights=None, probe_block: int = 1, fz=None,
                          fzr=None, bins: int | None = None
                          ) -> CovarianceEstimate:
    """Reduce JVPs at Z and Z_rho (shared probes) to cov, upper, lower, profile; :ref:`sec_exact_covariances`.

    ``jz``, ``jzr``: (n, k, p) (or (n, p) for k = 1), jz[i, j] = J(Z_i) v_ij
    and jzr[i, j] = J(Z_rho_i) v_ij with the *same* probe v_ij,
    E[v v^T] = I. ``rho``: (n,) the rho of each pair. ``weights``: (n,)
    quadrature weights with E[w h(rho)] = int_0^1 h (default ones: rho
    uniform or stratified on [0, 1]; ``draw_pairs`` returns them).
    ``upper`` is computed from jz and jzr alone (all 2 n JVPs). With
    ``jzr=None`` only jz is used: ``upper`` from jz, ``lower`` from its cross
    terms (probe_block >= 2), ``sample`` from fz; ``cov`` is nan, ``rho``
    is ignored (pass None) and the profile is h(1) = ``upper`` at rho = 1.
    ``probe_block``: blocks of that many consecutive pairs share their
    probes (as ``draw_pairs`` makes them), which gives an unbiased ``lower``
    from cross terms; with 1 (independent probes) ``lower`` comes from the
    pairs at rho = 0 and is nan when there are none. ``fz``, ``fzr``: (n, p)
    primal outputs f(Z_i), f(Z_rho_i), optional, for the free ``sample``
    covariance. ``bins``: number of equal-width rho bins of the profile
    (default: one per distinct rho value when there are at most 64, else
    min(16, n // 64)). Reduces in float64 on jz's device, in chunks.
    """
    jz = _as_jvps("jz", jz)
    alone = jzr is None
    if alone:
        if fzr is not None:
            raise ValueError("fzr must be None when jzr is None")
        # (Z, Z) is the pair at rho = 1
        jzr, fzr, rho = jz, fz, torch.ones(jz.shape[0], dtype=torch.float64)
    jzr = _as_jvps("jzr", jzr, jz.shape)
    n = _check_n(jz.shape[0])
    r = _rho_tensor(rho)
    if r.shape != (n,):
        raise ValueError(f"rho must have shape ({n},), one value per pair, "
                         f"got {tuple(r.shape)}")
    if weights is None:
        w = torch.ones(n, dtype=torch.float64)
    else:
        try:
            w = torch.as_tensor(weights, dtype=torch.float64).detach().cpu()
        except (TypeError, ValueError, RuntimeError):
            raise ValueError("weights must be a sequence of numbers, got "
                             f"{type(weights).__name__}") from None
        if w.shape != (n,) or not torch.isfinite(w).all() or (w < 0).any():
            raise ValueError(f"weights must be {n} finite non-negative numbers"
                             f" (one per pair), got shape {tuple(w.shape)}")
    probe_block = check_int("probe_block", probe_block, minimum=1)
    if (fz is None) != (fzr is None):
        raise ValueError("fz and fzr must be given together or not at all")
    if fz is not None:
        p = jz.shape[2]
        for name, f in (("fz", fz), ("fzr", fzr)):
            if not torch.is_tensor(f) or f.shape != (n, p):
                raise ValueError(f"{name} must be a tensor of shape ({n}, {p})"
                                 f", got {getattr(f, 'shape', type(f).__name__)}")
            if not torch.isfinite(f).all():
                raise ValueError(f"{name} must be finite; it has nan or inf")
        fz, fzr = fz.to(jz.device), fzr.to(jz.device)
    res = _reduce(jz, jzr.to(jz.device), r, w, probe_block, fz, fzr, bins,
                  not alone, "explicit" if weights is not None else "uniform")
    if alone:
        res.cov_terms = torch.full_like(res.cov_terms, math.nan)
        res.evaluations = n * jz.shape[1]
    return res


# -- estimators for a map and for a flow -------------------------------------

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


def _estimate(design: PairDesign, batch_size, jvps) -> CovarianceEstimate:
    """Run ``jvps(x, tangents)`` on [Z; Z_rho] batches and reduce."""
    n = design.n
    parts = []
    for s, e in _batches(n, batch_size):
        x = torch.cat([design.z[s:e], design.zr[s:e]])
        t = torch.cat([design.v[s:e], design.v[s:e]])
        f, jv = jvps(x, t)
        b = e - s
        parts.append((f[:b], f[b:], jv[:b], jv[b:]))
    fz, fzr, jz, jzr = (torch.cat(c) for c in zip(*parts))
    return _reduce(jz, jzr, design.rho, design.weights, design.probe_block,
                   fz, fzr, None, design.integrates, design.quadrature)


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
    ``lower``, ``profile``, ...).
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
    steps, method, t0, t1 = check_solver_args(steps, method, t0, t1)
    design = draw_pairs(latent_shape, n, k=k, rho=rho, quadrature=quadrature,
                        probes=probes, probe_block=2, generator=generator,
                        dtype=dtype, device=device)

    def jvps(x, t):
        x1, xd = flow_jvp(velocity, x, t, steps=steps, method=method, t0=t0,
                          t1=t1)
        if readout is None:
            bsz, k = x.shape[0], t.shape[1]
            return _check_outputs(x1.reshape(bsz, -1), xd.reshape(bsz, k, -1),
                                  bsz, k, "the flow map")
        return _map_jvp(readout, x1, xd, "readout")

    with torch.no_grad():
        return _estimate(design, batch_size, jvps)


# -- heavy-tail diagnostics ---------------------------------------------------




def summarize_probe(res: dict, *, batch_size: int) -> dict:
    """What ``flowjac probe`` reports from ``probing.probe``'s rows: E[J J^T] with its standard error, the mean output, the plain sample covariance with its standard error and correlation, and the identity's estimate where pairs were probed; :ref:`sec_exact_covariances`.

    ``res`` holds ``out`` (n, p) and ``jvp`` (n, k, p) (and ``rho``,
    ``out_pair``, ``jvp_pair`` for pairs), best in float64. The sums run
    batch by batch in the draw's order (``batch_size``), so the numbers do
    not depend on how the batches were shared out. The standard error of
    E[J J^T] is over the n latents (each latent's k probes one unit).
    Returns float64 tensors: ``second_moment``, ``second_moment_stderr``,
    ``second_moment_corr``, ``mean_output``, ``sample_covariance``,
    ``sample_covariance_stderr``, ``sample_correlation`` and, with pairs,
    ``covariance`` (a ``CovarianceEstimate``).
    """
    from flowjac.estimators.moments import moment_to_corr

    batch_size = check_int("batch_size", batch_size, minimum=1)
    jvp = _as_jvps("res['jvp']", res["jvp"]).double()
    fz = res["out"].double()
    n, k, p = jvp.shape
    if fz.shape != (n, p):
        raise ValueError(f"res['out'] must be ({n}, {p}) like res['jvp'], got "
                         f"{tuple(fz.shape)}")
    check_finite("res['jvp']", jvp)
    check_finite("res['out']", fz)
    moment = torch.zeros(p, p, dtype=torch.float64)
    moment_sq = torch.zeros(p, p, dtype=torch.float64)
    out_sum = torch.zeros(p, dtype=torch.float64)
    chunk = max(1, 4_000_000 // (p * p))
    for i in range(0, n, batch_size):
        per = jvp[i:i + batch_size]
        d = per.reshape(-1, p)
        moment += d.T @ d
        for c in range(0, per.shape[0], chunk):
            t = torch.einsum("ikp,ikq->ipq", per[c:c + chunk], per[c:c + chunk])
            moment_sq += (t * t).sum(0)
        out_sum += fz[i:i + batch_size].sum(0)
    var = (moment_sq - moment ** 2 / n).clamp_min(0) / (n - 1)
    out = dict(second_moment=moment / (n * k),
               second_moment_stderr=(n * var).sqrt() / (n * k),
               mean_output=out_sum / n)
    out["second_moment_corr"] = moment_to_corr(out["second_moment"])
    if "jvp_pair" in res:
        est = covariance_from_pairs(jvp, res["jvp_pair"].double(),
                                    res["rho"].double(), fz=fz,
                                    fzr=res["out_pair"].double())
        out["covariance"] = est
        cov, cov_se = est.sample, est.sample_stderr
    else:
        cov, cov_se = sample_covariance(fz)
    out.update(sample_covariance=cov, sample_covariance_stderr=cov_se,
               sample_correlation=moment_to_corr(cov))
    return out
