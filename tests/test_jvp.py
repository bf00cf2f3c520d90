"""Tests of flowjac.engine.jvp: exact forward-mode JVPs and finite differences."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowjac.closedform import gaussian
from flowjac.engine.jvp import (
    fd_jvp,
    flow_jvp,
    jvp_cost,
    median_seconds,
    random_probes,
    reference_jvp,
)

F64 = torch.float64


def gaussian_problem(d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=F64)
    cov = a @ a.T / d + 0.2 * torch.eye(d, dtype=F64)
    mean = torch.randn(d, generator=g, dtype=F64)
    return mean, cov


def tanh_velocity(d=3, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(d + 1, 16, generator=g, dtype=dtype) / 2
    w2 = torch.randn(16, d, generator=g, dtype=dtype) / 4

    def vel(x, t):
        tt = t.expand(*x.shape[:-1], 1)
        return torch.tanh(torch.cat([x, tt], -1) @ w1) @ w2
    return vel


def test_correctness_bar_gaussian_drift():
    """rk4, 100 steps, float64: flow_jvp = flow_map_jacobian(1, cov) @ v to 1e-6."""
    mean, cov = gaussian_problem()
    vel = lambda x, t: gaussian.drift(x, t, mean, cov)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(8, 3, generator=g, dtype=F64)
    v = random_probes(x0, generator=g)
    x1, jv = flow_jvp(vel, x0, v, steps=100, method="rk4")
    jac = gaussian.flow_map_jacobian(1, cov)
    assert (jv - v @ jac.T).abs().max() < 1e-6
    assert (x1 - gaussian.flow_map(x0, 1.0, mean, cov)).abs().max() < 1e-6
    vk = random_probes(x0, k=5, generator=g)
    x1k, jvk = flow_jvp(vel, x0, vk, steps=100, method="rk4")
    assert jvk.shape == (8, 5, 3)
    assert torch.equal(x1k, x1)
    assert (jvk - vk @ jac.T).abs().max() < 1e-6


@pytest.mark.parametrize("method", ["euler", "midpoint", "heun", "rk4"])
def test_flow_jvp_equals_torch_func_jvp_through_the_solver(method):
    vel = tanh_velocity()
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(6, 3, generator=g, dtype=F64)
    v = torch.randn(6, 2, 3, generator=g, dtype=F64)
    x1, jv = flow_jvp(vel, x0, v, steps=12, method=method)
    x1r, jvr = reference_jvp(vel, x0, v, steps=12, method=method)
    assert torch.allclose(x1, x1r, rtol=0, atol=1e-13)
    assert torch.allclose(jv, jvr, rtol=0, atol=1e-12)
    x1s, jvs = flow_jvp(vel, x0, v[:, 1], steps=12, method=method)
    assert torch.allclose(jvs, jvr[:, 1], rtol=0, atol=1e-12)


def test_flow_jvp_works_under_no_grad_and_in_float32():
    vel = tanh_velocity(dtype=torch.float32)
    x0 = torch.randn(4, 3)
    v = torch.randn(4, 3)
    with torch.no_grad():
        _, jv = flow_jvp(vel, x0, v, steps=10)
    _, jvr = reference_jvp(vel, x0, v, steps=10)
    assert jv.dtype == torch.float32
    assert torch.allclose(jv, jvr, atol=1e-5)


def test_primal_path_computed_once_for_k_probes():
    calls = []
    inner = tanh_velocity()

    def vel(x, t):
        calls.append(1)
        return inner(x, t)

    x0 = torch.randn(3, 3, dtype=F64)
    flow_jvp(vel, x0, torch.randn(3, 7, 3, dtype=F64), steps=5)
    assert len(calls) == 5 * 4  # one velocity call per rk4 stage, any k


def test_fd_uses_one_batched_solve_and_divides_by_eps():
    batches = []
    mean, cov = gaussian_problem()

    def vel(x, t):
        batches.append(x.shape[0])
        return gaussian.drift(x, t, mean, cov)

    x0 = torch.randn(4, 3, dtype=F64)
    v = torch.randn(4, 2, 3, dtype=F64)
    jac = gaussian.flow_map_jacobian(1.0, cov)
    for scheme, rows, eps, tol in [("forward", 4 * 3, 1e-7, 1e-5),
                                   ("central", 4 * 5, 1e-4, 1e-7)]:
        batches.clear()
        x1, jv = fd_jvp(vel, x0, v, eps, steps=100, scheme=scheme)
        assert set(batches) == {rows} and len(batches) == 400
        assert (jv - v @ jac.T).abs().max() < tol
        assert torch.allclose(x1, gaussian.flow_map(x0, 1.0, mean, cov), atol=1e-6)


def test_fd_agrees_with_exact_jvp_at_a_good_eps():
    vel = tanh_velocity()
    x0 = torch.randn(5, 3, dtype=F64)
    v = torch.randn(5, 3, dtype=F64)
    _, exact = flow_jvp(vel, x0, v, steps=20)
    _, fwd = fd_jvp(vel, x0, v, 1e-7, steps=20)
    _, cen = fd_jvp(vel, x0, v, 1e-5, steps=20, scheme="central")
    assert fwd.shape == exact.shape == cen.shape
    scale = exact.abs().max()
    assert (fwd - exact).abs().max() < 1e-6 * scale
    assert (cen - exact).abs().max() < 1e-9 * scale


@settings(max_examples=15, deadline=None)
@given(a=st.floats(-3, 3), b=st.floats(-3, 3), seed=st.integers(0, 1000))
def test_flow_jvp_is_linear_in_the_tangent(a, b, seed):
    vel = tanh_velocity(seed=seed % 7)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(2, 3, generator=g, dtype=F64)
    v1, v2 = torch.randn(2, 2, 3, generator=g, dtype=F64).unbind(1)
    _, j1 = flow_jvp(vel, x0, v1, steps=4)
    _, j2 = flow_jvp(vel, x0, v2, steps=4)
    _, j12 = flow_jvp(vel, x0, a * v1 + b * v2, steps=4)
    assert torch.allclose(j12, a * j1 + b * j2, atol=1e-10)


def test_random_probes_second_moment_gives_jjt():
    """Cov(Jv) = J J^T for v ~ N(0, I): the documented scaling."""
    mean, cov = gaussian_problem(2)
    g = torch.Generator().manual_seed(3)
    x0 = torch.zeros(10_000, 2, dtype=F64)
    v = random_probes(x0, generator=g)
    assert v.shape == x0.shape and v.dtype == F64
    _, jv = flow_jvp(lambda x, t: gaussian.drift(x, t, mean, cov), x0, v, steps=10)
    m = jv.T @ jv / len(jv)
    # J J^T = cov at t = 1 (10 rk4 steps are accurate to ~1e-5 here)
    assert torch.allclose(m, cov, atol=0.06 * float(cov.abs().max()))


def test_random_probes_shapes_and_reproducibility():
    x0 = torch.zeros(3, 1, 4, 4)
    a = random_probes(x0, k=2, generator=torch.Generator().manual_seed(0))
    b = random_probes(x0, k=2, generator=torch.Generator().manual_seed(0))
    assert a.shape == (3, 2, 1, 4, 4) and torch.equal(a, b)
    with pytest.raises(ValueError, match="k must be >= 1"):
        random_probes(x0, k=0)


def test_error_paths():
    vel = tanh_velocity()
    x0 = torch.randn(4, 3, dtype=F64)
    with pytest.raises(ValueError, match="tangents must have shape"):
        flow_jvp(vel, x0, torch.randn(4, 2, dtype=F64))
    with pytest.raises(ValueError, match="tangents must have x0's dtype"):
        flow_jvp(vel, x0, torch.randn(4, 3))
    with pytest.raises(ValueError, match="steps must be >= 1"):
        flow_jvp(vel, x0, torch.randn(4, 3, dtype=F64), steps=0)
    with pytest.raises(ValueError, match="method must be one of"):
        fd_jvp(vel, x0, torch.randn(4, 3, dtype=F64), 1e-3, method="rk45")
    for eps in (0.0, -1e-3, float("inf"), "a"):
        with pytest.raises(ValueError, match="eps must be a positive"):
            fd_jvp(vel, x0, torch.randn(4, 3, dtype=F64), eps)
    with pytest.raises(ValueError, match="scheme must be one of"):
        fd_jvp(vel, x0, torch.randn(4, 3, dtype=F64), 1e-3, scheme="backward")
    with pytest.raises(ValueError, match="must return the shape of x"):
        flow_jvp(lambda x, t: x[:, :2], x0, torch.randn(4, 3, dtype=F64))


def test_flow_jvp_records_no_graph_unless_asked():
    """Issue 15, item 4: inference mode by default; create_graph=True keeps the graph."""
    import pytest

    from flowjac.engine.jvp import flow_jvp
    from flowjac.engine.velocity import velocity_fn
    from flowjac.models.nets import MLPFlow

    torch.manual_seed(0)
    net = MLPFlow(3, hidden=8, depth=2)            # parameters require grad
    vel = velocity_fn(net)
    x0, v = torch.randn(4, 3), torch.randn(4, 3)
    for mode in ("auto", "func"):
        x1, jv = flow_jvp(vel, x0, v, steps=3, jvp_mode=mode)
        assert not x1.requires_grad and not jv.requires_grad
        x1g, jvg = flow_jvp(vel, x0, v, steps=3, jvp_mode=mode, create_graph=True)
        assert jvg.requires_grad
        assert torch.allclose(jv, jvg.detach(), atol=1e-6)
        (g,) = torch.autograd.grad(jvg.pow(2).sum(), net.out.weight)
        assert torch.isfinite(g).all() and g.abs().sum() > 0
    with pytest.raises(ValueError, match="create_graph"):
        flow_jvp(vel, x0, v, steps=3, create_graph="yes")


def test_median_seconds_interleaves_and_jvp_cost_gives_ratios():
    calls = []
    secs = median_seconds({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                          repeats=3)
    assert set(secs) == {"a", "b"} and all(v >= 0 for v in secs.values())
    assert calls == ["a", "b"] * 4                 # one warm-up, then interleaved
    vel = tanh_velocity()
    z = torch.randn(16, 3, dtype=F64)
    cost = jvp_cost(vel, z, torch.randn(16, 2, 3, dtype=F64), steps=3, repeats=2,
                    torch_func=True)
    assert set(cost) == {"exact", "torch_func"} and all(v > 0 for v in cost.values())
    with pytest.raises(ValueError, match="repeats"):
        median_seconds({"a": lambda: None}, repeats=0)
