"""Dependency estimators from samples or from JVP probes.

A flow map ``x1 = phi(x0)`` moves a small N(0, I) perturbation ``v`` of the
latent to ``delta = J v`` with ``E[delta delta^T] = J J^T``: the second moment
of JVP outputs estimates the linearized covariance, and normalizing it gives a
correlation. Explained in "Pixel correlations on MNIST fives".
"""
from __future__ import annotations

from typing import Callable

import torch

from .utils import check_int

__all__ = ["second_moment", "moment_to_corr", "corrcoef", "bootstrap_ci"]


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
    """Uncentered second moment E[δδᵀ] (p, p) of rows (N, p); "Pixel correlations on MNIST fives"."""
    d = _check_matrix("deltas", deltas)
    return d.T @ d / d.shape[0]


def moment_to_corr(m: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Correlation D^-1/2 M D^-1/2 of a (p, p) moment or covariance; "Pixel correlations on MNIST fives".

    Entries whose row or column has a variance <= ``eps`` (a constant pixel)
    are NaN, as in ``numpy.corrcoef``; the diagonal of the rest is 1.
    """
    if not isinstance(m, torch.Tensor) or m.ndim != 2 \
            or m.shape[0] != m.shape[1]:
        shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m)
        raise ValueError(f"m must be a square (p, p) tensor, got {shape}")
    if not torch.is_floating_point(m):
        raise ValueError(f"m must be a floating-point tensor, got {m.dtype}")
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
    """Pearson correlation (p, p) of the columns of samples (N, p); "Pixel correlations on MNIST fives"."""
    x = _check_matrix("samples", samples, min_rows=2)
    xc = x - x.mean(0, keepdim=True)
    return moment_to_corr(xc.T @ xc / (x.shape[0] - 1))


def bootstrap_ci(fn: Callable[[torch.Tensor], torch.Tensor | float],
                 data: torch.Tensor, n_boot: int = 1000, alpha: float = 0.05,
                 generator: torch.Generator | None = None):
    """Percentile bootstrap (estimate, low, high) of fn over data's rows; "Pixel correlations on MNIST fives".

    ``fn`` maps an (N, ...) tensor to a scalar or a tensor; rows of ``data``
    are resampled with replacement ``n_boot`` times and the ``alpha/2`` and
    ``1 - alpha/2`` quantiles of the replicates are returned (NaN replicates,
    e.g. a resample in which a pixel is constant, are ignored).
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
    n = data.shape[0]
    gen_device = generator.device if generator is not None else "cpu"
    est = torch.as_tensor(fn(data), dtype=torch.float64)
    reps = []
    for _ in range(n_boot):
        idx = torch.randint(n, (n,), generator=generator,
                            device=gen_device).to(data.device)
        reps.append(torch.as_tensor(fn(data[idx]), dtype=torch.float64).cpu())
    reps = torch.stack(reps)
    q = torch.tensor([alpha / 2, 1 - alpha / 2], dtype=torch.float64)
    lo_hi = torch.nanquantile(reps, q, dim=0)
    if est.ndim == 0:
        return float(est), float(lo_hi[0]), float(lo_hi[1])
    return est.cpu(), lo_hi[0], lo_hi[1]


# ------------------------------------------------ attributes via a classifier
# Added for "Attribute dependencies through a classifier": the flow composed
# with an attribute classifier c, its JVPs, per-sample gradient norms and
# conditioning on them.
__all__ += ["attribute_jvp", "attribute_grad_norm", "probe_grad_norm",
            "directional_logit_change", "below_threshold", "jvp_corr"]


def attribute_jvp(velocity, classifier, z: torch.Tensor, tangents=None,
                  k: int | None = 8, steps: int = 20, method: str = "rk4",
                  generator: torch.Generator | None = None):
    """Logits c(φ(z)) (B, p) and attribute JVPs δ = J_{c∘φ}(z) v (B, k, p) by exact forward-mode AD; "Attribute dependencies through a classifier".

    ``tangents`` (B, k, *z.shape[1:]) default to ``k`` N(0, I) probes per
    point. The flow's JVP is one batched forward-mode solve; the classifier
    is then differentiated forward along every probe.
    """
    from torch.func import jvp as _jvp

    from .jvp import flow_jvp, random_probes

    if not isinstance(z, torch.Tensor) or z.ndim < 2:
        raise ValueError(f"z must be a (B, ...) tensor, got "
                         f"{getattr(z, 'shape', type(z).__name__)}")
    if tangents is None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        tangents = random_probes(z, k, generator=generator)
    if tangents.shape == z.shape:
        tangents = tangents.unsqueeze(1)
    if tangents.ndim != z.ndim + 1 or tangents.shape[0] != z.shape[0] \
            or tangents.shape[2:] != z.shape[1:]:
        raise ValueError(f"tangents must have shape (B, k, *z.shape[1:]) = "
                         f"({z.shape[0]}, k, {tuple(z.shape[1:])}), got "
                         f"{tuple(tangents.shape)}")
    x1, dx1 = flow_jvp(velocity, z, tangents, steps=steps, method=method)
    if dx1.shape == x1.shape:
        dx1 = dx1.unsqueeze(1)
    b, kk = dx1.shape[:2]
    xr = x1.repeat_interleave(kk, dim=0)   # a copy: make_dual rejects views
    logits, dl = _jvp(classifier, (xr,), (dx1.reshape(b * kk, *x1.shape[1:]),))
    logits = logits.reshape(b, kk, -1)[:, 0]
    return logits.detach(), dl.reshape(b, kk, -1).detach()


def attribute_grad_norm(velocity, classifier, z: torch.Tensor, attr: int,
                        steps: int = 20, method: str = "rk4"):
    """True per-sample norm ‖∇_z c_attr(φ(z))‖ by one reverse-mode pass, and the logits; "Attribute dependencies through a classifier".

    One backward pass of the summed logit gives every sample's gradient,
    because neither the flow nor the classifier mixes samples of a batch
    (no BatchNorm in training mode).
    """
    from .ode import integrate

    if not isinstance(z, torch.Tensor) or z.ndim < 2:
        raise ValueError(f"z must be a (B, ...) tensor, got "
                         f"{getattr(z, 'shape', type(z).__name__)}")
    if isinstance(attr, bool) or not isinstance(attr, int) or attr < 0:
        raise ValueError(f"attr must be a non-negative integer, got {attr!r}")
    with torch.enable_grad():
        zz = z.detach().clone().requires_grad_(True)
        logits = classifier(integrate(velocity, zz, steps, method=method))
        if attr >= logits.shape[1]:
            raise ValueError(f"attr must be < {logits.shape[1]} (the number "
                             f"of logits), got {attr}")
        (g,) = torch.autograd.grad(logits[:, attr].sum(), zz)
    return g.flatten(1).norm(dim=1).detach(), logits.detach()


def probe_grad_norm(deltas: torch.Tensor, attr: int | None = None) -> torch.Tensor:
    """Probe estimate sqrt(mean_k δ²) of ‖∇_z c(φ(z))‖ per sample from JVPs (B, k, p); "Attribute dependencies through a classifier".

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


def directional_logit_change(velocity, classifier, z: torch.Tensor,
                             v: torch.Tensor, attr: int, eps: float = 1e-2,
                             steps: int = 20, method: str = "rk4") -> torch.Tensor:
    """The paper's criterion |c_attr(φ(z + εv)) - c_attr(φ(z))| along one direction v; "Attribute dependencies through a classifier".

    The paper kept samples with |Δlogit| < 1e-4 at ε = 1e-2 and called it a
    Jacobian norm; it is one directional finite difference, about
    ε |∇c · v|, not ε ‖∇c‖.
    """
    from .ode import integrate

    if not isinstance(z, torch.Tensor) or not isinstance(v, torch.Tensor) \
            or v.shape != z.shape:
        raise ValueError(f"v must be a tensor of z's shape "
                         f"{tuple(getattr(z, 'shape', ()))}, got "
                         f"{tuple(getattr(v, 'shape', ()))}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    with torch.no_grad():
        x = integrate(velocity, torch.cat([z, z + eps * v]), steps, method=method)
        logits = classifier(x)
    if isinstance(attr, bool) or not isinstance(attr, int) \
            or not 0 <= attr < logits.shape[1]:
        raise ValueError(f"attr must be an integer in [0, {logits.shape[1]}), "
                         f"got {attr!r}")
    b = z.shape[0]
    return (logits[b:, attr] - logits[:b, attr]).abs()


def below_threshold(values: torch.Tensor, threshold: float | None = None,
                    quantile: float | None = None) -> torch.Tensor:
    """Boolean mask of samples whose value is <= a threshold, given as a value or a quantile; "Attribute dependencies through a classifier"."""
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
    """Correlation of E[δδᵀ] over the samples in ``mask`` (all probes pooled) from JVPs (B, k, p) or (B, p); "Attribute dependencies through a classifier"."""
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
