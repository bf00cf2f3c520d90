"""The exact-covariance chapter's studies as functions: the rho rules, the mixture table, equal compute, tails and intervals.

Each function runs one study of :ref:`sec_exact_covariances` on maps whose
truth is exact (``flowjac.closedform.quantile.QuantileMap``, the tanh map by
quadrature) or on a learned flow's pair JVPs (``covariance.flow_pair_jvps``),
and returns numbers; the chapter shows them and glues its verdicts from
them.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from flowjac._checks import check_int
from flowjac.closedform.quantile import QuantileMap
from flowjac.engine.ode import integrate
from flowjac.estimators import covariance, intervals

__all__ = ["quadrature_study", "gauss_legendre_on_order", "mixture_table",
           "equal_compute", "flow_samples", "replicated_errors", "tail_table",
           "interval_coverage", "wins"]

F64 = torch.float64


def _rademacher(n: int, generator) -> torch.Tensor:
    return torch.randint(0, 2, (n,), generator=generator).to(F64) * 2 - 1


def quadrature_study(maps: dict, n: int, reps: int, generator: torch.Generator) -> list:
    """The rho rules of ``covariance.QUADRATURES`` at equal cost on 1D maps with exact covariances, common random numbers; :ref:`sec_exact_covariances`.

    ``maps``: ``{case: (derivative, truth)}`` with ``derivative`` T'(z)
    elementwise. Each of ``reps`` replications draws one set of latents,
    partners and probes of ``n`` pairs, and every rule uses them with its
    own rho. Returns one row per case and rule: bias, its standard error,
    the standard deviation of ``cov`` and that sd over the stratified
    rule's.
    """
    n, reps = check_int("n", n, minimum=2), check_int("reps", reps, minimum=2)
    est = {(c, q): [] for c in maps for q in covariance.QUADRATURES}
    for _ in range(reps):
        z = torch.randn(n, generator=generator, dtype=F64)
        zp = torch.randn(n, generator=generator, dtype=F64)
        v = _rademacher(n, generator)
        dz = {c: d(z) for c, (d, _) in maps.items()}
        for q in covariance.QUADRATURES:
            design = covariance.draw_pairs((1,), n, quadrature=q, generator=generator,
                                           dtype=F64)
            zr = design.rho * z + torch.sqrt(1 - design.rho ** 2) * zp
            for c, (d, _) in maps.items():
                res = covariance.covariance_from_pairs(
                    (dz[c] * v)[:, None], (d(zr) * v)[:, None], design.rho,
                    weights=design.weights)
                est[(c, q)].append(res.cov.item())
    rows = []
    for c, (_, truth) in maps.items():
        sd_strat = float(torch.tensor(est[(c, "stratified")]).std())
        for q in covariance.QUADRATURES:
            e = torch.tensor(est[(c, q)])
            rows.append(dict(case=c, rule=q, bias=float(e.mean() - truth),
                             bias_se=float(e.std()) / reps ** 0.5, sd=float(e.std()),
                             ratio=float(e.std()) / sd_strat))
    return rows


def gauss_legendre_on_order(q: int) -> float:
    """The ``covariance.GL_NODES``-node Gauss-Legendre rule on h = q rho^(q-1), the integrand of one chaos order of unit variance (exact: 1); :ref:`sec_exact_covariances`."""
    q = check_int("q", q, minimum=1)
    x, w = np.polynomial.legendre.leggauss(covariance.GL_NODES)
    return float((w / 2 * q * ((x + 1) / 2) ** (q - 1)).sum())


def mixture_table(separations, n: int, seed: int) -> list:
    """For each s, the exact Cov, E[T'^2] and (E T')^2 of the quantile map onto (N(-s, 1/4) + N(s, 1/4)) / 2 beside the identity's estimate from n pairs; :ref:`sec_exact_covariances`.

    Every separation uses the same latents and probes (a generator seeded
    with ``seed`` each time: common random numbers). Each row also holds
    the free sample covariance of the same run, ``z_sample`` =
    (cov - sample) / sqrt(se^2 + se_sample^2), whether ``cov`` is within
    4.5 standard errors of the truth (``covered``), and the
    ``CovarianceEstimate`` itself (``est``).
    """
    seed = check_int("seed", seed, minimum=0)
    rows = []
    for s in separations:
        qm = QuantileMap([-s, s])
        est = covariance.jvp_covariance(qm, (1,), n, dtype=F64,
                                        generator=torch.Generator().manual_seed(seed))
        row = dict(s=s, cov=qm.cov(), upper=qm.upper(), lower=qm.lower(),
                   est_cov=est.cov.item(), se=est.stderr.item(),
                   est_upper=est.upper.item(), est_lower=est.lower.item(),
                   sample=est.sample.item(), sample_se=est.sample_stderr.item(), est=est)
        row["z_sample"] = (row["est_cov"] - row["sample"]) / math.hypot(row["se"],
                                                                       row["sample_se"])
        row["covered"] = abs(row["est_cov"] - row["cov"]) < 4.5 * row["se"]
        rows.append(row)
    return rows


def equal_compute(qm: QuantileMap, budgets, reps: int, jvp_charge: float,
                  generator: torch.Generator) -> dict:
    """Relative RMSE of the identity's ``cov``, of ``upper`` and of the sample covariance at equal compute, per budget of n pairs; :ref:`sec_exact_cov_convergence`.

    n pairs cost 2 n JVPs, each charged ``jvp_charge`` forward passes, so
    the sample covariance gets ``2 jvp_charge n`` forward samples. All
    three are scored against the exact variance (``upper`` too: it is the
    paper's estimate of it).
    """
    reps = check_int("reps", reps, minimum=2)
    truth = qm.cov()
    out = {key: [] for key in ("cov", "upper", "sample")}
    for n in budgets:
        errs = {key: [] for key in out}
        for _ in range(reps):
            est = covariance.jvp_covariance(qm, (1,), n, generator=generator, dtype=F64)
            xs = qm(torch.randn(int(jvp_charge * 2 * n), generator=generator, dtype=F64))
            errs["cov"].append(est.cov.item() - truth)
            errs["upper"].append(est.upper.item() - truth)
            errs["sample"].append(xs.var().item() - truth)
        for key in out:
            out[key].append(float(torch.tensor(errs[key]).pow(2).mean().sqrt()) / truth)
    return out


def flow_samples(velocity, z: torch.Tensor, steps: int, method: str = "rk4",
                 batch_size: int = 4096) -> torch.Tensor:
    """phi(z) for latents z in batches of ``batch_size``, on z's device, returned in float64 on the CPU; :ref:`sec_exact_cov_convergence`."""
    with torch.no_grad():
        return torch.cat([integrate(velocity, zc, steps, method).cpu().double()
                          for zc in z.split(check_int("batch_size", batch_size, minimum=1))])


def replicated_errors(pairs, design, samples: torch.Tensor, truth: torch.Tensor,
                      budgets, jvp_charge: float) -> tuple:
    """Relative Frobenius RMSE of ``cov``, ``upper`` and the sample covariance at equal compute, over disjoint replications of a pool of pair JVPs; :ref:`sec_exact_cov_convergence`.

    ``pairs`` (``covariance.flow_pair_jvps``) and ``design`` (its
    ``PairDesign``) of N pairs; ``samples`` (M, p) forward samples, at least
    ``2 jvp_charge N``; ``truth`` (p, p). A budget of n pairs gives N // n
    replications, each scored against ``2 jvp_charge n`` samples of its
    own. Returns (errors ``{"cov", "upper", "sample"}`` per budget, the
    per-entry RMSE of ``cov`` and of the sample covariance at the largest
    budget).
    """
    norm = float(torch.linalg.matrix_norm(truth))
    rel = lambda m: float(torch.linalg.matrix_norm(m - truth)) / norm  # noqa: E731
    out = {key: [] for key in ("cov", "upper", "sample")}
    entry = {key: [] for key in ("cov", "sample")}
    for n in budgets:
        errs = {key: [] for key in out}
        m_s = int(2 * jvp_charge * n)
        for r in range(design.n // n):
            sl = slice(r * n, (r + 1) * n)
            est = covariance.covariance_from_pairs(pairs.jz[sl], pairs.jzr[sl], design.rho[sl],
                                                   weights=design.weights[sl], probe_block=2)
            samp = torch.cov(samples[r * m_s:(r + 1) * m_s].T)
            errs["cov"].append(rel(est.cov))
            errs["upper"].append(rel(est.upper))
            errs["sample"].append(rel(samp))
            if n == budgets[-1]:
                entry["cov"].append((est.cov - truth) ** 2)
                entry["sample"].append((samp - truth) ** 2)
        for key in out:
            out[key].append(float(torch.tensor(errs[key]).pow(2).mean().sqrt()))
    return out, {k: torch.stack(v).mean(0).sqrt() for k, v in entry.items()}


def tail_table(estimates: dict, n_ref: int, generator: torch.Generator) -> list:
    """Tail diagnostics of the per-pair terms of each estimate, beside two calibration rows; :ref:`sec_exact_cov_heavy_tails`.

    Per estimate (``{name: CovarianceEstimate}``): the top-1% shares and Hill
    indices of ``cov_terms`` and ``upper_terms`` and the largest ``|z|`` of
    ``cov`` against the free sample covariance; then the same Hill index of
    ``n_ref`` light-tailed values (a product of two standard normals) and of
    a Pareto sample with alpha = 1.5.
    """
    rows = []
    for name, est in estimates.items():
        zs = (torch.diagonal(est.cov - est.sample)
              / torch.diagonal(est.stderr ** 2 + est.sample_stderr ** 2).sqrt())
        rows.append(dict(name=name, share_cov=intervals.tail_share(est.cov_terms),
                         share_upper=intervals.tail_share(est.upper_terms),
                         hill_cov=intervals.hill_index(est.cov_terms),
                         hill_upper=intervals.hill_index(est.upper_terms),
                         z=float(zs.abs().max())))
    a, b = (torch.randn(n_ref, generator=generator, dtype=F64) for _ in range(2))
    pareto = torch.rand(n_ref, generator=generator, dtype=F64) ** (-1 / 1.5)
    nan = float("nan")
    for name, x in (("ref: N(0,1) N(0,1)", a * b), ("ref: Pareto(1.5)", pareto)):
        rows.append(dict(name=name, share_cov=intervals.tail_share(x), share_upper=nan,
                         hill_cov=intervals.hill_index(x), hill_upper=nan, z=nan))
    return rows


def interval_coverage(qm: QuantileMap, n: int, reps: int, n_boot: int,
                      generator: torch.Generator) -> dict:
    """How often nominal 95% intervals (each of ``intervals.INTERVALS``) of ``cov`` and ``upper`` from n pairs cover the exact values, over ``reps`` runs; :ref:`sec_exact_cov_heavy_tails`.

    Returns ``{(estimate, method): share covered}`` and the exact values
    under ``"truth"``.
    """
    reps = check_int("reps", reps, minimum=1)
    truths = dict(cov=qm.cov(), upper=qm.upper())
    cover = {(q, m): 0 for q in truths for m in intervals.INTERVALS}
    for _ in range(reps):
        est = covariance.jvp_covariance(qm, (1,), n, generator=generator, dtype=F64)
        for q, terms in (("cov", est.cov_terms), ("upper", est.upper_terms)):
            for m in intervals.INTERVALS:
                lo, hi = intervals.mean_interval(terms, method=m, n_boot=n_boot,
                                                 generator=generator)
                cover[(q, m)] += lo <= truths[q] <= hi
    out = {key: hits / reps for key, hits in cover.items()}
    out["truth"] = truths
    return out


def wins(errors: dict, a: str = "cov", b: str = "sample") -> int:
    """At how many budgets estimate ``a`` has the smaller error than ``b``; :ref:`sec_exact_cov_convergence`."""
    return sum(x < y for x, y in zip(errors[a], errors[b]))
