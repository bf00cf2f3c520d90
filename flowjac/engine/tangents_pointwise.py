"""The derivatives of pointwise functions at the primal, for the tangent rules.

``DERIVATIVES`` maps each pointwise torch function the engine follows
(sigmoid, tanh, exp, log, the trigonometric functions, square roots, abs,
erf, ReLU, SiLU, GELU, Softplus, leaky ReLU, SELU, ELU, and
``silu_unfused``, SiLU as flowjac's networks compute it) to its derivative
``d(x0, fn(x0), *args)`` at the primal x0, given the primal output too (so
that sigmoid's and tanh's come from the output, without a second call).
Plain torch functions of tensors, no tangent-carrying value: the value
(``flowjac.engine.tangents_value``) multiplies the tangents by them, and
``flowjac.engine.tangents`` lists each function in ``RULES``. Their own room
because they are a table of calculus, the one place to add an activation's
derivative. Explained in :ref:`sec_byom`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["DERIVATIVES", "silu_unfused"]


def silu_unfused(x):
    """SiLU computed as ``x * sigmoid(x)``, a function the engine has a rule for; :ref:`sec_byom`.

    Two kernels, not ``F.silu``'s fused one, so its rounding is the one
    flowjac's networks were trained with. It is overridable like a torch
    function (``torch.overrides``): on the engine's tangent-carrying value
    its rule is the pointwise one, one product of the tangents with SiLU's
    derivative, instead of the product rule through the sigmoid.
    """
    if torch.overrides.has_torch_function_unary(x):
        return torch.overrides.handle_torch_function(silu_unfused, (x,), x)
    return x * torch.sigmoid(x)


def _softplus_deriv(x0, out0, beta=1.0, threshold=20.0):
    return torch.where(x0 * beta > threshold, torch.ones_like(x0),
                       torch.sigmoid(beta * x0))


def _gelu_deriv(x0, out0, approximate="none"):
    if approximate == "tanh":
        c = math.sqrt(2 / math.pi)
        u = torch.tanh(c * (x0 + 0.044715 * x0 ** 3))
        return 0.5 * (1 + u) + 0.5 * x0 * (1 - u * u) * c * (1 + 3 * 0.044715 * x0 * x0)
    cdf = 0.5 * (1 + torch.erf(x0 / math.sqrt(2)))
    return cdf + x0 * torch.exp(-0.5 * x0 * x0) / math.sqrt(2 * math.pi)


def _silu_deriv(x0, out0):
    s = torch.sigmoid(x0)
    return torch.addcmul(x0, x0, s, value=-1).add_(1).mul_(s)   # s (1 + x0 (1 - s))


# SELU's constants (Klambauer et al. 2017), as torch defines them
_SELU_ALPHA, _SELU_SCALE = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946


def _selu_deriv(x0, out0, inplace=False):
    # scale for x > 0; d/dx scale alpha (e^x - 1) = out0 + scale alpha otherwise
    return torch.where(x0 > 0, torch.full_like(x0, _SELU_SCALE),
                       out0 + _SELU_SCALE * _SELU_ALPHA)


def _leaky_deriv(x0, out0, negative_slope=0.01):
    return torch.where(x0 > 0, torch.ones_like(x0), torch.full_like(x0, negative_slope))


#: The derivative of each pointwise function at the primal: ``fn -> d(x0, fn(x0), *args)``.
DERIVATIVES = {
    torch.sigmoid: lambda x0, y: torch.addcmul(y, y, y, value=-1),
    torch.tanh: lambda x0, y: (y * y).neg_().add_(1),
    torch.exp: lambda x0, y: y,
    torch.log: lambda x0, y: 1 / x0,
    torch.sin: lambda x0, y: torch.cos(x0),
    torch.cos: lambda x0, y: -torch.sin(x0),
    torch.sqrt: lambda x0, y: 0.5 / y,
    torch.rsqrt: lambda x0, y: -0.5 * y ** 3,
    torch.abs: lambda x0, y: torch.sign(x0),
    torch.erf: lambda x0, y: 2 / math.sqrt(math.pi) * torch.exp(-x0 * x0),
    torch.relu: lambda x0, y: (x0 > 0).to(x0.dtype),
    F.relu: lambda x0, y: (x0 > 0).to(x0.dtype),
    F.silu: _silu_deriv,
    silu_unfused: _silu_deriv,
    F.gelu: _gelu_deriv,
    F.softplus: _softplus_deriv,
    F.leaky_relu: _leaky_deriv,
    F.selu: _selu_deriv,
    torch.selu: _selu_deriv,
    F.elu: lambda x0, y, alpha=1.0: torch.where(x0 > 0, torch.ones_like(x0), y + alpha),
    F.tanh: lambda x0, y: (y * y).neg_().add_(1),
    F.sigmoid: lambda x0, y: torch.addcmul(y, y, y, value=-1),
}
