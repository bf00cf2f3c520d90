"""The limits of image counterfactuals, measured: conditional flows with the same conditional law but another coupling of noise and image give other counterfactuals of the same observation.

A counterfactual image is not identified by the observational law: the
conditional law p(image | t, i, digit) fixes what images look like, not
which latent an observed image abducts to and so not which image it
becomes under do(). Two flows of the same law that couple noise and
image differently (independent pairs against minibatch optimal-transport
pairs, ``train_flow(coupling="ot")``) differ in exactly that. Training
noise alone (another seed, the same coupling) also moves counterfactuals,
so the study compares three conditional flows (``COUPLING_STUDY``): the
shipped one (independent pairs, seed 0), the same recipe with seed 1, and
the same recipe with OT pairs.

For each image of the published test set and each intervention of the
protocol (``morpho_counterfactuals.intervention_targets``), ``gap_rows``
computes the reference flow's counterfactual and every other flow's,
with the same SCM step (the counterfactual parents are the same for all
flows), and records per image, in grey levels over 28 x 28:

* ``effect``: the reference counterfactual's L1 distance to the observed
  image (how much the intervention changes it);
* ``gap[name]``: its L1 distance to flow ``name``'s counterfactual.

``gap_summary`` gives means with 95% studentized intervals over images
and the gaps as shares of the effect; ``gap_verdict`` applies
``COUPLING_STUDY["rule"]``, fixed before any of these flows was trained.
Explained in :ref:`sec_morpho`.
"""
from __future__ import annotations

from flowjac._checks import check_choice
from flowjac.pipelines import morpho_counterfactuals as mc

__all__ = ["COUPLING_STUDY", "gap_rows", "gap_summary", "gap_verdict"]

COUPLING_STUDY = {
    # the reference first; the others are compared with it image by image
    "flows": ("morpho-conditional", "morpho-conditional-seed1", "morpho-conditional-ot"),
    "reference": "morpho-conditional",
    "training_noise": "morpho-conditional-seed1",
    "other_coupling": "morpho-conditional-ot",
    "interventions": ("t", "i", "digit"),
    "n_stored": 1_000,           # the first rows of the published test set
    "sampler": dict(mc.PROTOCOL["sampler"]),
    "rule": ("the coupling changes counterfactuals beyond training noise when, for an "
             "intervention, the 95% interval of the mean gap between the reference and "
             "the OT-coupled flow lies wholly above that between the reference and the "
             "seed-1 flow; 'no difference detected' when it lies wholly below or the "
             "intervals overlap; the gap is material when its interval's lower end "
             "exceeds 10% of the intervention's mean effect"),
    "material_share": 0.10,
}


def gap_rows(models: dict, images, t, i, digits, targets: dict, *,
             reference: str | None = None, **solver) -> dict:
    """Per-image effects and gaps of counterfactuals between flows of one conditional law; :ref:`sec_morpho`.

    ``models`` maps a name to a conditional flow (what
    ``morpho_counterfactuals.counterfactual_images`` takes); ``targets``
    maps an intervention (``"t"``, ``"i"``, ``"digit"``) to its values,
    one per image. Returns ``{intervention: {"effect": (n,), "gap": {name:
    (n,)}}}`` in grey levels (mean L1 over the pixels), the reference flow's
    counterfactual against the observed image and against each other flow's.
    """
    if not isinstance(models, dict) or len(models) < 2:
        raise ValueError("models must be a dict of at least two named flows")
    reference = COUPLING_STUDY["reference"] if reference is None else reference
    check_choice("reference", reference, tuple(models))
    if not isinstance(targets, dict) or not targets:
        raise ValueError("targets must be a dict of interventions and their values")
    x = mc._pixels(images)
    out = {}
    for name in targets:
        check_choice("targets", name, COUPLING_STUDY["interventions"])
        do = {name: targets[name]}
        cf = {m: mc.counterfactual_images(model, x, t, i, digits, do, **solver)["images"]
              for m, model in models.items()}
        ref = cf[reference]
        out[name] = {"effect": mc._l1(ref, x),
                     "gap": {m: mc._l1(ref, img) for m, img in cf.items() if m != reference}}
    return out


def gap_summary(rows: dict, seed: int = 0) -> dict:
    """Means with 95% intervals over images of each intervention's effect and gaps, and the gaps as shares of the mean effect; :ref:`sec_morpho`."""
    out = {}
    for name, r in rows.items():
        effect = mc._stat(r["effect"], seed)
        gaps = {m: mc._stat(g, seed) for m, g in r["gap"].items()}
        for g in gaps.values():
            g["share_of_effect"] = (g["value"] / effect["value"] if effect["value"] > 0
                                    else float("nan"))
        out[name] = {"n": int(len(r["effect"])), "effect": effect, "gap": gaps}
    return out


def gap_verdict(summary: dict, *, noise: str | None = None,
                other: str | None = None) -> dict:
    """``COUPLING_STUDY["rule"]`` per intervention: does the other coupling move counterfactuals beyond training noise, and is the move material; :ref:`sec_morpho`."""
    noise = COUPLING_STUDY["training_noise"] if noise is None else noise
    other = COUPLING_STUDY["other_coupling"] if other is None else other
    out = {}
    for name, s in summary.items():
        if noise not in s["gap"] or other not in s["gap"]:
            out[name] = {"status": "undecided", "material": None,
                         "text": f"needs the gaps to {noise!r} and {other!r}"}
            continue
        lo_n, hi_n = s["gap"][noise]["interval"]
        lo_o, hi_o = s["gap"][other]["interval"]
        if any(v != v for v in (lo_n, hi_n, lo_o, hi_o)):
            status = "undecided"
        elif lo_o > hi_n:
            status = "beyond training noise"
        else:
            status = "no difference detected"
        material = bool(lo_o > COUPLING_STUDY["material_share"] * s["effect"]["value"])
        out[name] = {"status": status, "material": material,
                     "text": (f"do({name}): the other coupling moves the counterfactual by "
                              f"{s['gap'][other]['value']:.3g} grey levels "
                              f"[{lo_o:.3g}, {hi_o:.3g}], another seed by "
                              f"{s['gap'][noise]['value']:.3g} [{lo_n:.3g}, {hi_n:.3g}], "
                              f"against an effect of {s['effect']['value']:.3g}: {status}"
                              + ("; material" if material else ""))}
    return out
