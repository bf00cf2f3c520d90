"""Closed forms for flow matching from N(0, I) to a Gaussian N(mean, cov).

Interpolation X_t = (1 - t) X_0 + t X_1 with X_0 ~ N(0, I) independent of
X_1 ~ N(mean, cov). Everything is expressed through the eigendecomposition
cov = Q diag(lam) Q^T, so that the drift, the flow map and their Jacobians
are exact, batched and differentiable (reverse and forward mode).

Derived in the chapter :ref:`sec_gaussian` (``book/gaussian.md``).
"""
from __future__ import annotations

import torch

from flowjac._checks import value_range

__all__ = [
    "check_t", "check_cov", "check_mean_cov", "drift", "drift_jacobian",
    "flow_map", "flow_map_jacobian", "pushforward_cov", "psd_sqrt",
]


def check_t(t, name: str = "t"):
    """Raise ValueError unless every entry of ``t`` lies in [0, 1]; :ref:`sec_gaussian`."""
    span = value_range(t, name)
    if span is not None and not (0.0 <= span[0] and span[1] <= 1.0):
        raise ValueError(f"{name} must lie in [0, 1], got values in "
                         f"[{span[0]:.6g}, {span[1]:.6g}]")
    return t


def check_cov(cov: torch.Tensor, name: str = "cov", *, tol: float = 1e-8,
              definite: bool = False) -> torch.Tensor:
    """Check a square, symmetric, positive (semi)definite covariance matrix; :ref:`sec_gaussian`.

    Returns ``cov`` as a floating tensor. Defined in :ref:`sec_gaussian`.
    """
    if not torch.is_tensor(cov):
        cov = torch.as_tensor(cov, dtype=torch.get_default_dtype())
    if not cov.is_floating_point():
        cov = cov.to(torch.get_default_dtype())
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"{name} must be a square (d, d) matrix, "
                         f"got shape {tuple(cov.shape)}")
    if not torch.isfinite(cov).all():
        raise ValueError(f"{name} must be finite")
    scale = max(1.0, float(cov.abs().max()))
    asym = float((cov - cov.T).abs().max())
    if asym > tol * scale * 100:
        raise ValueError(f"{name} must be symmetric; max |cov - cov^T| = "
                         f"{asym:.3g}")
    lam_min = float(torch.linalg.eigvalsh(0.5 * (cov + cov.T)).min())
    if definite and lam_min <= tol * scale:
        raise ValueError(f"{name} must be positive definite; its smallest "
                         f"eigenvalue is {lam_min:.3g}")
    if lam_min < -tol * scale * 100:
        raise ValueError(f"{name} must be positive semidefinite; its smallest "
                         f"eigenvalue is {lam_min:.3g}")
    return cov


def check_mean_cov(mean, cov):
    """Validate ``mean`` (d,) against ``cov`` (d, d); return both as tensors; :ref:`sec_gaussian`."""
    cov = check_cov(cov)
    if not torch.is_tensor(mean):
        mean = torch.as_tensor(mean, dtype=cov.dtype, device=cov.device)
    if mean.ndim != 1 or mean.shape[0] != cov.shape[0]:
        raise ValueError(f"mean must have shape ({cov.shape[0]},) to match "
                         f"cov {tuple(cov.shape)}, got {tuple(mean.shape)}")
    return mean, cov


def _check_x(x: torch.Tensor, d: int, name: str = "x") -> None:
    if not torch.is_tensor(x):
        raise ValueError(f"{name} must be a torch tensor, got {type(x).__name__}")
    if x.ndim < 1 or x.shape[-1] != d:
        raise ValueError(f"{name} must have shape (..., {d}) to match cov, "
                         f"got {tuple(x.shape)}")


def _eig(cov: torch.Tensor):
    lam, q = torch.linalg.eigh(0.5 * (cov + cov.T))
    return lam.clamp_min(0.0), q


def _as_t(t, like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t


def _drift_coef(t: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """(t lam - (1 - t)) / ((1 - t)^2 + t^2 lam), the eigenvalues of A(t).

    Where the denominator vanishes (t = 1 and lam = 0) the pseudo-inverse
    convention gives 0.
    """
    num = t * lam - (1 - t)
    den = (1 - t) ** 2 + t ** 2 * lam
    safe = torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(den > 0, num / safe, torch.zeros_like(den))


def drift_jacobian(t, cov) -> torch.Tensor:
    """A(t) = (t cov - (1 - t) I) ((1 - t)^2 I + t^2 cov)^{-1}; :ref:`sec_gaussian`.

    Scalar ``t`` gives (d, d); a tensor ``t`` of shape (...) gives (..., d, d).
    """
    cov = check_cov(cov)
    check_t(t)
    lam, q = _eig(cov)
    tt = _as_t(t, cov)[..., None]
    c = _drift_coef(tt, lam)
    return (q * c[..., None, :]) @ q.T


def drift(x: torch.Tensor, t, mean, cov) -> torch.Tensor:
    """E[X1 - X0 | Xt = x] = mean + A(t)(x - t mean); :ref:`sec_gaussian`.

    ``x`` has shape (..., d); ``t`` is a scalar or a tensor broadcastable to
    ``x.shape[:-1]``.
    """
    mean, cov = check_mean_cov(mean, cov)
    _check_x(x, cov.shape[0])
    check_t(t)
    mean = mean.to(x)
    lam, q = _eig(cov.to(x))
    tt = _as_t(t, x)
    if tt.ndim > 0:
        tt = tt[..., None]
    c = _drift_coef(tt, lam)
    y = (x - tt * mean) @ q
    return mean + (c * y) @ q.T


def psd_sqrt(mat: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a PSD matrix via eigh; :ref:`sec_gaussian`."""
    lam, q = _eig(check_cov(mat, "mat"))
    return (q * lam.sqrt()) @ q.T


def flow_map_jacobian(t, cov) -> torch.Tensor:
    """D phi_t = ((1 - t)^2 I + t^2 cov)^{1/2}; :ref:`sec_gaussian`."""
    cov = check_cov(cov)
    check_t(t)
    lam, q = _eig(cov)
    tt = _as_t(t, cov)[..., None]
    s = ((1 - tt) ** 2 + tt ** 2 * lam).sqrt()
    return (q * s[..., None, :]) @ q.T


def flow_map(x0: torch.Tensor, t, mean, cov) -> torch.Tensor:
    """phi_t(x0) = t mean + ((1 - t)^2 I + t^2 cov)^{1/2} x0; :ref:`sec_gaussian`."""
    mean, cov = check_mean_cov(mean, cov)
    _check_x(x0, cov.shape[0], "x0")
    check_t(t)
    mean = mean.to(x0)
    lam, q = _eig(cov.to(x0))
    tt = _as_t(t, x0)
    if tt.ndim > 0:
        tt = tt[..., None]
    s = ((1 - tt) ** 2 + tt ** 2 * lam).sqrt()
    return tt * mean + (s * (x0 @ q)) @ q.T


def pushforward_cov(t, cov) -> torch.Tensor:
    """Cov(phi_t(X0)) = (1 - t)^2 I + t^2 cov; :ref:`sec_gaussian`."""
    cov = check_cov(cov)
    check_t(t)
    t = float(t)
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    return (1 - t) ** 2 * eye + t ** 2 * cov
