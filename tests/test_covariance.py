"""Tests of flowjac.estimators.covariance: the interpolation-identity estimator of Cov f(Z)."""
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowjac.closedform import gaussian
from flowjac.engine.ode import integrate
from flowjac.estimators import covariance, covariance_reduction, intervals

warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*",
                        category=FutureWarning)
F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


# -- ground truths -------------------------------------------------------------

def gauss_hermite(m, d):
    """Nodes (m^d, d) and weights of the tensor Gauss-Hermite rule for N(0, I_d)."""
    x, w = np.polynomial.hermite_e.hermegauss(m)
    w = w / w.sum()
    grids = np.meshgrid(*([x] * d), indexing="ij")
    wgrid = np.prod(np.meshgrid(*([w] * d), indexing="ij"), axis=0)
    nodes = np.stack([g.ravel() for g in grids], 1)
    return torch.tensor(nodes, dtype=F64), torch.tensor(wgrid.ravel(), dtype=F64)


def poly(z):
    """A polynomial map R^2 -> R^2 of degree 3 (Hermite orders 1 to 3)."""
    z1, z2 = z[:, 0], z[:, 1]
    return torch.stack([z1 + 0.5 * z1 * z2, 0.3 * z2 ** 2 + 0.2 * z1 ** 3 - z2], 1)


def poly_jac(z):
    z1, z2 = z[:, 0], z[:, 1]
    row1 = torch.stack([1 + 0.5 * z2, 0.5 * z1], 1)
    row2 = torch.stack([0.6 * z1 ** 2, 0.6 * z2 - 1], 1)
    return torch.stack([row1, row2], 1)          # (B, out, in)


def poly_truth():
    """Cov, E[JJ^T], E[J]E[J]^T and h(rho) of ``poly``, exact by quadrature."""
    x, w = gauss_hermite(8, 2)                   # exact to degree 15
    f = poly(x)
    mean = w @ f
    cov = (w[:, None] * (f - mean)).T @ (f - mean)
    jac = poly_jac(x)
    upper = torch.einsum("n,nij,nkj->ik", w, jac, jac)
    ej = torch.einsum("n,nij->ij", w, jac)
    x4, w4 = gauss_hermite(6, 4)                 # (z, z') for the integrand

    def h(rho):
        zr = rho * x4[:, :2] + math.sqrt(1 - rho ** 2) * x4[:, 2:]
        return torch.einsum("n,nij,nkj->ik", w4, poly_jac(x4[:, :2]),
                            poly_jac(zr))
    return cov, upper, ej @ ej.T, h


def tanh_map(z):
    return torch.tanh(3 * z) + 0.3 * z ** 2


def tanh_truth():
    x, w = gauss_hermite(200, 1)
    x = x[:, 0]
    f = tanh_map(x)
    df = 3 / torch.cosh(3 * x) ** 2 + 0.6 * x
    var = float(w @ (f - w @ f) ** 2)
    return var, float(w @ df ** 2), float(w @ df) ** 2


def tanh_velocity(d=3, seed=0):
    g = gen(seed)
    w1 = torch.randn(d + 1, 16, generator=g, dtype=F64) / 2
    w2 = torch.randn(16, d, generator=g, dtype=F64) / 2

    def vel(x, t):
        tt = t.expand(*x.shape[:-1], 1)
        return torch.tanh(torch.cat([x, tt], -1) @ w1) @ w2
    return vel


def within(est, se, truth, z=4.5):
    return bool(((est - truth).abs() <= z * se).all())


# -- ground truths recovered ----------------------------------------------------

def test_tanh_1d_cov_upper_lower_match_quadrature():
    var, upper, lower = tanh_truth()
    assert abs(var - 0.925) < 1e-3 and abs(upper - 1.927) < 1e-3 \
        and abs(lower - 0.584) < 1e-3
    torch.set_default_dtype(F64)
    try:
        res = covariance.jvp_covariance(tanh_map, (1,), 8000, generator=gen(0))
    finally:
        torch.set_default_dtype(torch.float32)
    assert res.cov.shape == (1, 1) and res.evaluations == 2 * 8000
    assert within(res.cov, res.stderr, var)
    assert within(res.upper, res.upper_stderr, upper)
    assert within(res.lower, res.lower_stderr, lower)
    # the three are far apart relative to their errors: the test can fail
    assert float(res.upper - res.cov) > 20 * float(res.upper_stderr + res.stderr)
    assert float(res.cov - res.lower) > 5 * float(res.stderr + res.lower_stderr)
    # the integrand h(rho) rises from the lower to the upper bound
    assert float(res.integrand[0]) < float(res.integrand[-1])
    assert res.rho.shape[0] == res.integrand.shape[0] == 16
    # one name per concept: "profile" is the run's quick/full, not h(rho)
    assert not hasattr(res, "profile")


def test_polynomial_map_cov_integrand_and_bounds():
    cov, upper, lower, h = poly_truth()
    res = covariance.jvp_covariance(poly, (2,), 20_000, generator=gen(1), dtype=F64)
    assert within(res.cov, res.stderr, cov)
    assert within(res.upper, res.upper_stderr, upper)
    assert within(res.lower, res.lower_stderr, lower)
    assert torch.allclose(res.cov, res.cov.T)
    # the exact integrand integrates to the covariance (Gauss-Legendre in rho,
    # exact: h is a polynomial of degree 2 in rho for a cubic map)
    x, w = np.polynomial.legendre.leggauss(4)
    integral = sum(wi / 2 * h((xi + 1) / 2) for xi, wi in zip(x, w))
    assert torch.allclose(integral, cov, atol=1e-12)
    assert torch.allclose(h(1.0), upper, atol=1e-12)
    assert torch.allclose(h(0.0), lower, atol=1e-12)
    # explicit rho nodes, exact Jacobians (basis probes): the integrand on the grid
    nodes = [0.0, 0.25, 0.5, 0.75, 1.0]
    grid = covariance.jvp_covariance(poly, (2,), 5 * 3000, rho=nodes, probes="basis",
                            generator=gen(2), dtype=F64)
    assert torch.allclose(grid.rho, torch.tensor(nodes, dtype=F64))
    for r, prof, se in zip(nodes, grid.integrand, grid.integrand_stderr):
        assert within(prof, se, h(r))
    # the trapezoid rule over the 5 nodes of a quadratic h: error h''/(12*16)
    trap = grid.cov
    assert torch.isfinite(trap).all()
    assert within(trap, grid.stderr, cov, z=5)


def test_gaussian_flow_cov_equals_upper_equals_lower():
    """Affine flow map: cov = upper = lower = (1 - t)^2 I + t^2 Sigma."""
    g = gen(3)
    a = torch.randn(3, 3, generator=g, dtype=F64)
    sigma = a @ a.T / 3 + 0.2 * torch.eye(3, dtype=F64)
    mean = torch.randn(3, generator=g, dtype=F64)
    vel = lambda x, t: gaussian.drift(x, t, mean, sigma)  # noqa: E731
    tt = 0.7
    truth = gaussian.pushforward_cov(tt, sigma)
    exact = covariance.flow_jvp_covariance(vel, (3,), 64, probes="basis", steps=40,
                                  t1=tt, generator=g, dtype=F64)
    for m in (exact.cov, exact.upper, exact.lower):
        assert (m - truth).abs().max() < 1e-7
    assert (exact.integrand - truth).abs().max() < 1e-7     # flat integrand
    noisy = covariance.flow_jvp_covariance(vel, (3,), 2000, steps=20, t1=tt,
                                  generator=g, dtype=F64)
    assert within(noisy.cov, noisy.stderr, truth)
    assert within(noisy.upper, noisy.upper_stderr, truth)
    assert within(noisy.lower, noisy.lower_stderr, truth)
    assert torch.allclose(torch.diagonal(noisy.corr), torch.ones(3, dtype=F64))


def test_bounds_hold_up_to_noise():
    """cov <= upper and lower <= cov in the PSD order, for a nonlinear map."""
    res = covariance.jvp_covariance(poly, (2,), 20_000, generator=gen(4), dtype=F64)
    slack = lambda *ses: 4 * sum(float(torch.linalg.matrix_norm(s)) for s in ses)  # noqa: E731
    gap_up = torch.linalg.eigvalsh(res.upper - res.cov)
    gap_lo = torch.linalg.eigvalsh(res.cov - res.lower)
    assert gap_up.min() > -slack(res.upper_stderr, res.stderr)
    assert gap_lo.min() > -slack(res.stderr, res.lower_stderr)
    # and strictly: the exact gaps have eigenvalues (0.25, 0.66) and
    # (0.25, 0.42), far above the noise (entrywise standard errors < 0.03)
    cov, upper, lower, _ = poly_truth()
    assert torch.allclose(torch.linalg.eigvalsh(upper - cov),
                          torch.tensor([0.25, 0.66], dtype=F64))
    assert torch.allclose(torch.linalg.eigvalsh(cov - lower),
                          torch.tensor([0.25, 0.42], dtype=F64))
    assert max(res.stderr.max(), res.upper_stderr.max(),
               res.lower_stderr.max()) < 0.03
    assert gap_up.max() > 0.5 and gap_lo.max() > 0.3


def test_standard_errors_are_calibrated():
    """Over 120 independent runs the z-scores of cov have standard deviation ~1."""
    var = tanh_truth()[0]
    zs = []
    g = gen(5)
    for _ in range(120):
        res = covariance.jvp_covariance(tanh_map, (1,), 300, generator=g, dtype=F64)
        zs.append(float((res.cov - var) / res.stderr))
    zs = torch.tensor(zs)
    assert 0.75 < float(zs.std()) < 1.3
    assert abs(float(zs.mean())) < 0.35


def test_quadratures_agree_and_gauss_legendre_uses_8_nodes():
    var = tanh_truth()[0]
    for quad in covariance.QUADRATURES:
        res = covariance.jvp_covariance(tanh_map, (1,), 6000, quadrature=quad,
                               generator=gen(6), dtype=F64)
        assert res.quadrature == quad
        assert within(res.cov, res.stderr, var), quad
    design = covariance.draw_pairs((1,), 40, quadrature="gauss-legendre", generator=gen(0))
    assert torch.unique(design.rho).numel() == covariance.GL_NODES
    assert abs(float(design.weights.mean()) - 1) < 1e-12
    imp = covariance.draw_pairs((1,), 1000, quadrature="importance", generator=gen(0))
    assert abs(float(imp.weights.mean()) - 1) < 0.01   # E_q[1/q] = 1


# -- the flow convenience against the integrated flow -----------------------------

def test_flow_jvp_covariance_equals_jvp_covariance_of_integrated_flow():
    vel = tanh_velocity()
    steps = 8

    def phi(z):
        return integrate(vel, z, steps, "rk4")

    flow = covariance.flow_jvp_covariance(vel, (3,), 200, k=2, steps=steps,
                                 generator=gen(7), dtype=F64, batch_size=64)
    ref = covariance.jvp_covariance(phi, (3,), 200, k=2, generator=gen(7), dtype=F64)
    for name in ("cov", "upper", "lower", "stderr", "integrand", "sample"):
        assert torch.allclose(getattr(flow, name), getattr(ref, name),
                              rtol=0, atol=1e-10), name
    readout = lambda x: torch.stack([x[:, 0] * x[:, 1], torch.sin(x[:, 2])], 1)  # noqa: E731
    flow_r = covariance.flow_jvp_covariance(vel, (3,), 200, readout=readout,
                                   steps=steps, generator=gen(8), dtype=F64)
    ref_r = covariance.jvp_covariance(lambda z: readout(phi(z)), (3,), 200,
                             generator=gen(8), dtype=F64)
    assert flow_r.cov.shape == (2, 2)
    assert torch.allclose(flow_r.cov, ref_r.cov, rtol=0, atol=1e-10)
    assert torch.allclose(flow_r.lower, ref_r.lower, rtol=0, atol=1e-10)


def test_flow_pair_jvps_reduce_to_flow_jvp_covariance():
    vel = tanh_velocity()
    design = covariance.draw_pairs((3,), 120, k=2, probe_block=2, generator=gen(7), dtype=F64)
    pairs = covariance.flow_pair_jvps(vel, design, steps=8, batch_size=50)
    assert pairs.jz.shape == (120, 2, 3) and pairs.fz.shape == (120, 3)
    res = covariance.covariance_from_pairs(pairs.jz, pairs.jzr, design.rho,
                                           weights=design.weights, probe_block=2,
                                           fz=pairs.fz, fzr=pairs.fzr)
    ref = covariance.flow_jvp_covariance(vel, (3,), 120, k=2, steps=8, generator=gen(7),
                                         dtype=F64)
    for name in ("cov", "upper", "lower", "integrand", "sample"):
        assert torch.allclose(getattr(res, name), getattr(ref, name), atol=1e-12), name
    with pytest.raises(ValueError, match="PairDesign"):
        covariance.flow_pair_jvps(vel, {"z": design.z}, steps=8)


def test_flow_jvp_covariance_records_no_graph():
    lin = torch.nn.Linear(4, 3).double()
    vel = lambda x, t: torch.tanh(lin(torch.cat([x, t.expand(x.shape[0], 1)], 1)))  # noqa: E731
    res = covariance.flow_jvp_covariance(vel, (3,), 16, steps=4, generator=gen(9),
                                dtype=F64)
    assert not res.cov.requires_grad and not res.upper.requires_grad


def test_covariance_from_pairs_reproduces_jvp_covariance():
    """The GPU path: draw_pairs, JVPs computed elsewhere, covariance_from_pairs."""
    design = covariance.draw_pairs((2,), 500, k=3, generator=gen(10), dtype=F64)
    assert design.v.shape == (500, 3, 2)
    assert torch.equal(design.v[0::2], design.v[1::2])   # blocks of 2 share probes
    jz = torch.einsum("nij,nkj->nki", poly_jac(design.z), design.v)
    jzr = torch.einsum("nij,nkj->nki", poly_jac(design.zr), design.v)
    res = covariance.covariance_from_pairs(jz, jzr, design.rho, weights=design.weights,
                                  probe_block=design.probe_block,
                                  fz=poly(design.z), fzr=poly(design.zr))
    ref = covariance.jvp_covariance(poly, (2,), 500, k=3, generator=gen(10), dtype=F64)
    for name in ("cov", "stderr", "upper", "lower", "integrand", "sample"):
        assert torch.allclose(getattr(res, name), getattr(ref, name),
                              atol=1e-12), name
    # chunking does not change the result
    old = covariance_reduction._CHUNK_ELEMENTS
    try:
        covariance_reduction._CHUNK_ELEMENTS = 8
        chunked = covariance.covariance_from_pairs(jz, jzr, design.rho,
                                          weights=design.weights, probe_block=2)
    finally:
        covariance_reduction._CHUNK_ELEMENTS = old
    for name in ("cov", "stderr", "upper", "upper_stderr", "lower",
                 "lower_stderr", "integrand"):
        assert torch.allclose(getattr(chunked, name), getattr(res, name),
                              atol=1e-12), name
    # independent probes and no rho = 0 pair: lower is unknown (nan)
    alone = covariance.covariance_from_pairs(jz[:, 0], jzr[:, 0], design.rho)
    assert torch.isnan(alone.lower).all() and alone.sample is None
    # with pairs at rho = 0, lower is their mean
    r0 = torch.zeros(500, dtype=F64)
    at0 = covariance.covariance_from_pairs(jz, jzr, r0)
    assert torch.allclose(at0.lower, at0.cov)


def test_covariance_from_pairs_with_jz_alone():
    """jzr=None: upper and lower from the JVPs at Z only, cov unknown."""
    design = covariance.draw_pairs((2,), 4000, generator=gen(13), dtype=F64)
    jz = torch.einsum("nij,nkj->nki", poly_jac(design.z), design.v)
    res = covariance.covariance_from_pairs(jz, None, None, probe_block=2,
                                  fz=poly(design.z))
    flat = jz[:, 0]
    assert torch.allclose(res.upper, flat.T @ flat / 4000)
    assert torch.isnan(res.cov).all() and res.evaluations == 4000
    assert torch.allclose(res.rho, torch.ones(1, dtype=F64))
    assert torch.allclose(res.integrand[0], res.upper)
    assert torch.allclose(res.sample, torch.cov(poly(design.z).T))
    _, upper, lower, _ = poly_truth()
    assert within(res.upper, res.upper_stderr, upper)
    assert within(res.lower, res.lower_stderr, lower)
    with pytest.raises(ValueError, match="fzr must be None"):
        covariance.covariance_from_pairs(jz, None, None, fz=poly(design.z),
                                fzr=poly(design.z))


def test_fast_path_jvp_method_is_used():
    class Quadratic:
        calls = 0

        def __call__(self, z):
            raise AssertionError("the jvp method should be used")

        def jvp(self, z, tangents):
            Quadratic.calls += 1
            f = torch.stack([z[:, 0] ** 2, z[:, 0] * z[:, 1]], 1)
            jac = torch.stack([torch.stack([2 * z[:, 0], 0 * z[:, 0]], 1),
                               torch.stack([z[:, 1], z[:, 0]], 1)], 1)
            return f, torch.einsum("bij,bkj->bki", jac, tangents)

    res = covariance.jvp_covariance(Quadratic(), (2,), 4000, k=2, generator=gen(11),
                           dtype=F64, batch_size=1000)
    assert Quadratic.calls == 4
    truth = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=F64)   # Var z^2 = 2
    assert within(res.cov, res.stderr, truth)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(2, 40), k=st.integers(1, 3), p=st.integers(1, 4),
       seed=st.integers(0, 10_000))
def test_reduction_is_symmetric_and_swap_invariant(n, k, p, seed):
    g = gen(seed)
    jz = torch.randn(n, k, p, generator=g, dtype=F64)
    jzr = torch.randn(n, k, p, generator=g, dtype=F64)
    rho = torch.rand(n, generator=g, dtype=F64)
    a = covariance.covariance_from_pairs(jz, jzr, rho, probe_block=2)
    b = covariance.covariance_from_pairs(jzr, jz, rho, probe_block=2)
    assert torch.allclose(a.cov, a.cov.T) and torch.allclose(a.cov, b.cov)
    assert torch.allclose(a.upper, b.upper)
    assert torch.allclose(a.cov_terms.sum() / n, torch.trace(a.cov))


# -- heavy-tail diagnostics ---------------------------------------------------

def test_tail_diagnostics_on_pareto_samples():
    g = gen(12)
    u = torch.rand(200_000, generator=g, dtype=F64)
    pareto = u ** (-1 / 1.5)                    # tail index 1.5
    assert abs(intervals.hill_index(pareto, 0.01) - 1.5) < 0.1
    gauss = torch.randn(200_000, generator=g, dtype=F64)
    assert intervals.hill_index(gauss ** 2, 0.01) > 3
    assert intervals.tail_share(torch.ones(1000)) == pytest.approx(0.01)
    assert intervals.tail_share(pareto, 0.01) > 0.2
    lo, hi = intervals.mean_interval(gauss[:500], method="normal")
    assert lo < 0 < hi
    x = pareto[:2000]
    s_lo, s_hi = intervals.mean_interval(x, generator=gen(0), n_boot=500)
    p_lo, p_hi = intervals.mean_interval(x, method="percentile", generator=gen(0),
                                 n_boot=500)
    m = float(x.mean())
    # the studentized interval reaches further up a right tail
    assert s_hi - m > m - s_lo and s_hi > p_hi


# -- errors --------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(n=1), "n must be >= 2"),
    (dict(k=0), "k must be >= 1"),
    (dict(rho=1.5), r"rho must lie in \[0, 1\]"),
    (dict(rho=[-0.1, 0.5]), r"rho must lie in \[0, 1\]"),
    (dict(rho=[0.0, float("nan")]), "rho must be finite"),
    (dict(quadrature="simpson"), "quadrature must be one of"),
    (dict(probes="sobol"), "probes must be one of"),
    (dict(probes="basis", k=3), "k must be 1 or the latent dimension 2"),
    (dict(latent_shape=(0,)), "latent_shape must be"),
    (dict(latent_shape="2"), "latent_shape must be"),
    (dict(batch_size=0), "batch_size must be >= 1"),
    (dict(rho=[0.1, 0.2, 0.3], n=2), "n must be at least the number of"),
])
def test_jvp_covariance_bad_arguments(kwargs, match):
    args = dict(latent_shape=(2,), n=10)
    args.update(kwargs)
    shape, n = args.pop("latent_shape"), args.pop("n")
    with pytest.raises(ValueError, match=match):
        covariance.jvp_covariance(poly, shape, n, **args)


def test_bad_maps_raise_one_clear_error():
    with pytest.raises(ValueError, match="non-finite"):
        covariance.jvp_covariance(lambda z: torch.log(z), (2,), 8, generator=gen(0))
    with pytest.raises(ValueError, match=r"shape \(B, p\)"):
        covariance.jvp_covariance(lambda z: z.sum(1), (2,), 8)
    with pytest.raises(ValueError, match=r"readout must map"):
        covariance.flow_jvp_covariance(lambda x, t: -x, (2,), 8, steps=2,
                              readout=lambda x: x[:3])
    with pytest.raises(ValueError, match="steps must be"):
        covariance.flow_jvp_covariance(lambda x, t: -x, (2,), 8, steps=0)


def test_covariance_from_pairs_bad_arguments():
    jz = torch.randn(10, 1, 3, dtype=F64)
    rho = torch.rand(10, dtype=F64)
    with pytest.raises(ValueError, match="jzr must have the shape of jz"):
        covariance.covariance_from_pairs(jz, jz[:, :, :2], rho)
    with pytest.raises(ValueError, match=r"jz must have shape \(n, k, p\)"):
        covariance.covariance_from_pairs(jz[..., None], jz[..., None], rho)
    with pytest.raises(ValueError, match=r"rho must have shape \(10,\)"):
        covariance.covariance_from_pairs(jz, jz, rho[:5])
    with pytest.raises(ValueError, match="n must be >= 2"):
        covariance.covariance_from_pairs(jz[:1], jz[:1], rho[:1])
    bad = jz.clone()
    bad[3, 0, 1] = math.inf
    with pytest.raises(ValueError, match="jzr must be finite"):
        covariance.covariance_from_pairs(jz, bad, rho)
    with pytest.raises(ValueError, match="weights must be 10 finite"):
        covariance.covariance_from_pairs(jz, jz, rho, weights=-torch.ones(10))
    with pytest.raises(ValueError, match="fz and fzr must be given together"):
        covariance.covariance_from_pairs(jz, jz, rho, fz=jz[:, 0])
    with pytest.raises(ValueError, match="rho must lie"):
        covariance.covariance_from_pairs(jz, jz, rho + 1)


def test_tail_helpers_bad_arguments():
    with pytest.raises(ValueError, match="frac must be a number in"):
        intervals.tail_share([1.0, 2.0], frac=1.5)
    with pytest.raises(ValueError, match="values must be finite"):
        intervals.hill_index([1.0, math.nan, 2.0])
    with pytest.raises(ValueError, match="method must be one of"):
        intervals.mean_interval([1.0, 2.0, 3.0], method="bca")
    with pytest.raises(ValueError, match="level must be"):
        intervals.mean_interval([1.0, 2.0, 3.0], level=95)
