"""The readings of :ref:`sec_interventions`: the studies' tensors made into tables and verdict sentences.

``flowjac.pipelines.interventions_study`` runs the studies (or the chapter
loads their stored run); this module reads them, the same way in both
cases: the exact table of the three structures (``structure_frame``), the
generated images' correlations with bootstrap intervals (``image_table``),
the counterfactual and label-free tables, the paper's selection rule beside
them (``paper_rule_table``), and one ``*_verdict`` per section, whose
sentence is computed from those numbers by the rule its docstring states.
The chapter glues the sentences into its prose. A verdict resting on a
model that does not pass its gates opens with "(Provisional: ...)".
"""
from __future__ import annotations

import torch

from flowjac.causal import label_interventions
from flowjac.causal.scm import STRUCTURES, BinarySCM
from flowjac.estimators.intervals import bootstrap_ci
from flowjac.pipelines import stored

__all__ = ["SETTINGS", "CONDITIONAL_GATES", "conditional_gate_rows", "structure_frame", "image_table", "counterfactual_table",
           "label_free_table", "paper_rule_table", "gate_verdict", "images_verdict",
           "counterfactual_verdict", "paper_rule_verdict", "label_free_verdict"]

# the columns of the exact table, the middle node of each structure written m
SETTINGS = ("observe", "condition m=1", "condition m=0", "do m=1", "do m=0")
# the gates of a label-conditional flow: read-back (quality.conditional_gates), memorization
CONDITIONAL_GATES = ("min_accuracy", "nn_ratio", "copy_share")


def counterfactual_table(result: dict, scm: BinarySCM):
    """The counterfactual checks per intervened node, as a pandas DataFrame; :ref:`sec_interventions`."""
    import pandas as pd

    idx = {v: i for i, v in enumerate(scm.nodes)}
    lab, rows = result["labels"], []
    for m, r in result["do"].items():
        desc = label_interventions.descendants(scm, m)
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

def structure_frame(scm: BinarySCM, structures: dict | None = None, digits: int | None = None):
    """The exact corr(endpoints) per structure as a DataFrame, the middle node written m and named in column ``m``; :ref:`sec_interventions`.

    Columns ``SETTINGS`` from ``label_interventions.structure_table``;
    ``digits`` rounds them (and turns -0.0 into 0.0) for printing.
    """
    import pandas as pd

    structures = structures or STRUCTURES
    table = label_interventions.structure_table(scm, structures)
    rows = {kind: {k.replace(structures[kind][2], "m"): v for k, v in row.items()}
            for kind, row in table.items()}
    frame = pd.DataFrame(rows).T[list(SETTINGS)]
    if digits is not None:
        frame = frame.round(digits) + 0.0
    frame.insert(0, "m", [structures[k][2] for k in frame.index])
    return frame


def image_table(result: dict, scm: BinarySCM, *, seed: int, n_boot: int = 300,
                structures: dict | None = None) -> tuple:
    """corr(endpoints) of the generated images as the classifier reads them, per structure and setting, beside the exact value; :ref:`sec_interventions_images`.

    ``result`` is ``seeing_doing``'s. Conditioning selects observational
    images by the classifier's reading of the middle node; do() selects the
    experiment's images by the value set. Each reading has a 95% percentile
    bootstrap interval (``n_boot`` resamples, one generator seeded
    ``seed + 13``; nan below 20 images). Returns ``(measured, frame)``:
    ``measured[kind][setting] = ((read, low, high), requested)``, the
    requested labels' own correlation beside; ``frame`` one row per
    structure and setting with ``exact``, ``requested``, ``read``, ``low``,
    ``high`` and ``covers`` (the interval holds the exact value).
    """
    import pandas as pd

    structures = structures or STRUCTURES
    idx = {v: i for i, v in enumerate(scm.nodes)}
    exact = label_interventions.structure_table(scm, structures)
    lab_obs, lab_exp = result["lab_obs"], result["lab_exp"]
    read_obs, read_exp = (result["p_obs"] > 0.5).long(), (result["p_exp"] > 0.5).long()
    gen = torch.Generator().manual_seed(seed + 13)

    def corr_ci(rows, a, b):
        if len(rows) < 20:
            return (float("nan"),) * 3
        return bootstrap_ci(lambda r: stored.label_corr(r, idx[a], idx[b]), rows.double(),
                            n_boot=n_boot, generator=gen)

    measured = {}
    for kind, (a, b, m) in structures.items():
        row = {"observe": (corr_ci(read_obs, a, b), stored.label_corr(lab_obs, idx[a], idx[b]))}
        for val in (1, 0):
            cond, did = read_obs[:, idx[m]] == val, lab_exp[:, idx[m]] == val
            row[f"condition {m}={val}"] = (corr_ci(read_obs[cond], a, b),
                                           stored.label_corr(lab_obs[cond], idx[a], idx[b]))
            row[f"do {m}={val}"] = (corr_ci(read_exp[did], a, b),
                                    stored.label_corr(lab_exp[did], idx[a], idx[b]))
        measured[kind] = row
    rows = [dict(structure=kind, setting=setting, exact=round(exact[kind][setting], 3),
                 requested=round(req, 3), read=round(est, 3), low=round(lo, 3),
                 high=round(hi, 3), covers=bool(lo <= exact[kind][setting] <= hi))
            for kind, row in measured.items() for setting, ((est, lo, hi), req) in row.items()]
    return measured, pd.DataFrame(rows).set_index(["structure", "setting"])


def paper_rule_table(probes: dict, scm: BinarySCM, measured: dict,
                    structures: dict | None = None, threshold: float = 1e-4):
    """The paper's rule on a stored probe run beside label conditioning and do() on images and the exact values, per structure; :ref:`sec_interventions_jacobians`.

    The rule keeps latents whose one-direction change of the middle node's
    logit (``probes["paper_change"]``) is below ``threshold``; on them, the
    JVP correlation of the endpoints (``group_spread``, nan below 100
    latents), their label correlation (nan below 20) and the share read
    with m = 1. ``measured`` is ``image_table``'s. One column per structure.
    """
    import pandas as pd

    from flowjac.estimators import moments

    structures = structures or STRUCTURES
    exact = label_interventions.structure_table(scm, structures)
    idx = {v: i for i, v in enumerate(scm.nodes)}
    deltas = probes["jvp"].double()
    pred = (probes["out"] > 0).long()
    rows = []
    for kind, (a, b, m) in structures.items():
        ia, ib, im = idx[a], idx[b], idx[m]
        keep = probes["paper_change"][:, im] < threshold
        kept = int(keep.sum())
        jv = (stored.group_spread(lambda d: moments.jvp_corr(d)[ia, ib], deltas[keep])
              if kept >= 100 else (float("nan"),) * 4)
        rows.append({"structure": kind, "exact observe": exact[kind]["observe"],
                     "exact condition": exact[kind][f"condition {m}=1"],
                     "exact do": exact[kind][f"do {m}=1"],
                     "paper's rule: kept": kept, "paper's rule: JVP corr": jv[0],
                     "paper's rule: label corr": (stored.label_corr(pred[keep], ia, ib)
                                                  if kept >= 20 else float("nan")),
                     "paper's rule: share m=1": float(pred[keep, im].double().mean()),
                     "images: condition": measured[kind][f"condition {m}=1"][0][0],
                     "images: do": measured[kind][f"do {m}=1"][0][0]})
    return pd.DataFrame(rows).set_index("structure")


def _not_passed(gates: dict, rows=None) -> list:
    """The gates of a record that do not pass, as "name (status)"."""
    from flowjac.models import quality

    return [f"{r['gate']} ({r['status']})" for r in (rows or quality.gate_rows(gates))
            if not r["status"].startswith("pass")]


def conditional_gate_rows(record: dict) -> list:
    """``quality.gate_rows`` of a label-conditional flow's record, its own gates only; :ref:`sec_interventions`.

    A record with a ``status`` table lists exactly its gates; one measured
    before intervals existed holds other statistics as well (``in_range``,
    the pixel-range gate of the flows of fives, which no conditional flow
    is judged by), so its rows are kept to ``CONDITIONAL_GATES``.
    """
    from flowjac.models import quality

    rows = quality.gate_rows(record)
    return rows if record.get("status") else [r for r in rows if r["gate"] in CONDITIONAL_GATES]


def _provisional(ok: bool, what: str) -> str:
    return "" if ok else f"(Provisional: {what}.) "


def gate_verdict(record: dict, live: dict) -> dict:
    """The conditional flow's gates, stored and live, in one sentence, and whether comparisons with the exact SCM stand; :ref:`sec_interventions`.

    ``record``: the manifest's gate record of the sampler the chapter uses;
    ``live``: ``quality.conditional_gates`` on a few fresh samples. ``ok``
    when every stored gate passes (``record["passed"]``) and the live
    interval is not wholly below its limit (a small sample's interval is
    wide: it can refute the stored gates, not confirm them). The sentence
    ends with what follows for the chapter: its comparisons stand, or are
    provisional.
    """
    table = conditional_gate_rows(record)
    rows = {r["gate"]: r for r in table}
    acc = rows["min_accuracy"]
    shown = (f"{acc['value']:.3f}" if acc["low"] is None else
             f"{acc['value']:.3f} [{acc['low']:.3f}, {acc['high']:.3f}]")
    where = (f"on {record['n']:,} samples of seed {record['seed']}" if "seed" in record
             else "on the samples drawn when it was trained")
    mem = [f"{name} {rows[name]['value']:.3f} ({rows[name]['limit']}: {rows[name]['status']})"
           for name in ("nn_ratio", "copy_share") if name in rows]
    live_status = live["status"]["min_accuracy"]
    lo, hi = live["intervals"]["min_accuracy"]
    ok = bool(record["passed"]) and live_status != "fail"
    bad = _not_passed(record, table) + (["the live read-back (fail)"] if live_status == "fail" else [])
    smp = record["sampler"]
    how = (f"{smp['method']} with {smp['steps']} steps and "
           + ("no guidance" if smp.get("guidance", 1.0) == 1.0 else
              f"guidance {smp['guidance']:g}"))
    text = (f"Sampled by {how}, the worst per-attribute read-back {where} is {shown} (limit "
            f"{acc['limit']}: {acc['status']})"
            + (f"; memorization: {', '.join(mem)}" if mem else "")
            + f". Live, {live['n']} fresh samples give {live['min_accuracy']:.3f} "
            f"[{lo:.3f}, {hi:.3f}] ({live_status}). "
            + ("The flow passes its gates, so the comparisons of its images with the "
               "exact SCM below stand." if ok else
               f"The flow does not pass ({', '.join(bad)}), so every comparison of its "
               "images with the exact SCM below is provisional."))
    return dict(ok=ok, text=text, not_passed=bad)


def images_verdict(measured: dict, frame, *, flow_ok: bool = True,
                   structures: dict | None = None) -> dict:
    """Do the images show Berkson's paradox under seeing and its absence under doing? :ref:`sec_interventions_images`.

    ``measured`` and ``frame`` are ``image_table``'s. Separated when the
    collider's conditioned interval lies below 0, and the do() interval
    lies above it and covers 0 (or misses 0 only as far as the requested
    labels themselves do: the label draw's noise, not the flow's). Returns
    ``separated``, ``n_cover``, ``fidelity`` (the largest distance of a
    reading from the requested labels' correlation) and ``text``.
    """
    structures = structures or STRUCTURES
    m = structures["collider"][2]
    berkson = measured["collider"][f"condition {m}=1"][0]
    do_z, req_do = measured["collider"][f"do {m}=1"]
    exact_berkson = float(frame.loc[("collider", f"condition {m}=1"), "exact"])
    n_cover = int(frame["covers"].sum())
    fidelity = float((frame["read"] - frame["requested"]).abs().max())
    do_covers = do_z[1] <= 0 <= do_z[2]
    label_noise = (not do_covers) and do_z[1] <= req_do <= do_z[2]
    separated = berkson[2] < 0 and do_z[1] > berkson[2] and (do_covers or label_noise)
    text = (_provisional(flow_ok, "the conditional flow does not pass its gates")
            + f"The intervals of the classifier's readings cover the exact value in {n_cover} "
            f"of {len(frame)} cells, and the readings differ from the correlation of the "
            f"requested labels by at most {fidelity:.3f}: the images show what was asked "
            f"for. At the collider, conditioning on the frame gives {berkson[0]:+.2f} "
            f"[{berkson[1]:+.2f}, {berkson[2]:+.2f}] (exact {exact_berkson:+.2f}), and do() on "
            f"it gives {do_z[0]:+.2f} [{do_z[1]:+.2f}, {do_z[2]:+.2f}] (exact 0"
            + (f"; the requested labels themselves give {req_do:+.2f}, so the distance from 0 "
               "is the sampling noise of the label draw, not the flow's" if label_noise else "")
            + "): "
            + ("the flow and classifier reproduce Berkson's paradox under seeing and its "
               "absence under doing." if separated else
               "the images do not separate seeing from doing at this sample size."))
    return dict(separated=bool(separated), n_cover=n_cover, fidelity=fidelity, text=text)


def counterfactual_verdict(table, result: dict, *, flow_ok: bool = True) -> dict:
    """What the counterfactual images keep, from ``counterfactual_table`` and the round trip; :ref:`sec_interventions_counterfactuals`.

    ``kept``: the non-descendants keep their labels for every intervention;
    ``content``: every counterfactual is nearer its own scene re-rendered
    than another scene and than a fresh latent's image; ``ratio``: the
    range over interventions of (distance to its own scene) / (distance to
    another scene), which says how much of the scene is kept (0: all of
    it; 1: none beyond the labels), read as "a nearby scene" when even its
    smallest value is above 0.1 and "close to the same scene" otherwise.
    ``text`` states them with the descendants' change rates beside the
    exact ones.
    """
    same, other = table["MSE to same jitter"], table["MSE to other jitter"]
    kept = bool((table["non-descendants kept (labels)"] == 1).all())
    content = bool((same < other).all() and (same < table["fresh latent, same jitter"]).all())
    ratio = (float((same / other).min()), float((same / other).max()))
    changed = "; ".join(f"do({m}) {r['descendants changed']:.0%} (exact "
                        f"{r['exact P(change)']:.0%})" for m, r in table.iterrows()
                        if r["descendants changed"] == r["descendants changed"])   # not nan
    readback = float(table["read back = y' (all 9)"].min())
    text = (_provisional(flow_ok, "the conditional flow does not pass its gates")
            + ("The non-descendants keep their labels, by construction. " if kept else
               "Some non-descendants change their labels, which the construction forbids. ")
            + f"The descendants change in {changed}; the classifier reads all nine intended "
            f"labels off at least {readback:.0%} of the counterfactual images. "
            + ("For every intervention the counterfactual is nearer its own scene re-rendered "
               "than another scene, and nearer than a fresh latent's image, so the latent "
               "carries the scene. " if content else
               "Not every counterfactual is nearer its own scene than another scene or a "
               "fresh latent's image: the latent does not carry the scene throughout. ")
            + f"Its distance to its own scene is {ratio[0]:.0%} to {ratio[1]:.0%} of the "
            "distance between two different scenes"
            + (": the counterfactual is a nearby scene rather than the same scene with other "
               "labels." if ratio[0] > 0.1 else ", close to the same scene with other labels."))
    return dict(kept=kept, content=content, ratio=ratio, readback=readback, text=text,
                rt_mean=float(result["rt_mean"].mean()))


def paper_rule_verdict(table, measured: dict, *, scm_flow_gates: dict, flow_ok: bool = True,
                      structures: dict | None = None) -> dict:
    """Is the paper's selection conditioning or do()? From ``paper_rule_table``; :ref:`sec_interventions_jacobians`.

    The rule keeps latents of both values of the middle node in a structure
    when between 10% and 90% of the kept latents are read with m = 1 (it is
    then not conditioning on the attribute); it selects latents and never
    changes how an image is made, so it is not do(). Beside it, the
    structures whose do() interval of the images covers the exact 0.
    ``scm_flow_gates``: the gate record of the unconditional flow whose
    probes the rule selects from (its columns are provisional unless it
    passes); ``flow_ok``: the conditional flow's.
    """
    structures = structures or STRUCTURES
    share = table["paper's rule: share m=1"]
    mixed = [k for k in table.index if 0.1 < share[k] < 0.9]
    do_cover = [k for k, (_, _, m) in structures.items()
                if measured[k][f"do {m}=1"][0][1] <= 0 <= measured[k][f"do {m}=1"][0][2]]
    bad = _not_passed(scm_flow_gates)
    text = (_provisional(not bad, "the unconditional SCM flow, whose latents the paper's "
                         f"rule selects, does not pass its gates ({', '.join(bad)}); its "
                         "columns describe that flow, not the SCM")
            + f"The paper's rule keeps latents of both values of the middle node in "
            f"{len(mixed)} of {len(table)} structures (between 10% and 90% with m = 1)"
            + (", so there it is not even conditioning on the attribute" if mixed else
               ", so in every structure it keeps mostly one value of the attribute")
            + "; it selects on the latent and never changes how images are made, so it "
            "cannot be do(). "
            + _provisional(flow_ok, "the conditional flow does not pass its gates")
            + f"The conditional flow's do() intervals cover the exact 0 in {len(do_cover)} of "
            f"{len(structures)} structures ({', '.join(do_cover) or 'none'}).")
    return dict(mixed=mixed, do_cover=do_cover, scm_flow_not_passed=bad, text=text)


def label_free_verdict(table, n: int, *, readable_ok: bool, flow_ok: bool = True) -> dict:
    """Does moving a latent along an attribute's gradient act like do()? From ``label_free_table``; :ref:`sec_interventions_jacobians`.

    ``n`` latents were moved. Under do() the parent never changes and the
    child changes at the exact counterfactual rate. The projected step
    changes the child "about as do() would" when its rate is within two
    binomial standard errors of the exact one (over the latents that
    flipped; the error at least that of a rate of 1/2), and "leaves the
    parent alone" when the parent's rate is within two standard errors of
    a rate 1/2 over those latents (the widest binomial error,
    conservatively). ``readable_ok``: the unconditional mode passes its
    readability gate; ``flow_ok``: the conditional flow passes its gates.
    """
    res = table.to_dict(orient="index")
    proj, plain = res["projected"], res["plain gradient"]
    flipped = next(c for c in table.columns if c.startswith("flipped"))
    exact_q = res["exact do (counterfactual)"]["Q changed"]
    n_flip = max(1, round(proj[flipped] * n))
    se_q = (max(exact_q * (1 - exact_q), 0.25 / n_flip) / n_flip) ** 0.5
    se_p = (0.25 / n_flip) ** 0.5
    child_like_do = abs(proj["Q changed"] - exact_q) <= 2 * se_q
    parent_kept = proj["P changed (do: 0)"] <= 2 * se_p
    name = flipped.split(" ", 1)[1]
    text = (_provisional(readable_ok, "the unconditional mode fails its readability gate")
            + _provisional(flow_ok, "the conditional flow does not pass its gates")
            + f"Moving the latent along the gradient of {name}'s logit flips it in "
            f"{plain[flipped]:.0%} of latents (projected: {proj[flipped]:.0%}). The child Q "
            f"changes in {plain['Q changed']:.0%} (projected {proj['Q changed']:.0%}) of flipped "
            f"latents, where do() changes it in {exact_q:.0%}; the parent P changes in "
            f"{plain['P changed (do: 0)']:.0%} (projected {proj['P changed (do: 0)']:.0%}), "
            "where do() never does. The projected step changes the child "
            + ("about as do() would (within two binomial standard errors)" if child_like_do
               else "at a rate that do() would not (outside two binomial standard errors)")
            + (", and it leaves the parent alone, as do() does." if parent_kept else
               ", and it also changes the parent, which do() never does: it is not an "
               "intervention on the causal variable."))
    return dict(child_like_do=bool(child_like_do), parent_kept=bool(parent_kept), text=text)
