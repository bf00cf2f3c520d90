"""Unit, property and error-path tests of flowjac.closedform.gaussian."""
import numpy as np
import pytest
import sympy as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowjac.closedform import gaussian, symbolic

f64 = torch.float64


def random_spd(d, seed, scale=1.0, jitter=1e-3):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, dtype=f64, generator=g) * scale
    return a @ a.T + jitter * torch.eye(d, dtype=f64)


@pytest.mark.parametrize("t", [0.0, 0.2, 0.5, 0.9, 1.0])
def test_drift_1d_matches_sympy(t):
    mu, var = 0.7, 2.3
    expr = symbolic.regression_drift_1d(0, 1, mu, var)
    f = sp.lambdify((symbolic.x, symbolic.t), expr)
    xs = torch.linspace(-3, 3, 7, dtype=f64)
    ours = gaussian.drift(xs[:, None], t, torch.tensor([mu], dtype=f64),
                   torch.tensor([[var]], dtype=f64))[:, 0]
    ref = torch.tensor([f(float(x), t) for x in xs], dtype=f64)
    assert torch.allclose(ours, ref, atol=1e-12)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.8, 1.0])
def test_flow_map_1d_matches_sympy(t):
    mu, var = -1.2, 0.4
    f = sp.lambdify((symbolic.x0, symbolic.t), symbolic.flow_map_1d(mu, var))
    xs = torch.linspace(-2, 2, 5, dtype=f64)
    ours = gaussian.flow_map(xs[:, None], t, torch.tensor([mu], dtype=f64),
                      torch.tensor([[var]], dtype=f64))[:, 0]
    ref = torch.tensor([f(float(x), t) for x in xs], dtype=f64)
    assert torch.allclose(ours, ref, atol=1e-12)


def test_drift_2d_matches_block_formula():
    a, b, c = 1.3, 0.4, 0.7
    cov = sp.Matrix([[a, b], [b, c]])
    mu = sp.Matrix([0.5, -1.0])
    xv = sp.Matrix([0.3, 0.9])
    for t in [0.1, 0.5, 0.95]:
        ref = symbolic.block_drift(sp.eye(2), cov, sp.zeros(2, 1), mu, xv).subs(symbolic.t, t)
        ours = gaussian.drift(torch.tensor([[0.3, 0.9]], dtype=f64), t,
                       torch.tensor([0.5, -1.0], dtype=f64),
                       torch.tensor([[a, b], [b, c]], dtype=f64))[0]
        assert np.allclose(ours.numpy(), np.array(ref, dtype=float).ravel(),
                           atol=1e-12)


def test_symbolic_identities():
    assert sp.simplify(symbolic.regression_drift_1d() - symbolic.bayes_drift_1d()) == 0
    assert sp.simplify(symbolic.ode_residual_1d()) == 0
    u = symbolic.regression_drift_1d(0, 1, symbolic.m1, symbolic.v1)
    assert sp.simplify(u.subs(symbolic.t, 0) - (symbolic.m1 - symbolic.x)) == 0
    assert sp.simplify(u.subs(symbolic.t, 1) - symbolic.x) == 0
    assert sp.simplify(symbolic.conditional_variance_1d()
                       - 1 / ((1 - symbolic.t) ** 2 + symbolic.t ** 2)) == 0


def test_symbolic_identity_is_not_vacuous():
    # A wrong flow map must leave a non-zero residual.
    wrong = symbolic.t * symbolic.m1 + sp.sqrt((1 + symbolic.t) ** 2 + symbolic.t ** 2 * symbolic.v1) * symbolic.x0
    u = symbolic.regression_drift_1d(0, 1, symbolic.m1, symbolic.v1)
    assert sp.simplify(sp.diff(wrong, symbolic.t) - u.subs(symbolic.x, wrong)) != 0


@settings(max_examples=30, deadline=None)
@given(d=st.integers(1, 5), seed=st.integers(0, 10_000),
       t=st.floats(0.0, 1.0))
def test_flow_map_solves_ode_and_jacobians(d, seed, t):
    cov = random_spd(d, seed)
    g = torch.Generator().manual_seed(seed + 1)
    mean = torch.randn(d, dtype=f64, generator=g)
    z = torch.randn(6, d, dtype=f64, generator=g)
    # Jacobian of the flow map and of the drift by autograd
    jac = torch.func.jacfwd(lambda v: gaussian.flow_map(v, t, mean, cov))(z[0])
    assert torch.allclose(jac, gaussian.flow_map_jacobian(t, cov), atol=1e-10)
    jd = torch.func.jacrev(lambda v: gaussian.drift(v, t, mean, cov))(z[0])
    assert torch.allclose(jd, gaussian.drift_jacobian(t, cov), atol=1e-8)
    # push-forward covariance is J J^T
    j = gaussian.flow_map_jacobian(t, cov)
    assert torch.allclose(j @ j.T, gaussian.pushforward_cov(t, cov), atol=1e-9)
    # ODE: central difference in t matches the drift along the path
    tc = min(max(t, 1e-3), 1 - 1e-3)
    h = 1e-6
    dphi = (gaussian.flow_map(z, tc + h, mean, cov)
            - gaussian.flow_map(z, tc - h, mean, cov)) / (2 * h)
    u = gaussian.drift(gaussian.flow_map(z, tc, mean, cov), tc, mean, cov)
    assert torch.allclose(dphi, u, atol=1e-5 * (1 + cov.abs().max().item()))


def test_endpoints():
    cov = random_spd(3, 0)
    mean = torch.tensor([1.0, 2.0, 3.0], dtype=f64)
    z = torch.randn(5, 3, dtype=f64)
    assert torch.allclose(gaussian.flow_map(z, 0.0, mean, cov), z)
    assert torch.allclose(gaussian.flow_map(z, 1.0, mean, cov),
                          mean + z @ gaussian.psd_sqrt(cov), atol=1e-12)
    assert torch.allclose(gaussian.drift(z, 0.0, mean, cov), mean - z, atol=1e-12)
    assert torch.allclose(gaussian.drift(z, 1.0, mean, cov), z, atol=1e-10)


def test_batched_leading_dims_and_batched_t():
    cov = random_spd(2, 3)
    mean = torch.tensor([0.3, -0.2], dtype=f64)
    x = torch.randn(4, 5, 2, dtype=f64)
    out = gaussian.drift(x, 0.4, mean, cov)
    assert out.shape == (4, 5, 2)
    assert torch.allclose(out[2, 3], gaussian.drift(x[2, 3], 0.4, mean, cov))
    tb = torch.rand(4, 5, dtype=f64)
    outb = gaussian.drift(x, tb, mean, cov)
    assert torch.allclose(outb[1, 2], gaussian.drift(x[1, 2], tb[1, 2].item(), mean, cov))
    jb = gaussian.flow_map_jacobian(torch.tensor([0.2, 0.7], dtype=f64), cov)
    assert jb.shape == (2, 2, 2)
    assert torch.allclose(jb[1], gaussian.flow_map_jacobian(0.7, cov))


def test_dtype_and_singular_target():
    cov = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # PSD, singular, float32
    mean = torch.zeros(2)
    x = torch.randn(3, 2)
    for t in [0.0, 0.5, 1.0]:
        y = gaussian.drift(x, t, mean, cov)
        assert y.dtype == torch.float32 and torch.isfinite(y).all()
    assert torch.allclose(gaussian.flow_map(x, 1.0, mean, cov)[:, 1], torch.zeros(3))


@pytest.mark.parametrize("bad_t", [-0.1, 1.5, float("nan"), "a"])
def test_bad_t(bad_t):
    with pytest.raises(ValueError, match="t must"):
        gaussian.drift(torch.zeros(1, 2), bad_t, torch.zeros(2), torch.eye(2))


@pytest.mark.parametrize("cov, msg", [
    (torch.ones(2, 3), "square"),
    (torch.tensor([[1.0, 0.5], [0.0, 1.0]]), "symmetric"),
    (torch.tensor([[1.0, 2.0], [2.0, 1.0]]), "positive semidefinite"),
    (torch.tensor([[float("nan"), 0.0], [0.0, 1.0]]), "finite"),
])
def test_bad_cov(cov, msg):
    with pytest.raises(ValueError, match=f"cov must be .*{msg}|cov must be {msg}"):
        gaussian.flow_map(torch.zeros(1, 2), 0.5, torch.zeros(2), cov)


def test_shape_mismatch():
    with pytest.raises(ValueError, match="mean must have shape"):
        gaussian.drift(torch.zeros(1, 2), 0.5, torch.zeros(3), torch.eye(2))
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 2\)"):
        gaussian.drift(torch.zeros(1, 3), 0.5, torch.zeros(2), torch.eye(2))
    with pytest.raises(ValueError, match="x0 must have shape"):
        gaussian.flow_map(torch.zeros(4), 0.5, torch.zeros(2), torch.eye(2))
