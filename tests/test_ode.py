"""Tests of flowjac.engine.ode: fixed-grid solvers against closed forms."""
import math

import pytest
import torch
from torch.func import jvp, vmap

from flowjac.closedform import gaussian
from flowjac.engine.ode import METHODS, integrate, time_grid

ORDERS = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}


def gaussian_problem(d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    cov = a @ a.T / d + 0.2 * torch.eye(d, dtype=torch.float64)
    mean = torch.randn(d, generator=g, dtype=torch.float64)
    return mean, cov


def test_methods_are_the_documented_four():
    assert set(METHODS) == set(ORDERS)


@pytest.mark.parametrize("method", list(ORDERS))
def test_convergence_order_on_linear_time_dependent_ode(method):
    # dx/dt = (1 - 2t) x  ->  x(1) = x0 * exp(t - t^2)|_0^1 = x0 * exp(0)
    # use t in [0, 0.7]: x(0.7) = x0 * exp(0.7 - 0.49)
    vel = lambda x, t: (1 - 2 * t) * x
    x0 = torch.tensor([[1.0], [-2.0]], dtype=torch.float64)
    exact = x0 * math.exp(0.7 - 0.49)
    errs = [float((integrate(vel, x0, n, method, 0.0, 0.7) - exact).abs().max())
            for n in (64, 128)]
    rate = math.log2(errs[0] / errs[1])
    assert abs(rate - ORDERS[method]) < 0.3, (method, errs, rate)


def test_rk4_reproduces_gaussian_flow_map():
    mean, cov = gaussian_problem()
    x0 = torch.randn(7, 3, dtype=torch.float64)
    x1 = integrate(lambda x, t: gaussian.drift(x, t, mean, cov), x0, 100)
    assert torch.allclose(x1, gaussian.flow_map(x0, 1.0, mean, cov), atol=1e-6)


def test_return_path_matches_flow_map_on_the_grid():
    mean, cov = gaussian_problem(2, seed=1)
    x0 = torch.randn(5, 2, dtype=torch.float64)
    path = integrate(lambda x, t: gaussian.drift(x, t, mean, cov), x0, 50,
                     return_path=True)
    assert path.shape == (51, 5, 2)
    assert torch.equal(path[0], x0)
    ts = time_grid(50)
    exact = torch.stack([gaussian.flow_map(x0, float(t), mean, cov) for t in ts])
    assert torch.allclose(path, exact, atol=1e-6)
    assert torch.equal(path[-1], integrate(
        lambda x, t: gaussian.drift(x, t, mean, cov), x0, 50))


def test_velocity_gets_zero_dim_time_of_x_dtype():
    seen = []

    def vel(x, t):
        seen.append((t.ndim, t.dtype, float(t)))
        return torch.zeros_like(x)

    integrate(vel, torch.zeros(2, 1, dtype=torch.float32), 2, "rk4")
    assert all(nd == 0 and dt == torch.float32 for nd, dt, _ in seen)
    assert [round(s[2], 6) for s in seen] == [0, .25, .25, .5, .5, .75, .75, 1]


def test_backward_integration_inverts_forward():
    mean, cov = gaussian_problem(2, seed=2)
    vel = lambda x, t: gaussian.drift(x, t, mean, cov)
    x0 = torch.randn(4, 2, dtype=torch.float64)
    x1 = integrate(vel, x0, 200, t0=0.0, t1=0.9)
    back = integrate(vel, x1, 200, t0=0.9, t1=0.0)
    assert torch.allclose(back, x0, atol=1e-8)


def test_works_under_no_grad_jvp_and_vmap():
    mean, cov = gaussian_problem()
    vel = lambda x, t: gaussian.drift(x, t, mean, cov)
    x0 = torch.randn(6, 3, dtype=torch.float64)
    v = torch.randn(6, 3, dtype=torch.float64)
    with torch.no_grad():
        ref = integrate(vel, x0, 40)
    _, jv = jvp(lambda z: integrate(vel, z, 40), (x0,), (v,))
    assert torch.allclose(jv, v @ gaussian.flow_map_jacobian(1.0, cov).T, atol=1e-6)
    batched = vmap(lambda z: integrate(vel, z[None], 40)[0])(x0)
    assert torch.allclose(batched, ref, atol=1e-12)


def test_reverse_mode_gradient_of_gaussian_flow():
    mean, cov = gaussian_problem(2)
    x0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    integrate(lambda x, t: gaussian.drift(x, t, mean, cov), x0, 50).sum().backward()
    expected = gaussian.flow_map_jacobian(1.0, cov).sum(0).expand(3, 2)
    assert torch.allclose(x0.grad, expected, atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "steps must be >= 1"),
    (dict(steps=2.5), "steps must be an integer"),
    (dict(steps=4, method="dopri5"), "method must be one of"),
    (dict(steps=4, t1=float("nan")), "t1 must be finite"),
    (dict(steps=4, t0="zero"), "t0 must be a real number"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        integrate(lambda x, t: x, torch.zeros(2, 2), **kwargs)


def test_velocity_shape_mismatch_and_bad_x0():
    with pytest.raises(ValueError, match="must return the shape of x"):
        integrate(lambda x, t: x[:, :1], torch.zeros(2, 2), 3)
    with pytest.raises(ValueError, match="must return a tensor"):
        integrate(lambda x, t: 1.0, torch.zeros(2, 2), 3)
    with pytest.raises(ValueError, match="x0 must be a torch tensor"):
        integrate(lambda x, t: x, [[0.0]], 3)
    with pytest.raises(ValueError, match="x0 must be a floating tensor"):
        integrate(lambda x, t: x, torch.zeros(2, 2, dtype=torch.long), 3)
