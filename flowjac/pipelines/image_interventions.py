"""Interventions on images, :ref:`sec_interventions`: labels drawn, rendered through a conditional flow and read back.

Seeing, doing and imagining on the SCM images with a label-conditional flow
u(x, t, y): draw labels from the SCM (observation), from a randomized
experiment on the middle nodes (do()), or from the counterfactual of an
observed image; render them through the same conditional flow; read them
back with the shortcut-free attribute classifier. Counterfactual images
abduct the latent exactly, z = phi^{-1}(x; y), by integrating the ODE
backwards, then push it forward under the counterfactual labels.

The exact label mathematics it calls is ``flowjac.causal.label_interventions``;
the chapter's three studies, built from these steps, are
``flowjac.pipelines.interventions_study``.
"""
from __future__ import annotations

import itertools

import torch

from flowjac._checks import check_finite, check_int
from flowjac.causal import label_interventions
from flowjac.causal.scm import BinarySCM
from flowjac.engine.ode import integrate

__all__ = ["draw_labels", "generate", "read", "abduct_latent", "attribute_gradients",
           "counterfactual_images", "latent_intervention"]


def draw_labels(scm: BinarySCM, n: int, generator: torch.Generator,
                randomize=()) -> torch.Tensor:
    """n label rows from the SCM, with the nodes in ``randomize`` set by fair coins (a randomized experiment: do()); :ref:`sec_interventions`.

    Randomizing a node is do() with a random value per row: every row
    follows the mutilated SCM do(node = its coin). Nodes of disjoint
    structures can be randomized together.
    """
    n = check_int("n", n, minimum=1)
    _, u = scm.sample(n, generator, return_noise=True)
    if not randomize:
        return label_interventions.propagate(scm, u)
    coins = torch.randint(0, 2, (n, len(randomize)), generator=generator)
    out = torch.empty(n, len(scm.nodes), dtype=torch.int64)
    for combo in itertools.product((0, 1), repeat=len(randomize)):
        rows = (coins == torch.tensor(combo)).all(1)
        if rows.any():
            out[rows] = label_interventions.propagate(scm, u[rows], **dict(zip(randomize, combo)))
    return out


def generate(velocity, labels: torch.Tensor, *, seed: int = 0, z=None,
             method: str = "midpoint", steps: int = 10, guidance: float = 1.0,
             batch_size: int = 250, device="cpu") -> tuple:
    """Images phi(z; labels) in flow space [-1, 1] and their latents z; :ref:`sec_interventions`."""
    from flowjac.models.conditional import draw_latents, sample_given

    if z is None:
        z = draw_latents(velocity, len(labels), seed)
    x = sample_given(velocity, labels, z=z, method=method, steps=steps,
                     guidance=guidance, batch_size=batch_size, device=device)
    _refuse_nonfinite(x, "images", f"the velocity {type(velocity).__name__}")
    return x, z


def _refuse_nonfinite(x: torch.Tensor, what: str, source: str) -> None:
    """One ValueError naming the source when its output holds NaN or inf."""
    if not bool(torch.isfinite(x).all()):
        bad = (~torch.isfinite(x)).reshape(len(x), -1).any(1)
        raise ValueError(f"{source} gives NaN or inf {what} for {int(bad.sum())} "
                         f"of {len(x)} rows (first: row {int(bad.nonzero()[0])}) "
                         "from finite inputs; its weights or code give "
                         "non-finite values")


@torch.no_grad()
def read(classifier, images: torch.Tensor, batch_size: int = 500,
         device="cpu") -> torch.Tensor:
    """The classifier's probabilities (n, 9) for flow-space images; :ref:`sec_interventions`."""
    check_finite("images", images)
    out = []
    for i in range(0, len(images), batch_size):
        out.append(torch.sigmoid(classifier(images[i:i + batch_size].to(device))).cpu())
    out = torch.cat(out)
    _refuse_nonfinite(out, "probabilities", f"the classifier {type(classifier).__name__}")
    return out


@torch.no_grad()
def abduct_latent(velocity, x: torch.Tensor, labels: torch.Tensor, *,
                  method: str = "midpoint", steps: int = 10, guidance: float = 1.0,
                  batch_size: int = 250, device="cpu") -> torch.Tensor:
    """z = phi^{-1}(x; labels) by integrating the conditional ODE from t = 1 back to 0; :ref:`sec_interventions`."""
    check_finite("x", x)
    out = []
    for i in range(0, len(x), batch_size):
        v = velocity.given(labels[i:i + batch_size], guidance)
        out.append(integrate(v, x[i:i + batch_size].to(device), steps, method,
                             t0=1.0, t1=0.0).cpu())
    z = torch.cat(out)
    _refuse_nonfinite(z, "latents (abducted backwards)", f"the velocity {type(velocity).__name__}")
    return z


def counterfactual_images(velocity, scm: BinarySCM, x: torch.Tensor,
                          labels: torch.Tensor, generator: torch.Generator,
                          *, sampler: dict, device="cpu", **values) -> dict:
    """The three steps on images: abduct z and the labels' noise, intervene, predict and render; :ref:`sec_interventions`.

    Returns the abducted latents, the round trip phi(phi^{-1}(x)), the
    counterfactual labels y' (noise abducted from ``labels``, then
    propagated under do(values)) and the counterfactual images
    x' = phi(z; y').
    """
    z = abduct_latent(velocity, x, labels, device=device, **sampler)
    round_trip, _ = generate(velocity, labels, z=z, device=device, **sampler)
    u = label_interventions.abduct_noise(scm, labels, generator)
    new = label_interventions.propagate(scm, u, **values)
    x_cf, _ = generate(velocity, new, z=z, device=device, **sampler)
    return dict(z=z, round_trip=round_trip, labels=new, images=x_cf)


def attribute_gradients(velocity, classifier, z: torch.Tensor, *, sampler: dict,
                        grad_batch: int = 4, device="cpu") -> torch.Tensor:
    """grad_z c_j(phi(z)) of every logit j at each latent, (n, p, D), by reverse mode through the solver; :ref:`sec_interventions`."""
    z = check_finite("z", z).to(device)
    grads = []
    for i in range(0, len(z), grad_batch):         # bounded memory: one graph per batch
        zr = z[i:i + grad_batch].detach().clone().requires_grad_(True)
        logits = classifier(integrate(velocity, zr, sampler["steps"], sampler["method"]))
        rows = []
        for j in range(logits.shape[1]):
            (g,) = torch.autograd.grad(logits[:, j].sum(), zr,
                                       retain_graph=j + 1 < logits.shape[1])
            rows.append(g.flatten(1))
        grads.append(torch.stack(rows, 1))
        del logits
    grads = torch.cat(grads).detach()
    _refuse_nonfinite(grads, "gradients", "the flow composed with the classifier "
                      f"{type(classifier).__name__}")
    return grads


def latent_intervention(velocity, classifier, z: torch.Tensor, target: int,
                        *, value: int, project: bool, sampler: dict,
                        alphas=(0.5, 1, 2, 4, 8, 16), grad_batch: int = 4,
                        grads: torch.Tensor | None = None, device="cpu") -> dict:
    """Move each latent along the gradient of one attribute's logit until the classifier reads ``value``: a flow-level intervention without labels; :ref:`sec_interventions`.

    The direction is grad_z c_target(phi(z)), with the other attributes'
    gradients projected out when ``project`` (so that, to first order, no
    other attribute's logit moves). The step is the smallest of ``alphas``
    (in units of the latent's norm over the gradient's, scaled) that makes
    the classifier read ``value``; rows that never flip keep their last
    step and are reported. ``velocity`` is an unconditional velocity (x, t).
    ``grads``: the latents' ``attribute_gradients`` when already computed
    (they do not depend on ``value`` or ``project``).
    """
    z = check_finite("z", z).to(device)
    if isinstance(value, bool) or value not in (0, 1):
        raise ValueError(f"value must be 0 or 1 (the reading to reach), got {value!r}")
    target = check_int("target", target, minimum=0)
    if grads is None:
        grads = attribute_gradients(velocity, classifier, z, sampler=sampler,
                                    grad_batch=grad_batch, device=device)
    elif grads.ndim != 3 or grads.shape[0] != len(z) or grads.shape[2] != z[0].numel():
        raise ValueError(f"grads must be (n, p, D) = ({len(z)}, p, {z[0].numel()}) "
                         f"for these latents, got {tuple(grads.shape)}")
    check_finite("grads", grads)
    if target >= grads.shape[1]:
        raise ValueError(f"target must be < {grads.shape[1]} (the classifier's "
                         f"outputs), got {target}")
    grads = grads.to(device)
    d = grads[:, target]
    if project:
        others = torch.cat([grads[:, :target], grads[:, target + 1:]], 1)
        q, _ = torch.linalg.qr(others.transpose(1, 2))      # (n, D, 8)
        d = d - (q @ (q.transpose(1, 2) @ d[..., None]))[..., 0]
    sign = 1.0 if value == 1 else -1.0
    d = sign * d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)
    d = d.view_as(z)
    scale = z.flatten(1).norm(dim=1).median() / 10
    done = torch.zeros(len(z), dtype=torch.bool, device=device)
    z_new = z.clone()
    step = torch.full((len(z),), float("nan"), device=device)
    with torch.no_grad():
        for a in alphas:
            cand = z + a * scale * d
            xs = integrate(velocity, cand, sampler["steps"], sampler["method"])
            hit = ((classifier(xs)[:, target] > 0) == bool(value)) & ~done
            z_new[hit] = cand[hit]
            step[hit] = a
            done |= hit
            if bool(done.all()):
                break
        z_new[~done] = cand[~done]
        x0 = integrate(velocity, z, sampler["steps"], sampler["method"])
        x1 = integrate(velocity, z_new, sampler["steps"], sampler["method"])
    return dict(before=x0.cpu(), after=x1.cpu(), flipped=done.cpu(),
                step=step.cpu())
