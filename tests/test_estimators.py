"""flowjac.estimators.moments: second moments, correlations and the bootstrap,
against NumPy and closed forms, plus error paths."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowjac.estimators import intervals, moments


def test_second_moment_matches_definition():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(50, 4, generator=g, dtype=torch.float64)
    m = moments.second_moment(d)
    ref = sum(torch.outer(r, r) for r in d) / 50
    assert torch.allclose(m, ref, atol=1e-12)


def test_jvp_moment_recovers_linear_covariance():
    # delta = J v with v ~ N(0, I) has E[delta delta^T] = J J^T
    g = torch.Generator().manual_seed(1)
    J = torch.tensor([[1.0, 0.5, 0.0], [0.3, 2.0, 0.1], [0.0, -1.0, 1.0]],
                     dtype=torch.float64)
    v = torch.randn(200_000, 3, generator=g, dtype=torch.float64)
    m = moments.second_moment(v @ J.T)
    assert torch.allclose(m, J @ J.T, atol=0.05)
    c = moments.moment_to_corr(m)
    c_true = moments.moment_to_corr(J @ J.T)
    assert (c - c_true).abs().max() < 0.01


@settings(max_examples=25, deadline=None)
@given(n=st.integers(3, 40), p=st.integers(1, 6), seed=st.integers(0, 999))
def test_corrcoef_matches_numpy(n, p, seed):
    x = torch.from_numpy(np.random.default_rng(seed).normal(size=(n, p)))
    ours = moments.corrcoef(x).numpy()
    ref = np.atleast_2d(np.corrcoef(x.numpy(), rowvar=False))
    assert np.allclose(ours, ref, atol=1e-10)
    assert np.allclose(np.diag(ours), 1.0)
    assert np.abs(ours).max() <= 1.0


def test_constant_column_gives_nan_like_numpy():
    x = torch.tensor([[0.0, 1.0, 2.0], [0.0, 2.0, 1.0], [0.0, 3.0, 5.0]])
    c = moments.corrcoef(x)
    assert torch.isnan(c[0]).all() and torch.isnan(c[:, 0]).all()
    assert torch.isfinite(c[1:, 1:]).all()


def test_bootstrap_ci_covers_and_is_reproducible():
    g = torch.Generator().manual_seed(0)
    rho = 0.6
    L = torch.tensor([[1.0, 0.0], [rho, (1 - rho**2) ** 0.5]],
                     dtype=torch.float64)
    x = torch.randn(2000, 2, generator=g, dtype=torch.float64) @ L.T
    fn = lambda s: moments.corrcoef(s)[0, 1]
    est, lo, hi = intervals.bootstrap_ci(fn, x, n_boot=300,
                                 generator=torch.Generator().manual_seed(3))
    assert lo < est < hi and lo < rho < hi
    assert 0.01 < hi - lo < 0.1
    again = intervals.bootstrap_ci(fn, x, n_boot=300,
                           generator=torch.Generator().manual_seed(3))
    assert again == (est, lo, hi)


def test_bootstrap_ci_tensor_statistic():
    x = torch.arange(20.0).reshape(10, 2)
    est, lo, hi = intervals.bootstrap_ci(lambda s: s.mean(0), x, n_boot=50,
                                 generator=torch.Generator().manual_seed(0))
    assert est.shape == lo.shape == hi.shape == (2,)
    assert (lo <= est).all() and (est <= hi).all()


def test_moment_to_corr_errors():
    with pytest.raises(ValueError, match="square"):
        moments.moment_to_corr(torch.ones(2, 3))
    with pytest.raises(ValueError, match="non-negative diagonal"):
        moments.moment_to_corr(torch.tensor([[-1.0, 0.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="floating-point"):
        moments.moment_to_corr(torch.eye(2, dtype=torch.int64))


def test_matrix_errors():
    with pytest.raises(ValueError, match=r"deltas must have shape \(N, p\)"):
        moments.second_moment(torch.ones(3))
    with pytest.raises(ValueError, match="samples needs at least 2 rows"):
        moments.corrcoef(torch.ones(1, 3))
    with pytest.raises(ValueError, match="finite"):
        moments.corrcoef(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="torch.Tensor"):
        moments.second_moment(np.ones((3, 2)))


def test_bootstrap_errors():
    x = torch.randn(10, 2)
    with pytest.raises(ValueError, match="n_boot"):
        intervals.bootstrap_ci(lambda s: s.mean(), x, n_boot=1)
    with pytest.raises(ValueError, match="alpha"):
        intervals.bootstrap_ci(lambda s: s.mean(), x, alpha=1.5)
    with pytest.raises(ValueError, match="fn must be callable"):
        intervals.bootstrap_ci(3, x)
    with pytest.raises(ValueError, match="at least 2 rows"):
        intervals.bootstrap_ci(lambda s: s.mean(), torch.randn(1, 2))
