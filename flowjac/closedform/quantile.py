"""The quantile map from N(0, 1) onto a one-dimensional Gaussian mixture: the flow-matching map in 1D, exactly.

In one dimension every ODE flow preserves order, so the flow-matching map
from N(0, 1) onto a mixture with CDF F is T = F^{-1} o Phi, with
T'(z) = phi(z) / q(T(z)) for the mixture's density q. ``QuantileMap`` holds
it with its exact derivative and the exact references of the covariance
identity (the variance, E[T'^2], (E T')^2 and the integrand h(rho), each by
quadrature in x = T(z), where the integrands are smooth);
``monotone_map_jacobian_moment`` is E[T'^2] alone. Along the separating
direction of two components N(+-s u, sd^2 I) this is the flow map of the
two-dimensional mixture. Derived in :ref:`sec_mixture_table1`
(``book/mixture.md``), used in :ref:`sec_exact_covariances`.
"""
from __future__ import annotations

import math

import torch

from flowjac._checks import check_int

__all__ = ["QuantileMap", "monotone_map_jacobian_moment"]

_SQRT_2PI = math.sqrt(2 * math.pi)


def _normal_pdf(u: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * u ** 2) / _SQRT_2PI


def _components_1d(weights, means, stds):
    """(w, mu, sd) as float64 vectors with one entry per component, checked."""
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    mu = torch.as_tensor(means, dtype=torch.float64).flatten()
    sd = torch.as_tensor(stds, dtype=torch.float64).flatten()
    if not (w.numel() == mu.numel() == sd.numel() >= 1):
        raise ValueError("weights, means and stds must be 1D with one entry "
                         f"per component, got {w.numel()}, {mu.numel()}, "
                         f"{sd.numel()}")
    if not (torch.isfinite(w).all() and torch.isfinite(mu).all()
            and torch.isfinite(sd).all()):
        raise ValueError("weights, means and stds must be finite")
    if (w < 0).any() or abs(float(w.sum()) - 1.0) > 1e-9:
        raise ValueError("weights must be non-negative and sum to 1, got "
                         f"{w.tolist()}")
    if (sd <= 0).any():
        raise ValueError(f"stds must be positive, got {sd.tolist()}")
    return w, mu, sd


def _check_grid(n_grid) -> int:
    if isinstance(n_grid, bool) or not isinstance(n_grid, int) or n_grid < 3:
        raise ValueError(f"n_grid must be an integer >= 3, got {n_grid!r}")
    return n_grid


def _quantile_grid(w, mu, sd, width: float, n_grid: int):
    """x on [min(mu) - width sd, max(mu) + width sd], q(x) and z = T^{-1}(x) = Phi^{-1}(F(x)).

    The quantile of the base is taken through whichever tail of F keeps
    its precision, so z is exact far into both tails.
    """
    lo = float((mu - width * sd).min())
    hi = float((mu + width * sd).max())
    x = torch.linspace(lo, hi, n_grid, dtype=torch.float64)
    u = (x[:, None] - mu) / sd
    cdf = (w * torch.special.ndtr(u)).sum(1)
    sf = (w * torch.special.ndtr(-u)).sum(1)
    z = torch.where(cdf < 0.5, torch.special.ndtri(cdf), -torch.special.ndtri(sf))
    q = (w * _normal_pdf(u) / sd).sum(1)
    return x, q, z


def monotone_map_jacobian_moment(weights, means, stds,
                                 n_grid: int = 400_001) -> float:
    """E[T'(Z)^2] for the monotone map T of N(0, 1) onto a 1D Gaussian mixture, by quadrature; :ref:`sec_mixture`.

    In 1D every ODE flow is order preserving, so the flow-matching map from
    N(0, 1) is the quantile map T = F^{-1} o Phi, with T'(z) = p(z) / q(T(z))
    for the base density p and the target density q. Substituting x = T(z),
    E[T'(Z)^2] = int p(T^{-1}(x))^2 / q(x) dx, computed in float64 with the
    trapezoid rule on ``n_grid`` points spanning every component +- 12 sd.
    """
    w, mu, sd = _components_1d(weights, means, stds)
    x, q, z = _quantile_grid(w, mu, sd, 12.0, _check_grid(n_grid))
    return float(torch.trapezoid(_normal_pdf(z) ** 2 / q, x))


class QuantileMap:
    """The quantile map T = F^{-1} o Phi from N(0, 1) onto a 1D Gaussian mixture, with its exact derivative; :ref:`sec_exact_covariances`.

    ``means`` of the components, ``stds`` (one number for all, or one
    each) and ``weights`` (default equal). Along the separating direction
    of two components N(+-s u, sd^2 I) this is the flow-matching map of
    :ref:`sec_mixture_table1`. Computes in float64: ``forward`` by
    bisection of the CDF, ``derivative`` T'(z) = phi(z) / q(T(z)), ``jvp``
    for ``estimators.covariance.jvp_covariance`` (its fast path), and the
    exact references ``cov``, ``upper`` = E[T'^2], ``lower`` = (E T')^2 and
    ``integrand`` h(rho) = E[T'(Z) T'(Z_rho)] by quadrature.
    """

    def __init__(self, means, stds=0.5, weights=None):
        mu = torch.as_tensor(means, dtype=torch.float64).flatten()
        k = mu.numel()
        sd = torch.as_tensor(stds, dtype=torch.float64).flatten()
        if sd.numel() == 1:
            sd = sd.expand(k)
        w = torch.full((k,), 1.0 / max(k, 1), dtype=torch.float64) \
            if weights is None else weights
        self.weights, self.means, self.stds = _components_1d(w, mu, sd)

    def __repr__(self) -> str:
        return (f"QuantileMap(means={self.means.tolist()}, "
                f"stds={self.stds.tolist()}, weights={self.weights.tolist()})")

    def density(self, x: torch.Tensor) -> torch.Tensor:
        """The mixture's density q(x), elementwise; :ref:`sec_exact_covariances`."""
        u = (x[..., None] - self.means) / self.stds
        return (self.weights * _normal_pdf(u) / self.stds).sum(-1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """T(z) for z of any shape, by 64 bisection steps on the CDF; :ref:`sec_exact_covariances`."""
        target = torch.special.ndtr(z)
        lo = torch.full_like(z, float((self.means - 14 * self.stds).min()))
        hi = torch.full_like(z, float((self.means + 14 * self.stds).max()))
        for _ in range(64):
            mid = 0.5 * (lo + hi)
            cdf = (self.weights * torch.special.ndtr(
                (mid[..., None] - self.means) / self.stds)).sum(-1)
            below = cdf < target
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return 0.5 * (lo + hi)

    __call__ = forward

    def derivative(self, z: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """T'(z) = phi(z) / q(T(z)) (``x`` = T(z) when already known); :ref:`sec_exact_covariances`."""
        x = self.forward(z) if x is None else x
        return _normal_pdf(z) / self.density(x)

    def jvp(self, z: torch.Tensor, tangents: torch.Tensor):
        """(T(z), T'(z) v) for z (B, 1) and tangents (B, k, 1): the fast path of ``jvp_covariance``; :ref:`sec_exact_covariances`."""
        x = self.forward(z)
        return x, self.derivative(z, x)[:, None, :] * tangents

    def cov(self) -> float:
        """Var T(Z), the mixture's variance; :ref:`sec_exact_covariances`."""
        mean = float(self.weights @ self.means)
        return float(self.weights @ (self.stds ** 2 + self.means ** 2)) - mean ** 2

    def upper(self) -> float:
        """E[T'(Z)^2], the JVP second moment (Poincare bound), by ``monotone_map_jacobian_moment``; :ref:`sec_exact_covariances`."""
        return monotone_map_jacobian_moment(self.weights, self.means, self.stds)

    def grid(self, n_grid: int, width: float = 12.0):
        """x on [min mean - width sd, max mean + width sd] and T^{-1}(x), through whichever tail keeps precision; :ref:`sec_exact_covariances`."""
        x, _, z = _quantile_grid(self.weights, self.means, self.stds, float(width),
                                 _check_grid(n_grid))
        return x, z

    def lower(self, n_grid: int = 400_001) -> float:
        """(E T')^2 with E T'(Z) = int phi(T^{-1}(x)) dx, by the trapezoid rule (Stein bound); :ref:`sec_exact_covariances`."""
        x, z = self.grid(n_grid)
        return float(torch.trapezoid(_normal_pdf(z), x)) ** 2

    def integrand(self, rhos, n_grid: int = 1501) -> list:
        """Exact h(rho) = int int phi_rho(T^{-1}(x), T^{-1}(y)) dx dy at each rho, trapezoid rule (rho = 1: ``upper``); :ref:`sec_exact_covariances`.

        phi_rho is the standard bivariate normal density with correlation
        rho; the integrand is smooth for rho < 1 and the rule resolves it up
        to rho of about 0.997 on the default grid.
        """
        x, zx = self.grid(n_grid, width=8.0)
        out = []
        for r in (float(v) for v in rhos):
            if not 0.0 <= r <= 1.0:
                raise ValueError(f"rhos must lie in [0, 1], got {r}")
            if r == 1.0:
                out.append(self.upper())
                continue
            var = 1 - r * r
            quad = zx[:, None] ** 2 - 2 * r * zx[:, None] * zx[None, :] + zx[None, :] ** 2
            dens = torch.exp(-quad / (2 * var)) / (2 * math.pi * math.sqrt(var))
            out.append(float(torch.trapezoid(torch.trapezoid(dens, x, dim=1), x)))
        return out

    def rare_share(self, n: int, n_grid: int = 400_001) -> dict:
        """How much of E[T'^2] the latents of largest T' with total probability <= 1/n carry; :ref:`sec_exact_cov_heavy_tails`.

        Returns ``share`` (of E[T'(Z)^2]), ``max_derivative`` (the largest
        T', a bound on every term) and ``second_moment`` (E[T'^2] on the
        grid, a check of the grid against ``upper``).
        """
        n = check_int("n", n, minimum=1)
        x, q, zx = _quantile_grid(self.weights, self.means, self.stds, 12.0,
                                  _check_grid(n_grid))
        jac = _normal_pdf(zx) / q
        prob = q * (x[1] - x[0])            # the probability of each cell
        order = torch.argsort(jac, descending=True)
        rare = order[torch.cumsum(prob[order], 0) <= 1 / n]
        mass = jac ** 2 * prob
        return dict(share=float(mass[rare].sum() / mass.sum()),
                    max_derivative=float(jac.max()), second_moment=float(mass.sum()))
