"""Label-conditional velocities: u(x, t, y) and the flows it defines for fixed labels.

A label-conditional network (``FlowUNet(num_labels=m)`` trained by
``train_flow(..., labels=...)``) takes a code c in {-1, 0, +1}^m: +1 for an
attribute that is present, -1 absent, 0 unknown. ``LabelVelocity`` wraps it
as ``velocity(x, t, labels)`` with labels (B, m) of 0/1, and ``given(labels)``
fixes the labels, returning an ordinary velocity ``(x, t)`` with an exact
``jvp`` that every solver and JVP routine of the package accepts. With
``guidance`` w != 1 the velocity is classifier-free guided,
u = u(x, t, 0) + w (u(x, t, c) - u(x, t, 0)).

Explained in :ref:`sec_interventions`.
"""
from __future__ import annotations

import torch

from flowjac._checks import check_int

__all__ = ["LabelVelocity", "latent_shape", "draw_latents", "sample_given"]


def _codes(labels, m: int) -> torch.Tensor:
    labels = torch.as_tensor(labels)
    if labels.ndim == 1:
        labels = labels[None]
    if labels.ndim != 2 or labels.shape[1] != m:
        raise ValueError(f"labels must have shape (B, {m}) or ({m},), got "
                         f"{tuple(labels.shape)}")
    if labels.is_floating_point() and not bool(torch.isfinite(labels).all()):
        raise ValueError("labels must be 0 or 1, got non-finite values")
    if not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError("labels must be 0 or 1")
    return 2 * labels.float() - 1


class LabelVelocity:
    """``velocity(x, t, labels)`` of a label-conditional network; :ref:`sec_interventions`."""

    def __init__(self, model: torch.nn.Module):
        m = getattr(model, "num_labels", 0)
        if not m:
            raise ValueError("model must be a label-conditional network "
                             "(num_labels > 0)")
        self.model, self.num_labels = model, m

    def __call__(self, x: torch.Tensor, t, labels) -> torch.Tensor:
        return self.given(labels)(x, t)

    def unconditional(self) -> "_Given":
        """The unconditional velocity u(x, t, 0) the same network learned by label dropout."""
        return _Given(self.model, torch.zeros(1, self.num_labels), 1.0)

    def given(self, labels, guidance: float = 1.0) -> "_Given":
        """The velocity (x, t) for fixed labels (B, m) or (m,), optionally guided."""
        if not (isinstance(guidance, (int, float)) and guidance >= 0):
            raise ValueError(f"guidance must be a number >= 0, got {guidance!r}")
        return _Given(self.model, _codes(labels, self.num_labels),
                      float(guidance))


class _Given:
    """u(x, t, c) for a fixed code c, with the network's exact ``jvp``."""

    def __init__(self, model, code, guidance):
        self.model, self.code, self.guidance = model, code, guidance

    def _code(self, x):
        c = self.code.to(device=x.device, dtype=x.dtype)
        n = x.shape[0] if x.ndim == len(self._event(x)) + 1 else 1
        if len(c) not in (1, n):
            raise ValueError(f"labels have {len(c)} rows but x has {n}")
        return c.expand(n, -1) if x.ndim > len(self._event(x)) else c

    def _event(self, x):
        return (self.model.in_channels, self.model.image_size,
                self.model.image_size)

    def __call__(self, x, t):
        c = self._code(x)
        if x.ndim == 3:
            c = c[0]
        v = self.model(x, t, c)
        if self.guidance == 1.0:
            return v
        v0 = self.model(x, t, torch.zeros_like(c))
        return v0 + self.guidance * (v - v0)

    def jvp(self, x, t, tangents):
        c = self._code(x)
        if x.ndim == 3:
            c = c[0]
        v, vd = self.model.forward_jvp(x, t, tangents, c)
        if self.guidance == 1.0:
            return v, vd
        v0, vd0 = self.model.forward_jvp(x, t, tangents, torch.zeros_like(c))
        w = self.guidance
        return v0 + w * (v - v0), vd0 + w * (vd - vd0)


def latent_shape(velocity: LabelVelocity) -> tuple:
    """The shape of one latent of a label-conditional velocity; :ref:`sec_interventions`."""
    m = velocity.model
    return (m.in_channels, m.image_size, m.image_size)


def draw_latents(velocity: LabelVelocity, n: int, seed: int = 0) -> torch.Tensor:
    """n latents z ~ N(0, I) from a CPU generator seeded with ``seed``; :ref:`sec_interventions`."""
    g = torch.Generator().manual_seed(check_int("seed", seed, minimum=0))
    return torch.randn(n, *latent_shape(velocity), generator=g)


def sample_given(velocity: LabelVelocity, labels, *, method: str = "midpoint",
                 steps: int = 10, guidance: float = 1.0, seed: int = 0,
                 z=None, batch_size: int = 500, device="cpu") -> torch.Tensor:
    """phi(z; labels) for each row of labels, z ~ N(0, I) seeded on the CPU (or given); :ref:`sec_interventions`."""
    from flowjac.engine.ode import integrate

    labels = torch.as_tensor(labels)
    n = len(labels)
    shape = latent_shape(velocity)
    if z is None:
        z = draw_latents(velocity, n, seed)
    elif tuple(z.shape) != (n, *shape):
        raise ValueError(f"z must have shape {(n, *shape)}, got {tuple(z.shape)}")
    out = []
    with torch.no_grad():
        for i in range(0, n, batch_size):
            v = velocity.given(labels[i:i + batch_size], guidance)
            out.append(integrate(v, z[i:i + batch_size].to(device), steps,
                                 method).cpu())
    return torch.cat(out)
