"""flowjac.closedform.unified: SymPy table against torch, Monte Carlo, reverse steps,
error paths."""
import math

import pytest
import sympy as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowjac.closedform import gaussian, unified

f64 = torch.float64
NAMES = tuple(unified.MODELS)


def grid(name, n=7):
    spec = unified.SPECS[name]
    lo = spec.t_min + (1e-3 if spec.left_open else 0.0)
    if name in ("edm", "consistency"):
        return torch.logspace(math.log10(lo), math.log10(spec.t_max), n,
                              dtype=f64)
    return torch.linspace(lo, spec.t_max, n, dtype=f64)


def test_required_models_present():
    for name in ("ddpm_eps", "ddpm_x", "v_pred", "edm", "consistency",
                 "rectified_flow", "trigflow"):
        assert name in unified.MODELS and len(unified.MODELS[name]) == 4


@pytest.mark.parametrize("name", NAMES)
def test_symbolic_matches_numeric(name):
    ts = grid(name)
    coef = unified.coefficients(name, ts)
    exprs = {"det": unified.determinant_expr(name),
             "amp": unified.amplification_expr(name),
             "rho": unified.pearson_expr(name),
             "rho_half": unified.pearson_expr(name, sp.Rational(1, 4))}
    numeric = {"det": unified.determinant(name, ts),
               "amp": unified.amplification(name, ts),
               "rho": unified.pearson(name, ts),
               "rho_half": unified.pearson(name, ts, data_var=0.25)}
    for i, tv in enumerate(ts.tolist()):
        for k, e in enumerate(unified.coefficients_expr(name)):
            assert float(sp.sympify(e).subs(unified.t, tv)) == \
                pytest.approx(float(coef[k][i]), rel=1e-10, abs=1e-12)
        for key, e in exprs.items():
            sym = e.subs(unified.t, tv).evalf(30)
            num = float(numeric[key][i])
            if not sym.is_finite:           # a pole: det M(t) = 0
                assert abs(num) > 1e12
                continue
            if key == "amp" and abs(float(numeric["det"][i])) < 1e-12:
                assert math.isnan(num) or abs(num) > 1e12   # 0/0 or c/0
                continue
            sym = complex(sym)
            assert abs(sym.imag) < 1e-12
            assert sym.real == pytest.approx(num, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_pearson_monte_carlo(name):
    gen = torch.Generator().manual_seed(1)
    n = 100_000
    # unit-variance, clearly non-Gaussian data: Pearson needs 2nd moments only
    x0 = (torch.rand(n, generator=gen, dtype=f64) - 0.5) * math.sqrt(12)
    eps = torch.randn(n, generator=gen, dtype=f64)
    for tv in grid(name, 5).tolist():
        a, b, c, d = unified.coefficients(name, tv)
        xt, y = a * x0 + b * eps, c * x0 + d * eps
        if xt.std() == 0 or y.std() == 0:
            continue
        r_mc = torch.corrcoef(torch.stack([xt, y]))[0, 1].item()
        assert abs(r_mc - unified.pearson(name, tv)) < 5 / math.sqrt(n)


def test_closed_forms():
    t = unified.t
    assert sp.simplify(unified.pearson_expr("v_pred")) == 0
    assert sp.simplify(unified.pearson_expr("trigflow")) == 0
    assert sp.simplify(unified.pearson_expr("edm")) == 0
    rf = (2 * t - 1) / sp.sqrt(2 * ((1 - t) ** 2 + t ** 2))
    assert sp.simplify(unified.pearson_expr("rectified_flow") - rf) == 0
    assert sp.simplify(unified.pearson_expr("fm_book") - rf) == 0
    assert unified.pearson("rectified_flow", 0.5) == pytest.approx(0.0, abs=1e-15)
    e = sp.Rational(1, 500)
    cm = ((t - e) ** 2 - t ** 2) / (sp.sqrt(1 + t ** 2)
                                    * sp.sqrt((t - e) ** 4 + t ** 2))
    assert sp.simplify(unified.on_range(unified.pearson_expr("consistency") - cm,
                                  "consistency")) == 0


def test_general_pearson_matches_table():
    g = unified.pearson_general()
    a, b, c, d, s2 = g["symbols"]
    assert sp.simplify(g["cov"] - (a * c * s2 + b * d)) == 0
    assert sp.simplify(g["var_x"] - (a ** 2 * s2 + b ** 2)) == 0
    vals = {a: 0.3, b: -1.2, c: 0.7, d: 0.4, s2: 2.5}
    assert float(g["rho"].subs(vals)) == pytest.approx(
        (0.3 * 0.7 * 2.5 - 1.2 * 0.4)
        / math.sqrt((0.09 * 2.5 + 1.44) * (0.49 * 2.5 + 0.16)))


def test_edm_sigma_data_matters():
    # EDM with sigma_data = 1 is decorrelated only for unit-variance data
    assert unified.pearson("edm", 1.0, data_var=1.0) == pytest.approx(0, abs=1e-15)
    assert unified.pearson("edm", 1.0, data_var=0.25) < -0.3


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(NAMES), u=st.floats(0.05, 0.95),
       v=st.floats(0.0, 1.0))
def test_solve_inverts_forward(name, u, v):
    spec = unified.SPECS[name]
    tv = spec.t_min + u * (spec.t_max - spec.t_min)
    sv = spec.t_min + v * (tv - spec.t_min)
    if spec.left_open and sv <= spec.t_min:
        sv = tv
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(16, 3, generator=gen, dtype=f64)
    eps = torch.randn(16, 3, generator=gen, dtype=f64)
    a, b, c, d = unified.coefficients(name, tv)
    x0_hat, eps_hat = unified.solve(name, a * x0 + b * eps, c * x0 + d * eps, tv)
    assert torch.allclose(x0_hat, x0, atol=1e-8)
    assert torch.allclose(eps_hat, eps, atol=1e-8)
    a_s, b_s, _, _ = unified.coefficients(name, sv)
    x_s = unified.reverse_step(name, a * x0 + b * eps, c * x0 + d * eps, tv, sv)
    assert torch.allclose(x_s, a_s * x0 + b_s * eps, atol=1e-8)


def test_amplification_is_derivative():
    x = torch.tensor([0.7], dtype=f64)
    for name in NAMES:
        tv = float(grid(name, 5)[2])
        y = torch.tensor([0.3], dtype=f64, requires_grad=True)
        unified.solve(name, x, y, tv)[0].sum().backward()
        assert y.grad.item() == pytest.approx(unified.amplification(name, tv),
                                              rel=1e-10)


def test_gaussian_optimum_matches_drift_and_mc():
    mean = torch.tensor([1.0, -0.5], dtype=f64)
    cov = torch.tensor([[1.0, 0.44], [0.44, 0.64]], dtype=f64)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(2),
                    dtype=f64)
    for tv in [0.1, 0.5, 0.9]:
        rf = unified.gaussian_optimum("rectified_flow", x, tv, mean, cov)
        assert torch.allclose(rf, -gaussian.drift(x, 1 - tv, mean, cov), atol=1e-12)
        fm = unified.gaussian_optimum("fm_book", x, tv, mean, cov)
        assert torch.allclose(fm, gaussian.drift(x, tv, mean, cov), atol=1e-12)
    # least squares on samples recovers the same linear predictor
    gen = torch.Generator().manual_seed(3)
    n = 200_000
    x0 = mean + torch.randn(n, 2, generator=gen, dtype=f64) @ \
        torch.linalg.cholesky(cov).T
    eps = torch.randn(n, 2, generator=gen, dtype=f64)
    a, b, c, d = unified.coefficients("v_pred", 0.4)
    xt, y = a * x0 + b * eps, c * x0 + d * eps
    design = torch.cat([torch.ones(n, 1, dtype=f64), xt], 1)
    coef = torch.linalg.lstsq(design, y).solution
    probe = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=f64)
    fit = torch.cat([torch.ones(2, 1, dtype=f64), probe], 1) @ coef
    assert torch.allclose(fit, unified.gaussian_optimum("v_pred", probe, 0.4, mean,
                                                  cov), atol=0.02)


def test_reverse_processes_converge_to_flow_map():
    mean = torch.tensor([1.0, -0.5], dtype=f64)
    cov = torch.tensor([[1.0, 0.44], [0.44, 0.64]], dtype=f64)
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(4),
                    dtype=f64)
    exact = gaussian.flow_map(z, 1.0, mean, cov)
    errs = {}
    for name in ("rectified_flow", "v_pred"):
        for n in (50, 400):
            ts = torch.linspace(1, 0, n + 1, dtype=f64)
            path = unified.reverse_process(
                name, lambda x, tt: unified.gaussian_optimum(name, x, tt, mean, cov),
                z, ts)
            errs[name, n] = (path[-1] - exact).abs().max().item()
        assert errs[name, 400] < 0.01
        assert errs[name, 50] / errs[name, 400] > 5      # first order: ~8


def test_logit_normal_density():
    ts = torch.linspace(0, 1, 20_001, dtype=f64)
    p = unified.logit_normal_pdf(ts)
    assert torch.trapezoid(p, ts).item() == pytest.approx(1.0, abs=1e-6)
    s = unified.sample_times(100_000, "logit_normal",
                       generator=torch.Generator().manual_seed(5))
    assert (s < 0.5).double().mean().item() == pytest.approx(0.5, abs=0.01)
    assert unified.logit_normal_pdf(0.5) == pytest.approx(
        4 / math.sqrt(2 * math.pi))


def test_errors():
    with pytest.raises(ValueError, match="model must be one of"):
        unified.pearson("ddim", 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        unified.pearson("rectified_flow", 1.5)
    with pytest.raises(ValueError, match=r"\(0.002, 80\]"):
        unified.determinant("consistency", 0.002)
    with pytest.raises(ValueError, match=r"\[0.002, 80\]"):
        unified.amplification("edm", torch.tensor([0.001, 1.0]))
    with pytest.raises(ValueError, match="t must be finite"):
        unified.pearson("trigflow", float("nan"))
    with pytest.raises(ValueError, match="t must be a number"):
        unified.pearson("trigflow", "half")
    with pytest.raises(ValueError, match="singular"):
        unified.solve("ddpm_eps", torch.zeros(2), torch.zeros(2), 1.0)
    with pytest.raises(ValueError, match="same shape"):
        unified.solve("v_pred", torch.zeros(2), torch.zeros(3), 0.5)
    with pytest.raises(ValueError, match="s must lie"):
        unified.reverse_step("v_pred", torch.zeros(2), torch.zeros(2), 0.5, 2.0)
    with pytest.raises(ValueError, match="data_var"):
        unified.pearson("v_pred", 0.5, data_var=-1.0)
    with pytest.raises(ValueError, match="kind must be one of"):
        unified.sample_times(10, "beta")
    with pytest.raises(ValueError, match="times must"):
        unified.reverse_process("v_pred", lambda x, t: x, torch.zeros(2), [0.5])
    with pytest.raises(ValueError, match="scale must be"):
        unified.logit_normal_pdf(0.5, scale=0.0)


def test_float_in_float_out_tensor_in_tensor_out():
    assert isinstance(unified.pearson("v_pred", 0.3), float)
    out = unified.pearson("v_pred", torch.tensor([0.1, 0.2]))
    assert torch.is_tensor(out) and out.shape == (2,)
    amp = unified.amplification("ddpm_eps", torch.tensor([0.0, 1.0], dtype=f64))
    assert amp[0].item() == 0 and abs(amp[1].item()) > 1e15
