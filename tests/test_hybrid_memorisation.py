"""The hybrid sampler (engine.empirical_flow), its study and rule (pipelines.hybrid) and the CFM-EFM memorisation study (engine.small_flows)."""
import math

import pytest
import torch

from flowjac.closedform import empirical
from flowjac.engine import empirical_flow, small_flows
from flowjac.engine.ode import integrate
from flowjac.models.nets import MLPFlow
from flowjac.pipelines import hybrid

f64 = torch.float64


def cloud(n, d, seed):
    return torch.randn(n, d, dtype=f64, generator=torch.Generator().manual_seed(seed))


def model(x, t):
    return -x + torch.sin(3 * t)


def test_exact_tau_switches_at_tau():
    """exact_tau: ceil(tau * steps) steps of u* on [0, tau], ceil((1 - tau) *
    steps) of the model on [tau, 1]; the default still rounds to the grid."""
    data, x0 = cloud(20, 2, 1), cloud(16, 2, 2)
    u = lambda x, t: empirical.optimal_velocity(x, t, data)   # noqa: E731
    for tau, n_u, n_m in ((0.35, 4, 7), (0.3, 3, 7), (0.05, 1, 10)):
        mid = integrate(u, x0, n_u, method="midpoint", t0=0.0, t1=tau)
        ref = integrate(model, mid, n_m, method="midpoint", t0=tau, t1=1.0)
        got = empirical_flow.hybrid_sample(model, x0, data, tau, 10, exact_tau=True)
        assert torch.allclose(got, ref, rtol=0, atol=1e-13)
    ref0 = integrate(model, x0, 10, method="midpoint")
    assert torch.equal(empirical_flow.hybrid_sample(model, x0, data, 0.0, 10,
                                               exact_tau=True), ref0)
    mid = integrate(u, x0, 4, method="midpoint", t0=0.0, t1=0.4)
    ref = integrate(model, mid, 6, method="midpoint", t0=0.4, t1=1.0)
    assert torch.allclose(empirical_flow.hybrid_sample(model, x0, data, 0.35, 10), ref,
                          rtol=0, atol=1e-13)


def test_hybrid_study_matches_hybrid_sample_and_memorisation():
    data, x0, held = cloud(15, 2, 3), cloud(40, 2, 4), cloud(30, 2, 5)
    conts = {"network": model, "stop": lambda x, t: torch.zeros_like(x)}
    taus = [0.0, 0.25, 0.5, 1.0]
    study = hybrid.hybrid_study(conts, x0, data, held, taus, 10, keep=3)
    assert study["d1"].shape == (2, 4, 40) and study["ends"].shape == (2, 4, 3, 2)
    for k, tau in enumerate(taus):
        for c, vel in enumerate(conts.values()):
            end = empirical_flow.hybrid_sample(vel, x0, data, tau, 10, exact_tau=True)
            assert torch.equal(study["ends"][c, k], end[:3].float())
            memo = empirical.memorisation(end, data, held)
            bands = hybrid.hybrid_bands(study, n_boot=20)
            assert bands["copy"][c, k] == pytest.approx(memo["copy_share"], abs=1e-12)
            assert bands["nn"][c, k] == pytest.approx(memo["nn_ratio"], rel=1e-9)
    # at tau = 1 no continuation is left: every one ends where u* ends
    assert torch.equal(study["d1"][1, -1], study["d1"][0, -1])
    assert torch.allclose(study["named_weight"][0], torch.full((40,), 1 / 15, dtype=f64))
    assert bool((study["named_weight"][-1] == 1.0).all())
    with pytest.raises(ValueError, match="continuations must be"):
        hybrid.hybrid_study({}, x0, data, held, taus, 10)
    with pytest.raises(ValueError, match="method must be 'euler'"):
        hybrid.hybrid_study(conts, x0, data, held, taus, 10, method="rk4")
    with pytest.raises(ValueError, match="heldout must have shape"):
        hybrid.hybrid_study(conts, x0, data, cloud(3, 3, 0), taus, 10)


def test_crossing_time():
    grid = [0.0, 0.5, 1.0]
    assert float(hybrid.crossing_time(grid, [0.0, 0.4, 0.6], 0.5)) == \
        pytest.approx(0.75)
    assert float(hybrid.crossing_time(grid, [0.6, 0.7, 1.0], 0.5)) == 0.0
    assert math.isnan(float(hybrid.crossing_time(grid, [0.1, 0.2, 0.3], 0.5)))
    # first upward crossing, vectorised over leading dimensions
    v = torch.tensor([[0.0, 0.5, 0.2], [0.2, 0.3, 0.8]])
    got = hybrid.crossing_time(grid, v, 0.5)
    assert got.tolist() == pytest.approx([0.5, 0.5 + 0.5 * 0.2 / 0.5])
    assert float(hybrid.crossing_time([0.3], [0.7])) == 0.3
    with pytest.raises(ValueError, match="values must have shape"):
        hybrid.crossing_time(grid, [0.1, 0.2])
    with pytest.raises(ValueError, match="strictly increasing"):
        hybrid.crossing_time([0.0, 0.0, 1.0], [0.1, 0.2, 0.3])


def _bands(net_lo, net_hi, null_hi, null_lo=None, tau50=(0.6, 0.55, 0.65)):
    t = len(net_lo)
    null_lo = null_lo or [0.0] * t
    return {"names": ["network", "Gaussian"], "taus": [k / (t - 1) for k in range(t)],
            "copy_lo": torch.tensor([net_lo, null_lo], dtype=f64),
            "copy_hi": torch.tensor([net_hi, null_hi], dtype=f64),
            "tau50": tau50}


def test_hybrid_verdict_rule():
    # a window at tau = 0.5 and the network copies before u* has named
    b = _bands([0.0, 0.6, 1.0], [0.1, 0.8, 1.0], [0.0, 0.1, 1.0], tau50=(0.4, 0.35, 0.45))
    v = hybrid.hybrid_verdict(b, (0.5, 0.46, 0.55))
    assert v["window"] == [0.5] and v["timing"] == "early" and v["verdict"] == "holds"
    # the same window, but the network copies only after u* has named
    v = hybrid.hybrid_verdict(b, (0.3, 0.25, 0.34))
    assert v["timing"] == "late" and v["verdict"] == "fails"
    # overlapping intervals: the timing is undecided, the verdict inconclusive
    v = hybrid.hybrid_verdict(b, (0.4, 0.38, 0.42))
    assert v["timing"] == "undecided" and v["verdict"] == "inconclusive"
    # no window, every tau decided outside: fails whatever the timing
    b = _bands([0.0, 0.6, 1.0], [0.1, 0.8, 1.0], [0.0, 0.5, 1.0], null_lo=[0, 0.3, 1],
               tau50=(0.4, 0.35, 0.45))
    v = hybrid.hybrid_verdict(b, (0.5, 0.46, 0.55))
    assert v["window"] == [] and v["outside"] == [0.0, 0.5] and v["verdict"] == "fails"
    # an interval straddling 0.5 leaves the point undecided
    b = _bands([0.0, 0.45, 1.0], [0.1, 0.55, 1.0], [0.0, 0.1, 1.0], tau50=(0.4, 0.35, 0.45))
    v = hybrid.hybrid_verdict(b, (0.5, 0.46, 0.55))
    assert v["undecided"] == [0.5] and v["verdict"] == "inconclusive"


def test_share_crossing_and_bands_intervals():
    g = torch.Generator().manual_seed(0)
    grid = [0.0, 0.25, 0.5, 0.75]
    p = torch.tensor(grid)[:, None].expand(4, 400)
    flags = torch.rand(4, 400, generator=g) < p + 0.2
    out = hybrid.share_crossing(flags, grid, 0.5, n_boot=200)
    est, lo, hi = out["crossing"]
    assert lo <= est <= hi and abs(est - 0.3) < 0.08
    assert torch.all(out["lo"] <= out["share"]) and torch.all(out["share"] <= out["hi"])
    with pytest.raises(ValueError, match="flags must have shape"):
        hybrid.share_crossing(flags[:2], grid, 0.5)


def test_two_moons_and_fit_flow_share_minibatches():
    pts = small_flows.two_moons(30, 0)
    assert pts.shape == (30, 2) and pts.dtype == torch.float32
    assert torch.equal(pts, small_flows.two_moons(30, 0))
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    make = lambda: MLPFlow(2, hidden=8, depth=2)   # noqa: E731
    a, la, _ = small_flows.train_and_sample(make, pts, "CFM", z, 30, seed=3, steps=5)
    b, lb, _ = small_flows.train_and_sample(make, pts, "CFM", z, 30, seed=3, steps=5)
    assert torch.equal(a, b) and la == lb
    # EFM on one point: its target is the CFM target, so the runs agree
    one = pts[:1]
    c, lc, _ = small_flows.train_and_sample(make, one, "CFM", z, 20, seed=4, steps=5)
    e, le, _ = small_flows.train_and_sample(make, one, "EFM", z, 20, seed=4, steps=5)
    assert torch.allclose(c, e, atol=1e-4) and lc == pytest.approx(le, rel=1e-4)
    with pytest.raises(ValueError, match="target"):
        small_flows.fit_flow(make(), pts, "DFM", 5)
    with pytest.raises(ValueError, match="data must be a tensor"):
        small_flows.fit_flow(make(), pts[0], "CFM", 5)
    with pytest.raises(ValueError, match="train_steps"):
        small_flows.fit_flow(make(), pts, "CFM", 0)


def test_memorises_and_copy_verdict():
    fresh = {"nn_ratio": 1.0, "near_share": 0.01}
    assert small_flows.memorises({"nn_ratio": 0.4, "near_share": 0.0}, fresh)
    assert small_flows.memorises({"nn_ratio": 0.9, "near_share": 0.07}, fresh)
    assert not small_flows.memorises({"nn_ratio": 0.6, "near_share": 0.05}, fresh)
    with pytest.raises(ValueError, match="memo must be"):
        small_flows.memorises({"nn_ratio": 0.5}, fresh)
    yes, no, mixed = [True] * 5, [False] * 5, [True, False, True, True, True]
    v = small_flows.copy_verdict({(20, 8): {"CFM": no, "EFM": no},
                                  (20, 512): {"CFM": yes, "EFM": yes}})
    assert v["verdict"] == "holds" and v["per_config"][(20, 8)].startswith("no power")
    v = small_flows.copy_verdict({(20, 512): {"CFM": no, "EFM": yes}})
    assert v["verdict"] == "fails"
    v = small_flows.copy_verdict({(20, 512): {"CFM": mixed, "EFM": yes}})
    assert v["verdict"] == "inconclusive"
    v = small_flows.copy_verdict({(20, 8): {"CFM": mixed, "EFM": no}})
    assert v["verdict"] == "inconclusive" and "every seed" in v["reason"]
    v = small_flows.copy_verdict({(20, 512): {"CFM": yes, "EFM": mixed}})
    assert v["verdict"] == "holds"
    with pytest.raises(ValueError, match="targets"):
        small_flows.copy_verdict({(20, 8): {"CFM": no}})
    with pytest.raises(ValueError, match="non-empty"):
        small_flows.copy_verdict({})
