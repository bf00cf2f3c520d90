"""Dependency estimators from samples or from JVP probes.

A flow map ``x1 = phi(x0)`` moves a small N(0, I) perturbation ``v`` of the
latent to ``delta = J v`` with ``E[delta delta^T] = J J^T``: the second moment
of JVP outputs estimates the linearized covariance, and normalizing it gives a
correlation. Explained in :ref:`sec_mnist`.
"""
from __future__ import annotations

import torch

from flowjac._checks import check_finite

__all__ = ["second_moment", "moment_to_corr", "corrcoef", "probe_grad_norm",
           "below_threshold", "jvp_corr"]


def _check_matrix(name: str, x, min_rows: int = 1) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got "
                         f"{type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (N, p), got "
                         f"{tuple(x.shape)}")
    if x.shape[0] < min_rows or x.shape[1] < 1:
        raise ValueError(f"{name} needs at least {min_rows} rows and one "
                         f"column, got shape {tuple(x.shape)}")
    if not torch.is_floating_point(x):
        raise ValueError(f"{name} must be a floating-point tensor, got "
                         f"{x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} must be finite; it holds NaN or inf")
    return x


def second_moment(deltas: torch.Tensor) -> torch.Tensor:
    """Uncentered second moment E[δδᵀ] (p, p) of rows (N, p); :ref:`sec_mnist`."""
    d = _check_matrix("deltas", deltas)
    return d.T @ d / d.shape[0]


def moment_to_corr(m: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Correlation D^-1/2 M D^-1/2 of a (p, p) moment or covariance; :ref:`sec_mnist`.

    Entries whose row or column has a variance <= ``eps`` (a constant pixel)
    are NaN, as in ``numpy.corrcoef``; the diagonal of the rest is 1.
    """
    if not isinstance(m, torch.Tensor) or m.ndim != 2 \
            or m.shape[0] != m.shape[1]:
        shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m)
        raise ValueError(f"m must be a square (p, p) tensor, got {shape}")
    if not torch.is_floating_point(m):
        raise ValueError(f"m must be a floating-point tensor, got {m.dtype}")
    check_finite("m", m)
    var = torch.diagonal(m)
    if (var < -1e-12 * var.abs().max().clamp_min(1)).any():
        raise ValueError("m must have a non-negative diagonal; its smallest "
                         f"entry is {var.min().item():.3g}")
    sd = var.clamp_min(0).sqrt()
    ok = var > eps
    sd = torch.where(ok, sd, torch.full_like(sd, float("nan")))
    corr = m / (sd[:, None] * sd[None, :])
    corr = corr.clamp(-1.0, 1.0)
    idx = torch.arange(m.shape[0], device=m.device)
    corr[idx[ok], idx[ok]] = 1.0
    return corr


def corrcoef(samples: torch.Tensor) -> torch.Tensor:
    """Pearson correlation (p, p) of the columns of samples (N, p); :ref:`sec_mnist`."""
    x = _check_matrix("samples", samples, min_rows=2)
    xc = x - x.mean(0, keepdim=True)
    return moment_to_corr(xc.T @ xc / (x.shape[0] - 1))


# ------------------------------------------------ attributes via a classifier
# "Attribute dependencies through a classifier": gradient norms from probes,
# conditioning on them, and correlations of attribute JVPs.


def probe_grad_norm(deltas: torch.Tensor, attr: int | None = None) -> torch.Tensor:
    """Probe estimate sqrt(mean_k δ²) of ‖∇_z c(φ(z))‖ per sample from JVPs (B, k, p); :ref:`sec_attributes`.

    E[(∇c·v)²] = ‖∇c‖² for v ~ N(0, I), so the mean of δ² over probes is
    an unbiased estimate of the squared norm (its square root is slightly
    biased low for small k). ``attr=None`` returns all p columns.
    """
    if not isinstance(deltas, torch.Tensor) or deltas.ndim != 3:
        raise ValueError(f"deltas must be a (B, k, p) tensor, got "
                         f"{getattr(deltas, 'shape', type(deltas).__name__)}")
    sq = deltas.pow(2).mean(1)
    if attr is None:
        return sq.sqrt()
    if isinstance(attr, bool) or not isinstance(attr, int) \
            or not 0 <= attr < deltas.shape[2]:
        raise ValueError(f"attr must be an integer in [0, {deltas.shape[2]}), "
                         f"got {attr!r}")
    return sq[:, attr].sqrt()


def below_threshold(values: torch.Tensor, threshold: float | None = None,
                    quantile: float | None = None) -> torch.Tensor:
    """Boolean mask of samples whose value is <= a threshold, given as a value or a quantile; :ref:`sec_attributes`."""
    if not isinstance(values, torch.Tensor) or values.ndim != 1 \
            or values.numel() == 0:
        raise ValueError(f"values must be a non-empty 1-D tensor, got "
                         f"{getattr(values, 'shape', type(values).__name__)}")
    if (threshold is None) == (quantile is None):
        raise ValueError("give exactly one of threshold (a value) or "
                         f"quantile (in (0, 1]); got threshold={threshold!r}, "
                         f"quantile={quantile!r}")
    if quantile is not None:
        if not isinstance(quantile, (int, float)) or not 0.0 < quantile <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], got {quantile!r}")
        threshold = float(torch.quantile(values.double(), float(quantile)))
    return values <= threshold


def jvp_corr(deltas: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Correlation of E[δδᵀ] over the samples in ``mask`` (all probes pooled) from JVPs (B, k, p) or (B, p); :ref:`sec_attributes`."""
    if not isinstance(deltas, torch.Tensor) or deltas.ndim not in (2, 3):
        raise ValueError(f"deltas must be a (B, k, p) or (B, p) tensor, got "
                         f"{getattr(deltas, 'shape', type(deltas).__name__)}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool \
                or mask.shape != deltas.shape[:1]:
            raise ValueError(f"mask must be a bool tensor of shape "
                             f"({deltas.shape[0]},)")
        if not bool(mask.any()):
            raise ValueError("mask keeps no sample")
        deltas = deltas[mask]
    rows = deltas.reshape(-1, deltas.shape[-1]).double()
    return moment_to_corr(second_moment(rows))
