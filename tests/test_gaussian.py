"""Unit, property and error-path tests of flowjac.gaussian."""
import numpy as np
import pytest
import sympy as sp
import torch
from hypothesis import given, settings, strategies as st

from flowjac import gaussian as G
from flowjac import symbolic as S

f64 = torch.float64


def random_spd(d, seed, scale=1.0, jitter=1e-3):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, dtype=f64, generator=g) * scale
    return a @ a.T + jitter * torch.eye(d, dtype=f64)


@pytest.mark.parametrize("t", [0.0, 0.2, 0.5, 0.9, 1.0])
def test_drift_1d_matches_sympy(t):
    mu, var = 0.7, 2.3
    expr = S.regression_drift_1d(0, 1, mu, var)
    f = sp.lambdify((S.x, S.t), expr)
    xs = torch.linspace(-3, 3, 7, dtype=f64)
    ours = G.drift(xs[:, None], t, torch.tensor([mu], dtype=f64),
                   torch.tensor([[var]], dtype=f64))[:, 0]
    ref = torch.tensor([f(float(x), t) for x in xs], dtype=f64)
    assert torch.allclose(ours, ref, atol=1e-12)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.8, 1.0])
def test_flow_map_1d_matches_sympy(t):
    mu, var = -1.2, 0.4
    f = sp.lambdify((S.x0, S.t), S.flow_map_1d(mu, var))
    xs = torch.linspace(-2, 2, 5, dtype=f64)
    ours = G.flow_map(xs[:, None], t, torch.tensor([mu], dtype=f64),
                      torch.tensor([[var]], dtype=f64))[:, 0]
    ref = torch.tensor([f(float(x), t) for x in xs], dtype=f64)
    assert torch.allclose(ours, ref, atol=1e-12)


def test_drift_2d_matches_block_formula():
    a, b, c = 1.3, 0.4, 0.7
    cov = sp.Matrix([[a, b], [b, c]])
    mu = sp.Matrix([0.5, -1.0])
    xv = sp.Matrix([0.3, 0.9])
    for t in [0.1, 0.5, 0.95]:
        ref = S.block_drift(sp.eye(2), cov, sp.zeros(2, 1), mu, xv).subs(S.t, t)
        ours = G.drift(torch.tensor([[0.3, 0.9]], dtype=f64), t,
                       torch.tensor([0.5, -1.0], dtype=f64),
                       torch.tensor([[a, b], [b, c]], dtype=f64))[0]
        assert np.allclose(ours.numpy(), np.array(ref, dtype=float).ravel(),
                           atol=1e-12)


def test_symbolic_identities():
    assert sp.simplify(S.regression_drift_1d() - S.bayes_drift_1d()) == 0
    assert sp.simplify(S.ode_residual_1d()) == 0
    u = S.regression_drift_1d(0, 1, S.m1, S.v1)
    assert sp.simplify(u.subs(S.t, 0) - (S.m1 - S.x)) == 0
    assert sp.simplify(u.subs(S.t, 1) - S.x) == 0
    assert sp.simplify(S.conditional_variance_1d()
                       - 1 / ((1 - S.t) ** 2 + S.t ** 2)) == 0


def test_symbolic_identity_is_not_vacuous():
    # A wrong flow map must leave a non-zero residual.
    wrong = S.t * S.m1 + sp.sqrt((1 + S.t) ** 2 + S.t ** 2 * S.v1) * S.x0
    u = S.regression_drift_1d(0, 1, S.m1, S.v1)
    assert sp.simplify(sp.diff(wrong, S.t) - u.subs(S.x, wrong)) != 0


@settings(max_examples=30, deadline=None)
@given(d=st.integers(1, 5), seed=st.integers(0, 10_000),
       t=st.floats(0.0, 1.0))
def test_flow_map_solves_ode_and_jacobians(d, seed, t):
    cov = random_spd(d, seed)
    g = torch.Generator().manual_seed(seed + 1)
    mean = torch.randn(d, dtype=f64, generator=g)
    z = torch.randn(6, d, dtype=f64, generator=g)
    # Jacobian of the flow map and of the drift by autograd
    jac = torch.func.jacfwd(lambda v: G.flow_map(v, t, mean, cov))(z[0])
    assert torch.allclose(jac, G.flow_map_jacobian(t, cov), atol=1e-10)
    jd = torch.func.jacrev(lambda v: G.drift(v, t, mean, cov))(z[0])
    assert torch.allclose(jd, G.drift_jacobian(t, cov), atol=1e-8)
    # push-forward covariance is J J^T
    j = G.flow_map_jacobian(t, cov)
    assert torch.allclose(j @ j.T, G.pushforward_cov(t, cov), atol=1e-9)
    # ODE: central difference in t matches the drift along the path
    tc = min(max(t, 1e-3), 1 - 1e-3)
    h = 1e-6
    dphi = (G.flow_map(z, tc + h, mean, cov)
            - G.flow_map(z, tc - h, mean, cov)) / (2 * h)
    u = G.drift(G.flow_map(z, tc, mean, cov), tc, mean, cov)
    assert torch.allclose(dphi, u, atol=1e-5 * (1 + cov.abs().max().item()))


def test_endpoints():
    cov = random_spd(3, 0)
    mean = torch.tensor([1.0, 2.0, 3.0], dtype=f64)
    z = torch.randn(5, 3, dtype=f64)
    assert torch.allclose(G.flow_map(z, 0.0, mean, cov), z)
    assert torch.allclose(G.flow_map(z, 1.0, mean, cov),
                          mean + z @ G.psd_sqrt(cov), atol=1e-12)
    assert torch.allclose(G.drift(z, 0.0, mean, cov), mean - z, atol=1e-12)
    assert torch.allclose(G.drift(z, 1.0, mean, cov), z, atol=1e-10)


def test_batched_leading_dims_and_batched_t():
    cov = random_spd(2, 3)
    mean = torch.tensor([0.3, -0.2], dtype=f64)
    x = torch.randn(4, 5, 2, dtype=f64)
    out = G.drift(x, 0.4, mean, cov)
    assert out.shape == (4, 5, 2)
    assert torch.allclose(out[2, 3], G.drift(x[2, 3], 0.4, mean, cov))
    tb = torch.rand(4, 5, dtype=f64)
    outb = G.drift(x, tb, mean, cov)
    assert torch.allclose(outb[1, 2], G.drift(x[1, 2], tb[1, 2].item(), mean, cov))
    jb = G.flow_map_jacobian(torch.tensor([0.2, 0.7], dtype=f64), cov)
    assert jb.shape == (2, 2, 2)
    assert torch.allclose(jb[1], G.flow_map_jacobian(0.7, cov))


def test_dtype_and_singular_target():
    cov = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # PSD, singular, float32
    mean = torch.zeros(2)
    x = torch.randn(3, 2)
    for t in [0.0, 0.5, 1.0]:
        y = G.drift(x, t, mean, cov)
        assert y.dtype == torch.float32 and torch.isfinite(y).all()
    assert torch.allclose(G.flow_map(x, 1.0, mean, cov)[:, 1], torch.zeros(3))


@pytest.mark.parametrize("bad_t", [-0.1, 1.5, float("nan"), "a"])
def test_bad_t(bad_t):
    with pytest.raises(ValueError, match="t must"):
        G.drift(torch.zeros(1, 2), bad_t, torch.zeros(2), torch.eye(2))


@pytest.mark.parametrize("cov, msg", [
    (torch.ones(2, 3), "square"),
    (torch.tensor([[1.0, 0.5], [0.0, 1.0]]), "symmetric"),
    (torch.tensor([[1.0, 2.0], [2.0, 1.0]]), "positive semidefinite"),
    (torch.tensor([[float("nan"), 0.0], [0.0, 1.0]]), "finite"),
])
def test_bad_cov(cov, msg):
    with pytest.raises(ValueError, match=f"cov must be .*{msg}|cov must be {msg}"):
        G.flow_map(torch.zeros(1, 2), 0.5, torch.zeros(2), cov)


def test_shape_mismatch():
    with pytest.raises(ValueError, match="mean must have shape"):
        G.drift(torch.zeros(1, 2), 0.5, torch.zeros(3), torch.eye(2))
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 2\)"):
        G.drift(torch.zeros(1, 3), 0.5, torch.zeros(2), torch.eye(2))
    with pytest.raises(ValueError, match="x0 must have shape"):
        G.flow_map(torch.zeros(4), 0.5, torch.zeros(2), torch.eye(2))
