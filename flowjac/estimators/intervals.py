"""Intervals for means of heavy-tailed quantities: bootstrap, studentized and tail diagnostics.

JVP second moments have heavy tails (a few latents carry much of the mass),
so an interval must say how much it trusts itself: ``tail_share`` and
``hill_index`` measure the tail, ``mean_interval`` gives studentized,
normal or percentile intervals, ``bootstrap_ci`` a percentile bootstrap of
any statistic. Explained in :ref:`sec_exact_covariances` and :ref:`sec_mnist`.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from flowjac._checks import check_choice, check_int

__all__ = ["INTERVALS", "bootstrap_ci", "tail_share", "hill_index",
           "mean_interval"]

INTERVALS = ("studentized", "normal", "percentile")


def bootstrap_ci(fn: Callable[[torch.Tensor], torch.Tensor | float],
                 data: torch.Tensor, n_boot: int = 1000, alpha: float = 0.05,
                 generator: torch.Generator | None = None):
    """Percentile bootstrap (estimate, low, high) of fn over data's rows; :ref:`sec_mnist`.

    ``fn`` maps an (N, ...) tensor to a scalar or a tensor; rows of ``data``
    are resampled with replacement ``n_boot`` times and the ``alpha/2`` and
    ``1 - alpha/2`` quantiles of the replicates are returned (NaN replicates,
    e.g. a resample in which a pixel is constant, are ignored). Floating
    ``data`` with NaN or inf entries, and a statistic that is inf, are one
    ValueError each (a NaN statistic of the whole data gives NaN, as the
    statistic does).
    """
    if not callable(fn):
        raise ValueError(f"fn must be callable, got {type(fn).__name__}")
    if not isinstance(data, torch.Tensor) or data.ndim < 1 \
            or data.shape[0] < 2:
        shape = tuple(data.shape) if isinstance(data, torch.Tensor) \
            else type(data).__name__
        raise ValueError(f"data must be a tensor with at least 2 rows, got "
                         f"{shape}")
    n_boot = check_int("n_boot", n_boot, minimum=2)
    if not isinstance(alpha, (int, float)) or not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    if data.is_floating_point() and not bool(torch.isfinite(data).all()):
        bad = (~torch.isfinite(data)).reshape(data.shape[0], -1).any(1)
        raise ValueError(f"data must be finite; {int(bad.sum())} of its {len(bad)} "
                         f"rows have NaN or inf entries (first: row "
                         f"{int(bad.nonzero()[0])}); drop or fix them first")
    n = data.shape[0]
    gen_device = generator.device if generator is not None else "cpu"
    est = torch.as_tensor(fn(data), dtype=torch.float64)
    reps = []
    for _ in range(n_boot):
        idx = torch.randint(n, (n,), generator=generator,
                            device=gen_device).to(data.device)
        reps.append(torch.as_tensor(fn(data[idx]), dtype=torch.float64).cpu())
    reps = torch.stack(reps)
    for what, val in (("fn(data)", est), ("a bootstrap replicate of fn", reps)):
        if bool(torch.isinf(val).any()):
            raise ValueError(f"fn must return finite values (or NaN where "
                             f"undefined), but {what} is inf; the statistic "
                             "diverges on these rows")
    q = torch.tensor([alpha / 2, 1 - alpha / 2], dtype=torch.float64)
    lo_hi = torch.nanquantile(reps, q, dim=0)
    if est.ndim == 0:
        return float(est), float(lo_hi[0]), float(lo_hi[1])
    return est.cpu(), lo_hi[0], lo_hi[1]


def _values(values, name="values", min_n=2) -> torch.Tensor:
    try:
        x = torch.as_tensor(values, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be a 1D sequence of numbers, got "
                         f"{type(values).__name__}") from None
    x = x.reshape(-1)
    if x.numel() < min_n:
        raise ValueError(f"{name} must hold at least {min_n} numbers, got "
                         f"{x.numel()}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} must be finite, got nan or inf entries")
    return x


def _check_fraction(name: str, frac) -> float:
    if not isinstance(frac, (int, float)) or isinstance(frac, bool) \
            or not 0 < frac < 1:
        raise ValueError(f"{name} must be a number in (0, 1), got {frac!r}")
    return float(frac)


def tail_share(values, frac: float = 0.01) -> float:
    """Share of sum ``|x|`` carried by the largest ``frac`` of the ``|x|``; :ref:`sec_exact_covariances`.

    For per-latent contributions to a mean (e.g. ``upper_terms``), a share
    near ``frac`` means no latent dominates; near 1, a handful carry it.
    """
    x = _values(values).abs()
    frac = _check_fraction("frac", frac)
    top = max(1, math.ceil(frac * x.numel()))
    total = float(x.sum())
    if total == 0:
        return math.nan
    return float(torch.topk(x, top).values.sum()) / total


def hill_index(values, frac: float = 0.05) -> float:
    """Hill estimate of the tail index alpha of ``|x|`` from its top ``frac``; :ref:`sec_exact_covariances`.

    alpha = 1 / mean(log(x_(i) / x_(m+1)), i <= m) over the m = frac n
    largest ``|x|``. ``P(|X| > x)`` ~ x^(-alpha): for an unbounded law the mean
    exists for alpha > 1, the variance (and a standard error that means
    anything) for alpha > 2. A flow's Jacobian is bounded, so its terms have
    every moment; the index then describes the tail the sample reached:
    below 1, the sample mean at this n is dominated by latents of
    probability below 1/n.
    """
    x = _values(values, min_n=3).abs()
    frac = _check_fraction("frac", frac)
    m = max(2, int(frac * x.numel()))
    if m + 1 > x.numel():
        raise ValueError(f"values must hold more than {m} numbers for "
                         f"frac = {frac}, got {x.numel()}")
    top = torch.topk(x, m + 1).values
    if float(top[m]) <= 0:
        return math.nan
    logs = torch.log(top[:m] / top[m])
    mean = float(logs.mean())
    return math.inf if mean == 0 else 1.0 / mean


def mean_interval(values, level: float = 0.95, method: str = "studentized",
                  n_boot: int = 2000, generator: torch.Generator | None = None
                  ) -> tuple[float, float]:
    """Confidence interval for the mean of iid values; :ref:`sec_exact_covariances`.

    ``method``: "studentized" (bootstrap-t, the default: resamples
    t* = (mean* - mean) / se*, so a right-skewed sample gets a longer
    upper arm), "normal" (mean +- z se) or "percentile" (the percentile
    bootstrap, which understates heavy right tails; kept for comparison).
    No interval can cover mass that the sample has not seen: with a tail
    index below 2 (``hill_index``) all of them undercover. Resamples are
    drawn with ``generator`` (a CPU generator).
    """
    x = _values(values)
    if not isinstance(level, (int, float)) or not 0 < level < 1:
        raise ValueError(f"level must be a number in (0, 1), got {level!r}")
    check_choice("method", method, INTERVALS)
    n_boot = check_int("n_boot", n_boot, minimum=10)
    n = x.numel()
    mean, se = float(x.mean()), float(x.std() / math.sqrt(n))
    lo_q, hi_q = (1 - level) / 2, (1 + level) / 2
    if method == "normal":
        zq = float(torch.special.ndtri(torch.tensor(hi_q, dtype=torch.float64)))
        return mean - zq * se, mean + zq * se
    stats_m, stats_t = [], []
    step = max(1, (1 << 22) // n)
    for s in range(0, n_boot, step):
        b = min(step, n_boot - s)
        idx = torch.randint(0, n, (b, n), generator=generator)
        xb = x[idx]
        mb = xb.mean(1)
        stats_m.append(mb)
        stats_t.append((mb - mean) / (xb.std(1) / math.sqrt(n)).clamp_min(
            torch.finfo(torch.float64).tiny))
    if method == "percentile":
        mb = torch.cat(stats_m)
        return (float(torch.quantile(mb, lo_q)), float(torch.quantile(mb, hi_q)))
    tb = torch.cat(stats_t)
    return (mean - float(torch.quantile(tb, hi_q)) * se,
            mean - float(torch.quantile(tb, lo_q)) * se)
