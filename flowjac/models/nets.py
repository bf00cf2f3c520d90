"""Velocity networks with fast, exact forward-mode tangents.

``MLPFlow`` (vectors) and ``FlowUNet`` (images) both provide

* ``forward(x, t)``: the velocity (or the x1 prediction), with ``t`` a
  scalar, a 0-dim tensor or a ``(B,)`` tensor;
* ``forward_jvp(x, t, tangents)``: ``(forward(x, t), D_x forward(x, t) v)``
  for ``tangents`` shaped like ``x`` or ``(B, k, *x.shape[1:])``.

``forward_jvp`` is hand-written tangent propagation, not an approximation:
the network runs on a *joint* tensor ``Z`` of shape ``(B, 1 + k, ...)`` whose
slot 0 is the primal and slots 1..k the tangents. Every linear operation
(linear and convolution weights, padding, resampling, skips, sums) is applied
to all slots in one batched call; biases and the time embedding go to slot 0
only; the two nonlinear operations use their derivatives at the primal:

* SiLU: y = x s(x), y_dot = x_dot s (1 + x (1 - s)) with s the sigmoid;
* GroupNorm: z = (x - m) r with r = (var + eps)^(-1/2); with
  d = x_dot - mean(x_dot), z_dot = r (d - z mean(z d)) per group.

So the primal is computed once for all k probes, and the cost is close to
(1 + k) forward passes. ``torch.func.jvp`` of ``forward`` stays available
and is the reference the tests compare against. We avoid BatchNorm (breaks
vmap, couples the batch), fused attention (no forward AD) and
``nn.GroupNorm`` under forward AD (about a hundred times its forward pass on
CPU; measured in ``benchmarks/jvp.py``).

Explained in :ref:`sec_neural_gaussian` (MLP) and :ref:`sec_mnist` (UNet).

Longer than 400 lines because the two networks share the joint (primal,
tangent) helpers; splitting them would separate each network from the
tangent rules it relies on.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F

from flowjac._checks import check_int, check_number

__all__ = ["timestep_embedding", "MLPFlow", "FlowUNet", "joint_silu",
           "joint_group_norm"]


# ---------------------------------------------------------------------------
# joint (primal, tangents) helpers: Z has shape (B, 1 + k, ...)

def _add_primal(z: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Add b (broadcastable to (B, 1, ...)) to slot 0 of Z only."""
    k1 = z.shape[1]
    if k1 == 1:
        return z + b
    mask = torch.zeros(k1, dtype=z.dtype, device=z.device)
    mask[0] = 1
    return z + b * mask.view(1, k1, *([1] * (z.ndim - 2)))


def joint_silu(z: torch.Tensor) -> torch.Tensor:
    """SiLU of slot 0 and its exact tangent on slots 1..k; :ref:`sec_neural_gaussian`."""
    x = z[:, :1]
    s = torch.sigmoid(x)
    y = x * s
    if z.shape[1] == 1:
        return y
    return torch.cat([y, z[:, 1:] * (s * (1 + x * (1 - s)))], 1)


def joint_group_norm(z: torch.Tensor, num_groups: int, weight: torch.Tensor,
                     bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """GroupNorm of slot 0 with exact tangents on slots 1..k; :ref:`sec_mnist`.

    ``z`` has shape (B, 1 + k, C, ...). With one slot it is
    ``F.group_norm`` itself (fused, fast).
    """
    bsz, k1, c = z.shape[:3]
    shape_c = (c,) + (1,) * (z.ndim - 3)
    if k1 == 1:
        y = F.group_norm(z[:, 0], num_groups, weight, bias, eps)
        return y.unsqueeze(1)
    y = z.reshape(bsz, k1, num_groups, -1)
    xc = y[:, :1] - y[:, :1].mean(-1, keepdim=True)
    r = torch.rsqrt((xc * xc).mean(-1, keepdim=True) + eps)
    zn = xc * r
    d = y[:, 1:] - y[:, 1:].mean(-1, keepdim=True)
    zd = r * (d - zn * (zn * d).mean(-1, keepdim=True))
    out = torch.cat([zn, zd], 1).reshape(z.shape) * weight.view(shape_c)
    return _add_primal(out, bias.view(shape_c))


def _joint_linear(z, layer: nn.Linear):
    return _add_primal(F.linear(z, layer.weight), layer.bias)


def _joint_conv(z, conv: nn.Conv2d):
    bsz, k1 = z.shape[:2]
    out = F.conv2d(z.flatten(0, 1), conv.weight, None, conv.stride,
                   conv.padding)
    out = out.view(bsz, k1, *out.shape[1:])
    return _add_primal(out, conv.bias.view(-1, 1, 1))


def _apply_flat(z, fn):
    """Apply a linear, batch-wise map to every slot at once."""
    bsz, k1 = z.shape[:2]
    out = fn(z.flatten(0, 1))
    return out.view(bsz, k1, *out.shape[1:])


# ---------------------------------------------------------------------------

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


class _JointModule(nn.Module):
    """forward / forward_jvp on top of a ``_joint(z, t)`` implementation."""

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
        y = (self._joint(x.unsqueeze(1), tb) if cond is None else
             self._joint(x.unsqueeze(1), tb, cond))[:, 0]
        return y[0] if unbatched else y

    def forward_jvp(self, x: torch.Tensor, t, tangents: torch.Tensor,
                    cond=None):
        """Return (forward(x, t), D_x forward(x, t) tangents), primal once for k probes."""
        unbatched = self._check_x(x)
        if unbatched:
            x, tangents = x.unsqueeze(0), tangents.unsqueeze(0)
        cond = self._cond(cond, x, unbatched)
        if tangents.shape == x.shape:
            single, tv = True, tangents.unsqueeze(1)
        elif (tangents.ndim == x.ndim + 1 and tangents.shape[0] == x.shape[0]
              and tangents.shape[2:] == x.shape[1:]):
            single, tv = False, tangents
        else:
            raise ValueError(
                f"tangents must have shape {tuple(x.shape)} or "
                f"{(x.shape[0], 'k', *x.shape[1:])}, got "
                f"{tuple(tangents.shape)}")
        tb = _batch_t(t, x.shape[0], x)
        zin = torch.cat([x.unsqueeze(1), tv.to(x.dtype)], 1)
        z = self._joint(zin, tb) if cond is None else self._joint(zin, tb, cond)
        y, yd = z[:, 0], z[:, 1:]
        if single:
            yd = yd[:, 0]
        if unbatched:
            y, yd = y[0], yd[0]
        return y, yd


class MLPFlow(_JointModule):
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

    def _joint(self, z, t):
        emb = timestep_embedding(t, self.time_dim, scale=self.time_scale)
        w = self.inp.weight
        h = F.linear(z, w[:, :self.dim])
        h = _add_primal(h, F.linear(emb, w[:, self.dim:], self.inp.bias)[:, None])
        h = joint_silu(h)
        for layer in self.hidden:
            h = joint_silu(_joint_linear(h, layer))
        return _joint_linear(h, self.out)


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

    def forward(self, z, emb):
        n1, n2 = self.norm1, self.norm2
        h = joint_silu(joint_group_norm(z, self.groups, n1.weight, n1.bias,
                                        n1.eps))
        h = _joint_conv(h, self.conv1)
        h = _add_primal(h, self.emb(F.silu(emb))[:, None, :, None, None])
        h = joint_silu(joint_group_norm(h, self.groups, n2.weight, n2.bias,
                                        n2.eps))
        h = _joint_conv(h, self.conv2)
        return h + (z if self.skip is None else _joint_conv(z, self.skip))


class FlowUNet(_JointModule):
    """UNet velocity field for images with skips and a sinusoidal time MLP; :ref:`sec_mnist`.

    The paper's baseline: a sinusoidal time embedding of dimension
    ``time_dim`` followed by an MLP, ``base_channels`` channels at the top
    level, ``channel_mult`` per resolution (one 2x down/up-sampling between
    levels), ``num_res_blocks`` residual blocks per level, skip connections.
    Inputs of size ``image_size`` are zero-padded to a multiple of
    2^(levels - 1) and the output cropped back (28 x 28 needs no padding for
    three levels, 32 x 32 for four). GroupNorm and SiLU have hand-written
    exact tangents (``forward_jvp``); no attention, no BatchNorm.

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

    def _joint(self, z, t, cond=None):
        emb = self.time_mlp(timestep_embedding(t, self.time_dim))
        if self.num_labels:
            emb = emb + self.label_emb(
                torch.zeros(len(emb), self.num_labels, dtype=emb.dtype,
                            device=emb.device) if cond is None else cond)
        p0, p1 = self.pad
        if p0 or p1:
            z = F.pad(z, (p0, p1, p0, p1))
        h = _joint_conv(z, self.conv_in)
        skips = [h]
        for i, blocks in enumerate(self.down):
            for block in blocks:
                h = block(h, emb)
                skips.append(h)
            if i < len(self.downsample):
                h = _joint_conv(h, self.downsample[i])
                skips.append(h)
        for block in self.mid:
            h = block(h, emb)
        for i, blocks in enumerate(self.up):
            for block in blocks:
                h = block(torch.cat([h, skips.pop()], 2), emb)
            if i < len(self.upsample):
                h = _apply_flat(h, lambda u: F.interpolate(
                    u, scale_factor=2, mode="nearest"))
                h = _joint_conv(h, self.upsample[i])
        n = self.norm_out
        h = joint_silu(joint_group_norm(h, self.groups, n.weight, n.bias,
                                        n.eps))
        h = _joint_conv(h, self.conv_out)
        if p0 or p1:
            s = self.image_size
            h = h[..., p0:p0 + s, p0:p0 + s]
        return h
