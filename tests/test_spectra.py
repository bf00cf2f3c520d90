"""Spectra, divergences, log-likelihoods and trace estimators of flow maps
(flowjac.estimators.spectra) against closed forms and full Jacobians."""
import math

import pytest
import torch

from flowjac.closedform import gaussian
from flowjac.closedform.mixture import GaussianMixture
from flowjac.engine.jvp import random_probes
from flowjac.engine.ode import integrate
from flowjac.engine.velocity import velocity_fn
from flowjac.estimators import spectra
from flowjac.models.nets import MLPFlow

F64 = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def gauss():
    g = gen(1)
    a = torch.randn(4, 4, generator=g, dtype=F64)
    cov = a @ a.T / 4 + 0.3 * torch.eye(4, dtype=F64)
    mean = torch.randn(4, generator=g, dtype=F64)
    return mean, cov, (lambda x, t: gaussian.drift(x, t, mean, cov))


@pytest.fixture(scope="module")
def mix2():
    covs = torch.stack([0.3 * torch.eye(2, dtype=F64),
                        torch.tensor([[0.5, 0.2], [0.2, 0.4]], dtype=F64)])
    return GaussianMixture([0.3, 0.7], torch.tensor([[-1.5, 0.5], [1.0, -0.5]],
                                                    dtype=F64), covs)


def mixture_log_density(mix, x):
    comp = torch.distributions.MultivariateNormal(mix.means, mix.covs)
    return torch.logsumexp(comp.log_prob(x[:, None]) + mix.weights.log(), 1)


def full_jacobian(fn, z):
    """(B, p, d) Jacobians of a row-wise map, one autograd call per row."""
    return torch.stack([torch.autograd.functional.jacobian(
        lambda y: fn(y[None])[0], z[i]).reshape(-1, z[i].numel())
        for i in range(z.shape[0])])


# -- probes -------------------------------------------------------------------

def test_random_probes_gaussian_stream_unchanged_and_rademacher_signs():
    x = torch.zeros(3, 5, dtype=F64)
    a = random_probes(x, 4, generator=gen(7))
    b = torch.randn((3, 4, 5), generator=gen(7), dtype=F64)
    assert torch.equal(a, b)
    assert torch.equal(random_probes(x, 4, generator=gen(7), kind="gaussian"), a)
    r = random_probes(torch.zeros(2000, 6, dtype=F64), generator=gen(3),
                      kind="rademacher")
    assert set(r.unique().tolist()) == {-1.0, 1.0} and r.dtype == F64
    second = r.T @ r / r.shape[0]
    assert (second - torch.eye(6, dtype=F64)).abs().max() < 0.1
    with pytest.raises(ValueError, match="kind"):
        random_probes(x, kind="uniform")


# -- spectra ------------------------------------------------------------------

def test_flow_spectrum_gaussian_matches_closed_form(gauss):
    mean, cov, vel = gauss
    z = torch.randn(3, 4, generator=gen(2), dtype=F64)
    spec = spectra.flow_spectrum(vel, z, 3, steps=100, passes=1, oversample=1,
                                 generator=gen(3))
    jac = gaussian.flow_map_jacobian(1.0, cov)
    exact = torch.linalg.eigvalsh(jac @ jac.T).flip(0).sqrt()[:3]
    assert (spec.values - exact).abs().max() < 1e-8
    # against the discrete map's full Jacobian, at machine precision
    full = full_jacobian(lambda y: integrate(vel, y, 100), z)
    assert (spec.values - torch.linalg.svdvals(full)[:, :3]).abs().max() < 1e-10
    # J v_i = s_i u_i, J^T u_i = s_i v_i, orthonormal vectors
    jv = full @ spec.right.mT
    assert (jv - spec.left.mT * spec.values[:, None, :]).abs().max() < 1e-10
    jtu = full.mT @ spec.left.mT
    assert (jtu - spec.right.mT * spec.values[:, None, :]).abs().max() < 1e-10
    eye = torch.eye(3, dtype=F64)
    assert (spec.right @ spec.right.mT - eye).abs().max() < 1e-12
    assert (spec.left @ spec.left.mT - eye).abs().max() < 1e-12
    assert (spec.values[:, :-1] >= spec.values[:, 1:]).all()


def test_flow_spectrum_mixture_matches_full_jacobian():
    covs = torch.stack([0.2 * torch.eye(3, dtype=F64),
                        torch.diag(torch.tensor([0.6, 0.3, 0.1], dtype=F64))])
    mix = GaussianMixture([0.4, 0.6], torch.tensor(
        [[-1.0, 0.5, 0.0], [1.2, -0.3, 0.4]], dtype=F64), covs)
    z = torch.randn(4, 3, generator=gen(4), dtype=F64)
    spec = spectra.flow_spectrum(mix.drift, z, 2, steps=20, passes=2,
                                 oversample=1, generator=gen(5))
    full = full_jacobian(lambda y: integrate(mix.drift, y, 20), z)
    u, s, vh = torch.linalg.svd(full)
    assert (spec.values - s[:, :2]).abs().max() < 1e-10
    # the singular vectors agree up to sign
    assert ((spec.right * vh[:, :2]).sum(-1).abs() - 1).abs().max() < 1e-8
    assert ((spec.left * u[:, :, :2].mT).sum(-1).abs() - 1).abs().max() < 1e-8


def test_flow_spectrum_to_intermediate_time(gauss):
    mean, cov, vel = gauss
    z = torch.randn(2, 4, generator=gen(6), dtype=F64)
    spec = spectra.flow_spectrum(vel, z, 4, steps=100, t1=0.5, passes=0,
                                 oversample=0, generator=gen(7))
    exact = torch.linalg.svdvals(gaussian.flow_map_jacobian(0.5, cov))
    assert (spec.values - exact).abs().max() < 1e-8


def test_subspace_iteration_passes_improve_a_decaying_spectrum():
    g = gen(8)
    p, d = 30, 40
    u = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=F64))[0]
    v = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))[0]
    s = 0.5 ** torch.arange(p, dtype=F64)
    mat = u @ torch.diag(s) @ v[:, :p].T            # (p, d)

    def fn(z):
        return z @ mat.T

    z = torch.randn(2, d, generator=g, dtype=F64)
    errs = {}
    for passes in (0, 4):
        spec = spectra.spectrum(fn, z, 3, passes=passes, oversample=2,
                                generator=gen(9))
        errs[passes] = float((spec.values - s[:3]).abs().max())
    assert errs[4] < 1e-8
    assert errs[0] > 100 * errs[4]
    # a user-supplied JVP gives the same result
    spec_j = spectra.spectrum(fn, z, 3, passes=4, oversample=2, generator=gen(9),
                              jvp=lambda z0, t: t @ mat.T)
    assert (spec_j.values - s[:3]).abs().max() < 1e-8


def test_spectrum_of_a_composite_against_full_jacobian():
    covs = torch.stack([0.3 * torch.eye(3, dtype=F64)] * 2)
    mix = GaussianMixture([0.5, 0.5], torch.tensor(
        [[-1.0, 0.0, 0.5], [1.0, 0.5, 0.0]], dtype=F64), covs)
    head = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.2, -1.0]], dtype=F64)

    def fn(z):
        return torch.tanh(integrate(mix.drift, z, 10) @ head.T)

    z = torch.randn(3, 3, generator=gen(10), dtype=F64)
    spec = spectra.spectrum(fn, z, 2, passes=1, generator=gen(11))
    full = full_jacobian(fn, z)
    assert (spec.values - torch.linalg.svdvals(full)).abs().max() < 1e-10
    assert spec.left.shape == (3, 2, 2) and spec.right.shape == (3, 2, 3)


# -- divergences and log-likelihoods --------------------------------------------

def test_exact_divergence_is_the_trace_of_the_jacobian(mix2):
    x = torch.randn(5, 2, generator=gen(12), dtype=F64)
    div = spectra.divergence(mix2.drift, x, 0.4)
    tr = torch.diagonal(mix2.jacobian(x, 0.4), dim1=-2, dim2=-1).sum(-1)
    assert (div - tr).abs().max() < 1e-12
    # a network with its own exact jvp, in more dimensions than one chunk
    torch.manual_seed(0)
    net = MLPFlow(70, hidden=32, depth=2).double()
    vel = velocity_fn(net)
    xb = torch.randn(2, 70, generator=gen(13), dtype=F64)
    div = spectra.divergence(vel, xb, 0.3)
    t = torch.tensor(0.3, dtype=F64)
    full = full_jacobian(lambda y: vel(y, t), xb)
    assert (div - torch.diagonal(full, dim1=-2, dim2=-1).sum(-1)).abs().max() < 1e-10


def test_log_likelihood_of_the_gaussian_flow_is_the_gaussian_density(gauss):
    mean, cov, vel = gauss
    x = mean + torch.randn(6, 4, generator=gen(14), dtype=F64)
    ll = spectra.log_likelihood(vel, x, steps=100)
    exact = torch.distributions.MultivariateNormal(mean, cov).log_prob(x)
    assert (ll - exact).abs().max() < 1e-8


def test_log_likelihood_of_the_mixture_flow_is_the_mixture_density(mix2):
    x = mix2.sample(6, generator=gen(15))
    ll = spectra.log_likelihood(mix2.drift, x, steps=128)
    assert (ll - mixture_log_density(mix2, x)).abs().max() < 1e-8
    # Hutch++ whose sketch spans R^2 is exact, on any grid
    coarse = spectra.log_likelihood(mix2.drift, x, steps=16)
    pp = spectra.log_likelihood(mix2.drift, x, steps=16, divergence="hutch++",
                                k=6, generator=gen(16))
    assert (pp - coarse).abs().max() < 1e-10


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_hutchinson_log_likelihood_is_unbiased(mix2, kind):
    x = mix2.sample(1, generator=gen(17))
    exact = spectra.log_likelihood(mix2.drift, x, steps=20)
    reps = x.expand(400, 2).contiguous()
    est = spectra.log_likelihood(mix2.drift, reps, steps=20,
                                 divergence="hutchinson", kind=kind,
                                 generator=gen(18))
    se = est.std() / math.sqrt(len(est))
    assert est.std() > 1e-3      # the probes do vary
    assert abs(float(est.mean() - exact)) < 4 * float(se)


def test_one_dimensional_flow_is_the_quantile_map():
    w = torch.tensor([0.35, 0.65], dtype=F64)
    mu = torch.tensor([[-1.2], [1.5]], dtype=F64)
    sd = torch.tensor([0.5, 0.7], dtype=F64)
    mix = GaussianMixture(w, mu, (sd ** 2)[:, None, None])
    x = torch.linspace(-2.5, 3.0, 9, dtype=F64)[:, None]
    z, logdet = spectra.volume_change(mix.drift, x, steps=200, t0=1.0, t1=0.0)
    u = (x - mu[:, 0]) / sd
    cdf = (w * torch.special.ndtr(u)).sum(1)
    q = (w * torch.exp(-0.5 * u ** 2) / (sd * math.sqrt(2 * math.pi))).sum(1)
    z_exact = torch.special.ndtri(cdf)
    assert (z[:, 0] - z_exact).abs().max() < 1e-7
    # change of variables: log q(x) = log phi(z) + logdet
    log_phi = -0.5 * z_exact ** 2 - 0.5 * math.log(2 * math.pi)
    assert (logdet - (q.log() - log_phi)).abs().max() < 1e-7


def test_knots_refine_the_grid_and_keep_the_answer(gauss):
    mean, cov, vel = gauss
    x = mean + torch.randn(3, 4, generator=gen(19), dtype=F64)
    exact = torch.distributions.MultivariateNormal(mean, cov).log_prob(x)
    coarse = spectra.log_likelihood(vel, x, steps=8)
    knotted = spectra.log_likelihood(vel, x, steps=8, knots=(0.25, 0.5, 0.75))
    assert (knotted - exact).abs().max() < (coarse - exact).abs().max() / 10


# -- trace and Frobenius estimators ----------------------------------------------

def _decaying(d, rate, g, symmetric=True):
    q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))[0]
    lam = rate ** torch.arange(d, dtype=F64)
    if symmetric:
        return q @ torch.diag(lam) @ q.T
    q2 = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))[0]
    return q @ torch.diag(lam) @ q2.T


def test_hutchplusplus_has_smaller_variance_on_a_decaying_spectrum():
    a = _decaying(60, 0.6, gen(20))
    n, m = 4000, 12          # 12 matrix-vector products per estimate

    def matvec(v):
        return v @ a.T

    x = torch.zeros(n, 60, dtype=F64)
    tr = float(torch.trace(a))
    h = spectra.trace_estimate(matvec, random_probes(x, m, generator=gen(21)))
    pp = spectra.trace_estimate(matvec, random_probes(x, 2 * m // 3,
                                                      generator=gen(22)),
                                estimator="hutch++")
    for est in (h, pp):
        assert abs(float(est.mean()) - tr) < 5 * float(est.std()) / math.sqrt(n)
    assert float(pp.var()) < 0.3 * float(h.var())
    # Hutchinson's variance per probe: 2 ||A||_F^2 (Gaussian) and
    # 2 (||A||_F^2 - sum_i A_ii^2) (Rademacher), for symmetric A
    fro2, diag2 = float((a ** 2).sum()), float((torch.diagonal(a) ** 2).sum())
    rad = spectra.trace_estimate(matvec, random_probes(
        x, m, generator=gen(23), kind="rademacher"))
    assert float(h.var()) * m == pytest.approx(2 * fro2, rel=0.1)
    assert float(rad.var()) * m == pytest.approx(2 * (fro2 - diag2), rel=0.1)


def test_hutchplusplus_is_unbiased_for_a_nonsymmetric_matrix():
    a = _decaying(20, 0.7, gen(24), symmetric=False)
    x = torch.zeros(4000, 20, dtype=F64)
    est = spectra.trace_estimate(lambda v: v @ a.T, random_probes(
        x, 4, generator=gen(25), kind="rademacher"), estimator="hutch++")
    assert abs(float(est.mean() - torch.trace(a))) < \
        5 * float(est.std()) / math.sqrt(len(est))


def test_frobenius_estimators_unbiased_and_hutchplusplus_better():
    mat = _decaying(30, 0.6, gen(26))[:20]           # (20, 30)
    fro2 = float((mat ** 2).sum())

    def fn(z):
        return z @ mat.T

    z = torch.zeros(3000, 30, dtype=F64)
    h = spectra.frobenius_sq(fn, z, 8, generator=gen(27))
    pp = spectra.frobenius_sq(fn, z, 8, estimator="hutch++", generator=gen(28))
    for est in (h, pp):
        assert abs(float(est.mean()) - fro2) < 5 * float(est.std()) / math.sqrt(len(z))
    assert float(pp.var()) < 0.2 * float(h.var())


def test_flow_frobenius_hutchplusplus_exact_when_the_sketch_spans(gauss):
    mean, cov, vel = gauss
    z = torch.randn(2, 4, generator=gen(29), dtype=F64)
    full = full_jacobian(lambda y: integrate(vel, y, 30), z)
    est = spectra.flow_frobenius_sq(vel, z, 16, steps=30, estimator="hutch++",
                                    generator=gen(30))
    assert (est - (full ** 2).sum((-1, -2))).abs().max() < 1e-10
    plain = spectra.flow_frobenius_sq(vel, z[:1].expand(500, 4), 2, steps=30,
                                      kind="rademacher", generator=gen(31))
    exact = float((gaussian.flow_map_jacobian(1.0, cov) ** 2).sum())
    assert abs(float(plain.mean()) - exact) < 5 * float(plain.std()) / math.sqrt(500)


# -- errors ---------------------------------------------------------------------

def test_bad_inputs_raise_one_clear_value_error(gauss, mix2):
    mean, cov, vel = gauss
    z = torch.randn(2, 4, dtype=F64)
    with pytest.raises(ValueError, match="r must be <= "):
        spectra.flow_spectrum(vel, z, 5, steps=2)
    with pytest.raises(ValueError, match=r"r must be <= min\(input dimension, "
                       r"output dimension\) = 2"):
        spectra.spectrum(lambda y: y[:, :2], z, 3)
    with pytest.raises(ValueError, match="r must be >= 1"):
        spectra.flow_spectrum(vel, z, 0, steps=2)
    bad = z.clone()
    bad[0, 1] = float("nan")
    with pytest.raises(ValueError, match="z must be finite"):
        spectra.flow_spectrum(vel, bad, 2, steps=2)
    with pytest.raises(ValueError, match="x must be finite"):
        spectra.log_likelihood(vel, bad, steps=2)
    with pytest.raises(ValueError, match="divergence must be one of"):
        spectra.log_likelihood(vel, z, steps=2, divergence="skilling")
    with pytest.raises(ValueError, match="estimator must be one of"):
        spectra.divergence(vel, z, 0.5, estimator="hutch")
    with pytest.raises(ValueError, match="kind must be one of"):
        spectra.log_likelihood(vel, z, steps=2, divergence="hutchinson",
                               kind="sphere")
    with pytest.raises(ValueError, match="multiple of 3"):
        spectra.divergence(vel, z, 0.5, estimator="hutch++", k=4)
    probes = torch.randn(2, 3, 4, dtype=F64)
    probes[1, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="probes must be finite"):
        spectra.divergence(vel, z, 0.5, estimator="hutchinson", probes=probes)
    with pytest.raises(ValueError, match="either probes or k"):
        spectra.divergence(vel, z, 0.5, estimator="hutchinson",
                           probes=torch.randn(2, 3, 4, dtype=F64), k=3)
    with pytest.raises(ValueError, match="knots must be"):
        spectra.log_likelihood(vel, z, steps=2, knots=(0.5, 1.5))
    with pytest.raises(ValueError, match="steps must be >= 1"):
        spectra.log_likelihood(vel, z, steps=0)
    with pytest.raises(ValueError, match="passes must be >= 0"):
        spectra.spectrum(lambda y: y, z, 2, passes=-1)
    with pytest.raises(ValueError, match="the JVP output must be finite"):
        spectra.spectrum(lambda y: y, z, 2,
                         jvp=lambda z0, t: t * float("nan"))
    with pytest.raises(ValueError, match="matvec must return"):
        spectra.trace_estimate(lambda v: v[:, :1], torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="k must be >= 1"):
        spectra.frobenius_sq(lambda y: y, z, 0)
    with pytest.raises(ValueError, match="multiple of 4"):
        spectra.frobenius_sq(lambda y: y, z, 3, estimator="hutch++")
