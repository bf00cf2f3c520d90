"""SymPy derivations for Gaussian flow matching.

Every function returns SymPy expressions; the chapters and the tests assert
identities between them with ``sp.simplify(lhs - rhs) == 0``.

Interpolation X_t = (1 - t) X_0 + t X_1, target Y = X_1 - X_0, with X_0 and
X_1 independent Gaussians. Derived in :ref:`sec_flow_matching`
(``book/flow_matching.md``) and :ref:`sec_gaussian` (``book/gaussian.md``).
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
    """E[Y | X = x] = mu_y + cov_yx var_x^{-1} (x - mu_x), scalar or Matrix; :ref:`sec_gaussian`."""
    if isinstance(var_x, sp.MatrixBase):
        return mu_y + cov_yx * var_x.inv() * (xval - mu_x)
    return mu_y + cov_yx / var_x * (xval - mu_x)


def interpolation_moments_1d(mean0=m0, var0=v0, mean1=m1, var1=v1):
    """Means, variance and covariance of (Y, X_t) for scalar Gaussians; :ref:`sec_gaussian`."""
    return {
        "mu_y": mean1 - mean0,
        "mu_x": (1 - t) * mean0 + t * mean1,
        "var_x": (1 - t) ** 2 * var0 + t ** 2 * var1,
        "cov_yx": t * var1 - (1 - t) * var0,
        "var_y": var0 + var1,
    }


def regression_drift_1d(mean0=m0, var0=v0, mean1=m1, var1=v1):
    """Drift E[X1 - X0 | Xt = x] by Gaussian conditioning (regression form); :ref:`sec_gaussian`."""
    mo = interpolation_moments_1d(mean0, var0, mean1, var1)
    return conditional_mean(mo["mu_y"], mo["mu_x"], mo["cov_yx"],
                            mo["var_x"], x)


def bayes_drift_1d(mean0=m0, var0=v0, mean1=m1, var1=v1):
    """The same drift by Bayes' rule: the posterior of X1 given Xt = x; :ref:`sec_gaussian`.

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
    """Drift for N(0, 1) -> N(0, 1): (2t - 1) x / ((1 - t)^2 + t^2); :ref:`sec_gaussian`."""
    return (2 * t - 1) / ((1 - t) ** 2 + t ** 2) * x


def flow_map_1d(mean1=m1, var1=v1):
    """phi_t(x0) = t m1 + sqrt((1-t)^2 + t^2 v1) x0 for base N(0, 1); :ref:`sec_gaussian`."""
    return t * mean1 + sp.sqrt((1 - t) ** 2 + t ** 2 * var1) * x0


def ode_residual_1d(mean1=m1, var1=v1):
    """d phi_t/dt - u(phi_t, t); simplifies to 0 (phi solves the ODE); :ref:`sec_gaussian`."""
    u = regression_drift_1d(0, 1, mean1, var1)
    phi = flow_map_1d(mean1, var1)
    return sp.diff(phi, t) - u.subs(x, phi)


def rotation(u):
    """2 x 2 rotation in rational (Cayley) form, u = tan(theta / 2); :ref:`sec_gaussian`.

    Rational entries keep ``sp.simplify`` fast; every rotation except by pi
    is of this form.
    """
    return sp.Matrix([[1 - u ** 2, -2 * u], [2 * u, 1 - u ** 2]]) / (1 + u ** 2)


def gaussian_2d_symbols():
    """Symbols for a 2D target N(m, Q diag(l1, l2) Q^T), Q = rotation(u); :ref:`sec_gaussian`."""
    th = sp.Symbol("u", real=True)
    l1, l2 = sp.symbols("lambda_1 lambda_2", positive=True)
    ma, mb = sp.symbols("m_a m_b", real=True)
    return th, l1, l2, sp.Matrix([ma, mb])


def block_moments(cov0, cov1, mean0, mean1):
    """Block moments of (Y, Xt) for vector Gaussians (any sizes); :ref:`sec_gaussian`."""
    return {
        "mu_y": mean1 - mean0,
        "mu_x": (1 - t) * mean0 + t * mean1,
        "var_x": (1 - t) ** 2 * cov0 + t ** 2 * cov1,
        "cov_yx": t * cov1 - (1 - t) * cov0,
    }


def block_drift(cov0, cov1, mean0, mean1, xvec):
    """E[Y | Xt = x] in block-matrix form, mu_y + S_yx S_xx^{-1}(x - mu_x); :ref:`sec_gaussian`."""
    mo = block_moments(cov0, cov1, mean0, mean1)
    return conditional_mean(mo["mu_y"], mo["mu_x"], mo["cov_yx"],
                            mo["var_x"], xvec)


def block_drift_generic(d: int = 2):
    """The block formula stated with MatrixSymbols (no entries expanded); :ref:`sec_gaussian`."""
    s0 = sp.MatrixSymbol("Sigma_0", d, d)
    s1 = sp.MatrixSymbol("Sigma_1", d, d)
    mu0 = sp.MatrixSymbol("mu_0", d, 1)
    mu1 = sp.MatrixSymbol("mu_1", d, 1)
    xv = sp.MatrixSymbol("x", d, 1)
    sxx = (1 - t) ** 2 * s0 + t ** 2 * s1
    syx = t * s1 - (1 - t) * s0
    return (mu1 - mu0) + syx * sxx.I * (xv - ((1 - t) * mu0 + t * mu1))


def bayes_drift_2d(cov1, mean1, xvec):
    """2D drift via the posterior of X1 given Xt = x (base N(0, I)); :ref:`sec_gaussian`."""
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
    """phi_t(x0) = t m + Q diag(sqrt((1-t)^2 + t^2 l_i)) Q^T x0; :ref:`sec_gaussian`."""
    q = rotation(th)
    s = sp.diag(sp.sqrt((1 - t) ** 2 + t ** 2 * l1),
                sp.sqrt((1 - t) ** 2 + t ** 2 * l2))
    return t * mean + q * s * q.T * x0vec


def ode_residual_2d():
    """d phi/dt - u(phi, t) for a rotated 2D Gaussian target; simplifies to 0; :ref:`sec_gaussian`."""
    th, l1, l2, mean = gaussian_2d_symbols()
    q = rotation(th)
    cov1 = q * sp.diag(l1, l2) * q.T
    x0vec = sp.Matrix(sp.symbols("x_01 x_02", real=True))
    phi = flow_map_2d(th, l1, l2, mean, x0vec)
    u = block_drift(sp.eye(2), cov1, sp.zeros(2, 1), mean, phi)
    return sp.diff(phi, t) - u


def conditional_variance_1d(var1=1):
    """Var(Y | Xt) for N(0,1) -> N(0, var1): the CFM loss floor at time t; :ref:`sec_flow_matching`."""
    mo = interpolation_moments_1d(0, 1, 0, var1)
    return sp.simplify(mo["var_y"] - mo["cov_yx"] ** 2 / mo["var_x"])


def sym_gaussian_density(xvec: sp.Matrix, mean: sp.Matrix, cov: sp.Matrix):
    """N(x; mean, cov) as a SymPy expression (column vectors); :ref:`sec_mixture`."""
    d = xvec.shape[0]
    r = xvec - mean
    quad = (r.T * cov.inv() * r)[0, 0]
    return sp.exp(-quad / 2) / sp.sqrt((2 * sp.pi) ** d * cov.det())


def sym_moments(t, means, covs, m0, cov0):
    """Lists m_k(t), S_k(t) and C_k(t) = t Sigma_k - (1-t) Sigma0 in SymPy; :ref:`sec_mixture`."""
    ms = [(1 - t) * m0 + t * mu for mu in means]
    ss = [(1 - t) ** 2 * cov0 + t ** 2 * c for c in covs]
    cs = [t * c - (1 - t) * cov0 for c in covs]
    return ms, ss, cs


def sym_density_functions(xvec: sp.Matrix, n: int):
    """Undefined functions N_1(x), ..., N_n(x) standing for the component densities of X_t; :ref:`sec_mixture`."""
    return [sp.Function(f"N_{k + 1}")(*xvec) for k in range(n)]


def sym_gaussian_rule(t, xvec, densities, means, covs, m0, cov0):
    """Substitutions dN_k/dx_i -> N_k [-S_k^{-1}(x - m_k)]_i for the undefined densities; :ref:`sec_mixture`."""
    ms, ss, _ = sym_moments(t, means, covs, m0, cov0)
    rule = {}
    for nk, m, s in zip(densities, ms, ss):
        g = -s.inv() * (xvec - m)
        for i, xi in enumerate(xvec):
            rule[sp.Derivative(nk, xi)] = nk * g[i]
    return rule


def _densities(t, xvec, means, covs, m0, cov0, densities):
    if densities is not None:
        return densities
    ms, ss, _ = sym_moments(t, means, covs, m0, cov0)
    return [sym_gaussian_density(xvec, m, s) for m, s in zip(ms, ss)]


def sym_mixture_drift(t, xvec, weights, means, covs, m0, cov0,
                      densities=None):
    """Derivative-free drift sum_k gamma_k [(mu_k - m0) + C_k S_k^{-1}(x - m_k)] in SymPy; :ref:`sec_mixture`.

    ``densities`` defaults to the true Gaussian densities N(x; m_k, S_k);
    pass ``sym_density_functions`` to keep them abstract. Returns
    (drift, responsibilities, component drifts d_k).
    """
    ms, ss, cs = sym_moments(t, means, covs, m0, cov0)
    dens = _densities(t, xvec, means, covs, m0, cov0, densities)
    weighted = [w * n for w, n in zip(weights, dens)]
    total = sum(weighted)
    gammas = [p / total for p in weighted]
    dks = [(mu - m0) + c * s.inv() * (xvec - m)
           for mu, m, s, c in zip(means, ms, ss, cs)]
    drift = sp.zeros(xvec.shape[0], 1)
    for g, dk in zip(gammas, dks):
        drift += g * dk
    return drift, gammas, dks


def sym_score_drift(t, xvec, weights, means, covs, m0, cov0, densities=None):
    """Drift from the score of p_t (Tweedie): ((x - m0) + (1-t) Sigma0 grad log p_t(x)) / t; :ref:`sec_mixture`.

    Given X1, X_t ~ N(t X1 + (1-t) m0, (1-t)^2 Sigma0), so the score of
    p_t = sum_k pi_k N_k identifies E[X1 | X_t = x], and
    E[X1 - X0 | X_t = x] = (E[X1 | x] - x) / (1 - t). Valid for 0 < t < 1.
    """
    dens = _densities(t, xvec, means, covs, m0, cov0, densities)
    p = sum(w * n for w, n in zip(weights, dens))
    grad = sp.Matrix([sp.diff(p, xi) for xi in xvec]) / p
    return ((xvec - m0) + (1 - t) * cov0 * grad) / t


def sym_mixture_jacobian(t, xvec, weights, means, covs, m0, cov0,
                         densities=None):
    """Closed-form Jacobian: blend sum_k gamma_k A_k plus softmax term sum_k d_k grad(gamma_k)^T; :ref:`sec_mixture`.

    grad gamma_k = gamma_k (g_k - sum_j gamma_j g_j) with
    g_k = grad log N(x; m_k, S_k) = -S_k^{-1}(x - m_k). Returns
    (blend, softmax_term).
    """
    ms, ss, cs = sym_moments(t, means, covs, m0, cov0)
    _, gammas, dks = sym_mixture_drift(t, xvec, weights, means, covs, m0,
                                       cov0, densities)
    d = xvec.shape[0]
    gs = [-s.inv() * (xvec - m) for m, s in zip(ms, ss)]
    gbar = sp.zeros(d, 1)
    for g, gk in zip(gammas, gs):
        gbar += g * gk
    blend, soft = sp.zeros(d, d), sp.zeros(d, d)
    for g, c, s, dk, gk in zip(gammas, cs, ss, dks, gs):
        blend += g * c * s.inv()
        soft += dk * (g * (gk - gbar)).T
    return blend, soft


# -- the Gaussian interpolation identity for polynomial maps ------------------

def gaussian_expectation(expr, variables):
    """E[expr] for independent N(0, 1) variables of a polynomial, monomial by monomial (E z^m = (m-1)!! for even m, else 0); :ref:`sec_exact_covariances_identity`."""
    poly = sp.Poly(sp.expand(expr), *variables)
    total = sp.Integer(0)
    for powers, coeff in poly.terms():
        moment = sp.Integer(1)
        for m in powers:
            moment *= sp.factorial2(m - 1) if m % 2 == 0 else 0
        total += coeff * moment
    return sp.expand(total)


def interpolation_identity(f, variables, rho):
    """Both sides of Cov f(Z) = int_0^1 h(rho) d rho for a polynomial map of independent N(0, 1) variables; :ref:`sec_exact_covariances_identity`.

    ``f`` a column Matrix of polynomials in ``variables``; ``rho`` the
    correlation symbol. With Z_rho = rho Z + sqrt(1 - rho^2) W (W fresh
    standard Gaussians) returns a dict of Matrices: ``h`` = E[J(Z) J(Z_rho)^T]
    (a polynomial in rho), ``cov`` = Cov f(Z), ``upper`` = E[J J^T],
    ``lower`` = E[J] E[J]^T, and ``blocks``, the chaos blocks C_q read off
    h = sum_q q rho^(q-1) C_q (q = 1 .. degree of h in rho + 1).
    """
    f = sp.Matrix(f)
    variables = list(variables)
    fresh = sp.symbols(f"w_1:{len(variables) + 1}", real=True)
    s_rho = sp.sqrt(1 - rho ** 2)
    mean = lambda m, v: m.applyfunc(lambda e: gaussian_expectation(e, v))  # noqa: E731
    jac = f.jacobian(variables)
    jac_r = jac.subs({z: rho * z + s_rho * w for z, w in zip(variables, fresh)},
                     simultaneous=True)
    h = mean(jac * jac_r.T, variables + list(fresh))
    centre = mean(f, variables)
    cov = mean(f * f.T, variables) - centre * centre.T
    ej = mean(jac, variables)
    degree = max((sp.Poly(e, rho).degree() for e in h if e != 0), default=0)
    blocks = [h.applyfunc(lambda e: sp.Poly(e, rho).coeff_monomial(rho ** (q - 1))) / q
              for q in range(1, degree + 2)]
    return dict(h=h, cov=cov, upper=mean(jac * jac.T, variables), lower=ej * ej.T,
                blocks=blocks)
