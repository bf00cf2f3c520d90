"""The reduction of the covariance estimator: JVPs at Z and Z_rho with shared probes to cov, upper, lower and the integrand h(rho).

``covariance_from_pairs`` reduces JVPs at the pairs of a ``PairDesign``
(``flowjac.estimators.covariance_pairs``), or computed anywhere with the
same probes, to a ``CovarianceEstimate``: ``cov`` with standard errors over
the probe blocks, the bounds ``upper`` = E[J J^T] and ``lower`` = E[J] E[J]^T,
and the integrand h(rho) in bins, in float64 and in chunks of per-pair (p, p)
matrices; ``sample_covariance`` is the plain sample covariance beside it,
and ``summarize_probe`` what ``flowjac probe`` reports from
``probing.probe``'s rows. The derivation is in
``flowjac.estimators.covariance``'s docstring.
Explained in :ref:`sec_exact_covariances` (``book/exact_covariances.md``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flowjac._checks import check_finite, check_int
from flowjac.estimators.covariance_pairs import _check_n, _rho_tensor

__all__ = ["CovarianceEstimate", "covariance_from_pairs", "sample_covariance",
           "summarize_probe"]

# elements of one chunk of per-pair (p, p) matrices in the reduction
_CHUNK_ELEMENTS = 1 << 22


@dataclass
class CovarianceEstimate:
    """Result of the interpolation-identity estimator; :ref:`sec_exact_covariances`.

    ``cov`` (p, p): the identity's estimate of Cov f(Z), symmetric, with
    entrywise standard errors ``stderr``; ``corr``: ``cov`` normalised by its
    diagonal (nan where a diagonal entry is not positive). ``upper``:
    E[J J^T], the JVP second moment from the same JVPs (Poincare bound),
    with ``upper_stderr``; ``lower``: E[J] E[J]^T (Stein bound), with
    ``lower_stderr`` (nan when the design has no cross terms). ``rho`` (m,)
    and ``integrand`` (m, p, p): the integrand h(rho) on the rho grid (bin
    means for drawn rho), with ``integrand_stderr`` and ``integrand_count``.
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
    integrand: torch.Tensor
    integrand_stderr: torch.Tensor
    integrand_count: torch.Tensor
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
    h1, h2 = zeros(m, p, p), zeros(m, p, p)
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
        h1.index_add_(0, bi, g)
        h2.index_add_(0, bi, g * g)
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
    integrand = h1[keep] / cnt
    pvar = (h2[keep] / cnt - integrand ** 2).clamp_min(0) * cnt / (cnt - 1)
    integrand_se = torch.where(cnt > 1, (pvar / cnt).sqrt(),
                               torch.full_like(integrand, math.nan))
    rho_grid = zeros(m).index_add_(0, bin_idx, r)[keep] / count[keep]
    d = torch.diagonal(cov)
    scale = torch.where(d > 0, d, torch.full_like(d, math.nan)).sqrt()
    corr = cov / (scale[:, None] * scale[None, :])
    sample = sample_se = None
    if fz is not None:
        sample, sample_se = _sample_cov(fz.to(f64), fzr.to(f64))
    return CovarianceEstimate(
        cov=cov, stderr=stderr, corr=corr, upper=upper, upper_stderr=upper_se,
        lower=lower, lower_stderr=lower_se, rho=rho_grid, integrand=integrand,
        integrand_stderr=integrand_se, integrand_count=count[keep].long(), n=n, k=k,
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
    """Reduce JVPs at Z and Z_rho (shared probes) to cov, upper, lower, the integrand h(rho); :ref:`sec_exact_covariances`.

    ``jz``, ``jzr``: (n, k, p) (or (n, p) for k = 1), jz[i, j] = J(Z_i) v_ij
    and jzr[i, j] = J(Z_rho_i) v_ij with the *same* probe v_ij,
    E[v v^T] = I. ``rho``: (n,) the rho of each pair. ``weights``: (n,)
    quadrature weights with E[w h(rho)] = int_0^1 h (default ones: rho
    uniform or stratified on [0, 1]; ``draw_pairs`` returns them).
    ``upper`` is computed from jz and jzr alone (all 2 n JVPs). With
    ``jzr=None`` only jz is used: ``upper`` from jz, ``lower`` from its cross
    terms (probe_block >= 2), ``sample`` from fz; ``cov`` is nan, ``rho``
    is ignored (pass None) and the integrand is h(1) = ``upper`` at rho = 1.
    ``probe_block``: blocks of that many consecutive pairs share their
    probes (as ``draw_pairs`` makes them), which gives an unbiased ``lower``
    from cross terms; with 1 (independent probes) ``lower`` comes from the
    pairs at rho = 0 and is nan when there are none. ``fz``, ``fzr``: (n, p)
    primal outputs f(Z_i), f(Z_rho_i), optional, for the free ``sample``
    covariance. ``bins``: number of equal-width rho bins of the integrand
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


# -- what flowjac probe reports -------------------------------------------------

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
