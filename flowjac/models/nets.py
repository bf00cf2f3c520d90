"""Velocity networks whose exact tangents come from the engine's rules.

``MLPFlow`` (vectors) and ``FlowUNet`` (images) both provide

* ``forward(x, t)``: the velocity (or the x1 prediction), with ``t`` a
  scalar, a 0-dim tensor or a ``(B,)`` tensor;
* ``forward_jvp(x, t, tangents)``: ``(forward(x, t), D_x forward(x, t) v)``
  for ``tangents`` shaped like ``x`` or ``(B, k, *x.shape[1:])``.

``forward_jvp`` runs the network's own forward code once on the engine's
tangent-carrying value (``flowjac.engine.tangents.joint_jvp``): the primal
is computed once for all k probes, by the same operations as ``forward``
(so it equals ``forward``'s output bit for bit), and every linear operation
(linear and convolution weights, padding, resampling, skips, sums) acts on
the k tangents in one batched call; GroupNorm and SiLU use their derivatives
at the primal. These are the engine's rules, the same ones that serve
third-party networks (``flowjac.models.adapters``); the networks write no
tangent of their own. The cost is close to (1 + k) forward passes
(``benchmarks/jvp_cost.py``). ``torch.func.jvp`` of ``forward`` stays
available and is the reference the tests compare against. We avoid
BatchNorm (breaks vmap, couples the batch), fused attention (no forward AD
in torch.func) and ``nn.GroupNorm`` under ``torch.func`` forward AD (about a
hundred times its forward pass on CPU; measured in ``benchmarks/jvp.py``).

Convolution and linear biases are added after the product, and SiLU is
x sigmoid(x) (``flowjac.engine.tangents_pointwise.silu_unfused``, not
``F.silu``'s fused kernel): the shipped weights' samples depend on these
roundings, so they stay as they were when the networks were trained.

Explained in :ref:`sec_neural_gaussian` (MLP) and :ref:`sec_mnist` (UNet).
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F

from flowjac._checks import check_int, check_number
from flowjac.engine.tangents import joint_jvp
from flowjac.engine.tangents_pointwise import silu_unfused as _silu

__all__ = ["timestep_embedding", "MLPFlow", "FlowUNet"]


def _linear(x, layer: nn.Linear):
    return F.linear(x, layer.weight) + layer.bias


def _conv(x, conv: nn.Conv2d):
    return F.conv2d(x, conv.weight, None, conv.stride, conv.padding) + \
        conv.bias.view(-1, 1, 1)


def _norm(x, norm: nn.GroupNorm):
    return F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)


def timestep_embedding(t: torch.Tensor, dim: int, scale: float = 1000.0,
                       max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos(scale t f_i), sin(scale t f_i)] of t (B,) -> (B, dim); :ref:`sec_neural_gaussian`.

    Frequencies f_i = max_period^(-i / half), i < half = dim // 2 (the
    transformer/DDPM convention; ``scale=1000`` maps t in [0, 1] to the
    usual integer-step range).
    """
    dim = check_int("dim", dim, minimum=2)
    if dim % 2:
        raise ValueError(f"dim must be even, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(
        half, dtype=t.dtype, device=t.device) / half)
    args = (scale * t)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _batch_t(t, bsz: int, like: torch.Tensor) -> torch.Tensor:
    if not (torch.is_tensor(t) or (isinstance(t, numbers.Real)
                                   and not isinstance(t, bool))):
        raise ValueError(f"t must be a number or a tensor, got {t!r}")
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.ndim == 0 or t.numel() == 1:
        return t.reshape(()).expand(bsz)
    if t.ndim == 1 and t.shape[0] == bsz:
        return t
    raise ValueError(f"t must be a scalar or have shape ({bsz},), got "
                     f"{tuple(t.shape)}")


def _check_dtype(net: nn.Module, x) -> None:
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise ValueError("x must be a floating tensor, got "
                         f"{getattr(x, 'dtype', type(x).__name__)}")
    w = next(net.parameters(), None)
    if w is not None and w.dtype != x.dtype:
        raise ValueError(f"x has dtype {x.dtype} but the network's weights are "
                         f"{w.dtype}; convert one of them (x.to({w.dtype}) or "
                         f"net.to({x.dtype}))")


class _Velocity(nn.Module):
    """forward / forward_jvp on top of a ``_forward(x, t[, cond])`` implementation."""

    event_ndim = 1

    num_labels = 0

    def _cond(self, cond, x, unbatched):
        """The label code (B, num_labels) in {-1, 0, +1}, or None."""
        if cond is None:
            return None
        if not self.num_labels:
            raise ValueError("cond is only accepted by a network built with "
                             "num_labels > 0")
        cond = torch.as_tensor(cond, device=x.device)
        if unbatched:
            cond = cond.unsqueeze(0)
        if cond.ndim != 2 or cond.shape[1] != self.num_labels or \
                cond.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"cond must have shape (B, {self.num_labels}) with "
                             f"B = {x.shape[0]} or 1, got {tuple(cond.shape)}")
        return cond.to(x.dtype).expand(x.shape[0], -1)

    def forward(self, x: torch.Tensor, t, cond=None) -> torch.Tensor:
        unbatched = self._check_x(x)
        if unbatched:
            x = x.unsqueeze(0)
        tb = _batch_t(t, x.shape[0], x)
        cond = self._cond(cond, x, unbatched)
        y = self._forward(x, tb) if cond is None else self._forward(x, tb, cond)
        return y[0] if unbatched else y

    def forward_jvp(self, x: torch.Tensor, t, tangents: torch.Tensor,
                    cond=None):
        """Return (forward(x, t), D_x forward(x, t) tangents), primal once for k probes, by the engine's rules."""
        unbatched = self._check_x(x)
        if unbatched:
            x, tangents = x.unsqueeze(0), tangents.unsqueeze(0)
        cond = self._cond(cond, x, unbatched)
        tb = _batch_t(t, x.shape[0], x)
        extra = () if cond is None else (cond,)
        y, yd = joint_jvp(lambda z: self._forward(z, tb, *extra), x,
                          tangents.to(x.dtype))
        return (y[0], yd[0]) if unbatched else (y, yd)


class MLPFlow(_Velocity):
    """MLP velocity field v(x, t) on R^dim with a sinusoidal time embedding; :ref:`sec_neural_gaussian`.

    ``depth`` hidden layers of width ``hidden`` with SiLU activations; the
    input is [x, emb(t)] with ``emb`` the sinusoidal embedding of dimension
    ``time_dim`` (frequencies up to ``time_scale`` radians per unit t).
    Forward-AD friendly: ``forward_jvp`` propagates k tangents with the
    primal computed once.
    """

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3,
                 time_dim: int = 32, time_scale: float = 10.0):
        super().__init__()
        self.dim = check_int("dim", dim, minimum=1)
        check_int("hidden", hidden, minimum=1)
        check_int("depth", depth, minimum=1)
        check_int("time_dim", time_dim, minimum=2)
        if time_dim % 2:
            raise ValueError(f"time_dim must be even, got {time_dim}")
        time_scale = check_number("time_scale", time_scale, minimum=0,
                                  strict_min=True)
        self.time_dim, self.time_scale = time_dim, float(time_scale)
        self.config = dict(dim=dim, hidden=hidden, depth=depth,
                           time_dim=time_dim, time_scale=float(time_scale))
        self.inp = nn.Linear(dim + time_dim, hidden)
        self.hidden = nn.ModuleList(
            nn.Linear(hidden, hidden) for _ in range(depth - 1))
        self.out = nn.Linear(hidden, dim)

    def _check_x(self, x) -> bool:
        _check_dtype(self, x)
        if x.ndim not in (1, 2) or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (B, {self.dim}) or "
                             f"({self.dim},), got {tuple(x.shape)}")
        return x.ndim == 1

    def _forward(self, x, t):
        emb = timestep_embedding(t, self.time_dim, scale=self.time_scale)
        w = self.inp.weight
        h = F.linear(x, w[:, :self.dim]) + F.linear(emb, w[:, self.dim:], self.inp.bias)
        h = _silu(h)
        for layer in self.hidden:
            h = _silu(_linear(h, layer))
        return _linear(h, self.out)


class _ResBlock(nn.Module):
    def __init__(self, cin, cout, emb_dim, groups):
        super().__init__()
        self.groups = groups
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, emb):
        h = _conv(_silu(_norm(x, self.norm1)), self.conv1)
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = _conv(_silu(_norm(h, self.norm2)), self.conv2)
        return h + (x if self.skip is None else _conv(x, self.skip))


class FlowUNet(_Velocity):
    """UNet velocity field for images with skips and a sinusoidal time MLP; :ref:`sec_mnist`.

    The paper's baseline: a sinusoidal time embedding of dimension
    ``time_dim`` followed by an MLP, ``base_channels`` channels at the top
    level, ``channel_mult`` per resolution (one 2x down/up-sampling between
    levels), ``num_res_blocks`` residual blocks per level, skip connections.
    Inputs of size ``image_size`` are zero-padded to a multiple of
    2^(levels - 1) and the output cropped back (28 x 28 needs no padding for
    three levels, 32 x 32 for four). ``forward_jvp`` runs this code through
    the engine's exact tangent rules; no attention, no BatchNorm.

    With ``num_labels > 0`` the network is label-conditional: ``forward(x,
    t, cond)`` takes a code ``cond`` (B, num_labels) whose entries are +1
    (attribute present), -1 (absent) or 0 (unknown; all zeros is the
    unconditional velocity used by classifier-free guidance), embedded
    linearly and added to the time embedding (:ref:`sec_interventions`).
    """

    event_ndim = 3

    def __init__(self, in_channels: int = 1, base_channels: int = 64,
                 channel_mult=(1, 2, 2), time_dim: int = 256,
                 image_size: int = 28, num_res_blocks: int = 1,
                 norm_groups: int = 8, num_labels: int = 0):
        super().__init__()
        check_int("in_channels", in_channels, minimum=1)
        self.num_labels = check_int("num_labels", num_labels, minimum=0)
        check_int("base_channels", base_channels, minimum=1)
        check_int("time_dim", time_dim, minimum=2)
        check_int("image_size", image_size, minimum=1)
        check_int("num_res_blocks", num_res_blocks, minimum=1)
        check_int("norm_groups", norm_groups, minimum=1)
        channel_mult = tuple(channel_mult)
        if not channel_mult or not all(
                isinstance(m, int) and not isinstance(m, bool) and m >= 1
                for m in channel_mult):
            raise ValueError("channel_mult must be a non-empty sequence of "
                             f"positive integers, got {channel_mult!r}")
        if time_dim % 2:
            raise ValueError(f"time_dim must be even, got {time_dim}")
        for m in channel_mult:
            if (base_channels * m) % norm_groups:
                raise ValueError(
                    f"norm_groups must divide every width base_channels * "
                    f"mult; {norm_groups} does not divide {base_channels * m}")
        self.config = dict(in_channels=in_channels,
                           base_channels=base_channels,
                           channel_mult=list(channel_mult),
                           time_dim=time_dim, image_size=image_size,
                           num_res_blocks=num_res_blocks,
                           norm_groups=norm_groups)
        if num_labels:
            self.config["num_labels"] = num_labels
        self.in_channels, self.image_size = in_channels, image_size
        self.time_dim, self.groups = time_dim, norm_groups
        factor = 2 ** (len(channel_mult) - 1)
        padded = -(-image_size // factor) * factor
        self.pad = ((padded - image_size) // 2,
                    padded - image_size - (padded - image_size) // 2)
        emb_dim = 4 * base_channels
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, emb_dim), nn.SiLU(),
                                      nn.Linear(emb_dim, emb_dim))
        if num_labels:
            self.label_emb = nn.Linear(num_labels, emb_dim)
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        chans, ch = [base_channels], base_channels
        for i, m in enumerate(channel_mult):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(_ResBlock(ch, base_channels * m, emb_dim,
                                        norm_groups))
                ch = base_channels * m
                chans.append(ch)
            self.down.append(blocks)
            if i < len(channel_mult) - 1:
                self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2,
                                                 padding=1))
                chans.append(ch)
        self.mid = nn.ModuleList([_ResBlock(ch, ch, emb_dim, norm_groups),
                                  _ResBlock(ch, ch, emb_dim, norm_groups)])
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i, m in reversed(list(enumerate(channel_mult))):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                blocks.append(_ResBlock(ch + chans.pop(), base_channels * m,
                                        emb_dim, norm_groups))
                ch = base_channels * m
            self.up.append(blocks)
            if i > 0:
                self.upsample.append(nn.Conv2d(ch, ch, 3, padding=1))
        self.norm_out = nn.GroupNorm(norm_groups, ch)
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)

    def _check_x(self, x) -> bool:
        _check_dtype(self, x)
        event = (self.in_channels, self.image_size, self.image_size)
        if x.ndim not in (3, 4) or tuple(x.shape[-3:]) != event:
            raise ValueError(f"x must have shape (B, {event[0]}, {event[1]}, "
                             f"{event[2]}) or {event}, got {tuple(x.shape)}")
        return x.ndim == 3

    def _forward(self, x, t, cond=None):
        emb = self.time_mlp(timestep_embedding(t, self.time_dim))
        if self.num_labels:
            emb = emb + self.label_emb(
                torch.zeros(len(emb), self.num_labels, dtype=emb.dtype,
                            device=emb.device) if cond is None else cond)
        p0, p1 = self.pad
        if p0 or p1:
            x = F.pad(x, (p0, p1, p0, p1))
        h = _conv(x, self.conv_in)
        skips = [h]
        for i, blocks in enumerate(self.down):
            for block in blocks:
                h = block(h, emb)
                skips.append(h)
            if i < len(self.downsample):
                h = _conv(h, self.downsample[i])
                skips.append(h)
        for block in self.mid:
            h = block(h, emb)
        for i, blocks in enumerate(self.up):
            for block in blocks:
                h = block(torch.cat([h, skips.pop()], 1), emb)
            if i < len(self.upsample):
                h = F.interpolate(h, scale_factor=2, mode="nearest")
                h = _conv(h, self.upsample[i])
        h = _conv(_silu(_norm(h, self.norm_out)), self.conv_out)
        if p0 or p1:
            s = self.image_size
            h = h[..., p0:p0 + s, p0:p0 + s]
        return h
