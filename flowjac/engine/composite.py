"""JVPs of a classifier composed with the flow map, c(phi(z)), and their gradient norms.

The attribute JVP J_{c o phi}(z) v is one forward-mode solve of the flow
followed by the classifier's forward-mode derivative along each probe;
gradient norms use reverse mode through the same solver. Explained in
:ref:`sec_attributes`.
"""
from __future__ import annotations

import torch

__all__ = ["attribute_jvp", "attribute_grad_norm", "directional_logit_change"]


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


def attribute_grad_norm(velocity, classifier, z: torch.Tensor, attr: int,
                        steps: int = 20, method: str = "rk4"):
    """True per-sample norm ‖∇_z c_attr(φ(z))‖ by one reverse-mode pass, and the logits; :ref:`sec_attributes`.

    One backward pass of the summed logit gives every sample's gradient,
    because neither the flow nor the classifier mixes samples of a batch
    (no BatchNorm in training mode).
    """
    from flowjac.engine.ode import integrate

    if not isinstance(z, torch.Tensor) or z.ndim < 2:
        raise ValueError(f"z must be a (B, ...) tensor, got "
                         f"{getattr(z, 'shape', type(z).__name__)}")
    if isinstance(attr, bool) or not isinstance(attr, int) or attr < 0:
        raise ValueError(f"attr must be a non-negative integer, got {attr!r}")
    with torch.enable_grad():
        zz = z.detach().clone().requires_grad_(True)
        logits = classifier(integrate(velocity, zz, steps, method=method))
        if attr >= logits.shape[1]:
            raise ValueError(f"attr must be < {logits.shape[1]} (the number "
                             f"of logits), got {attr}")
        (g,) = torch.autograd.grad(logits[:, attr].sum(), zz)
    return g.flatten(1).norm(dim=1).detach(), logits.detach()


def directional_logit_change(velocity, classifier, z: torch.Tensor,
                             v: torch.Tensor, attr: int, eps: float = 1e-2,
                             steps: int = 20, method: str = "rk4") -> torch.Tensor:
    """The paper's criterion ``|c_attr(φ(z + εu)) - c_attr(φ(z))|`` along the unit direction u = v/‖v‖; :ref:`sec_attributes`.

    ``v`` ``(B, *z.shape[1:])`` gives one direction per sample; each is
    scaled to unit norm (over all non-batch dimensions), as in the paper's
    rule, so only its direction matters. The paper kept samples with
    ``|Δlogit| < 1e-4`` at ε = 1e-2 and called it a Jacobian norm; it is one
    directional finite difference, about ε ``|∇c · u|``, not ε ‖∇c‖.
    """
    from flowjac.engine.ode import integrate

    if not isinstance(z, torch.Tensor) or not isinstance(v, torch.Tensor) \
            or z.ndim < 2 or v.shape != z.shape:
        raise ValueError(f"z must be a (B, ...) tensor and v a tensor of its shape "
                         f"{tuple(getattr(z, 'shape', ()))}, got v of shape "
                         f"{tuple(getattr(v, 'shape', ()))}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    norms = v.flatten(1).norm(dim=1)
    if not (torch.isfinite(norms) & (norms > 0)).all():
        raise ValueError("v must be finite and non-zero for every sample "
                         "(it is scaled to a unit direction)")
    u = v / norms.view(-1, *([1] * (v.ndim - 1)))
    with torch.no_grad():
        x = integrate(velocity, torch.cat([z, z + eps * u]), steps, method=method)
        logits = classifier(x)
    if isinstance(attr, bool) or not isinstance(attr, int) \
            or not 0 <= attr < logits.shape[1]:
        raise ValueError(f"attr must be an integer in [0, {logits.shape[1]}), "
                         f"got {attr!r}")
    b = z.shape[0]
    return (logits[b:, attr] - logits[:b, attr]).abs()
