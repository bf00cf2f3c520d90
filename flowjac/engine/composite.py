"""JVPs of a classifier composed with the flow map, c(phi(z)).

The attribute JVP J_{c o phi}(z) v is one forward-mode solve of the flow
followed by the classifier's forward-mode derivative along each probe.
The true gradient norms (reverse mode through the same solver) and the
paper's directional change are computed at scale by
``flowjac.engine.probing.probe``. Explained in :ref:`sec_attributes`.
"""
from __future__ import annotations

import torch

__all__ = ["attribute_jvp"]


def attribute_jvp(velocity, classifier, z: torch.Tensor, tangents=None,
                  k: int | None = 8, steps: int = 20, method: str = "rk4",
                  generator: torch.Generator | None = None):
    """Logits c(φ(z)) (B, p) and attribute JVPs δ = J_{c∘φ}(z) v (B, k, p) by exact forward-mode AD; :ref:`sec_attributes`.

    ``tangents`` ``(B, k, *z.shape[1:])`` default to ``k`` N(0, I) probes per
    point. The flow's JVP is one batched forward-mode solve; the classifier
    is then differentiated forward along every probe.
    """
    from torch.func import jvp as _jvp

    from flowjac.engine.jvp import flow_jvp, random_probes

    if not isinstance(z, torch.Tensor) or z.ndim < 2:
        raise ValueError(f"z must be a (B, ...) tensor, got "
                         f"{getattr(z, 'shape', type(z).__name__)}")
    if tangents is None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        tangents = random_probes(z, k, generator=generator)
    if tangents.shape == z.shape:
        tangents = tangents.unsqueeze(1)
    if tangents.ndim != z.ndim + 1 or tangents.shape[0] != z.shape[0] \
            or tangents.shape[2:] != z.shape[1:]:
        raise ValueError(f"tangents must have shape (B, k, *z.shape[1:]) = "
                         f"({z.shape[0]}, k, {tuple(z.shape[1:])}), got "
                         f"{tuple(tangents.shape)}")
    x1, dx1 = flow_jvp(velocity, z, tangents, steps=steps, method=method)
    if dx1.shape == x1.shape:
        dx1 = dx1.unsqueeze(1)
    b, kk = dx1.shape[:2]
    xr = x1.repeat_interleave(kk, dim=0)   # a copy: make_dual rejects views
    logits, dl = _jvp(classifier, (xr,), (dx1.reshape(b * kk, *x1.shape[1:]),))
    logits = logits.reshape(b, kk, -1)[:, 0]
    return logits.detach(), dl.reshape(b, kk, -1).detach()
