"""SymPy derivations for Gaussian flow matching.

Every function returns SymPy expressions; the chapters and the tests assert
identities between them with ``sp.simplify(lhs - rhs) == 0``.

Interpolation X_t = (1 - t) X_0 + t X_1, target Y = X_1 - X_0, with X_0 and
X_1 independent Gaussians. Derived in "Flow matching in one page"
(``book/flow_matching.md``) and "Gaussian targets" (``book/gaussian.md``).
"""
from __future__ import annotations

import sympy as sp

t = sp.Symbol("t", nonnegative=True)
x = sp.Symbol("x", real=True)
x0 = sp.Symbol("x_0", real=True)
x1 = sp.Symbol("x_1", real=True)
m0 = sp.Symbol("m_0", real=True)
m1 = sp.Symbol("m_1", real=True)
v0 = sp.Symbol("sigma_0^2", positive=True)
v1 = sp.Symbol("sigma_1^2", positive=True)


def conditional_mean(mu_y, mu_x, cov_yx, var_x, xval):
    """E[Y | X = x] = mu_y + cov_yx var_x^{-1} (x - mu_x), scalar or Matrix; "Gaussian targets"."""
    if isinstance(var_x, sp.MatrixBase):
        return mu_y + cov_yx * var_x.inv() * (xval - mu_x)
    return mu_y + cov_yx / var_x * (xval - mu_x)


def interpolation_moments_1d(mean0=m0, var0=v0, mean1=m1, var1=v1):
    """Means, variance and covariance of (Y, X_t) for scalar Gaussians; "Gaussian targets"."""
    return {
        "mu_y": mean1 - mean0,
        "mu_x": (1 - t) * mean0 + t * mean1,
        "var_x": (1 - t) ** 2 * var0 + t ** 2 * var1,
        "cov_yx": t * var1 - (1 - t) * var0,
        "var_y": var0 + var1,
    }


def regression_drift_1d(mean0=m0, var0=v0, mean1=m1, var1=v1):
    """Drift E[X1 - X0 | Xt = x] by Gaussian conditioning (regression form); "Gaussian targets"."""
    mo = interpolation_moments_1d(mean0, var0, mean1, var1)
    return conditional_mean(mo["mu_y"], mo["mu_x"], mo["cov_yx"],
                            mo["var_x"], x)


def bayes_drift_1d(mean0=m0, var0=v0, mean1=m1, var1=v1):
    """The same drift by Bayes' rule: the posterior of X1 given Xt = x; "Gaussian targets".

    log p(x1 | xt) = log N(x1; m1, v1) + log N(xt; t x1 + (1-t) m0,
    (1-t)^2 v0) + const is quadratic in x1, so the posterior mean is its
    stationary point. Then E[X0 | x] = (x - t E[X1 | x]) / (1 - t).
    """
    logp = (-(x1 - mean1) ** 2 / (2 * var1)
            - (x - t * x1 - (1 - t) * mean0) ** 2 / (2 * (1 - t) ** 2 * var0))
    post_mean = sp.solve(sp.diff(logp, x1), x1)[0]
    e_x0 = (x - t * post_mean) / (1 - t)
    return post_mean - e_x0


def standard_drift_1d():
    """Drift for N(0, 1) -> N(0, 1): (2t - 1) x / ((1 - t)^2 + t^2); "Gaussian targets"."""
    return (2 * t - 1) / ((1 - t) ** 2 + t ** 2) * x


def flow_map_1d(mean1=m1, var1=v1):
    """phi_t(x0) = t m1 + sqrt((1-t)^2 + t^2 v1) x0 for base N(0, 1); "Gaussian targets"."""
    return t * mean1 + sp.sqrt((1 - t) ** 2 + t ** 2 * var1) * x0


def ode_residual_1d(mean1=m1, var1=v1):
    """d phi_t/dt - u(phi_t, t); simplifies to 0 (phi solves the ODE); "Gaussian targets"."""
    u = regression_drift_1d(0, 1, mean1, var1)
    phi = flow_map_1d(mean1, var1)
    return sp.diff(phi, t) - u.subs(x, phi)


def rotation(u):
    """2 x 2 rotation in rational (Cayley) form, u = tan(theta / 2); "Gaussian targets".

    Rational entries keep ``sp.simplify`` fast; every rotation except by pi
    is of this form.
    """
    return sp.Matrix([[1 - u ** 2, -2 * u], [2 * u, 1 - u ** 2]]) / (1 + u ** 2)


def gaussian_2d_symbols():
    """Symbols for a 2D target N(m, Q diag(l1, l2) Q^T), Q = rotation(u); "Gaussian targets"."""
    th = sp.Symbol("u", real=True)
    l1, l2 = sp.symbols("lambda_1 lambda_2", positive=True)
    ma, mb = sp.symbols("m_a m_b", real=True)
    return th, l1, l2, sp.Matrix([ma, mb])


def block_moments(cov0, cov1, mean0, mean1):
    """Block moments of (Y, Xt) for vector Gaussians (any sizes); "Gaussian targets"."""
    return {
        "mu_y": mean1 - mean0,
        "mu_x": (1 - t) * mean0 + t * mean1,
        "var_x": (1 - t) ** 2 * cov0 + t ** 2 * cov1,
        "cov_yx": t * cov1 - (1 - t) * cov0,
    }


def block_drift(cov0, cov1, mean0, mean1, xvec):
    """E[Y | Xt = x] in block-matrix form, mu_y + S_yx S_xx^{-1}(x - mu_x); "Gaussian targets"."""
    mo = block_moments(cov0, cov1, mean0, mean1)
    return conditional_mean(mo["mu_y"], mo["mu_x"], mo["cov_yx"],
                            mo["var_x"], xvec)


def block_drift_generic(d: int = 2):
    """The block formula stated with MatrixSymbols (no entries expanded); "Gaussian targets"."""
    s0 = sp.MatrixSymbol("Sigma_0", d, d)
    s1 = sp.MatrixSymbol("Sigma_1", d, d)
    mu0 = sp.MatrixSymbol("mu_0", d, 1)
    mu1 = sp.MatrixSymbol("mu_1", d, 1)
    xv = sp.MatrixSymbol("x", d, 1)
    sxx = (1 - t) ** 2 * s0 + t ** 2 * s1
    syx = t * s1 - (1 - t) * s0
    return (mu1 - mu0) + syx * sxx.I * (xv - ((1 - t) * mu0 + t * mu1))


def bayes_drift_2d(cov1, mean1, xvec):
    """2D drift via the posterior of X1 given Xt = x (base N(0, I)); "Gaussian targets"."""
    z = sp.Matrix(sp.symbols("z_1 z_2", real=True))
    p1 = cov1.inv()
    r = xvec - t * z
    logp = (-(z - mean1).T * p1 * (z - mean1)
            - r.T * r / (1 - t) ** 2)[0] / 2
    grad = [sp.diff(logp, zi) for zi in z]
    sol = sp.solve(grad, list(z), dict=True)[0]
    post = sp.Matrix([sol[zi] for zi in z])
    return post - (xvec - t * post) / (1 - t)


def flow_map_2d(th, l1, l2, mean, x0vec):
    """phi_t(x0) = t m + Q diag(sqrt((1-t)^2 + t^2 l_i)) Q^T x0; "Gaussian targets"."""
    q = rotation(th)
    s = sp.diag(sp.sqrt((1 - t) ** 2 + t ** 2 * l1),
                sp.sqrt((1 - t) ** 2 + t ** 2 * l2))
    return t * mean + q * s * q.T * x0vec


def ode_residual_2d():
    """d phi/dt - u(phi, t) for a rotated 2D Gaussian target; simplifies to 0; "Gaussian targets"."""
    th, l1, l2, mean = gaussian_2d_symbols()
    q = rotation(th)
    cov1 = q * sp.diag(l1, l2) * q.T
    x0vec = sp.Matrix(sp.symbols("x_01 x_02", real=True))
    phi = flow_map_2d(th, l1, l2, mean, x0vec)
    u = block_drift(sp.eye(2), cov1, sp.zeros(2, 1), mean, phi)
    return sp.diff(phi, t) - u


def conditional_variance_1d(var1=1):
    """Var(Y | Xt) for N(0,1) -> N(0, var1): the CFM loss floor at time t; "Flow matching in one page"."""
    mo = interpolation_moments_1d(0, 1, 0, var1)
    return sp.simplify(mo["var_y"] - mo["cov_yx"] ** 2 / mo["var_x"])
