"""Exact forward-mode tangents by a tangent-carrying value and a table of rules.

``joint_jvp(fn, x, tangents)`` runs ``fn``, the model's own forward code, on
a *tangent-carrying* value (``Joint``, not a torch.Tensor): the primal,
computed by the model's own operations (so it equals the original output),
and its k tangents stacked as ``(k, *shape)``. Every torch operation the code
applies to it is intercepted (``__torch_function__``) and replaced by its
exact tangent rule (``RULES``, keyed by the torch function): linear maps
(linear and convolution weights, reshapes, concatenation, resampling,
pooling, padding, sums) act on the k tangents in one batched call without
the bias; GroupNorm, LayerNorm, softmax, SiLU, SELU, ELU, GELU, Softplus and
the other pointwise functions (``DERIVATIVES``) use their derivatives at the
primal; bilinear maps (einsum, matmul, attention) use the product rule, the
attention scores in one product over a doubled contracted axis. The
network's parameters are read, never copied or modified. An operation
without a rule raises ``Unsupported`` inside the run and ``NoRule`` out of
``joint_jvp``.

``torch.func.jvp`` instead computes a second product per layer for the
weights' zero tangents, decomposes GroupNorm and softmax into many small
operations, and cannot differentiate fused attention
(``scaled_dot_product_attention`` on CPU). The adapters of third-party
networks (``flowjac.models.adapters``) use this engine and check it once per
input signature against ``torch.func.jvp``; ``tests/test_tangents.py`` checks
the rules against it.

The engine has three rooms: the value and its algebra
(``flowjac.engine.tangents_value``: ``Joint``, ``Unsupported``,
``NoRule``), the derivatives of pointwise functions
(``flowjac.engine.tangents_pointwise``: ``DERIVATIVES``), and this module:
the rules of the layers, the table ``RULES`` keyed by torch function, and
``joint_jvp``; every name is importable from here.
Explained in :ref:`sec_byom`.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from flowjac.engine.tangents_pointwise import DERIVATIVES
from flowjac.engine.tangents_value import (
    RULES,
    Joint,
    NoRule,
    Unsupported,
    _add,
    _ax,
    _clamp,
    _div,
    _flat,
    _log_softmax,
    _matmul,
    _mul,
    _pow,
    _primal,
    _softmax,
    _tangents,
    _unary,
    _unflat,
)

__all__ = ["Joint", "RULES", "DERIVATIVES", "joint_jvp", "check_tangents",
           "Unsupported", "NoRule"]


def _unary_rule(fn):
    def rule(input, *args, **kwargs):
        inplace = kwargs.pop("inplace", False)
        if fn is F.selu and args:           # F.selu(input, inplace)
            inplace, args = bool(args[0]), args[1:]
        out = _unary(fn, input, *args, **kwargs)
        return input._become(out) if inplace else out   # torch's aliasing
    return rule



def _conv(fn, nd):
    def rule(input, weight, bias=None, *args, **kwargs):
        if not isinstance(input, Joint) or isinstance(weight, Joint) or \
                isinstance(bias, Joint):
            raise Unsupported(f"{fn.__name__} with x-dependent weights")
        batched = input.ndim == nd + 2
        p = fn(input.p, weight, bias, *args, **kwargs)
        t = fn(_flat(input.d, batched), weight, None, *args, **kwargs)
        return Joint(p, _unflat(t, input.k, batched))
    return rule


def _linear(input, weight, bias=None):
    if not isinstance(input, Joint) or isinstance(weight, Joint) or \
            isinstance(bias, Joint):
        raise Unsupported("linear with x-dependent weights")
    return Joint(F.linear(input.p, weight, bias), F.linear(input.d, weight))


def _normalized(j: Joint, p, mean, rstd, groups, scale) -> Joint:
    """Tangents of (x - mean) rstd weight, statistics over the last axis of the
    primal viewed as ``groups``: (t - mean(t) - z mean(z t)) scale, with
    ``scale`` = rstd weight broadcastable against the primal. In place after
    the first difference: one new tangent-sized buffer, not five."""
    mean, rstd = mean.reshape(*groups[:-1], 1), rstd.reshape(*groups[:-1], 1)
    z = (j.p.reshape(groups) - mean) * rstd
    t = j.d.reshape(j.k, *groups)
    zt = (z * t).mean(-1, keepdim=True)
    td = torch.sub(t, t.mean(-1, keepdim=True)).addcmul_(z, zt, value=-1)
    return Joint(p, td.reshape(j.d.shape).mul_(scale))


def _group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    n, c = input.shape[:2]
    p, mean, rstd = torch.native_group_norm(
        input.p.contiguous(), weight, bias, n, c, input.p[0, 0].numel(), num_groups, eps)
    scale = rstd.reshape(n, num_groups, 1).expand(n, num_groups, c // num_groups)
    scale = scale.reshape(n, c) if weight is None else scale.reshape(n, c) * weight
    return _normalized(input, p, mean, rstd, (n, num_groups, -1),
                       scale.reshape(n, c, *([1] * (input.ndim - 2))))


def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    shape = tuple(normalized_shape)
    p, mean, rstd = torch.native_layer_norm(input.p, shape, weight, bias, eps)
    lead = input.shape[:input.ndim - len(shape)]
    scale = rstd.reshape(*lead, *([1] * len(shape)))
    return _normalized(input, p, mean, rstd, (*lead, -1),
                       scale if weight is None else scale * weight)


def _batch_norm(input, running_mean, running_var, weight=None, bias=None,
                training=False, momentum=0.1, eps=1e-5):
    if training or running_mean is None:
        raise Unsupported("batch_norm with batch statistics (training mode)")
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = scale * weight
    p = F.batch_norm(input.p, running_mean, running_var, weight, bias, False, momentum, eps)
    return Joint(p, input.d * scale.reshape((-1,) + (1,) * (input.ndim - 2)))


def _resample(fn, min_rank):
    def rule(input, *args, **kwargs):
        if not isinstance(input, Joint):
            raise Unsupported(f"{fn.__name__} with an x-dependent argument")
        batched = input.ndim > min_rank
        return Joint(fn(input.p, *args, **kwargs),
                      _unflat(fn(_flat(input.d, batched), *args, **kwargs),
                              input.k, batched))
    return rule


def _pad(input, pad, mode="constant", value=None):
    if mode == "constant":
        return Joint(F.pad(input.p, pad, value=value), F.pad(input.d, pad))
    batched = input.ndim > len(pad) // 2 + 1
    return Joint(F.pad(input.p, pad, mode),
                  _unflat(F.pad(_flat(input.d, batched), pad, mode), input.k, batched))


def _dropout(input, p=0.5, training=True, inplace=False):
    if training and p > 0:
        raise Unsupported("dropout in training mode (a random velocity)")
    return input


def _cat(tensors, dim=0, *, out=None):
    like = next(v for v in tensors if isinstance(v, Joint))
    d = _ax(dim, like.ndim)
    return Joint(torch.cat([_primal(v) for v in tensors], d),
                  torch.cat([_tangents(v, like) for v in tensors], d + 1))


def _stack(tensors, dim=0, *, out=None):
    like = next(v for v in tensors if isinstance(v, Joint))
    d = _ax(dim, like.ndim + 1)
    return Joint(torch.stack([_primal(v) for v in tensors], d),
                  torch.stack([_tangents(v, like) for v in tensors], d + 1))


def _einsum(equation, *operands):
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    eq = equation.replace(" ", "")
    if "->" not in eq or "." in eq:
        raise Unsupported("einsum without an explicit output or with '...'")
    lhs, rhs = eq.split("->")
    terms = lhs.split(",")
    s = next(c for c in "zyxwvutsrqponmlkjihgfedcbaZYXWVUTSRQPONMLKJIHGFEDCBA"
             if c not in eq)
    primals = [_primal(v) for v in operands]
    p = torch.einsum(eq, *primals)
    joint = [i for i, v in enumerate(operands) if isinstance(v, Joint)]
    if len(terms) == 2 and len(joint) == 2:
        # a (x) b: t = ta (x) b + a (x) tb. When the output is larger than the
        # inputs (attention scores), one product over a doubled contracted
        # axis c: [ta, a] (x) [b, tb], instead of two products and a sum.
        a, b = operands
        shared = [c for c in terms[0] if c in terms[1] and c not in rhs]
        if shared and p.numel() > a.p.numel() + b.p.numel():
            c = shared[0]
            ia, ib = terms[0].index(c) + 1, terms[1].index(c) + 1
            ta = torch.cat([a.d, a.p.expand_as(a.d)], ia)
            tb = torch.cat([b.p.expand_as(b.d), b.d], ib)
            return Joint(p, torch.einsum(f"{s}{terms[0]},{s}{terms[1]}->{s}{rhs}", ta, tb))
    t = None
    for i in joint:
        sub = ",".join(s + term if m == i else term for m, term in enumerate(terms))
        term = torch.einsum(f"{sub}->{s}{rhs}", *primals[:i], operands[i].d, *primals[i + 1:])
        t = term if t is None else t + term
    return Joint(p, t)


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
          scale=None, enable_gqa=False):
    """softmax(q k^T scale + mask) v, written out so that each step has its rule."""
    if dropout_p > 0 or enable_gqa:
        raise Unsupported("scaled_dot_product_attention with dropout or GQA")
    scale = 1 / math.sqrt(query.shape[-1]) if scale is None else scale
    w = (query @ key.transpose(-2, -1)) * scale
    if is_causal:
        attn_mask = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool,
                               device=query.device).tril()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype,
                                    device=query.device).masked_fill(~attn_mask,
                                                                     float("-inf"))
        w = w + attn_mask
    return torch.softmax(w, dim=-1) @ value


def _where(condition, input, other):
    if isinstance(condition, Joint):
        raise Unsupported("where with an x-dependent condition")
    like = input if isinstance(input, Joint) else other
    return Joint(torch.where(condition, _primal(input), _primal(other)),
                  torch.where(condition, _tangents(input, like), _tangents(other, like)))



def _like(fn):
    def rule(input, *args, **kwargs):
        return fn(input.p, *args, **kwargs)
    return rule


def _method(name):
    def rule(self, *args, **kwargs):
        if not isinstance(self, Joint):
            raise Unsupported(f"torch.{name} with an x-dependent argument "
                               "other than the first")
        return getattr(self, name)(*args, **kwargs)
    return rule


def _swap(rule):
    return lambda a, b, *args, **kwargs: rule(b, a, *args, **kwargs)


def _sub(a, b, alpha=1):
    return _add(a, b, alpha=-alpha)


def _build_rules() -> dict:
    T = torch.Tensor
    rules = {
        F.linear: _linear,
        F.conv1d: _conv(F.conv1d, 1), F.conv2d: _conv(F.conv2d, 2),
        F.conv3d: _conv(F.conv3d, 3),
        F.conv_transpose1d: _conv(F.conv_transpose1d, 1),
        F.conv_transpose2d: _conv(F.conv_transpose2d, 2),
        F.conv_transpose3d: _conv(F.conv_transpose3d, 3),
        F.group_norm: _group_norm, F.layer_norm: _layer_norm,
        F.batch_norm: _batch_norm,
        F.interpolate: _resample(F.interpolate, 2),
        F.avg_pool1d: _resample(F.avg_pool1d, 2),
        F.avg_pool2d: _resample(F.avg_pool2d, 3),
        F.avg_pool3d: _resample(F.avg_pool3d, 4),
        F.adaptive_avg_pool1d: _resample(F.adaptive_avg_pool1d, 2),
        F.adaptive_avg_pool2d: _resample(F.adaptive_avg_pool2d, 3),
        F.adaptive_avg_pool3d: _resample(F.adaptive_avg_pool3d, 4),
        F.pixel_shuffle: _resample(F.pixel_shuffle, 3),
        F.pixel_unshuffle: _resample(F.pixel_unshuffle, 3),
        F.pad: _pad, torch._C._nn.pad: _pad,
        F.dropout: _dropout, F.dropout1d: _dropout, F.dropout2d: _dropout,
        F.dropout3d: _dropout, F.alpha_dropout: _dropout,
        F.scaled_dot_product_attention: _sdpa,
        torch.cat: _cat, torch.concat: _cat, torch.concatenate: _cat,
        torch.stack: _stack, torch.einsum: _einsum,
        torch.softmax: _softmax, F.softmax: _softmax, T.softmax: _softmax,
        torch.log_softmax: _log_softmax, F.log_softmax: _log_softmax,
        T.log_softmax: _log_softmax,
        torch.where: _where, torch.clamp: _clamp, T.clamp: _clamp,
        torch.add: _add, T.add: _add, T.__add__: _add, T.__radd__: _swap(_add),
        torch.sub: _sub, T.sub: _sub, T.__sub__: _sub, T.__rsub__: _swap(_sub),
        torch.rsub: _swap(_sub),
        torch.mul: _mul, T.mul: _mul, T.__mul__: _mul, T.__rmul__: _mul,
        torch.div: _div, T.div: _div, T.__truediv__: _div, torch.true_divide: _div,
        T.__rtruediv__: _swap(_div),
        torch.matmul: _matmul, T.matmul: _matmul, T.__matmul__: _matmul,
        T.__rmatmul__: _swap(_matmul), torch.mm: _matmul, torch.bmm: _matmul,
        torch.neg: lambda x: -x, torch.pow: _pow,
        torch.zeros_like: _like(torch.zeros_like), torch.ones_like: _like(torch.ones_like),
        torch.empty_like: _like(torch.empty_like), torch.full_like: _like(torch.full_like),
        torch.randn_like: _like(torch.randn_like), torch.rand_like: _like(torch.rand_like),
    }
    for fn in DERIVATIVES:
        rules[fn] = _unary_rule(fn)
    for name in ("reshape", "flatten", "unflatten", "permute", "transpose", "swapaxes",
                 "movedim", "unsqueeze", "squeeze", "chunk", "split", "unbind", "sum",
                 "mean", "t", "narrow", "flip", "roll"):
        rules[getattr(torch, name)] = _method(name)
    return rules


RULES.update(_build_rules())


def check_tangents(x, tangents) -> bool:
    """True for tangents of x's shape (one direction), False for ``(B, k, ...)``, else ValueError; :ref:`sec_byom`."""
    if not torch.is_tensor(tangents) or tangents.dtype != x.dtype or \
            tangents.device != x.device:
        raise ValueError(f"tangents must be a tensor of x's dtype and device "
                         f"({x.dtype}, {x.device})")
    if tangents.shape == x.shape:
        return True
    if (x.ndim >= 1 and tangents.ndim == x.ndim + 1 and tangents.shape[0] == x.shape[0]
            and tangents.shape[1] >= 1 and tangents.shape[2:] == x.shape[1:]):
        return False
    raise ValueError(f"tangents must have shape {tuple(x.shape)} or "
                     f"{(x.shape[0], 'k', *x.shape[1:])}, got {tuple(tangents.shape)}")


def joint_jvp(fn: Callable, x: torch.Tensor, tangents: torch.Tensor):
    """(fn(x), D fn(x) tangents) by running fn once on a tangent-carrying value; :ref:`sec_byom`.

    ``tangents`` has x's shape or ``(B, k, *x.shape[1:])`` (k directions, the
    primal computed once). ``fn`` is the model's own code, run unchanged:
    every torch operation on x-dependent values uses the exact tangent
    rules of this module, and the primal operations are the model's own.
    Raises ``NoRule`` (a ValueError) naming the first operation without a rule (an
    in-place write, data-dependent control flow, an unlisted function);
    ``AdaptedVelocity.jvp`` then falls back to ``torch.func.jvp``.
    """
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise ValueError("x must be a floating torch tensor, got "
                         f"{getattr(x, 'dtype', type(x).__name__)}")
    single = check_tangents(x, tangents)
    tv = tangents.unsqueeze(0) if single else tangents.movedim(1, 0)
    try:
        out = fn(Joint(x, tv))
    except Unsupported as err:
        raise NoRule(f"no exact tangent rule: {err}") from None
    if isinstance(out, Joint):
        y, yd = out.p, out.d
    elif torch.is_tensor(out):
        y, yd = out, out.new_zeros((tv.shape[0], *out.shape))
    else:
        raise ValueError(f"fn must return a tensor, got {type(out).__name__}")
    return y, (yd[0] if single else yd.movedim(0, 1)).contiguous()
