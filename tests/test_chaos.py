"""Hermite chaos spectra by Gauss-Hermite quadrature, their closure and the split of the normalised estimator's gap."""
import math

import numpy as np
import pytest
import sympy as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowjac.closedform import chaos, symbolic

F64 = torch.float64


def test_gauss_hermite_integrates_gaussian_moments():
    z, w = chaos.gauss_hermite(6, dim=2)
    assert z.shape == (36, 2) and w.shape == (36,) and abs(float(w.sum()) - 1) < 1e-14
    assert abs(float(w @ z[:, 0] ** 4) - 3) < 1e-12          # E z^4 = 3
    assert abs(float(w @ (z[:, 0] ** 2 * z[:, 1] ** 2)) - 1) < 1e-12
    assert abs(float(w @ z[:, 1] ** 3)) < 1e-12


def test_hermite_functions_are_orthonormal():
    z, w = chaos.gauss_hermite(30)
    h = chaos.hermite_functions(z[:, 0], 12)                  # (30, 13)
    gram = h.T @ (w[:, None] * h)
    assert torch.allclose(gram, torch.eye(13, dtype=F64), atol=1e-10)
    # He_3(z) / sqrt(3!) = (z^3 - 3 z) / sqrt(6)
    x = torch.tensor([0.3, -1.7], dtype=F64)
    assert torch.allclose(chaos.hermite_functions(x, 3)[:, 3], (x ** 3 - 3 * x) / math.sqrt(6))


def test_chaos_spectra_of_a_polynomial_match_sympy():
    z1, z2, rho = sp.symbols("z_1 z_2 rho", real=True)
    f = sp.Matrix([z1 + z1 * z2 / 2, sp.Rational(3, 10) * z2 ** 2 + z1 ** 3 / 5 - z2])
    exact = symbolic.interpolation_identity(f, [z1, z2], rho)

    def fn(z):
        a, b = z[:, 0], z[:, 1]
        return torch.stack([a + a * b / 2, 0.3 * b ** 2 + a ** 3 / 5 - b], 1)

    blocks = chaos.chaos_spectra(fn, 2, 5, nodes=8)
    for q, blk in enumerate(exact["blocks"]):
        assert torch.allclose(blocks[q], torch.tensor(np.array(blk, dtype=float)), atol=1e-12)
    assert blocks[3:].abs().max() < 1e-12                      # no order above 3
    assert torch.allclose(blocks.sum(0), torch.tensor(np.array(exact["cov"], dtype=float)),
                          atol=1e-12)


def test_an_affine_map_has_one_order():
    A = torch.tensor([[1.0, 2.0], [-0.5, 0.3], [0.0, 1.0]], dtype=F64)
    blocks = chaos.chaos_spectra(lambda z: z @ A.T + 4.0, 2, 4, nodes=6)
    assert torch.allclose(blocks[0], A @ A.T, atol=1e-12)
    assert blocks[1:].abs().max() < 1e-12


def test_proportional_spectra_close_the_gap_and_the_counterexample_opens_it():
    C = torch.tensor([[2.0, 0.7], [0.7, 1.0]], dtype=F64)
    g = chaos.chaos_gap(torch.stack([w * C for w in (1.0, 0.5, 0.0, 3.0)]))
    assert abs(g["gap"]) < 1e-14 and abs(g["spread"]) < 1e-14
    assert abs(g["corr_jvp"] - 0.7 / math.sqrt(2.0)) < 1e-14
    # f = (z, z + z^2 - 1): C_1 = [[1, 1], [1, 1]], C_2 = [[0, 0], [0, 2]]
    g = chaos.chaos_gap(torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 2.0]]]))
    assert abs(g["corr_data"] - 1 / math.sqrt(3)) < 1e-14
    assert abs(g["corr_jvp"] - 1 / math.sqrt(5)) < 1e-14
    assert g["mean_orders"] == pytest.approx((1.0, 5 / 3))


@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=1, max_value=6), st.integers(min_value=0, max_value=10_000))
def test_the_split_is_exact_for_any_psd_spectrum(m, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, 3, 3, generator=g, dtype=F64)
    blocks = a @ a.mT                                          # PSD blocks
    orders = torch.rand(m, generator=g, dtype=F64) * 10 + 1
    out = chaos.chaos_gap(blocks, orders, pair=(2, 0))
    assert abs(out["gap"] - out["spread_term"] - out["mismatch_term"]) < 1e-12
    tot, mom = blocks.sum(0), (orders[:, None, None] * blocks).sum(0)
    assert abs(out["corr_data"] - float(tot[2, 0] / (tot[0, 0] * tot[2, 2]).sqrt())) < 1e-12
    assert abs(out["corr_jvp"] - float(mom[2, 0] / (mom[0, 0] * mom[2, 2]).sqrt())) < 1e-12
    assert abs(float(out["shares"].sum()) - 1) < 1e-12


def test_close_spectrum_lumps_the_rest_with_its_mean_order():
    R = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=F64)
    blocks = torch.stack([torch.eye(2, dtype=F64), 0.5 * R])          # orders 1, 2
    cov = blocks.sum(0) + 0.25 * R                                      # rest: 0.25 R
    moment = torch.eye(2, dtype=F64) + 2 * 0.5 * R + 7 * 0.25 * R       # rest at order 7
    closed, orders = chaos.close_spectrum(blocks, cov, moment)
    assert torch.allclose(closed[-1], 0.25 * R) and float(orders[-1]) == pytest.approx(7)
    g = chaos.chaos_gap(closed, orders)
    assert g["corr_jvp"] == pytest.approx(float(moment[0, 1] / moment[0, 0]))
    with pytest.raises(ValueError, match="no variance"):
        chaos.close_spectrum(blocks, blocks.sum(0), moment)
    with pytest.raises(ValueError, match="mean order"):
        chaos.close_spectrum(blocks, cov, blocks.sum(0) * 1.0 + 0.25 * R)


def test_error_paths():
    with pytest.raises(ValueError, match="fn must map"):
        chaos.chaos_spectra(lambda z: z[:, 0], 2, 3, nodes=4)
    with pytest.raises(ValueError, match="non-finite"):
        chaos.chaos_spectra(lambda z: z / 0.0, 1, 3, nodes=4)
    with pytest.raises(ValueError, match="order"):
        chaos.chaos_spectra(lambda z: z, 1, 0)
    with pytest.raises(ValueError, match="blocks"):
        chaos.chaos_gap(torch.ones(2, 2))
    with pytest.raises(ValueError, match="orders"):
        chaos.chaos_gap(torch.ones(2, 2, 2), orders=[1.0])
    with pytest.raises(ValueError, match="pair"):
        chaos.chaos_gap(torch.ones(2, 2, 2), pair=(0, 0))
    with pytest.raises(ValueError, match="positive variance"):
        chaos.chaos_gap(torch.zeros(2, 2, 2))



def test_gaussian_expectation_and_the_identity_in_sympy():
    z1, z2, rho = sp.symbols("z_1 z_2 rho", real=True)
    assert symbolic.gaussian_expectation(z1 ** 4 + 2 * z1 * z2 ** 2 + z1 ** 2 * z2 ** 2,
                                         [z1, z2]) == 4
    ident = symbolic.interpolation_identity(sp.Matrix([z1 ** 2]), [z1], rho)
    # f = z^2 = He_2 + 1: C_2 = 2, h(rho) = 2 rho * 2 = 4 rho
    assert sp.expand(ident["h"][0] - 4 * rho) == 0 and ident["cov"][0] == 2
    assert ident["upper"][0] == 4 and ident["lower"][0] == 0
    assert [b[0] for b in ident["blocks"]] == [0, 2]
