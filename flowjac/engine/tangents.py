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

Longer than 400 lines because the value class and its rule table are one
unit: every method of ``Joint`` calls a rule and every rule builds a
``Joint``; split, each half would reach into the other's internals.
Explained in :ref:`sec_byom`.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["Joint", "RULES", "DERIVATIVES", "joint_jvp", "check_tangents",
           "Unsupported", "NoRule"]


class Unsupported(Exception):
    """Raised inside a run: an operation the tangent-carrying value has no exact rule for; :ref:`sec_byom`."""


class _UnsupportedAttr(Unsupported, AttributeError):
    """A Tensor attribute the tangent-carrying value does not offer."""


class NoRule(ValueError):
    """joint_jvp's error: the model used an operation without a tangent rule; :ref:`sec_byom`."""


# ---------------------------------------------------------------------------
# the tangent-carrying value

def _ax(d: int, n: int) -> int:
    """Primal axis d of a rank-n value, made non-negative."""
    d = int(d)
    if not -n <= d < max(n, 1):
        raise Unsupported(f"dimension {d} out of range for rank {n}")
    return d + n if d < 0 else d


def _sizes(args) -> tuple:
    if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)):
        return tuple(args[0])
    return tuple(args)


def _rank(v) -> int:
    return v.ndim if isinstance(v, Joint) or torch.is_tensor(v) else 0


def _lift(t: torch.Tensor, ndim: int, rank: int) -> torch.Tensor:
    """Tangents ``(k, *shape)`` of a rank-ndim value, aligned for broadcasting at rank."""
    return t[(slice(None),) + (None,) * (rank - ndim)] if rank > ndim else t


def _primal(v):
    return v.p if isinstance(v, Joint) else v


def _zeros(v, like: "Joint") -> torch.Tensor:
    """The ``(k, *shape)`` zero tangents of a plain value, without allocation."""
    v = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    return v.new_zeros(()).expand(like.k, *v.shape)


def _tangents(v, like: "Joint") -> torch.Tensor:
    return v.d if isinstance(v, Joint) else _zeros(v, like)


def _flat(t: torch.Tensor, batched: bool) -> torch.Tensor:
    """Tangents (k, B, ...) with k folded into the batch axis (or k as the batch)."""
    return t.flatten(0, 1) if batched else t


def _unflat(out: torch.Tensor, k: int, batched: bool) -> torch.Tensor:
    return out.unflatten(0, (k, -1)) if batched else out


class Joint:
    """A value that depends on x: the primal ``p`` and its k tangents ``d`` ``(k, *p.shape)``; :ref:`sec_byom`.

    Presents the primal's shape, dtype and device to the model's code and
    answers every torch function through ``__torch_function__``.
    """

    __slots__ = ("p", "d")

    def __init__(self, p: torch.Tensor, d: torch.Tensor):
        self.p, self.d = p, d

    def _map(self, fn, *args, **kwargs):
        """An op that is linear in the value and acts on trailing axes."""
        return Joint(fn(self.p, *args, **kwargs), fn(self.d, *args, **kwargs))

    # metadata of the primal
    shape = property(lambda self: self.p.shape)
    ndim = property(lambda self: self.p.ndim)
    dtype = property(lambda self: self.p.dtype)
    device = property(lambda self: self.p.device)
    is_cuda = property(lambda self: self.p.is_cuda)
    requires_grad = property(lambda self: self.p.requires_grad or self.d.requires_grad)
    k = property(lambda self: self.d.shape[0])
    T = property(lambda self: self.permute(*reversed(range(self.ndim))))

    def size(self, dim=None):
        return self.p.size() if dim is None else self.p.size(dim)

    def dim(self) -> int:
        return self.p.ndim

    ndimension = dim

    def numel(self) -> int:
        return self.p.numel()

    def is_floating_point(self) -> bool:
        return self.p.is_floating_point()

    def is_contiguous(self, memory_format=None) -> bool:
        return True

    def __len__(self) -> int:
        return len(self.p)

    def __repr__(self) -> str:
        return f"Joint(shape={tuple(self.shape)}, k={self.k}, dtype={self.dtype})"

    def __bool__(self):
        raise Unsupported("bool() of an x-dependent tensor (control flow on x)")

    def __getattr__(self, name):
        raise _UnsupportedAttr(f"Tensor.{name}")

    __torch_function__ = classmethod(
        lambda cls, func, types, args=(), kwargs=None:
        _dispatch(func, args, kwargs or {}))

    def new_zeros(self, *args, **kwargs):
        return self.p.new_zeros(*args, **kwargs)

    def new_ones(self, *args, **kwargs):
        return self.p.new_ones(*args, **kwargs)

    def new_empty(self, *args, **kwargs):
        return self.p.new_empty(*args, **kwargs)

    def new_full(self, *args, **kwargs):
        return self.p.new_full(*args, **kwargs)

    def new_tensor(self, *args, **kwargs):
        return self.p.new_tensor(*args, **kwargs)

    def detach(self):
        return self.p.detach()

    # comparisons are piecewise constant in x: plain results
    def __gt__(self, other):
        return self.p > _primal(other)

    def __ge__(self, other):
        return self.p >= _primal(other)

    def __lt__(self, other):
        return self.p < _primal(other)

    def __le__(self, other):
        return self.p <= _primal(other)

    # shape operations: linear, the same on the primal and the tangents
    def reshape(self, *shape):
        shape = _sizes(shape)
        return Joint(self.p.reshape(shape), self.d.reshape(self.k, *shape))

    view = reshape

    def view_as(self, other):
        return self.reshape(other.shape)

    reshape_as = view_as

    def expand(self, *sizes):
        sizes = _sizes(sizes)
        return Joint(self.p.expand(*sizes),
                      _lift(self.d, self.ndim, len(sizes)).expand(self.k, *sizes))

    def expand_as(self, other):
        return self.expand(*other.shape)

    def repeat(self, *sizes):
        sizes = _sizes(sizes)
        return Joint(self.p.repeat(*sizes),
                      _lift(self.d, self.ndim, len(sizes)).repeat(1, *sizes))

    def permute(self, *dims):
        dims = [_ax(d, self.ndim) for d in _sizes(dims)]
        return Joint(self.p.permute(dims), self.d.permute(0, *[d + 1 for d in dims]))

    def transpose(self, a, b):
        a, b = _ax(a, self.ndim), _ax(b, self.ndim)
        return Joint(self.p.transpose(a, b), self.d.transpose(a + 1, b + 1))

    swapaxes = transpose

    def movedim(self, source, destination):
        src = [_ax(s, self.ndim) for s in ([source] if isinstance(source, int) else source)]
        dst = [_ax(d, self.ndim) for d in
               ([destination] if isinstance(destination, int) else destination)]
        return Joint(self.p.movedim(src, dst),
                      self.d.movedim([s + 1 for s in src], [d + 1 for d in dst]))

    def t(self):
        return self if self.ndim < 2 else self.transpose(0, 1)

    def flatten(self, start_dim=0, end_dim=-1):
        if self.ndim == 0:
            return self.reshape(1)
        a, b = _ax(start_dim, self.ndim), _ax(end_dim, self.ndim)
        return Joint(self.p.flatten(a, b), self.d.flatten(a + 1, b + 1))

    def unflatten(self, dim, sizes):
        d = _ax(dim, self.ndim)
        return Joint(self.p.unflatten(d, sizes), self.d.unflatten(d + 1, sizes))

    def unsqueeze(self, dim):
        d = _ax(dim, self.ndim + 1)
        return Joint(self.p.unsqueeze(d), self.d.unsqueeze(d + 1))

    def squeeze(self, dim=None):
        if dim is None:
            dims = tuple(i for i, s in enumerate(self.shape) if s == 1)
        else:
            dims = tuple(_ax(d, self.ndim) for d in ((dim,) if isinstance(dim, int) else dim))
        if not dims:
            return self
        return Joint(self.p.squeeze(dims), self.d.squeeze(tuple(d + 1 for d in dims)))

    def flip(self, *dims):
        dims = [_ax(d, self.ndim) for d in _sizes(dims)]
        return Joint(self.p.flip(dims), self.d.flip([d + 1 for d in dims]))

    def roll(self, shifts, dims=None):
        if dims is None:
            raise Unsupported("roll without dims")
        dims = [_ax(d, self.ndim) for d in ((dims,) if isinstance(dims, int) else dims)]
        return Joint(self.p.roll(shifts, dims), self.d.roll(shifts, [d + 1 for d in dims]))

    def narrow(self, dim, start, length):
        d = _ax(dim, self.ndim)
        return Joint(self.p.narrow(d, start, length), self.d.narrow(d + 1, start, length))

    def contiguous(self, memory_format=None):
        return self

    def clone(self, memory_format=None):
        return Joint(self.p.clone(), self.d.clone())

    def to(self, *args, **kwargs):
        args = tuple(a.dtype if isinstance(a, Joint) else a for a in args)
        return self._map(lambda a: a.to(*args, **kwargs))

    def type(self, dtype=None, non_blocking=False):
        if not isinstance(dtype, torch.dtype):
            raise Unsupported("Tensor.type without a torch.dtype")
        return self.to(dtype)

    def type_as(self, other):
        return self.to(other.dtype)

    def float(self):
        return self.to(torch.float32)

    def double(self):
        return self.to(torch.float64)

    def half(self):
        return self.to(torch.float16)

    def bfloat16(self):
        return self.to(torch.bfloat16)

    def __getitem__(self, idx):
        idx = idx if isinstance(idx, tuple) else (idx,)
        if any(isinstance(v, Joint) for v in idx):
            raise Unsupported("indexing by an x-dependent tensor")
        if any(torch.is_tensor(v) or isinstance(v, list) for v in idx):
            # advanced indices must stay where they are, after the slot axis too
            adv = [i for i, v in enumerate(idx) if torch.is_tensor(v) or
                   isinstance(v, (list, int))]
            if adv != list(range(adv[0], adv[0] + len(adv))) or \
                    sum(not isinstance(idx[i], int) for i in adv) > 1:
                raise Unsupported("this combination of tensor indices")
        return Joint(self.p[idx], self.d[(slice(None),) + idx])

    def __setitem__(self, idx, value):
        raise Unsupported("in-place assignment into an x-dependent tensor")

    def _parts(self, method, dim, *args):
        d = _ax(dim, self.ndim)
        return tuple(Joint(a, b) for a, b in zip(getattr(self.p, method)(*args, d),
                                                  getattr(self.d, method)(*args, d + 1)))

    def chunk(self, chunks, dim=0):
        return self._parts("chunk", dim, chunks)

    def split(self, split_size, dim=0):
        return self._parts("split", dim, split_size)

    def unbind(self, dim=0):
        return self._parts("unbind", dim)

    def _reduce(self, fn, dim, keepdim, dtype):
        if dim is None:
            dims = tuple(range(self.ndim))
        else:
            dims = tuple(_ax(d, self.ndim) for d in ((dim,) if isinstance(dim, int) else dim))
        if not dims:
            return self
        return Joint(fn(self.p, dim=dims, keepdim=keepdim, dtype=dtype),
                      fn(self.d, dim=tuple(d + 1 for d in dims), keepdim=keepdim,
                         dtype=dtype))

    def sum(self, dim=None, keepdim=False, dtype=None):
        return self._reduce(torch.sum, dim, keepdim, dtype)

    def mean(self, dim=None, keepdim=False, dtype=None):
        return self._reduce(torch.mean, dim, keepdim, dtype)

    # arithmetic
    def __add__(self, other):
        return _add(self, other)

    def __radd__(self, other):
        return _add(other, self)

    def __sub__(self, other):
        return _add(self, other, alpha=-1)

    def __rsub__(self, other):
        return _add(other, self, alpha=-1)

    def __mul__(self, other):
        return _mul(self, other)

    __rmul__ = __mul__

    def __truediv__(self, other):
        return _div(self, other)

    def __rtruediv__(self, other):
        return _div(other, self)

    def __neg__(self):
        return Joint(-self.p, -self.d)

    def __pos__(self):
        return self

    def __pow__(self, exponent):
        return _pow(self, exponent)

    def __matmul__(self, other):
        return _matmul(self, other)

    def __rmatmul__(self, other):
        return _matmul(other, self)

    def add(self, other, alpha=1):
        return _add(self, other, alpha=alpha)

    def sub(self, other, alpha=1):
        return _add(self, other, alpha=-alpha)

    def mul(self, other):
        return _mul(self, other)

    def div(self, other):
        return _div(self, other)

    def matmul(self, other):
        return _matmul(self, other)

    def pow(self, exponent):
        return _pow(self, exponent)

    def square(self):
        return _pow(self, 2)

    # in place: the value object is updated, so that aliases of it see it
    def _become(self, other: "Joint") -> "Joint":
        self.p, self.d = other.p, other.d
        return self

    def __iadd__(self, other):
        return self._become(_add(self, other))

    def __isub__(self, other):
        return self._become(_add(self, other, alpha=-1))

    def __imul__(self, other):
        return self._become(_mul(self, other))

    def __itruediv__(self, other):
        return self._become(_div(self, other))

    # pointwise functions as methods
    def sigmoid(self):
        return _unary(torch.sigmoid, self)

    def tanh(self):
        return _unary(torch.tanh, self)

    def exp(self):
        return _unary(torch.exp, self)

    def sin(self):
        return _unary(torch.sin, self)

    def cos(self):
        return _unary(torch.cos, self)

    def sqrt(self):
        return _unary(torch.sqrt, self)

    def rsqrt(self):
        return _unary(torch.rsqrt, self)

    def relu(self):
        return _unary(torch.relu, self)

    def abs(self):
        return _unary(torch.abs, self)

    def clamp(self, min=None, max=None):
        return _clamp(self, min, max)

    def softmax(self, dim, dtype=None):
        return _softmax(self, dim, dtype=dtype)


# ---------------------------------------------------------------------------
# tangent rules

def _add(a, b, alpha=1):
    rank = max(_rank(a), _rank(b))
    p = torch.add(_primal(a), _primal(b), alpha=alpha)
    if isinstance(a, Joint) and isinstance(b, Joint):
        t = torch.add(_lift(a.d, a.ndim, rank), _lift(b.d, b.ndim, rank), alpha=alpha)
    elif isinstance(a, Joint):
        t = _lift(a.d, a.ndim, rank)
    else:
        t = _lift(b.d, b.ndim, rank)
        t = t if alpha == 1 else alpha * t
    return Joint(p, t.expand(t.shape[0], *p.shape))


def _mul(a, b):
    rank = max(_rank(a), _rank(b))
    if isinstance(a, Joint) and isinstance(b, Joint):
        ta, tb = _lift(a.d, a.ndim, rank), _lift(b.d, b.ndim, rank)
        return Joint(a.p * b.p, torch.addcmul(ta * b.p, a.p, tb))
    if isinstance(b, Joint):
        a, b = b, a
    return Joint(a.p * b, _lift(a.d, a.ndim, rank) * b)


def _div(a, b):
    rank = max(_rank(a), _rank(b))
    if not isinstance(b, Joint):
        return Joint(a.p / b, _lift(a.d, a.ndim, rank) / b)
    p = _primal(a) / b.p
    t = -p * _lift(b.d, b.ndim, rank)
    if isinstance(a, Joint):
        t = t + _lift(a.d, a.ndim, rank)
    return Joint(p, t / b.p)


def _pow(j, exponent):
    if isinstance(exponent, Joint) or not isinstance(j, Joint):
        raise Unsupported("an x-dependent exponent")
    return Joint(j.p ** exponent, j.d * (exponent * j.p ** (exponent - 1)))


def _matmul(a, b):
    if isinstance(b, Joint) and b.ndim < 2:
        raise Unsupported("matmul with an x-dependent vector on the right")
    p = torch.matmul(_primal(a), _primal(b))
    if isinstance(a, Joint) and isinstance(b, Joint):
        return Joint(p, torch.matmul(a.d, b.p) + torch.matmul(a.p, b.d))
    if isinstance(a, Joint):
        return Joint(p, torch.matmul(a.d, b))
    return Joint(p, torch.matmul(a, b.d))


def _unary(fn, j, *args, **kwargs):
    p = fn(j.p, *args, **kwargs)
    return Joint(p, j.d * DERIVATIVES[fn](j.p, p, *args, **kwargs))


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
    F.gelu: _gelu_deriv,
    F.softplus: _softplus_deriv,
    F.leaky_relu: _leaky_deriv,
    F.selu: _selu_deriv,
    torch.selu: _selu_deriv,
    F.elu: lambda x0, y, alpha=1.0: torch.where(x0 > 0, torch.ones_like(x0), y + alpha),
    F.tanh: lambda x0, y: (y * y).neg_().add_(1),
    F.sigmoid: lambda x0, y: torch.addcmul(y, y, y, value=-1),
}


def _unary_rule(fn):
    def rule(input, *args, **kwargs):
        inplace = kwargs.pop("inplace", False)
        if fn is F.selu and args:           # F.selu(input, inplace)
            inplace, args = bool(args[0]), args[1:]
        out = _unary(fn, input, *args, **kwargs)
        return input._become(out) if inplace else out   # torch's aliasing
    return rule


def _softmax(j, dim, _stacklevel=3, dtype=None):
    if dtype is not None:
        j = j.to(dtype)
    p = torch.softmax(j.p, dim)
    d = _ax(dim, j.ndim) + 1
    pt = p * j.d
    return Joint(p, pt.addcmul_(p, pt.sum(d, keepdim=True), value=-1))


def _log_softmax(j, dim, _stacklevel=3, dtype=None):
    if dtype is not None:
        j = j.to(dtype)
    p = torch.log_softmax(j.p, dim)
    d = _ax(dim, j.ndim) + 1
    return Joint(p, j.d - (p.exp() * j.d).sum(d, keepdim=True))


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


def _normalized(j: Joint, p, mean, rstd, groups, weight, wshape) -> Joint:
    """Tangents of (x - mean) rstd weight, statistics over the last axis of the
    primal viewed as ``groups``: rstd (t - mean(t) - z mean(z t)) weight."""
    mean, rstd = mean.reshape(*groups[:-1], 1), rstd.reshape(*groups[:-1], 1)
    z = (j.p.reshape(groups) - mean) * rstd
    t = j.d.reshape(j.k, *groups)
    zt = (z * t).mean(-1, keepdim=True)
    td = torch.addcmul(t - t.mean(-1, keepdim=True), z, zt, value=-1) * rstd
    td = td.reshape(j.d.shape)
    return Joint(p, td if weight is None else td * weight.reshape(wshape))


def _group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    n, c = input.shape[:2]
    p, mean, rstd = torch.native_group_norm(
        input.p.contiguous(), weight, bias, n, c, input.p[0, 0].numel(), num_groups, eps)
    return _normalized(input, p, mean, rstd, (n, num_groups, -1), weight,
                       (-1,) + (1,) * (input.ndim - 2))


def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    shape = tuple(normalized_shape)
    p, mean, rstd = torch.native_layer_norm(input.p, shape, weight, bias, eps)
    lead = input.shape[:input.ndim - len(shape)]
    return _normalized(input, p, mean, rstd, (*lead, -1), weight, shape)


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


def _clamp(input, min=None, max=None):
    keep = torch.ones_like(input.p, dtype=torch.bool)
    if min is not None:
        keep = keep & (input.p >= min)
    if max is not None:
        keep = keep & (input.p <= max)
    return Joint(torch.clamp(input.p, min, max), input.d * keep.to(input.dtype))


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


#: The tangent rule of each torch function the engine follows: ``fn -> rule(*args, **kwargs)``.
RULES = _build_rules()


def _dispatch(func, args, kwargs):
    rule = RULES.get(func)
    if rule is None:
        name = getattr(func, "__qualname__", None) or getattr(func, "__name__", func)
        raise Unsupported(f"no tangent rule for {name}")
    return rule(*args, **kwargs)


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
