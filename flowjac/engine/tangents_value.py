"""The tangent-carrying value of the forward-mode engine and its algebra.

``Joint`` holds a primal ``p`` and its k tangents ``d`` stacked as
``(k, *p.shape)``; it presents the primal's shape, dtype and device to a
model's code, carries the tangents through every shape operation, and sends
every torch function applied to it (``__torch_function__``) to its rule in
``RULES``. The arithmetic, matmul, pointwise and softmax rules its own
methods call live here beside it; the rules of the layers (linear,
convolution, normalisation, resampling, attention, ...) and ``joint_jvp``
live in ``flowjac.engine.tangents``, which fills ``RULES`` when it is
imported (the package ``flowjac.engine`` imports it, so the table is full
whenever any engine module is). ``Unsupported`` is raised inside a run for
an operation without a rule, ``NoRule`` out of ``joint_jvp``.

Longer than 400 lines because the value class is one unit: its shape
operations, arithmetic and in-place updates all build ``Joint`` values the
same way, and the rules its methods call share its helpers (``_lift``,
``_ax``); split, each half would reach into the other's internals.
Explained in :ref:`sec_byom`.
"""
from __future__ import annotations

import torch

from flowjac.engine.tangents_pointwise import DERIVATIVES

__all__ = ["Joint", "RULES", "Unsupported", "NoRule"]


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


def _clamp(input, min=None, max=None):
    keep = torch.ones_like(input.p, dtype=torch.bool)
    if min is not None:
        keep = keep & (input.p >= min)
    if max is not None:
        keep = keep & (input.p <= max)
    return Joint(torch.clamp(input.p, min, max), input.d * keep.to(input.dtype))


#: The tangent rule of each torch function the engine follows: ``fn -> rule(*args, **kwargs)``;
#: filled by ``flowjac.engine.tangents`` with the rules of every function it lists.
RULES: dict = {}


def _dispatch(func, args, kwargs):
    rule = RULES.get(func)
    if rule is None:
        name = getattr(func, "__qualname__", None) or getattr(func, "__name__", func)
        raise Unsupported(f"no tangent rule for {name}")
    return rule(*args, **kwargs)
