"""Unit, property and error-path tests of flowjac.closedform.empirical, and of what integrates
u* (flowjac.engine.empirical_flow) or trains on it (flowjac.engine.small_flows)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowjac.closedform import empirical, gaussian
from flowjac.engine import empirical_flow, small_flows

f64 = torch.float64


def brute_velocity(x, t, data):
    """Direct differences x - t x_i, no expansion, no chunks, float64."""
    x = x.reshape(x.shape[0], -1).to(f64)
    data = data.reshape(data.shape[0], -1).to(f64)
    t = torch.as_tensor(t, dtype=f64)
    t = t.expand(x.shape[0]) if t.ndim == 0 else t
    diff = x[:, None, :] - t[:, None, None] * data[None]
    logits = -(diff ** 2).sum(-1) / (2 * (1 - t[:, None]) ** 2)
    lam = torch.softmax(logits, dim=1)
    return (lam[:, :, None] * (data[None] - x[:, None, :])).sum(1) / (
        1 - t[:, None])


def brute_velocity_chunked(x, t, data, chunk=4096):
    """Direct differences, one row at a time, for large n."""
    out = []
    for row in x.reshape(x.shape[0], -1).to(f64):
        logits, parts = [], []
        for i in range(0, data.shape[0], chunk):
            d = data[i:i + chunk].reshape(-1, row.numel()).to(f64)
            diff = row - t * d
            logits.append(-(diff ** 2).sum(1) / (2 * (1 - t) ** 2))
            parts.append(d)
        lam = torch.softmax(torch.cat(logits), 0)
        mean = lam @ torch.cat(parts)
        out.append((mean - row) / (1 - t))
    return torch.stack(out)


def rel_err(a, b):
    return float(((a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-300)).max())


def cloud(n, d, seed, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, dtype=f64, generator=g) + offset


def near_path(data, t, seed, k=16):
    """Points x_t = (1-t) x0 + t x1 on training paths."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, data.shape[0], (k,), generator=g)
    x0 = torch.randn(k, data.shape[1], dtype=f64, generator=g)
    return (1 - t) * x0 + t * data[idx]


@pytest.mark.parametrize("t", [0.0, 0.01, 0.3, 0.7, 0.95, 0.999, 1 - 1e-5,
                               1 - 1e-6])
@pytest.mark.parametrize("chunk", [None, 1, 37])
def test_matches_brute_force(t, chunk):
    data = cloud(200, 6, 0, offset=3.0)
    x = near_path(data, t, 1)
    v = empirical.optimal_velocity(x, t, data, chunk_size=chunk)
    assert rel_err(v, brute_velocity(x, t, data)) < 1e-9


@pytest.mark.parametrize("t", [0.5, 0.999, 1 - 1e-6])
def test_off_path_points_near_t1(t):
    """Points that are not on any path: the velocity is huge but exact."""
    data = cloud(100, 4, 2)
    x = cloud(10, 4, 3) * 2
    v = empirical.optimal_velocity(x, t, data, chunk_size=13)
    ref = brute_velocity(x, t, data)
    assert rel_err(v, ref) < 1e-9
    assert float(v.norm(dim=1).min()) > 0.1 / (1 - t)


def test_per_row_times():
    data = cloud(50, 3, 4)
    t = torch.tensor([0.0, 0.2, 0.5, 0.9, 0.999999], dtype=f64)
    x = cloud(5, 3, 5)
    v = empirical.optimal_velocity(x, t, data, chunk_size=8)
    assert rel_err(v, brute_velocity(x, t, data)) < 1e-9
    for i in range(5):
        vi = empirical.optimal_velocity(x[i:i + 1], float(t[i]), data)
        assert torch.allclose(v[i:i + 1], vi, rtol=1e-12, atol=0)


def test_t0_is_mean_minus_x():
    data = cloud(40, 3, 6, offset=-2.0)
    x = cloud(7, 3, 7)
    v = empirical.optimal_velocity(x, 0.0, data)
    assert torch.allclose(v, data.mean(0) - x, atol=1e-12)


def test_single_point_is_straight_line():
    data = cloud(1, 5, 8)
    x = cloud(4, 5, 9)
    for t in (0.0, 0.4, 0.99):
        v = empirical.optimal_velocity(x, t, data)
        assert torch.allclose(v, (data - x) / (1 - t), rtol=1e-12)


def test_image_shapes_and_float32():
    g = torch.Generator().manual_seed(10)
    data = torch.rand(64, 1, 4, 4, generator=g)
    x = torch.randn(5, 1, 4, 4, generator=g)
    v = empirical.optimal_velocity(x, 0.6, data, chunk_size=10)
    assert v.shape == x.shape and v.dtype == torch.float32
    ref = brute_velocity(x, 0.6, data).reshape(x.shape)
    assert rel_err(v.reshape(5, -1).double(), ref.reshape(5, -1)) < 1e-6


def test_offset_data_cancellation():
    """A large common offset: centring keeps the expansion accurate."""
    data = cloud(80, 3, 11, offset=1e4)
    for t in (0.5, 0.99, 1 - 1e-6):
        x = near_path(data, t, 12)
        v = empirical.optimal_velocity(x, t, data, chunk_size=16)
        assert rel_err(v, brute_velocity(x, t, data)) < 1e-7


def test_large_n_mnist_size():
    """n = 60,000 and d = 784, float32 data in [0, 1], chunked."""
    g = torch.Generator().manual_seed(13)
    data = torch.rand(60_000, 784, generator=g)
    for t in (0.5, 1 - 1e-6):
        x = ((1 - t) * torch.randn(2, 784, generator=g, dtype=f64)
             + t * data[[5, 59_999]].double())
        v = empirical.optimal_velocity(x, t, data, chunk_size=8192)
        assert torch.isfinite(v).all()
        assert rel_err(v, brute_velocity_chunked(x, t, data)) < 1e-8


def test_far_points_do_not_underflow():
    """All logits ~ -1e12: a naive softmax would give 0/0."""
    data = cloud(5000, 8, 14)
    x = torch.full((3, 8), 50.0, dtype=f64)
    t = 0.999
    v = empirical.optimal_velocity(x, t, data, chunk_size=512)
    assert torch.isfinite(v).all()
    assert rel_err(v, brute_velocity(x, t, data)) < 1e-9


def test_forward_and_reverse_mode():
    data = cloud(30, 3, 15)
    x = cloud(4, 3, 16)
    tan = cloud(4, 3, 17)
    t = 0.8
    f = lambda z: empirical.optimal_velocity(z, t, data, chunk_size=7)
    _, jv = torch.func.jvp(f, (x,), (tan,))
    _, jv_ref = torch.func.jvp(lambda z: brute_velocity(z, t, data), (x,),
                               (tan,))
    assert torch.allclose(jv, jv_ref, rtol=1e-9, atol=1e-10)
    xr = x.clone().requires_grad_(True)
    (f(xr) * tan).sum().backward()
    xb = x.clone().requires_grad_(True)
    (brute_velocity(xb, t, data) * tan).sum().backward()
    assert torch.allclose(xr.grad, xb.grad, rtol=1e-9, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), d=st.integers(1, 5), b=st.integers(1, 6),
       t=st.floats(0.0, 0.9999), chunk=st.integers(1, 70),
       seed=st.integers(0, 10_000))
def test_property_brute_force(n, d, b, t, chunk, seed):
    data = cloud(n, d, seed)
    x = cloud(b, d, seed + 1)
    v = empirical.optimal_velocity(x, t, data, chunk_size=chunk)
    assert rel_err(v, brute_velocity(x, t, data)) < 1e-8


def test_posterior_weights():
    data = cloud(30, 2, 18)
    x = cloud(6, 2, 19)
    lam = empirical.posterior_weights(x, 0.5, data)
    assert lam.shape == (6, 30)
    assert torch.allclose(lam.sum(1), torch.ones(6, dtype=f64))
    mean = lam @ data
    v = empirical.optimal_velocity(x, 0.5, data)
    assert torch.allclose(v, (mean - x) / 0.5, atol=1e-12)
    # on a path to x^(3), the weights concentrate on it as t -> 1
    t = 1 - 1e-4
    lam = empirical.posterior_weights(t * data[3:4] + (1 - t) * x[:1], t, data)
    assert float(lam[0, 3]) > 1 - 1e-12


def test_nearest_neighbours():
    data = cloud(500, 5, 20, offset=1e3)
    x = torch.cat([data[[7, 400]], cloud(10, 5, 21, offset=1e3)])
    dist, idx = empirical.nearest_neighbours(x, data, chunk_size=64)
    ref = torch.cdist(x, data)
    assert torch.equal(idx, ref.argmin(1))
    assert torch.allclose(dist, ref.min(1).values, atol=1e-9)
    assert idx[:2].tolist() == [7, 400]
    assert dist[:2].tolist() == [0.0, 0.0]


def test_energy_distance():
    a = torch.tensor([[0.0], [1.0]])
    b = torch.tensor([[2.0], [3.0]])
    assert math.isclose(empirical.energy_distance(a, b), 2.0, rel_tol=1e-12)
    g = torch.Generator().manual_seed(22)
    p = torch.randn(800, 2, generator=g)
    q = torch.randn(800, 2, generator=g)
    r = torch.randn(800, 2, generator=g) + torch.tensor([1.0, 0.0])
    same, shifted = empirical.energy_distance(p, q), empirical.energy_distance(p, r)
    assert abs(same) < 0.02 and shifted > 0.2


@pytest.mark.parametrize("t, match", [
    (1.0, r"\[0, 1\)"), (1.5, r"\[0, 1\)"), (-0.1, r"\[0, 1\)"),
    (float("nan"), "finite"), ("soon", "number"),
    (torch.zeros(3), r"shape \(4,\)"), (torch.zeros(4, 1), r"shape \(4,\)"),
])
def test_bad_t(t, match):
    data, x = cloud(10, 2, 0), cloud(4, 2, 1)
    with pytest.raises(ValueError, match=match):
        empirical.optimal_velocity(x, t, data)


def test_bad_shapes_and_data():
    data, x = cloud(10, 2, 0), cloud(4, 2, 1)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 2\)"):
        empirical.optimal_velocity(cloud(4, 3, 1), 0.5, data)
    with pytest.raises(ValueError, match="x must have shape"):
        empirical.optimal_velocity(x[0], 0.5, data)
    with pytest.raises(ValueError, match="at least one point"):
        empirical.optimal_velocity(x, 0.5, data[:0])
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        empirical.optimal_velocity(x, 0.5, data[:, 0])
    with pytest.raises(ValueError, match="data must be a torch tensor"):
        empirical.optimal_velocity(x, 0.5, data.tolist())
    with pytest.raises(ValueError, match="x must be a torch tensor"):
        empirical.optimal_velocity(x.numpy(), 0.5, data)
    with pytest.raises(ValueError, match="x must be finite"):
        empirical.optimal_velocity(x * float("inf"), 0.5, data)
    with pytest.raises(ValueError, match="data must be finite"):
        empirical.optimal_velocity(x, 0.5, data * float("nan"))
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="chunk_size"):
            empirical.optimal_velocity(x, 0.5, data, chunk_size=bad)
    with pytest.raises(ValueError, match="t must lie"):
        empirical.posterior_weights(x, 1.0, data)
    with pytest.raises(ValueError, match="x must have shape"):
        empirical.nearest_neighbours(cloud(3, 5, 0), data)
    with pytest.raises(ValueError, match="m >= 2"):
        empirical.energy_distance(x[:1], x)
    with pytest.raises(ValueError, match="trailing shape"):
        empirical.energy_distance(x, cloud(4, 3, 0))


def test_hybrid_sample_bad_inputs():
    data, x = cloud(10, 2, 0), cloud(4, 2, 1)
    with pytest.raises(ValueError, match="tau must lie"):
        empirical_flow.hybrid_sample(None, x, data, 1.2, 10)
    with pytest.raises(ValueError, match="tau must be a number"):
        empirical_flow.hybrid_sample(None, x, data, "half", 10)
    with pytest.raises(ValueError, match="steps"):
        empirical_flow.hybrid_sample(None, x, data, 1.0, 0)
    with pytest.raises(ValueError, match="velocity must be a callable"):
        empirical_flow.hybrid_sample(None, x, data, 0.5, 10)
    with pytest.raises(ValueError, match="method must be 'euler' or"):
        empirical_flow.hybrid_sample(None, x, data, 1.0, 10, method="rk4")
    with pytest.raises(ValueError, match="x0 must have shape"):
        empirical_flow.hybrid_sample(None, cloud(4, 3, 1), data, 1.0, 10)


def test_empirical_sample_memorises():
    """Every endpoint of the u* flow is a training point."""
    data = cloud(50, 2, 23)
    x0 = cloud(200, 2, 24)
    end = empirical_flow.empirical_sample(x0, data, steps=10, decades=3)
    dist, _ = empirical.nearest_neighbours(end, data)
    assert float(dist.max()) < 1e-6
    with pytest.raises(ValueError, match="method must be 'euler' or"):
        empirical_flow.empirical_sample(x0, data, method="rk4")
    with pytest.raises(ValueError, match="decades"):
        empirical_flow.empirical_sample(x0, data, decades=-1)
    with pytest.raises(ValueError, match="x0 must have shape"):
        empirical_flow.empirical_sample(cloud(3, 3, 0), data)


def test_hybrid_sample_segments():
    """tau = 0 is the plain model flow; tau = 1 lands on training points;
    in between, the two segments compose."""
    from flowjac.engine.ode import integrate

    data = cloud(20, 2, 25)
    x0 = cloud(30, 2, 26)
    model = lambda x, t: -x + torch.sin(3 * t)
    ref0 = integrate(model, x0, 40, method="midpoint")
    assert torch.allclose(empirical_flow.hybrid_sample(model, x0, data, 0.0, 40), ref0,
                          rtol=0, atol=1e-14)
    end = empirical_flow.hybrid_sample(model, x0, data, 1.0, 400)
    assert float(empirical.nearest_neighbours(end, data)[0].max()) < 1e-6
    u = lambda x, t: empirical.optimal_velocity(x, t, data)
    mid = integrate(u, x0, 12, method="midpoint", t0=0.0, t1=0.3)
    ref = integrate(model, mid, 28, method="midpoint", t0=0.3, t1=1.0)
    assert torch.allclose(empirical_flow.hybrid_sample(model, x0, data, 0.3, 40), ref,
                          rtol=0, atol=1e-12)


def test_efm_loss_target():
    """With one point the EFM target is the CFM target x1 - x0; with a
    model equal to u* of the batch the loss is 0."""
    x1 = cloud(1, 3, 27).expand(8, 3).clone()
    x0 = cloud(8, 3, 28)
    t = torch.linspace(0, 0.99, 8, dtype=f64)
    zero = lambda x, tt: torch.zeros_like(x)
    cfm = ((x1 - x0) ** 2).mean()
    assert torch.allclose(small_flows.efm_loss(zero, x0, x1, t), cfm, rtol=1e-10)
    x1 = cloud(8, 3, 29)
    exact = lambda x, tt: empirical.optimal_velocity(x, tt, x1)
    assert float(small_flows.efm_loss(exact, x0, x1, t)) < 1e-20
    with pytest.raises(ValueError, match="same batch size"):
        small_flows.efm_loss(zero, x0[:4], x1, t)


# --- the nulls, memorisation, cosines and the capacity study -------------

def test_gaussian_velocity_matches_gaussian_drift():
    data = cloud(60, 3, 11) * torch.tensor([1.0, 2.0, 0.5], dtype=f64) + 1.0
    v = empirical.gaussian_velocity(data)
    x = cloud(9, 3, 12)
    mean, cov = data.mean(0), torch.cov(data.T)
    for t in (0.0, 0.3, 0.9, 1.0):
        assert torch.allclose(v(x, t), gaussian.drift(x, t, mean, cov), atol=1e-10)


def test_gaussian_velocity_images_and_no_copies():
    """Pushed from noise, the Gaussian flow lands near no training image."""
    from flowjac.engine.ode import integrate
    g = torch.Generator().manual_seed(0)
    data = torch.rand(30, 1, 4, 4, generator=g) * 4
    v = empirical.gaussian_velocity(data)
    z = torch.randn(200, 1, 4, 4, generator=g)
    out = integrate(v, z, 20, method="rk4")
    assert out.shape == z.shape and out.dtype == torch.float32
    flat = out.flatten(1).double()
    assert torch.allclose(flat.mean(0), data.flatten(1).double().mean(0),
                          atol=0.6)
    memo = empirical.memorisation(out, data, torch.rand(50, 1, 4, 4, generator=g) * 4)
    assert memo["copy_share"] < 0.5


def test_gaussian_velocity_bad_inputs():
    with pytest.raises(ValueError, match="at least 2 points"):
        empirical.gaussian_velocity(torch.zeros(1, 3))
    v = empirical.gaussian_velocity(cloud(10, 3, 0))
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        v(cloud(2, 3, 1), 1.5)
    with pytest.raises(ValueError, match="x must have shape"):
        v(cloud(2, 4, 1), 0.5)


def test_memorisation_references():
    train = cloud(200, 2, 1)
    held = cloud(300, 2, 2)
    fresh = cloud(300, 2, 3)
    copies = empirical.memorisation(train[:50] + 1e-6, train, held)
    assert copies["nn_ratio"] < 1e-3
    assert copies["copy_share"] == 1.0 and copies["near_share"] == 1.0
    new = empirical.memorisation(fresh, train, held)
    assert 0.7 < new["nn_ratio"] < 1.4
    assert new["near_share"] < 0.1
    # in 2D, (d1 / d2)^2 is about uniform: P(d1 < d2 / 3) is about 1/9
    assert 0.03 < new["heldout_copy_share"] < 0.25
    far = empirical.memorisation(fresh * 10, train, held)
    assert far["nn_ratio"] > 3 and far["copy_share"] < 0.5
    wide = empirical.memorisation(fresh, train, held, radius=100.0)
    assert wide["near_share"] == 1.0 and wide["heldout_near_share"] == 1.0


def test_memorisation_bad_inputs():
    train = cloud(20, 2, 1)
    with pytest.raises(ValueError, match="radius"):
        empirical.memorisation(train, train, train, radius=0)
    with pytest.raises(ValueError, match="at least 2 points"):
        empirical.memorisation(train, train[:1], train)
    with pytest.raises(ValueError, match="heldout must have shape"):
        empirical.memorisation(train, train, cloud(5, 3, 0))
    bad = train.clone()
    bad[0, 0] = math.nan
    with pytest.raises(ValueError, match="samples must be finite"):
        empirical.memorisation(bad, train, train)


def test_target_cosines_single_point_and_late_times():
    """One training point: u*(x_t, t) = x1 - x0 exactly, so cos = lam = 1."""
    g = torch.Generator().manual_seed(0)
    one = cloud(1, 5, 0)
    cos, lam = empirical.target_cosines(one, [0.0, 0.5, 0.99], 40, g)
    for c, w in zip(cos, lam):
        assert c.shape == (40,)
        assert torch.allclose(c, torch.ones(40, dtype=f64), atol=1e-12)
        assert torch.allclose(w, torch.ones(40, dtype=f64))
    spread = cloud(50, 400, 1) * 3
    cos, lam = empirical.target_cosines(spread, [0.0, 0.9], 300, g)
    assert float(lam[1].min()) > 0.99 and float(cos[1].min()) > 0.99
    # at t = 0 every point is equally likely: lam = 1/n
    assert torch.allclose(lam[0], torch.full((300,), 1 / 50, dtype=f64))


def test_target_cosines_bad_inputs():
    with pytest.raises(ValueError, match="t must lie in"):
        empirical.target_cosines(cloud(5, 2, 0), [1.0], 3)
    with pytest.raises(ValueError, match="n must be"):
        empirical.target_cosines(cloud(5, 2, 0), [0.5], 0)


def test_fit_optimal_reduces_approximation_error():
    from flowjac.models.nets import MLPFlow
    data = cloud(8, 2, 4).float()
    torch.manual_seed(0)
    net = MLPFlow(2, hidden=32, depth=2)
    ts = [0.1, 0.5]
    before = empirical.approximation_error(lambda x, t: net(x, t), data, ts, 500,
                                   torch.Generator().manual_seed(1))
    losses = small_flows.fit_optimal(net, data, 300, batch_size=128, lr=3e-3, seed=0)
    after = empirical.approximation_error(lambda x, t: net(x, t), data, ts, 500,
                                  torch.Generator().manual_seed(1))
    assert len(losses) == 300 and losses[-1] < losses[0]
    assert all(a < 0.5 * b for a, b in zip(after, before))


def test_approximation_error_exact_and_zero_velocity():
    data = cloud(20, 3, 5)
    g = torch.Generator().manual_seed(0)
    exact = empirical.approximation_error(
        lambda x, t: empirical.optimal_velocity(x, t, data), data, [0.2, 0.9], 100, g)
    assert max(exact) < 1e-10
    zero = empirical.approximation_error(lambda x, t: torch.zeros_like(x), data,
                                 [0.2, 0.9], 100, g)
    assert all(abs(z - 1.0) < 1e-12 for z in zero)


def test_fit_optimal_bad_inputs():
    from flowjac.models.nets import MLPFlow
    net = MLPFlow(2, hidden=4, depth=1)
    with pytest.raises(ValueError, match="steps"):
        small_flows.fit_optimal(net, cloud(5, 2, 0), 0)
    with pytest.raises(ValueError, match="lr"):
        small_flows.fit_optimal(net, cloud(5, 2, 0), 1, lr=-1)
