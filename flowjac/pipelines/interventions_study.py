"""The three studies of :ref:`sec_interventions` as functions: seeing and doing, counterfactual images, a label-free intervention.

Built from the image steps of ``flowjac.pipelines.interventions`` and the
exact label mathematics of ``flowjac.causal.interventions``.

The chapter runs them live (``live=True``, the full profile) or loads the
stored run that ``tools/run_interventions.py`` made with the same
functions (``results/interventions_run.pt``, the quick profile) and
recomputes a few of its images live to show that it belongs to the shipped
model. Each study returns plain tensors (labels, classifier readings,
per-image measurements), so the tables are computed from them the same way
in both cases (``counterfactual_table``, ``label_free_table``).

The seeds follow the chapter's: ``seed + 10`` .. ``seed + 12`` for seeing
and doing, ``seed + 20`` .. ``seed + 22`` for counterfactuals, ``seed + 30``
for the label-free intervention.
"""
from __future__ import annotations

import torch

from flowjac._checks import check_int
from flowjac.causal import interventions as iv
from flowjac.causal.scm import STRUCTURES, BinarySCM
from flowjac.engine.ode import integrate
from flowjac.pipelines.interventions import (abduct_latent, attribute_gradients, draw_labels,
                                             generate, latent_intervention, read)

__all__ = ["COUNTERFACTUAL_NODES", "seeing_doing", "counterfactuals", "counterfactual_table",
           "label_free", "label_free_table"]

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
        u = iv.abduct_noise(scm, lab, g)
        new = torch.empty_like(lab)
        flip = 1 - lab[:, idx[m]]
        for val in (0, 1):
            rows = flip == val
            if rows.any():
                new[rows] = iv.propagate(scm, u[rows], **{m: val})
        x_cf, _ = generate(velocity, new, z=z, device=device, **smp)
        desc = [idx[v] for v in iv.descendants(scm, m)]
        p_change = torch.zeros(n, len(desc), dtype=torch.float64)
        for i in range(n):
            st, pr = iv.counterfactual(scm, lab[i], **{m: int(new[i, idx[m]])})
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


def counterfactual_table(result: dict, scm: BinarySCM):
    """The counterfactual checks per intervened node, as a pandas DataFrame; :ref:`sec_interventions`."""
    import pandas as pd

    idx = {v: i for i, v in enumerate(scm.nodes)}
    lab, rows = result["labels"], []
    for m, r in result["do"].items():
        desc = iv.descendants(scm, m)
        nd = [idx[v] for v in scm.nodes if v != m and v not in desc]
        dd = [idx[v] for v in desc]
        new = r["labels"]
        rows.append({
            "do": m,
            "non-descendants kept (labels)": float((new[:, nd] == lab[:, nd]).double().mean()),
            "read back = y' (all 9)": float((r["readback"] == new).all(1).double().mean()),
            "descendants changed": (float((new[:, dd] != lab[:, dd]).double().mean())
                                    if dd else float("nan")),
            "exact P(change)": float(r["p_change"].mean()) if dd else float("nan"),
            "MSE to same jitter": float(r["mse_same"].mean()),
            "MSE to other jitter": float(r["mse_other"].mean()),
            "fresh latent, same jitter": float(r["mse_fresh"].mean()),
        })
    return pd.DataFrame(rows).set_index("do")


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
        st, pr = iv.counterfactual(scm, read0[i], **{target: int(1 - read0[i, it])})
        for j in range(len(scm.nodes)):
            p_exact[i, j] = float((pr * (st[:, j] != int(read0[i, j]))).sum())
    out["p_change_exact"] = p_exact
    out["target"] = target
    return out


def label_free_table(result: dict, scm: BinarySCM, parent: str = "P_right",
                     child: str = "Q_low"):
    """Flip, parent and child change rates of the label-free moves beside exact do(); :ref:`sec_interventions`."""
    import pandas as pd

    idx = {v: i for i, v in enumerate(scm.nodes)}
    it, ip, ic = idx[result["target"]], idx[parent], idx[child]
    read0 = (result["p_before"] > 0.5).long()
    others = [j for j in range(len(scm.nodes)) if j != it]
    res = {}
    for name, r in result["moved"].items():
        f, after = r["flipped"], r["after"]
        res[name] = {
            f"flipped {result['target'].split('_')[0]}": float(f.double().mean()),
            "P changed (do: 0)": float((after[f, ip] != read0[f, ip]).double().mean()),
            "Q changed": float((after[f, ic] != read0[f, ic]).double().mean()),
            "others changed": float((after[f][:, others] != read0[f][:, others])
                                    .double().mean()),
        }
    res["exact do (counterfactual)"] = {
        f"flipped {result['target'].split('_')[0]}": 1.0,
        "P changed (do: 0)": float(result["p_change_exact"][:, ip].mean()),
        "Q changed": float(result["p_change_exact"][:, ic].mean()),
        "others changed": float("nan")}
    return pd.DataFrame(res).T
