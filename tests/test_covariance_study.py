"""The exact-covariance chapter's studies (flowjac.pipelines.covariance_study), at tiny sizes."""
import math

import pytest
import torch

from flowjac.closedform.quantile import QuantileMap
from flowjac.estimators import covariance, intervals
from flowjac.pipelines import covariance_study as study

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_quadrature_study_rows_and_the_legendre_rule():
    qm = QuantileMap([-0.5, 0.5])
    rows = study.quadrature_study({"mixture": (qm.derivative, qm.cov())}, 200, 6, gen(0))
    assert [r["rule"] for r in rows] == list(covariance.QUADRATURES)
    strat = next(r for r in rows if r["rule"] == "stratified")
    assert strat["ratio"] == 1.0
    assert all(abs(r["bias"]) < 5 * r["bias_se"] + 0.01 for r in rows)
    assert study.gauss_legendre_on_order(1) == pytest.approx(1.0)
    assert study.gauss_legendre_on_order(50) < 1.0          # high orders are under-counted


def test_mixture_table_uses_common_random_numbers():
    rows = study.mixture_table([0.5, 1.0], 2000, seed=3)
    again = study.mixture_table([1.0], 2000, seed=3)
    assert rows[1]["est_cov"] == again[0]["est_cov"]     # same latents for every s
    for r in rows:
        assert r["lower"] < r["cov"] < r["upper"] and r["covered"]
        assert math.isfinite(r["z_sample"])


def test_equal_compute_and_wins():
    out = study.equal_compute(QuantileMap([-0.5, 0.5]), [32, 128], 4, 3, gen(1))
    assert set(out) == {"cov", "upper", "sample"} and all(len(v) == 2 for v in out.values())
    assert study.wins({"cov": [1, 3, 2], "sample": [2, 2, 2]}) == 1


def test_replicated_errors_on_a_linear_flow():
    A = torch.tensor([[1.0, 0.5], [0.0, 2.0]], dtype=F64)
    vel = lambda x, t: x @ (A - torch.eye(2, dtype=F64)).T  # noqa: E731  (a linear flow)
    design = covariance.draw_pairs((2,), 64, generator=gen(2), dtype=F64)
    pairs = covariance.flow_pair_jvps(vel, design, steps=4)
    samples = study.flow_samples(vel, torch.randn(6 * 64, 2, generator=gen(3), dtype=F64), 4,
                                 batch_size=100)
    truth = torch.cov(samples.T)
    errs, entry = study.replicated_errors(pairs, design, samples, truth, [16, 32], 3)
    assert all(len(v) == 2 for v in errs.values())
    # an affine map: the identity is exact up to round-off
    assert max(errs["cov"]) < 0.5 and entry["cov"].shape == (2, 2)


def test_tail_table_and_coverage():
    est = covariance.jvp_covariance(QuantileMap([-1.0, 1.0]), (1,), 500, generator=gen(4),
                                    dtype=F64)
    rows = study.tail_table({"mixture": est}, 2000, gen(5))
    assert [r["name"] for r in rows] == ["mixture", "ref: N(0,1) N(0,1)", "ref: Pareto(1.5)"]
    assert rows[2]["hill_cov"] < rows[1]["hill_cov"]         # Pareto is heavier
    cov = study.interval_coverage(QuantileMap([-0.5, 0.5]), 200, 3, 50, gen(6))
    assert set(cov.pop("truth")) == {"cov", "upper"}
    assert all(0 <= v <= 1 for v in cov.values())
    assert len(cov) == 2 * len(intervals.INTERVALS)
