"""The 6x6 patch study: readout, the paper's forward differences, one flow's summary."""
import pytest
import torch

from flowjac.pipelines import patch_study as ps


def test_patch_readout_maps_the_flow_space_to_pixels():
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(ps.Patch()(x), x.flatten(1)[:, ps.PATCH])
    got = ps.Patch((-1, 1))(x * 2 - 1)
    assert torch.allclose(got, x.flatten(1)[:, ps.PATCH], atol=1e-6)
    i, j = ps.pair_index()
    assert ps.PATCH[i] == 8 * 28 + 14 and ps.PATCH[j] == 8 * 28 + 15
    with pytest.raises(ValueError, match="value_range"):
        ps.Patch((1, 1))


def test_paper_fd_is_a_forward_difference_of_the_linear_flow():
    # a linear velocity: phi(z) = e^A-like linear map; FD equals the exact JVP up to float32
    W = torch.randn(784, 784, dtype=torch.float64) * 0.01

    def vel(x, t):
        return (x.flatten(1) @ W.to(x.dtype)).view_as(x)

    z = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    v = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    fd = ps.paper_fd(vel, ps.Patch(), z, v, batch_size=3)
    fd64 = ps.paper_fd(vel, ps.Patch(), z, v, dtype=torch.float64)
    assert fd.dtype == torch.float64 and fd.shape == (4, 36)
    # linear flow: the difference quotient is eps-independent, float32 round-off aside
    assert (fd - fd64).abs().max() < 1e-2 * fd64.abs().max()
    with pytest.raises(ValueError, match="v must"):
        ps.paper_fd(vel, ps.Patch(), z, v[:2])


def _probes(n, k, A_scale, gen):
    L = torch.randn(36, 36, generator=gen, dtype=torch.float64) / 6
    A = torch.randn(n, k, 36, generator=gen, dtype=torch.float64) @ L.T * A_scale
    B = torch.randn(n, k, 36, generator=gen, dtype=torch.float64) @ L.T * A_scale
    plain = torch.randn(6 * n, 36, generator=gen, dtype=torch.float64) @ L.T
    return dict(jvp=A, jvp_pair=B, rho=torch.rand(n, generator=gen, dtype=torch.float64),
                plain=plain), L


def test_summary_recovers_a_shared_correlation_and_beats_the_trivial_baseline():
    gen = torch.Generator().manual_seed(0)
    probes, L = _probes(800, 2, 1.0, gen)
    data = torch.randn(3000, 36, generator=gen, dtype=torch.float64) @ L.T
    s = ps.summarize(probes, data, fd=probes["jvp"][:300, 0] * 1.0, n_boot=50)
    rows = {r["name"]: r for r in s["estimates"]}
    zero = rows["zeros (trivial)"]["mae_data"]
    for name in ("plain samples (equal compute)",
                 "normalised E[JJ^T], exact JVPs"):
        assert rows[name]["mae_data"] < zero / 3, (name, rows[name], zero)
        lo, hi = rows[name]["mae_data_interval"]
        assert lo <= rows[name]["mae_data"] <= hi
    # the identity has A, B independent here: it estimates zero covariance (nan correlations)
    assert s["fd"]["median_relative_error"] == 0
    t = s["tails"]
    assert t["n"] == 800 and t["hill_interval"][0] <= t["hill"] <= t["hill_interval"][1]
    # light-tailed terms (chi-square): a large Hill index and a top 1% share near 0.01
    assert t["hill"] > 2 and t["top1_share"] < 0.05
    with pytest.raises(ValueError, match="data must"):
        ps.summarize(probes, data[:, :5])


def test_summary_sees_heavy_tails():
    gen = torch.Generator().manual_seed(1)
    probes, L = _probes(1000, 2, 1.0, gen)
    # a few latents with enormous JVPs: the Pareto-like tail of the flows of fives
    scale = torch.ones(1000, 1, 1, dtype=torch.float64)
    scale[:5] = 300.0
    probes["jvp"] = probes["jvp"] * scale
    probes["jvp_pair"] = probes["jvp_pair"] * scale
    data = torch.randn(2000, 36, generator=gen, dtype=torch.float64) @ L.T
    t = ps.summarize(probes, data, n_boot=20)["tails"]
    assert t["top1_share"] > 0.9


def test_size_verdict_rules():
    def summary(mae_int, hill_int):
        rows = [dict(name=n, mae_data_interval=list(mae_int)) for n in ps.STUDY_ESTIMATORS]
        return dict(estimates=rows, tails=dict(hill_interval=list(hill_int)))

    two = ps.size_verdict({100: summary((0.2, 0.3), (0.5, 0.9)),
                           400: summary((0.05, 0.1), (2, 3))})
    assert set(two["estimators"].values()) == {"inconclusive: fewer than three sizes"}
    v = ps.size_verdict({100: summary((0.2, 0.3), (0.5, 0.9)),
                         200: summary((0.1, 0.4), (0.5, 2)),
                         400: summary((0.05, 0.1), (2, 3))})
    assert set(v["estimators"].values()) == {"shrinks"} and v["tails"] == "rises"
    v = ps.size_verdict({100: summary((0.05, 0.1), (2, 3)),
                         200: summary((0.1, 0.4), (0.5, 2)),
                         400: summary((0.2, 0.3), (0.5, 0.9))})
    assert set(v["estimators"].values()) == {"grows"} and v["tails"] == "falls"
    v = ps.size_verdict({100: summary((0.1, 0.3), (0.5, 2)),
                         200: summary((0.1, 0.4), (0.5, 2)),
                         400: summary((0.2, 0.25), (1, 3))})
    assert set(v["estimators"].values()) == {"no change detected"}
    assert v["tails"] == "no change detected"


def test_against_own_correlation_at_equal_compute():
    gen = torch.Generator().manual_seed(1)
    probes, L = _probes(400, 2, 1.0, gen)
    probes["plain"] = torch.randn(4 * 200 * 3 + 10, 36, generator=gen,
                                  dtype=torch.float64) @ L.T
    data = torch.randn(2000, 36, generator=gen, dtype=torch.float64) @ L.T
    out = ps.against_own_correlation(probes, data)
    assert out["n_pairs"] == 200 and out["n_plain"] == 1200
    errs = out["errors"]
    plain = "plain samples (1,200, equal compute)"
    assert errs[plain] < errs["zeros (trivial)"] / 3
    assert errs["paper's E[JJ^T] (200 pairs' JVPs)"] < errs["zeros (trivial)"]
    assert list(errs)[-1] == "flow's correlation vs the data's"
    fewer = ps.against_own_correlation(probes, data, n_pairs=50)
    assert fewer["n_pairs"] == 50 and "plain samples (300, equal compute)" in fewer["errors"]
    with pytest.raises(ValueError, match="n_pairs"):
        ps.against_own_correlation(probes, data, n_pairs=401)
    probes["plain"] = probes["plain"][:100]
    with pytest.raises(ValueError, match="plain"):
        ps.against_own_correlation(probes, data)


def test_size_study_steps_cap_the_passes_over_the_data():
    from flowjac.pipelines.patch_study import SIZE_STUDY, size_study_steps

    assert [size_study_steps(n) for n in (100, 200, 300, 400, 4000)] == [1000, 2000, 3000, 4000,
                                                                       4000]
    assert SIZE_STUDY["sizes"] == (100, 200, 300, 400)
    # the all-digit flow's continuation: a final seed no earlier measurement saw
    cont = SIZE_STUDY["all_digits"]
    assert cont["final_seed"] not in (SIZE_STUDY["check_seed"], 2)
    assert cont["max_steps"] * SIZE_STUDY["batch_size"] / 4000 <= SIZE_STUDY["max_epochs"]
    assert all(size_study_steps(n) * SIZE_STUDY["batch_size"] / n <= SIZE_STUDY["max_epochs"]
               for n in (50, 100, 137, 200, 400, 4000))
    with pytest.raises(ValueError, match="n_train"):
        size_study_steps(0)


def test_size_study_cut_of_the_stored_run_owns_its_storage():
    """The stored flow's cut keeps n pairs and 6n plain samples and saves only them
    (a slice would carry the whole run's storage); meta keeps the run's n for redraw."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import size_study

    r = size_study.stored_run(10)
    per = r["meta"]["plain_cut_from"] // r["meta"]["cut_from"]
    assert r["jvp"].shape[0] == 10 and r["plain"].shape[0] == per * 10
    assert r["meta"]["plain_n"] == per * 10 and r["meta"]["n"] == r["meta"]["cut_from"]
    for key in ("out", "jvp", "jvp_pair", "plain"):
        t = r[key]
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), key


def test_resampled_moments_are_the_resamples_own():
    """The bootstrap from counts equals resampling the rows: the covariance (torch.cov)
    and the mean of per-unit outer products, replicate by replicate."""
    from flowjac.pipelines import patch_study as ps

    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 4, generator=g, dtype=torch.float64)
    u = torch.randn(50, 3, 4, generator=g, dtype=torch.float64)
    cov = ps._resampled(ps._outer(x[:, None]), 7, torch.Generator().manual_seed(1), x=x,
                        chunk=3)
    sec = ps._resampled(ps._outer(u), 7, torch.Generator().manual_seed(1), chunk=3)
    g1 = torch.Generator().manual_seed(1)
    for b in range(7):
        idx = torch.randint(0, 50, (50,), generator=g1)
        torch.testing.assert_close(cov[b], torch.cov(x[idx].T), rtol=1e-12, atol=1e-12)
    g1 = torch.Generator().manual_seed(1)
    for b in range(7):
        idx = torch.randint(0, 50, (50,), generator=g1)
        torch.testing.assert_close(sec[b], ps._second(u[idx]), rtol=1e-12, atol=1e-12)
    C = ps.corr_of(cov)
    assert C.shape == (7, 4, 4) and torch.allclose(C[2], ps.corr_of(cov[2]))
    assert ps._offdiag_maes(C, C[0])[0] == 0.0
