"""The SCM image renderer and its Dataset: each attribute changes something visible.

``render(labels)`` draws 9-attribute label rows (SCM order,
``flowjac.causal.scm.ATTRIBUTES``) as RGB images in [0, 1]: background
colour (C), shape (A), colour (B), size (X), stripes (Y), frame (Z),
position (P), marker (M) and height (Q), with jitter so that images vary
within one configuration. ``SCMImages`` samples labels from an SCM and
renders them. Explained in :ref:`sec_causal_structures`.
"""
from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset

from flowjac._checks import check_int, check_number
from flowjac.causal.scm import ATTRIBUTES, BinarySCM, default_scm

__all__ = ["render", "SCMImages"]


_BG = torch.tensor([[0.12, 0.16, 0.40], [0.92, 0.80, 0.55]])   # C: cool / warm
_FG = torch.tensor([[0.15, 0.75, 0.25], [0.90, 0.15, 0.10]])   # B: green / red
_FRAME = torch.tensor([0.85, 0.25, 0.90])                       # Z: magenta
_MARK = torch.tensor([0.10, 0.95, 0.95])                        # M: cyan dot


def render(labels: torch.Tensor, size: int = 32,
           generator: torch.Generator | None = None,
           noise: float = 0.03) -> torch.Tensor:
    """Render label vectors (n, 9) as RGB images (n, 3, size, size) in [0, 1]; :ref:`sec_causal_structures`.

    C: background warm/cool; A: square/circle; B: red/green; X: large/small;
    Y: striped/plain; Z: magenta frame; P: object right/left; M: cyan
    marker dot; Q: object low/high. Position, size, colour and stripe phase
    are jittered and pixel noise of standard deviation ``noise`` is added.
    """
    size = check_int("size", size, minimum=8)
    if not torch.is_tensor(labels) or labels.ndim != 2 or \
            labels.shape[1] != len(ATTRIBUTES):
        raise ValueError(f"labels must be a (n, {len(ATTRIBUTES)}) tensor, got "
                         f"{getattr(labels, 'shape', type(labels))}")
    if not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError("labels must hold only 0 and 1")
    noise = check_number("noise", noise, minimum=0)
    lab = labels.long()
    n = lab.shape[0]
    C, A, B, X, Y, Z, P, M, Q = lab.unbind(1)
    g = generator

    def jitter(scale, *shape):
        return (torch.rand(n, *shape, generator=g) * 2 - 1) * scale

    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    yy, xx = coords[None, :, None], coords[None, None, :]
    sharp = size * 1.5                      # soft edges about 2/3 pixel wide

    bg = _BG[C] + jitter(0.05, 3)
    img = bg[:, :, None, None].expand(n, 3, size, size).clone()

    cx = (0.36 + 0.28 * P.float() + jitter(0.03))[:, None, None]
    cy = (0.38 + 0.24 * Q.float() + jitter(0.03))[:, None, None]
    r = (0.17 + 0.11 * X.float() + jitter(0.015))[:, None, None]
    dx, dy = xx - cx, yy - cy
    sd_circle = r - torch.sqrt(dx ** 2 + dy ** 2)
    sd_square = r - torch.maximum(dx.abs(), dy.abs())
    sd = torch.where(A.bool()[:, None, None], sd_square, sd_circle)
    obj = torch.sigmoid(sd * sharp)[:, None]
    fg = (_FG[B] + jitter(0.05, 3))[:, :, None, None]
    phase = torch.rand(n, 1, 1, generator=g) * 2 * math.pi
    stripe = 0.5 + 0.5 * torch.sin(2 * math.pi * 5.0 * (xx + yy) + phase)
    shade = 1.0 - 0.6 * Y.float()[:, None, None] * torch.sigmoid(
        (stripe - 0.5) * 8.0)
    img = img * (1 - obj) + fg * shade[:, None] * obj

    w = 0.07
    edge = torch.minimum(torch.minimum(xx, 1 - xx), torch.minimum(yy, 1 - yy))
    frame = torch.sigmoid((w - edge) * sharp)[:, None] * Z.float()[:, None, None, None]
    img = img * (1 - frame) + _FRAME[None, :, None, None] * frame

    mr = 0.075
    md = mr - torch.sqrt((xx - 0.17) ** 2 + (yy - 0.83) ** 2)
    mark = torch.sigmoid(md * sharp)[None] * M.float()[:, None, None, None]
    img = img * (1 - mark) + _MARK[None, :, None, None] * mark

    if noise > 0:
        img = img + noise * torch.randn(img.shape, generator=g)
    return img.clamp(0.0, 1.0)


class SCMImages(Dataset):
    """A torch Dataset of rendered SCM images and their labels, deterministic from a seed; :ref:`sec_causal_structures`.

    ``ds[i]`` is ``(image (3, size, size) float32 in [0, 1], labels (9,) int64)``;
    ``ds.images`` and ``ds.labels`` hold everything at once.
    """

    def __init__(self, n: int, size: int = 32, seed: int = 0,
                 scm: BinarySCM | None = None, noise: float = 0.03):
        n = check_int("n", n, minimum=1)
        size = check_int("size", size, minimum=8)
        seed = check_int("seed", seed, minimum=0)
        self.scm = scm or default_scm()
        self.size, self.seed = size, seed
        g = torch.Generator().manual_seed(seed)
        self.labels = self.scm.sample(n, generator=g)
        chunks = [render(self.labels[i:i + 2048], size, generator=g, noise=noise)
                  for i in range(0, n, 2048)]
        self.images = torch.cat(chunks)
        self.attr_names = list(self.scm.nodes)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i):
        return self.images[i], self.labels[i]
