"""Unit, property and error-path tests of flowjac.closedform.mixture."""
import math
import warnings

import pytest
import sympy as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowjac.closedform import gaussian, mixture, symbolic
from flowjac.closedform.mixture import GaussianMixture

warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*",
                        category=FutureWarning)
f64 = torch.float64

TABLE4_MEANS = [[1.861, 0.753], [2.547, 2.575], [2.835, 2.670]]
TABLE4_COVS = [[[1.221, -0.245], [-0.245, 1.225]],
               [[1.955, 0.547], [0.547, 2.758]],
               [[0.560, 0.032], [0.032, 0.549]]]


def table4_mixture(dtype=f64):
    return GaussianMixture(torch.full((3,), 1 / 3, dtype=dtype),
                           torch.tensor(TABLE4_MEANS, dtype=dtype),
                           torch.tensor(TABLE4_COVS, dtype=dtype))


def random_spd(d, g, scale=1.0, jitter=0.05):
    a = torch.randn(d, d, dtype=f64, generator=g) * scale
    return a @ a.T + jitter * torch.eye(d, dtype=f64)


def random_mixture(k, d, seed, general_base=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(k, dtype=f64, generator=g) + 0.1
    means = 2 * torch.randn(k, d, dtype=f64, generator=g)
    covs = torch.stack([random_spd(d, g, 0.7) for _ in range(k)])
    if general_base:
        return GaussianMixture(w / w.sum(), means, covs,
                               torch.randn(d, dtype=f64, generator=g),
                               random_spd(d, g, 0.5, 0.3))
    return GaussianMixture(w / w.sum(), means, covs)


def autograd_jacobian(gm, x, t):
    return torch.func.vmap(torch.func.jacrev(lambda z: gm.drift(z, t)))(x)


# -- closed forms against references -------------------------------------

@pytest.mark.parametrize("t", [0.0, 0.1, 0.5, 0.9, 0.99, 1.0])
def test_jacobian_matches_autograd_table4(t):
    gm = table4_mixture()
    x = 2 * torch.randn(32, 2, dtype=f64,
                        generator=torch.Generator().manual_seed(1))
    assert torch.allclose(gm.jacobian(x, t), autograd_jacobian(gm, x, t),
                          atol=1e-9, rtol=0)


def test_single_component_equals_gaussian_module():
    g = torch.Generator().manual_seed(3)
    cov = random_spd(3, g)
    mean = torch.randn(3, dtype=f64, generator=g)
    gm = GaussianMixture([1.0], mean[None], cov[None])
    x = torch.randn(10, 3, dtype=f64, generator=g)
    for t in [0.0, 0.3, 0.8, 1.0]:
        assert torch.allclose(gm.drift(x, t), gaussian.drift(x, t, mean, cov),
                              atol=1e-12)
        jac = gaussian.drift_jacobian(t, cov).expand(10, 3, 3)
        assert torch.allclose(gm.jacobian(x, t), jac, atol=1e-12)
        assert torch.allclose(gm.blend_jacobian(x, t), jac, atol=1e-12)
        assert torch.allclose(gm.component_jacobian(0, t), jac[0],
                              atol=1e-12)
        assert torch.allclose(gm.responsibilities(x, t),
                              torch.ones(10, 1, dtype=f64))


def test_matches_sympy_drift_and_jacobian_1d():
    t, x = sp.symbols("t x", real=True)
    w = [sp.Rational(1, 4), sp.Rational(3, 4)]
    means = [sp.Matrix([-1]), sp.Matrix([sp.Rational(3, 2)])]
    covs = [sp.Matrix([[sp.Rational(1, 2)]]), sp.Matrix([[2]])]
    m0, c0 = sp.Matrix([sp.Rational(1, 3)]), sp.Matrix([[sp.Rational(3, 2)]])
    X = sp.Matrix([x])
    u, _, _ = symbolic.sym_mixture_drift(t, X, w, means, covs, m0, c0)
    blend, soft = symbolic.sym_mixture_jacobian(t, X, w, means, covs, m0, c0)
    f_u = sp.lambdify((x, t), u[0])
    f_j = sp.lambdify((x, t), blend[0] + soft[0])
    gm = GaussianMixture([0.25, 0.75], torch.tensor([[-1.0], [1.5]], dtype=f64),
                         torch.tensor([[[0.5]], [[2.0]]], dtype=f64),
                         torch.tensor([1 / 3], dtype=f64),
                         torch.tensor([[1.5]], dtype=f64))
    xs = torch.linspace(-3, 3, 7, dtype=f64)[:, None]
    for tv in [0.0, 0.2, 0.6, 1.0]:
        ref_u = torch.tensor([f_u(float(v), tv) for v in xs], dtype=f64)
        ref_j = torch.tensor([f_j(float(v), tv) for v in xs], dtype=f64)
        assert torch.allclose(gm.drift(xs, tv)[:, 0], ref_u, atol=1e-12)
        assert torch.allclose(gm.jacobian(xs, tv)[:, 0, 0], ref_j, atol=1e-12)


def test_sympy_drift_equals_score_drift_1d():
    t = sp.Symbol("t", positive=True)
    x = sp.Symbol("x", real=True)
    X = sp.Matrix([x])
    args = dict(weights=[sp.Rational(1, 3), sp.Rational(2, 3)],
                means=[sp.Matrix([0]), sp.Matrix([2])],
                covs=[sp.Matrix([[1]]), sp.Matrix([[sp.Rational(1, 4)]])],
                m0=sp.Matrix([0]), cov0=sp.Matrix([[1]]))
    N = symbolic.sym_density_functions(X, 2)
    rule = symbolic.sym_gaussian_rule(t, X, N, args["means"], args["covs"],
                               args["m0"], args["cov0"])
    u, _, _ = symbolic.sym_mixture_drift(t, X, **args, densities=N)
    us = symbolic.sym_score_drift(t, X, **args, densities=N).subs(rule)
    assert sp.simplify(u[0] - us[0]) == 0
    blend, soft = symbolic.sym_mixture_jacobian(t, X, **args, densities=N)
    jac = sp.diff(u[0], x).subs(rule)
    assert sp.simplify(jac - blend[0] - soft[0]) == 0
    # not vacuous: the blend alone is not the Jacobian
    at = {t: sp.Rational(1, 2), x: 1, N[0]: 1, N[1]: 2}
    assert (jac - blend[0]).subs(at) != 0


def test_endpoints():
    gm = random_mixture(3, 2, seed=5)
    x = torch.randn(20, 2, dtype=f64, generator=torch.Generator().manual_seed(6))
    eye = torch.eye(2, dtype=f64).expand(20, 2, 2)
    assert torch.allclose(gm.drift(x, 0.0), gm.mean() - x, atol=1e-12)
    assert torch.allclose(gm.drift(x, 1.0), x - gm.base_mean, atol=1e-12)
    assert torch.allclose(gm.jacobian(x, 0.0), -eye, atol=1e-12)
    assert torch.allclose(gm.jacobian(x, 1.0), eye, atol=1e-12)
    assert torch.allclose(gm.responsibilities(x, 0.0),
                          gm.weights.expand(20, 3), atol=1e-12)


def test_drift_monte_carlo_ball():
    gm = table4_mixture()
    g = torch.Generator().manual_seed(11)
    n, t, q, radius = 200_000, 0.5, torch.tensor([1.0, 1.0], dtype=f64), 0.2
    x0, x1 = gm.sample_base(n, g), gm.sample(n, g)
    xt, y = (1 - t) * x0 + t * x1, x1 - x0
    inside = ((xt - q) ** 2).sum(1) < radius ** 2
    diff = y[inside] - gm.drift(xt[inside], t)
    z = diff.mean(0) / (diff.std(0) / math.sqrt(int(inside.sum())))
    assert int(inside.sum()) > 500
    assert z.abs().max() < 4.5


def test_sample_moments():
    gm = table4_mixture()
    x, comp = gm.sample(100_000, torch.Generator().manual_seed(2),
                        return_components=True)
    assert x.shape == (100_000, 2) and comp.shape == (100_000,)
    assert torch.allclose(x.mean(0), gm.mean(), atol=0.03)
    sel = x[comp == 2]
    assert torch.allclose(torch.cov(sel.T), gm.covs[2], atol=0.03)


def test_extreme_points_are_finite():
    gm = table4_mixture()
    far = torch.tensor([[1e3, 1e3], [-1e3, 1e3], [1e3, -1e3], [-1e3, -1e3],
                        [0.0, 1e3]])
    for dtype in (torch.float32, f64):
        for t in [0.0, 0.3, 0.7, 0.99, 1.0]:
            xs = far.to(dtype)
            for out in (gm.drift(xs, t), gm.jacobian(xs, t),
                        gm.responsibilities(xs, t), gm.blend_jacobian(xs, t)):
                assert out.dtype == dtype
                assert torch.isfinite(out).all()


def test_per_point_times_and_batch_shapes():
    gm = random_mixture(2, 3, seed=8)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(4, 5, 3, dtype=f64, generator=g)
    t = torch.rand(5, dtype=f64, generator=g)
    jac = gm.jacobian(x, t)
    assert jac.shape == (4, 5, 3, 3)
    assert gm.drift(x, t).shape == (4, 5, 3)
    assert gm.responsibilities(x, t).shape == (4, 5, 2)
    for i in range(4):
        for j in range(5):
            assert torch.allclose(jac[i, j], gm.jacobian(x[i, j], float(t[j])),
                                  atol=1e-12)
    assert gm.component_jacobian(1, t).shape == (5, 3, 3)


def test_zero_weight_component_is_ignored():
    g = torch.Generator().manual_seed(4)
    covs = torch.stack([random_spd(2, g) for _ in range(2)])
    means = torch.randn(2, 2, dtype=f64, generator=g)
    gm2 = GaussianMixture([1.0, 0.0], means, covs)
    gm1 = GaussianMixture([1.0], means[:1], covs[:1])
    x = torch.randn(6, 2, dtype=f64, generator=g)
    assert torch.allclose(gm2.jacobian(x, 0.4), gm1.jacobian(x, 0.4))
    assert torch.allclose(gm2.drift(x, 0.4), gm1.drift(x, 0.4))


# -- properties on random mixtures --------------------------------------

@settings(max_examples=25, deadline=None)
@given(k=st.integers(1, 4), d=st.integers(1, 4), seed=st.integers(0, 10_000),
       t=st.floats(0.0, 1.0), base=st.booleans())
def test_random_mixture_properties(k, d, seed, t, base):
    gm = random_mixture(k, d, seed, general_base=base)
    x = 1.5 * torch.randn(6, d, dtype=f64,
                          generator=torch.Generator().manual_seed(seed + 1))
    gamma = gm.responsibilities(x, t)
    assert (gamma >= 0).all()
    assert torch.allclose(gamma.sum(-1), torch.ones(6, dtype=f64))
    jac = gm.jacobian(x, t)
    assert torch.allclose(jac, autograd_jacobian(gm, x, t), atol=1e-9,
                          rtol=1e-9)
    # blend = sum_k gamma_k A_k, with A_k from component_jacobian
    a = torch.stack([gm.component_jacobian(j, t) for j in range(k)])
    assert torch.allclose(gm.blend_jacobian(x, t),
                          torch.einsum("nk,kij->nij", gamma, a), atol=1e-12)
    # drift = sum_k gamma_k d_k
    dks = torch.stack([gm.component_drift(j, x, t) for j in range(k)], 1)
    assert torch.allclose(gm.drift(x, t),
                          (gamma[..., None] * dks).sum(1), atol=1e-12)
    # float32 agrees with float64 to single precision
    assert torch.allclose(gm.drift(x.float(), t).double(), gm.drift(x, t),
                          atol=1e-3, rtol=1e-3)


@settings(max_examples=25, deadline=None)
@given(k=st.integers(2, 4), seed=st.integers(0, 10_000),
       t=st.floats(0.05, 0.95))
def test_authors_blend_is_scaled_gap(k, seed, t):
    # E[X1 | x] = x + (1 - t) u(x): its Jacobian is I + (1 - t) J, and
    # its blend uses B_k = I + (1 - t) A_k = t Sigma_k S_k^{-1}.
    gm = random_mixture(k, 2, seed, general_base=False)
    s = (1 - t) ** 2 * torch.eye(2, dtype=f64) + t ** 2 * gm.covs
    b = t * torch.linalg.solve(s, gm.covs).mT
    a = torch.stack([gm.component_jacobian(j, t) for j in range(k)])
    assert torch.allclose(b, torch.eye(2, dtype=f64) + (1 - t) * a,
                          atol=1e-10)


# -- error paths ----------------------------------------------------------

GOOD = dict(weights=[0.5, 0.5], means=[[0.0, 0.0], [1.0, 1.0]],
            covs=[[[1.0, 0.0], [0.0, 1.0]], [[2.0, 0.3], [0.3, 1.0]]])


@pytest.mark.parametrize("change, name", [
    (dict(weights=[0.7, 0.7]), "weights"),
    (dict(weights=[1.5, -0.5]), "weights"),
    (dict(weights=[1.0]), "weights"),
    (dict(weights=[float("nan"), 1.0]), "weights"),
    (dict(means=[0.0, 1.0]), "means"),
    (dict(means=[[0.0, float("inf")], [1.0, 1.0]]), "means"),
    (dict(covs=[[[1.0, 0.0], [0.0, 1.0]]]), "covs"),
    (dict(covs=[[[1.0, 0.0], [0.0, 1.0]], [[1.0, 2.0], [2.0, 1.0]]]), "covs[1]"),
    (dict(covs=[[[1.0, 0.5], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]]), "covs[0]"),
    (dict(base_mean=[0.0, 0.0, 0.0]), "base_mean"),
    (dict(base_cov=[[1.0, 0.0], [0.0, 0.0]]), "base_cov"),
    (dict(base_cov=[[1.0]]), "base_cov"),
    (dict(means="abc"), "means"),
])
def test_constructor_errors(change, name):
    with pytest.raises(ValueError, match=name.replace("[", r"\[")):
        GaussianMixture(**{**GOOD, **change})


def test_method_errors():
    gm = GaussianMixture(**GOOD)
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="x must"):
        gm.drift(torch.zeros(3, 3), 0.5)
    with pytest.raises(ValueError, match="x must"):
        gm.jacobian([[0.0, 0.0]], 0.5)
    with pytest.raises(ValueError, match="x must"):
        gm.drift(torch.zeros(3, 2, dtype=torch.int64), 0.5)
    with pytest.raises(ValueError, match="t must"):
        gm.drift(x, 1.5)
    with pytest.raises(ValueError, match="t must"):
        gm.jacobian(x, torch.tensor([0.2, -0.1, 0.3]))
    with pytest.raises(ValueError, match="t must"):
        gm.drift(x, "half")
    with pytest.raises(ValueError, match="t must"):
        gm.drift(x, torch.rand(4, 3))
    with pytest.raises(ValueError, match="k must"):
        gm.component_jacobian(2, 0.5)
    with pytest.raises(ValueError, match="k must"):
        gm.component_drift(-1, x, 0.5)
    with pytest.raises(ValueError, match="n must"):
        gm.sample(0)
    with pytest.raises(ValueError, match="n must"):
        gm.sample_base(2.5)


def test_singular_component_at_t1():
    gm = GaussianMixture([0.5, 0.5], [[0.0, 0.0], [1.0, 1.0]],
                         [[[1.0, 0.0], [0.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]])
    x = torch.zeros(2, 2)
    assert torch.isfinite(gm.jacobian(x, 0.999)).all()   # fine for t < 1
    with pytest.raises(ValueError, match="singular"):
        gm.drift(x, 1.0)


def test_covariance_is_within_plus_between_and_matches_samples():
    gm = mixture.GaussianMixture(torch.tensor([0.2, 0.8], dtype=torch.float64),
                           torch.tensor([[0.0, 1.0], [2.0, -1.0]], dtype=torch.float64),
                           torch.stack([torch.eye(2, dtype=torch.float64),
                                        torch.tensor([[0.5, 0.1], [0.1, 0.3]],
                                                     dtype=torch.float64)]))
    total = gm.covariance()
    assert torch.allclose(total, gm.covariance("within") + gm.covariance("between"))
    # law of total covariance, by hand: 0.2 * 0.8 * (mu_1 - mu_0)(mu_1 - mu_0)^T
    d = torch.tensor([2.0, -2.0], dtype=torch.float64)
    assert torch.allclose(gm.covariance("between"), 0.16 * torch.outer(d, d))
    x = gm.sample(200_000, torch.Generator().manual_seed(0))
    assert torch.allclose(torch.cov(x.T), total, atol=0.03)
    with pytest.raises(ValueError, match="part"):
        gm.covariance("outer")


def test_monotone_map_moment_single_gaussian_and_flow():
    # one component: T(z) = m + s z, so E[T'^2] = s^2
    assert mixture.monotone_map_jacobian_moment([1.0], [3.0], [0.7]) == pytest.approx(0.49, rel=1e-7)
    # two components: against the exact Jacobians of the RK4 flow map
    from flowjac.engine.jvp import flow_jvp
    f64 = torch.float64
    gm = mixture.GaussianMixture(torch.tensor([0.5, 0.5], dtype=f64),
                           torch.tensor([[-1.0, 0.0], [1.0, 0.0]], dtype=f64),
                           0.25 * torch.eye(2, dtype=f64).expand(2, 2, 2))
    z = torch.randn(20_000, 2, dtype=f64, generator=torch.Generator().manual_seed(1))
    _, cols = flow_jvp(gm.drift, z, torch.eye(2, dtype=f64).expand(len(z), 2, 2).contiguous(),
                       steps=60)
    a = cols[:, 0, 0] ** 2
    exact = mixture.monotone_map_jacobian_moment([0.5, 0.5], [-1.0, 1.0], [0.5, 0.5])
    assert abs(a.mean().item() - exact) < 5 * (a.std() / len(a) ** 0.5).item()
    assert cols[:, 0, 1].abs().max() < 1e-12 and cols[:, 1, 0].abs().max() < 1e-12


@pytest.mark.parametrize("kw, word", [
    (dict(weights=[0.5, 0.6], means=[0, 1], stds=[1, 1]), "sum to 1"),
    (dict(weights=[1.0], means=[0, 1], stds=[1]), "one entry per component"),
    (dict(weights=[1.0], means=[0], stds=[0.0]), "stds must be positive"),
    (dict(weights=[1.0], means=[float("nan")], stds=[1]), "finite"),
    (dict(weights=[1.0], means=[0], stds=[1], n_grid=2), "n_grid"),
])
def test_monotone_map_moment_rejects_bad_input(kw, word):
    with pytest.raises(ValueError, match=word):
        mixture.monotone_map_jacobian_moment(**kw)


# -- the quantile map (flowjac.closedform.quantile) ------------------------

def test_quantile_map_of_one_component_is_affine():
    from flowjac.closedform.quantile import QuantileMap

    qm = QuantileMap([3.0], 0.7)
    z = torch.linspace(-4, 4, 9, dtype=torch.float64)
    assert torch.allclose(qm(z), 3.0 + 0.7 * z, atol=1e-12)
    assert torch.allclose(qm.derivative(z), torch.full_like(z, 0.7), atol=1e-10)
    assert qm.cov() == pytest.approx(0.49)
    assert qm.upper() == pytest.approx(0.49, rel=1e-7)
    assert qm.lower() == pytest.approx(0.49, rel=1e-7)
    assert qm.integrand([0.0, 0.5, 1.0]) == pytest.approx([0.49] * 3, rel=1e-6)


def test_quantile_map_bounds_integrand_and_derivative():
    from flowjac.closedform.quantile import QuantileMap

    qm = QuantileMap([-1.0, 1.0])                  # sd 0.5, equal weights
    z = torch.linspace(-3, 3, 13, dtype=torch.float64)
    fd = (qm(z + 1e-6) - qm(z - 1e-6)) / 2e-6
    assert torch.allclose(qm.derivative(z), fd, rtol=1e-6)
    x, jv = qm.jvp(z[:, None], torch.full((13, 2, 1), 2.0, dtype=torch.float64))
    assert x.shape == (13, 1) and torch.allclose(jv[:, 1, 0], 2 * qm.derivative(z))
    assert qm.cov() == pytest.approx(1.25)
    assert qm.lower() < qm.cov() < qm.upper()
    assert qm.upper() == pytest.approx(mixture.monotone_map_jacobian_moment(
        [0.5, 0.5], [-1.0, 1.0], [0.5, 0.5]))
    rhos = torch.linspace(0, 0.99, 100, dtype=torch.float64)
    h = torch.tensor(qm.integrand(rhos.tolist(), n_grid=801), dtype=torch.float64)
    assert h[0] == pytest.approx(qm.lower(), rel=1e-4)
    assert (h[1:] >= h[:-1] - 1e-9).all()                       # non-decreasing
    rare = qm.rare_share(20_000)
    assert 0 <= rare["share"] < 0.01 and rare["second_moment"] == pytest.approx(qm.upper(), rel=1e-3)
    assert rare["max_derivative"] == pytest.approx(float(qm.derivative(torch.zeros(1, dtype=torch.float64))), rel=1e-3)


def test_quantile_map_errors():
    from flowjac.closedform.quantile import QuantileMap

    with pytest.raises(ValueError, match="stds"):
        QuantileMap([0.0, 1.0], [0.5, -1.0])
    with pytest.raises(ValueError, match="weights"):
        QuantileMap([0.0, 1.0], 0.5, weights=[0.5, 0.6])
    with pytest.raises(ValueError, match="rhos"):
        QuantileMap([0.0]).integrand([1.5])
    with pytest.raises(ValueError, match="n_grid"):
        QuantileMap([0.0]).grid(2)
