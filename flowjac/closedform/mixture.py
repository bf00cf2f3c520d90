"""Flow matching from a Gaussian base to a mixture of Gaussians, in closed form.

Base X_0 ~ N(m0, Sigma0), target X_1 ~ sum_k pi_k N(mu_k, Sigma_k), and
X_t = (1 - t) X_0 + t X_1. Given the component k, X_t is Gaussian with mean
m_k(t) = (1 - t) m0 + t mu_k and covariance
S_k(t) = (1 - t)^2 Sigma0 + t^2 Sigma_k, so the drift is a
responsibility-weighted sum of affine maps and its Jacobian is a blend of
their linear parts plus a softmax-gradient term.

The torch class ``GaussianMixture`` is batched over points and components.
In one dimension every ODE flow preserves order, so the flow-matching map
from N(0, 1) onto a 1D mixture is its quantile map, in
``flowjac.closedform.quantile`` (``monotone_map_jacobian_moment``, its JVP
second moment, is importable from here too). Derived in :ref:`sec_mixture`
(``book/mixture.md``).
"""
from __future__ import annotations

import math

import torch

from flowjac._checks import check_choice, check_int
from flowjac.closedform.gaussian import check_cov, check_t, psd_sqrt
# the 1D monotone map lives in quantile.py; its moment keeps this address too
from flowjac.closedform.quantile import monotone_map_jacobian_moment

__all__ = [
    "GaussianMixture", "monotone_map_jacobian_moment",
]


def _as_float(value, name: str, dtype=None) -> torch.Tensor:
    if not torch.is_tensor(value):
        try:
            value = torch.as_tensor(value, dtype=dtype)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"{name} must be a tensor or nested list of "
                             f"numbers, got {type(value).__name__}") from None
    if not value.is_floating_point():
        value = value.to(dtype or torch.get_default_dtype())
    elif dtype is not None:
        value = value.to(dtype)
    return value


class GaussianMixture:
    """A Gaussian-mixture target with its exact flow-matching drift and Jacobian; :ref:`sec_mixture`.

    ``weights`` (K,), ``means`` (K, d), ``covs`` (K, d, d) describe the
    target; ``base_mean`` (d,) and ``base_cov`` (d, d) the base, default
    N(0, I). Methods take ``x`` of shape (..., d) and ``t`` a number or a
    tensor broadcastable to ``x.shape[:-1]``, and compute in ``x``'s dtype
    and device.
    """

    def __init__(self, weights, means, covs, base_mean=None, base_cov=None):
        means = _as_float(means, "means")
        dtype = means.dtype
        if means.ndim != 2 or means.shape[0] < 1 or means.shape[1] < 1:
            raise ValueError("means must have shape (K, d) with K, d >= 1, "
                             f"got {tuple(means.shape)}")
        k, d = means.shape
        weights = _as_float(weights, "weights", dtype).to(means.device)
        if weights.shape != (k,):
            raise ValueError(f"weights must have shape ({k},) to match means "
                             f"{tuple(means.shape)}, got {tuple(weights.shape)}")
        if not torch.isfinite(weights).all() or (weights < 0).any():
            raise ValueError("weights must be finite and non-negative, got "
                             f"{weights.tolist()}")
        total = float(weights.sum())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"weights must sum to 1, got sum {total:.8g}")
        if not torch.isfinite(means).all():
            raise ValueError("means must be finite")
        covs = _as_float(covs, "covs", dtype).to(means.device)
        if covs.shape != (k, d, d):
            raise ValueError(f"covs must have shape ({k}, {d}, {d}) to match "
                             f"means {tuple(means.shape)}, got "
                             f"{tuple(covs.shape)}")
        for j in range(k):
            check_cov(covs[j], f"covs[{j}]")
        if base_mean is None:
            base_mean = torch.zeros(d, dtype=dtype, device=means.device)
        base_mean = _as_float(base_mean, "base_mean", dtype).to(means.device)
        if base_mean.shape != (d,) or not torch.isfinite(base_mean).all():
            raise ValueError(f"base_mean must be a finite vector of shape "
                             f"({d},), got shape {tuple(base_mean.shape)}")
        if base_cov is None:
            base_cov = torch.eye(d, dtype=dtype, device=means.device)
        base_cov = _as_float(base_cov, "base_cov", dtype).to(means.device)
        if base_cov.shape != (d, d):
            raise ValueError(f"base_cov must have shape ({d}, {d}), got "
                             f"{tuple(base_cov.shape)}")
        check_cov(base_cov, "base_cov", definite=True)
        self.weights = weights
        self.means = means
        self.covs = 0.5 * (covs + covs.mT)
        self.base_mean = base_mean
        self.base_cov = 0.5 * (base_cov + base_cov.T)
        self.n_components, self.dim = k, d

    def __repr__(self) -> str:
        return (f"GaussianMixture(K={self.n_components}, d={self.dim}, "
                f"dtype={self.means.dtype})")

    # -- internals -----------------------------------------------------
    def _check_x(self, x) -> None:
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise ValueError("x must be a floating-point torch tensor of shape "
                             f"(..., {self.dim}), got {type(x).__name__}"
                             + (f" of dtype {x.dtype}" if torch.is_tensor(x)
                                else ""))
        if x.ndim < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (..., {self.dim}), got "
                             f"{tuple(x.shape)}")

    def _t(self, t, like: torch.Tensor) -> torch.Tensor:
        check_t(t)
        return torch.as_tensor(t, dtype=like.dtype, device=like.device)

    def _moments(self, t: torch.Tensor):
        """m_k(t), S_k(t), C_k(t) and chol S_k(t) with shapes (*t, K, ...)."""
        p = {n: getattr(self, n).to(t) for n in
             ("means", "covs", "base_mean", "base_cov")}
        tk = t[..., None]                       # (*t, 1)
        tm = tk[..., None, None]                # (*t, 1, 1, 1)
        m = (1 - tk[..., None]) * p["base_mean"] + tk[..., None] * p["means"]
        s = (1 - tm) ** 2 * p["base_cov"] + tm ** 2 * p["covs"]
        c = tm * p["covs"] - (1 - tm) * p["base_cov"]
        chol, info = torch.linalg.cholesky_ex(s)
        if (info != 0).any():
            raise ValueError(
                "t: S_k(t) = (1-t)^2 base_cov + t^2 covs[k] is singular at "
                "some t (this happens at t = 1 when a component covariance "
                "is singular); use t < 1 or positive-definite covs")
        return m, s, c, chol

    def _parts(self, x: torch.Tensor, t):
        """Responsibilities, component drifts d_k, A_k and S_k^{-1}(x - m_k)."""
        self._check_x(x)
        tt = self._t(t, x)
        try:
            ok = torch.broadcast_shapes(tt.shape, x.shape[:-1]) == x.shape[:-1]
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"t must be a number or a tensor broadcastable to "
                             f"x.shape[:-1] = {tuple(x.shape[:-1])}, got shape "
                             f"{tuple(tt.shape)}")
        m, _, c, chol = self._moments(tt)
        # S_k^{-1} from the Cholesky factor: there are only K (or K per
        # time) of them, so per-point work is plain matrix products.
        s_inv = torch.cholesky_inverse(chol)     # (*t, K, d, d)
        r = x[..., None, :] - m                  # (..., K, d)
        w = (s_inv @ r[..., None])[..., 0]       # S_k^{-1} (x - m_k)
        quad = (r * w).sum(-1).clamp_min(0.0)
        logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        logn = -0.5 * (quad + logdet + self.dim * math.log(2 * math.pi))
        logits = torch.log(self.weights.to(x)) + logn
        gamma = torch.softmax(logits, dim=-1)     # log-sum-exp inside
        a = c @ s_inv                             # A_k = C_k S_k^{-1}
        mu = (self.means - self.base_mean).to(x)
        dk = mu + (c @ w[..., None])[..., 0]      # (..., K, d)
        return gamma, dk, a, w, logits

    # -- public API ----------------------------------------------------
    def responsibilities(self, x: torch.Tensor, t) -> torch.Tensor:
        """gamma_k(x, t) = P(component k | X_t = x), shape (..., K), via log-sum-exp; :ref:`sec_mixture`."""
        return self._parts(x, t)[0]

    def drift(self, x: torch.Tensor, t) -> torch.Tensor:
        """u(x, t) = E[X1 - X0 | Xt = x] = sum_k gamma_k d_k(x, t), shape (..., d); :ref:`sec_mixture`."""
        gamma, dk, *_ = self._parts(x, t)
        return (gamma[..., None] * dk).sum(-2)

    def blend_jacobian(self, x: torch.Tensor, t) -> torch.Tensor:
        """sum_k gamma_k A_k(t), A_k = (t Sigma_k - (1-t) Sigma0) S_k^{-1}, shape (..., d, d); :ref:`sec_mixture`."""
        gamma, _, a, _, _ = self._parts(x, t)
        return (gamma[..., None, None] * a).sum(-3)

    def jacobian(self, x: torch.Tensor, t) -> torch.Tensor:
        """Full Jacobian du/dx = sum_k gamma_k A_k + sum_k d_k grad(gamma_k)^T, shape (..., d, d); :ref:`sec_mixture`."""
        gamma, dk, a, w, _ = self._parts(x, t)
        blend = (gamma[..., None, None] * a).sum(-3)
        # grad gamma_k = gamma_k (g_k - sum_j gamma_j g_j), g_k = -S_k^{-1} r_k.
        # sum_k grad gamma_k = 0, so centring d_k changes nothing and
        # avoids cancellation between large terms.
        g = -w
        g_c = g - (gamma[..., None] * g).sum(-2, keepdim=True)
        d_c = dk - (gamma[..., None] * dk).sum(-2, keepdim=True)
        soft = torch.einsum("...k,...ki,...kj->...ij", gamma, d_c, g_c)
        return blend + soft

    def softmax_jacobian(self, x: torch.Tensor, t) -> torch.Tensor:
        """The softmax-gradient term sum_k d_k grad(gamma_k)^T alone, shape (..., d, d); :ref:`sec_mixture`."""
        return self.jacobian(x, t) - self.blend_jacobian(x, t)

    def component_drift(self, k: int, x: torch.Tensor, t) -> torch.Tensor:
        """d_k(x, t) = (mu_k - m0) + A_k(t)(x - m_k(t)): the drift under do(component = k); :ref:`sec_mixture`."""
        k = self._check_k(k)
        return self._parts(x, t)[1][..., k, :]

    def component_jacobian(self, k: int, t) -> torch.Tensor:
        """A_k(t) = (t Sigma_k - (1-t) Sigma0) S_k(t)^{-1}: the Jacobian under do(component = k); :ref:`sec_mixture`."""
        k = self._check_k(k)
        tt = self._t(t, self.means)
        _, _, c, chol = self._moments(tt)
        return torch.cholesky_solve(c, chol).mT[..., k, :, :]

    def _check_k(self, k) -> int:
        if isinstance(k, bool) or not isinstance(k, int) \
                or not 0 <= k < self.n_components:
            raise ValueError(f"k must be an integer component index in "
                             f"[0, {self.n_components}), got {k!r}")
        return k

    def mean(self) -> torch.Tensor:
        """E[X1] = sum_k pi_k mu_k; :ref:`sec_mixture`."""
        return self.weights @ self.means

    def covariance(self, part: str = "total") -> torch.Tensor:
        """Cov X1: "total", its "within" part sum_k pi_k Sigma_k, or "between" sum_k pi_k (mu_k - mean)(mu_k - mean)^T; :ref:`sec_mixture`."""
        check_choice("part", part, ("total", "within", "between"))
        within = (self.weights[:, None, None] * self.covs).sum(0)
        centred = self.means - self.mean()
        between = (self.weights[:, None] * centred).T @ centred
        return {"total": within + between, "within": within,
                "between": between}[part]

    def sample(self, n: int, generator: torch.Generator | None = None,
               return_components: bool = False):
        """Draw n points from the target mixture (and optionally their components); :ref:`sec_mixture`."""
        n = check_int("n", n, minimum=1)
        dev = self.means.device
        comp = torch.multinomial(self.weights, n, replacement=True,
                                 generator=generator)
        roots = torch.stack([psd_sqrt(c) for c in self.covs])
        z = torch.randn(n, self.dim, dtype=self.means.dtype, device=dev,
                        generator=generator)
        x = self.means[comp] + (roots[comp] @ z[..., None])[..., 0]
        return (x, comp) if return_components else x

    def sample_base(self, n: int, generator: torch.Generator | None = None):
        """Draw n points from the base N(m0, Sigma0); :ref:`sec_mixture`."""
        n = check_int("n", n, minimum=1)
        z = torch.randn(n, self.dim, dtype=self.means.dtype,
                        device=self.means.device, generator=generator)
        return self.base_mean + z @ torch.linalg.cholesky(self.base_cov).T
