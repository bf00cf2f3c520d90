"""The engine's tangent rules (flowjac.engine.tangents) against torch.func.jvp,
in float64 on random inputs: each rule alone, one direction and k at once."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jvp as func_jvp

from flowjac.engine import tangents
from flowjac.engine.tangents import DERIVATIVES, RULES, Joint, NoRule, joint_jvp
from flowjac.engine.tangents_pointwise import silu_unfused

TOL = 1e-11


@pytest.fixture(autouse=True)
def _seeded():
    """Every test draws its inputs from its own fixed stream."""
    with torch.random.fork_rng():
        torch.manual_seed(31)
        yield


def _close(a, b, what):
    a, b = a.detach(), b.detach()
    err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
    assert err <= TOL, f"{what}: relative error {err:.1e}"


def check(fn, x, k=3, ref=None):
    """joint_jvp(fn) against torch.func.jvp(ref or fn): one direction and k directions."""
    ref = fn if ref is None else ref
    v = torch.randn_like(x)
    y, yd = joint_jvp(fn, x, v)
    y0, yd0 = func_jvp(ref, (x,), (v,))
    _close(y, y0, "primal")
    _close(yd, yd0, "tangent")
    vk = torch.randn(x.shape[0], k, *x.shape[1:], dtype=x.dtype)
    yk, ydk = joint_jvp(fn, x, vk)
    _close(yk, y0, "primal (k directions)")
    assert ydk.shape == (y0.shape[0], k, *y0.shape[1:])
    for i in range(k):
        _close(ydk[:, i], func_jvp(ref, (x,), (vk[:, i],))[1], f"tangent {i} of {k}")


def x64(*shape, scale=2.0):
    return scale * torch.randn(*shape, dtype=torch.float64)


@pytest.mark.parametrize("fn", [
    F.silu, nn.SiLU(), silu_unfused,
    F.selu, torch.selu, nn.SELU(),
    F.elu, lambda x: F.elu(x, alpha=0.7), nn.ELU(alpha=1.3),
    F.gelu, lambda x: F.gelu(x, approximate="tanh"), nn.GELU(),
    F.softplus, lambda x: F.softplus(x, beta=2.0, threshold=3.0), nn.Softplus(),
    F.leaky_relu, torch.tanh, torch.sigmoid, torch.exp, torch.sin, torch.erf,
], ids=["silu", "SiLU", "silu_unfused", "selu", "torch.selu", "SELU", "elu", "elu_alpha", "ELU",
        "gelu", "gelu_tanh", "GELU", "softplus", "softplus_beta_threshold",
        "Softplus", "leaky_relu", "tanh", "sigmoid", "exp", "sin", "erf"])
def test_pointwise_rules(fn):
    check(fn, x64(4, 5, 6))


def test_the_common_activations_have_rules():
    for fn in (F.silu, F.selu, torch.selu, F.elu, F.gelu, F.softplus, F.leaky_relu,
               torch.tanh, torch.sigmoid, silu_unfused):
        assert fn in DERIVATIVES and fn in RULES, fn


def test_silu_unfused_keeps_its_rounding_under_the_engine():
    # x * sigmoid(x), not F.silu's fused kernel: flowjac's networks were trained with it
    x = 3 * torch.randn(4, 1000)
    y, _ = joint_jvp(silu_unfused, x, torch.randn(4, 2, 1000))
    assert torch.equal(silu_unfused(x), x * torch.sigmoid(x)) and torch.equal(y, x * torch.sigmoid(x))


def test_group_norm_with_and_without_affine():
    gn = nn.GroupNorm(3, 6).double()
    with torch.no_grad():
        gn.weight.normal_()
        gn.bias.normal_()
    check(gn, x64(4, 6, 5, 5))
    check(lambda x: F.group_norm(x, 2), x64(4, 6, 7))
    check(lambda x: F.group_norm(x, 2, gn.weight), x64(4, 6))   # (N, C): no spatial axes


def test_layer_norm_and_softmax():
    ln = nn.LayerNorm(8).double()
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    check(ln, x64(4, 3, 8))
    check(lambda x: F.layer_norm(x, (3, 8)), x64(4, 3, 8))
    check(lambda x: F.layer_norm(x, (3, 8), ln.weight.expand(3, 8)), x64(4, 3, 8))
    check(lambda x: torch.softmax(x, dim=-1), x64(4, 3, 8))
    check(lambda x: F.log_softmax(x, dim=1), x64(4, 3, 8))


def test_conv2d_and_transposed():
    conv = nn.Conv2d(3, 5, 3, padding=1, stride=2).double()
    check(conv, x64(2, 3, 8, 8))
    convt = nn.ConvTranspose2d(3, 4, 4, stride=2, padding=1).double()
    check(convt, x64(2, 3, 5, 5))
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    check(lambda x: F.conv2d(x, w, None, padding=1), x64(2, 3, 6, 6))


def test_linear_and_matmul():
    lin = nn.Linear(7, 4).double()
    check(lin, x64(5, 7))
    check(lin, x64(5, 3, 7))
    w = torch.randn(7, 7, dtype=torch.float64)
    check(lambda x: x @ w @ x.transpose(-2, -1), x64(2, 7, 7))


def _attention_reference(q, k, v, mask=None):
    """softmax(q k^T / sqrt(d) + mask) v, in operations torch.func differentiates."""
    w = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        w = w + mask
    return torch.softmax(w, dim=-1) @ v


@pytest.mark.parametrize("variant", ["plain", "causal", "bool_mask", "scale"])
def test_attention_without_fused_kernels(variant):
    """scaled_dot_product_attention (fused on CPU: no forward AD) by the written-out rule."""
    wq, wk, wv = (torch.randn(8, 8, dtype=torch.float64) / 3 for _ in range(3))
    n = 6
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    additive = torch.zeros(n, n, dtype=torch.float64).masked_fill(~causal, float("-inf"))

    def qkv(x):
        return (x @ wq).unflatten(-1, (2, 4)).transpose(1, 2), \
            (x @ wk).unflatten(-1, (2, 4)).transpose(1, 2), \
            (x @ wv).unflatten(-1, (2, 4)).transpose(1, 2)

    def fast(x):
        q, k, v = qkv(x)
        if variant == "causal":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if variant == "bool_mask":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=causal)
        if variant == "scale":
            return F.scaled_dot_product_attention(q, k, v, scale=0.25)
        return F.scaled_dot_product_attention(q, k, v)

    def ref(x):
        q, k, v = qkv(x)
        if variant == "scale":
            q = q * (0.25 * math.sqrt(q.shape[-1]))
        mask = additive if variant in ("causal", "bool_mask") else None
        return _attention_reference(q, k, v, mask)

    check(fast, x64(3, n, 8, scale=1.0), ref=ref)


def test_einsum_attention_scores():
    def scores(x):
        return torch.softmax(torch.einsum("bid,bjd->bij", x, 2 * x), dim=-1)
    check(scores, x64(3, 5, 4, scale=0.5))


def test_shape_operations_and_reductions():
    def f(x):
        y = x.reshape(x.shape[0], -1).unflatten(1, (3, 4)).permute(0, 2, 1)
        y = torch.cat([y, y.flip(1) * 2], dim=1).sum(-1, keepdim=True)
        return F.interpolate(y.transpose(1, 2), scale_factor=2) + y.mean()
    check(f, x64(2, 12))


def test_joint_presents_the_primal():
    x = x64(2, 3)
    j = Joint(x, torch.zeros(4, 2, 3, dtype=torch.float64))
    assert (j.shape, j.dtype, j.k) == (x.shape, x.dtype, 4)
    assert "Joint(shape=(2, 3), k=4" in repr(j)


def test_an_operation_without_a_rule_names_itself():
    with pytest.raises(NoRule, match="cumsum"):
        joint_jvp(lambda x: torch.cumsum(x, 0), x64(3, 2), x64(3, 2))
    with pytest.raises(NoRule, match="control flow"):
        joint_jvp(lambda x: x if x else -x, x64(1), x64(1))
    assert issubclass(NoRule, ValueError)


def test_tangents_of_the_wrong_shape_are_refused():
    with pytest.raises(ValueError, match="tangents must have shape"):
        joint_jvp(torch.tanh, x64(3, 2), x64(3, 3))


def test_the_adapters_reexport_the_engine():
    from flowjac.models import adapters
    assert adapters.joint_jvp is tangents.joint_jvp
