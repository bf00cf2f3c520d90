"""The three studies of :ref:`sec_interventions` as functions: seeing and doing, counterfactual images, a label-free intervention.

Built from the image steps of ``flowjac.pipelines.image_interventions`` and
the exact label mathematics of ``flowjac.causal.label_interventions``.

The chapter runs them live (``live=True``, the full profile) or loads the
stored run that ``tools/run_interventions.py`` made with the same
functions (``results/interventions_run.pt``, the quick profile) and
recomputes a few of its images live (``check_stored_run``) to show that it
belongs to the shipped model. Each study returns plain tensors (labels,
classifier readings, per-image measurements), so the tables and verdicts
are computed from them the same way in both cases
(``flowjac.pipelines.interventions_tables``).

The seeds follow the chapter's: ``seed + 10`` .. ``seed + 12`` for seeing
and doing (``seed + 13`` for their bootstrap, in the tables), ``seed + 20``
.. ``seed + 22`` for counterfactuals, ``seed + 30`` for the label-free
intervention.
"""
from __future__ import annotations

import torch

from flowjac._checks import check_int
from flowjac.causal import label_interventions
from flowjac.causal.scm import STRUCTURES, BinarySCM
from flowjac.engine.ode import integrate
from flowjac.pipelines.image_interventions import (abduct_latent, attribute_gradients,
                                                   draw_labels, generate,
                                                   latent_intervention, read)

__all__ = ["COUNTERFACTUAL_NODES", "seeing_doing", "counterfactuals", "label_free",
           "check_stored_run", "stored_run_text"]

COUNTERFACTUAL_NODES = ("C_warm", "X_large", "M_marker")


def seeing_doing(velocity, classifier, scm: BinarySCM, n: int, *, seed: int,
                 sampler: dict, device="cpu") -> dict:
    """Observational and randomized-experiment labels, rendered and read back; :ref:`sec_interventions`.

    Returns the requested labels ``lab_obs`` (from the SCM) and ``lab_exp``
    (the middle node of every structure set by a fair coin: do() with a
    random value per image) and the classifier's probabilities ``p_obs``,
    ``p_exp`` (n, 9) on the generated images.
    """
    n = check_int("n", n, minimum=1)
    g = torch.Generator().manual_seed(seed + 10)
    lab_obs = draw_labels(scm, n, g)
    lab_exp = draw_labels(scm, n, g, randomize=[m for _, _, m in STRUCTURES.values()])
    x_obs, _ = generate(velocity, lab_obs, seed=seed + 11, device=device, **sampler)
    x_exp, _ = generate(velocity, lab_exp, seed=seed + 12, device=device, **sampler)
    return dict(lab_obs=lab_obs, lab_exp=lab_exp,
                p_obs=read(classifier, x_obs, device=device),
                p_exp=read(classifier, x_exp, device=device))


def _mse(a, b):
    return ((a - b) ** 2).flatten(1).mean(1)


def counterfactuals(velocity, classifier, scm: BinarySCM, n: int, *, seed: int,
                    sampler: dict, size: int = 32, keep: int = 6, device="cpu") -> dict:
    """Counterfactual images of real renders under do() flipping C, X and M; :ref:`sec_interventions`.

    Abduction: z = phi^{-1}(x; y) on twice the sampler's steps (both ways),
    the labels' noise from its posterior; action: flip one attribute;
    prediction: propagate the noise, render x' = phi(z; y'). Per image and
    intervened node it returns the counterfactual labels, the classifier's
    reading of x', the exact probability that each descendant changes, and
    the mean squared distances of x' to the scene re-rendered with the same
    jitter, with other jitter, and of a fresh latent's image to the same
    jitter; the round-trip errors; the first ``keep`` images for figures.
    """
    from flowjac.data.scm_images import render

    n = check_int("n", n, minimum=1)
    idx = {v: i for i, v in enumerate(scm.nodes)}
    g = torch.Generator().manual_seed(seed + 20)
    lab = scm.sample(n, g)
    jitter = seed + 21
    x_real = render(lab, size, generator=torch.Generator().manual_seed(jitter)) * 2 - 1
    smp = dict(sampler, steps=2 * sampler["steps"])     # the same ODE, a finer grid both ways
    z = abduct_latent(velocity, x_real, lab, device=device, **smp)
    x_rt, _ = generate(velocity, lab, z=z, device=device, **smp)
    err = (x_rt - x_real).abs().flatten(1)
    out = dict(labels=lab, x_real=x_real[:keep], rt_max=err.max(1).values,
               rt_mean=err.mean(1), do={})
    for m in COUNTERFACTUAL_NODES:
        u = label_interventions.abduct_noise(scm, lab, g)
        new = torch.empty_like(lab)
        flip = 1 - lab[:, idx[m]]
        for val in (0, 1):
            rows = flip == val
            if rows.any():
                new[rows] = label_interventions.propagate(scm, u[rows], **{m: val})
        x_cf, _ = generate(velocity, new, z=z, device=device, **smp)
        desc = [idx[v] for v in label_interventions.descendants(scm, m)]
        p_change = torch.zeros(n, len(desc), dtype=torch.float64)
        for i in range(n):
            st, pr = label_interventions.counterfactual(scm, lab[i], **{m: int(new[i, idx[m]])})
            for c, j in enumerate(desc):
                p_change[i, c] = float((pr * (st[:, j] != int(lab[i, j]))).sum())
        same = render(new, size, generator=torch.Generator().manual_seed(jitter)) * 2 - 1
        other = render(new, size, generator=torch.Generator().manual_seed(jitter + 1)) * 2 - 1
        fresh, _ = generate(velocity, new, seed=seed + 22, device=device, **smp)
        out["do"][m] = dict(labels=new, readback=(read(classifier, x_cf, device=device) > 0.5).long(),
                            p_change=p_change, mse_same=_mse(x_cf, same),
                            mse_other=_mse(x_cf, other), mse_fresh=_mse(fresh, same),
                            images=x_cf[:keep])
    return out

def label_free(velocity, classifier, scm: BinarySCM, n: int, *, seed: int, sampler: dict,
               target: str = "M_marker", latent_shape=(3, 32, 32), device="cpu") -> dict:
    """Move latents of the unconditional mode along one attribute's gradient, with and without projection, and read what changed; :ref:`sec_interventions`.

    Returns the classifier's probabilities on the unmoved images
    (``p_before``), for each of ``"plain gradient"`` and ``"projected"`` the
    rows that flipped and the labels read after the move, and per latent the
    exact probability that each attribute changes under do(target flipped)
    given the labels read before (the counterfactual distribution).
    """
    n = check_int("n", n, minimum=1)
    idx = {v: i for i, v in enumerate(scm.nodes)}
    it = idx[target]
    unc = velocity.unconditional()
    g = torch.Generator().manual_seed(seed + 30)
    z0 = torch.randn(n, *latent_shape, generator=g)
    with torch.no_grad():
        x0 = integrate(unc, z0.to(device), sampler["steps"], sampler["method"]).cpu()
    p_before = read(classifier, x0, device=device)
    read0 = (p_before > 0.5).long()
    grads = attribute_gradients(unc, classifier, z0, sampler=sampler, device=device)
    out = dict(p_before=p_before, moved={})
    for project in (False, True):
        flipped = torch.zeros(n, dtype=torch.bool)
        after = torch.empty(n, len(scm.nodes), dtype=torch.long)
        target_val = 1 - read0[:, it]
        for val in (0, 1):
            rows = target_val == val
            if rows.any():
                r = latent_intervention(unc, classifier, z0[rows], it, value=val,
                                        project=project, sampler=sampler,
                                        grads=grads[rows], device=device)
                flipped[rows] = r["flipped"]
                after[rows] = (read(classifier, r["after"], device=device) > 0.5).long()
        out["moved"]["projected" if project else "plain gradient"] = dict(
            flipped=flipped, after=after)
    p_exact = torch.zeros(n, len(scm.nodes), dtype=torch.float64)
    for i in range(n):
        st, pr = label_interventions.counterfactual(scm, read0[i], **{target: int(1 - read0[i, it])})
        for j in range(len(scm.nodes)):
            p_exact[i, j] = float((pr * (st[:, j] != int(read0[i, j]))).sum())
    out["p_change_exact"] = p_exact
    out["target"] = target
    return out

def check_stored_run(stored_run: dict, velocity, classifier, *, sampler: dict, seed: int,
                     weights_sha256: str, latent_shape, device="cpu") -> dict:
    """Recompute a few images of a stored run from the loaded model and return the largest difference of each kind; :ref:`sec_interventions_images`.

    The run's ``meta`` must record the chapter's design: its ``sampler``,
    ``seed`` and the ``weights_sha256`` of the conditional flow. It names no
    module, so the comparison is on these values alone and a renamed module
    leaves a stored run valid. A value that differs raises one ValueError
    naming it. Then four observational readings, two counterfactual images
    under do(C flipped) and two readings of the unconditional mode are
    recomputed with the studies' seeds; returns ``{what: max |now - stored|}``.
    """
    from flowjac.models.conditional import draw_latents

    meta = stored_run["meta"]
    for key, want in (("sampler", dict(sampler)), ("seed", seed),
                      ("weights_sha256", weights_sha256)):
        if meta.get(key) != want:
            raise ValueError(f"the stored run has {key} = {meta.get(key)!r} where the chapter "
                             f"uses {want!r}; rerun tools/run_interventions.py")
    sd, cf, lf = (stored_run[k] for k in ("seeing_doing", "counterfactuals", "label_free"))
    diffs = {}
    z = draw_latents(velocity, len(sd["lab_obs"]), seed + 11)[:4]
    x, _ = generate(velocity, sd["lab_obs"][:4], z=z, device=device, **sampler)
    diffs["observation readings"] = float(
        (read(classifier, x, device=device) - sd["p_obs"][:4]).abs().max())
    fine = dict(sampler, steps=2 * sampler["steps"])     # as counterfactuals() abducts
    node = COUNTERFACTUAL_NODES[0]
    z = abduct_latent(velocity, cf["x_real"][:2], cf["labels"][:2], device=device, **fine)
    x, _ = generate(velocity, cf["do"][node]["labels"][:2], z=z, device=device, **fine)
    diffs["counterfactual images"] = float((x - cf["do"][node]["images"][:2]).abs().max())
    z0 = torch.randn(len(lf["p_before"]), *latent_shape,
                     generator=torch.Generator().manual_seed(seed + 30))[:2]
    with torch.no_grad():
        x = integrate(velocity.unconditional(), z0.to(device), sampler["steps"],
                      sampler["method"])
    diffs["unconditional readings"] = float(
        (read(classifier, x, device=device) - lf["p_before"][:2]).abs().max())
    return diffs


def stored_run_text(meta: dict, diffs: dict) -> str:
    """The stored run in words for the page: its sizes, hardware and time from its ``meta``, and ``check_stored_run``'s differences; :ref:`sec_interventions_images`."""
    from flowjac.base import hardware_text

    return (f"In this build these images, and those of the next two sections, come from a "
            f"stored run: {meta['n_images']:,} images per setting, {meta['n_cf']} "
            f"counterfactual images and {meta['n_latent']} latents moved, made on "
            f"{hardware_text(meta['hardware'])} in {sum(meta['seconds'].values()) / 60:.0f} "
            "minutes. Its meta records the design it was made with (the sampler, the seed and "
            "the sha256 of the weights, no module names), which the chapter checks against "
            "its own; a few of its images, recomputed now from the shipped model, differ from "
            f"the stored ones by at most {max(diffs.values()):.0e} ("
            + ", ".join(f"{k} {v:.0e}" for k, v in diffs.items()) + ").")
