"""The chapter's tables and verdicts (pipelines.interventions_tables): each rule on hand-made numbers, both sides of it."""
import math

import pandas as pd
import pytest
import torch

from flowjac.causal import label_interventions
from flowjac.causal.scm import STRUCTURES, default_scm
from flowjac.models import quality
from flowjac.pipelines import interventions_tables as tables


def test_structure_frame_is_the_exact_table_with_the_middle_written_m():
    scm = default_scm()
    exact = label_interventions.structure_table(scm)
    frame = tables.structure_frame(scm)
    assert list(frame.columns) == ["m"] + list(tables.SETTINGS)
    for kind, (_, _, m) in STRUCTURES.items():
        assert frame.loc[kind, "m"] == m
        for setting in tables.SETTINGS:
            assert frame.loc[kind, setting] == exact[kind][setting.replace(" m=", f" {m}=")]
    shown = tables.structure_frame(scm, digits=3)
    values = shown[list(tables.SETTINGS)].to_numpy().ravel()
    assert not any(math.copysign(1, v) < 0 for v in values if v == 0)      # no -0.0 printed


def _seeing_doing(n=400, seed=0):
    """Requested labels from the SCM and the experiment, read back perfectly."""
    from flowjac.pipelines.image_interventions import draw_labels

    scm = default_scm()
    g = torch.Generator().manual_seed(seed)
    lab_obs = draw_labels(scm, n, g)
    lab_exp = draw_labels(scm, n, g, randomize=[m for _, _, m in STRUCTURES.values()])
    return scm, dict(lab_obs=lab_obs, lab_exp=lab_exp, p_obs=lab_obs.double() * 0.9 + 0.05,
                     p_exp=lab_exp.double() * 0.9 + 0.05)


def test_image_table_reads_the_images_and_is_reproducible():
    scm, sd = _seeing_doing()
    measured, frame = tables.image_table(sd, scm, seed=0, n_boot=100)
    again, frame2 = tables.image_table(sd, scm, seed=0, n_boot=100)
    pd.testing.assert_frame_equal(frame, frame2)
    assert len(frame) == 15 and set(measured) == set(STRUCTURES)
    # a perfect reader: the reading is the requested labels' correlation
    assert (frame["read"] - frame["requested"]).abs().max() < 1e-9
    assert (frame["low"] <= frame["read"] + 1e-9).all()
    assert (frame["read"] <= frame["high"] + 1e-9).all()
    inside = (frame["low"] <= frame["exact"]) & (frame["exact"] <= frame["high"])
    assert (frame["covers"] == inside).all()
    # fewer than 20 images in a cell: no interval
    few = {k: v[:15] for k, v in sd.items()}
    measured_few, _ = tables.image_table(few, scm, seed=0, n_boot=20)
    assert all(math.isnan(v[0][0]) for row in measured_few.values() for v in row.values())


def _collider(berkson, do, req_do, exact_berkson=-0.35, covers=15):
    m = STRUCTURES["collider"][2]
    measured = {"collider": {f"condition {m}=1": (berkson, berkson[0]),
                             f"do {m}=1": (do, req_do)}}
    frame = pd.DataFrame({"exact": [exact_berkson] + [0.0] * 14,
                          "requested": [0.0] * 15, "read": [0.01] * 15,
                          "covers": [True] * covers + [False] * (15 - covers)},
                         index=pd.MultiIndex.from_tuples(
                             [("collider", f"condition {m}=1")]
                             + [("x", str(i)) for i in range(14)]))
    return measured, frame


def test_images_verdict_separates_seeing_from_doing_only_when_the_intervals_do():
    v = tables.images_verdict(*_collider((-0.33, -0.38, -0.27), (0.01, -0.05, 0.07), 0.0))
    assert v["separated"] and "reproduce Berkson's paradox" in v["text"]
    assert v["n_cover"] == 15 and abs(v["fidelity"] - 0.01) < 1e-12
    assert not v["text"].startswith("(Provisional")
    # do() misses 0, but only as far as the requested labels do: the label draw's noise
    v = tables.images_verdict(*_collider((-0.33, -0.38, -0.27), (0.09, 0.005, 0.17), 0.09))
    assert v["separated"] and "sampling noise of the label draw" in v["text"]
    # do() misses 0 and the requested labels do not explain it
    v = tables.images_verdict(*_collider((-0.33, -0.38, -0.27), (0.09, 0.005, 0.17), 0.0))
    assert not v["separated"] and "do not separate" in v["text"]
    # conditioning's interval reaches 0
    v = tables.images_verdict(*_collider((-0.1, -0.2, 0.02), (0.0, -0.05, 0.05), 0.0),
                              flow_ok=False)
    assert not v["separated"] and v["text"].startswith("(Provisional: the conditional flow")


def _cf_table(same=(0.013, 0.008, 0.008), other=(0.027, 0.028, 0.024),
              fresh=(0.033, 0.034, 0.033), kept=1.0):
    return pd.DataFrame({"non-descendants kept (labels)": [kept, 1.0, 1.0],
                         "read back = y' (all 9)": [0.984, 1.0, 1.0],
                         "descendants changed": [0.656, 0.531, float("nan")],
                         "exact P(change)": [0.637, 0.481, float("nan")],
                         "MSE to same jitter": list(same), "MSE to other jitter": list(other),
                         "fresh latent, same jitter": list(fresh)},
                        index=pd.Index(["C_warm", "X_large", "M_marker"], name="do"))


def test_counterfactual_verdict_reads_what_the_images_keep():
    result = dict(rt_mean=torch.tensor([0.0002, 0.0004], dtype=torch.float64))
    v = tables.counterfactual_verdict(_cf_table(), result)
    assert v["kept"] and v["content"] and abs(v["rt_mean"] - 0.0003) < 1e-12
    assert v["ratio"] == pytest.approx((0.008 / 0.028, 0.013 / 0.027))
    assert "a nearby scene" in v["text"] and "do(C_warm) 66% (exact 64%)" in v["text"]
    assert "M_marker" not in v["text"]                    # no descendants changed: nan, left out
    assert "at least 98%" in v["text"]
    # nearly the same scene
    v = tables.counterfactual_verdict(_cf_table(same=(0.001, 0.002, 0.001)), result)
    assert v["content"] and "close to the same scene" in v["text"]
    # one counterfactual farther from its scene than from a fresh latent's image
    v = tables.counterfactual_verdict(_cf_table(fresh=(0.010, 0.034, 0.033)), result,
                                      flow_ok=False)
    assert not v["content"] and "does not carry the scene" in v["text"]
    assert v["text"].startswith("(Provisional")
    v = tables.counterfactual_verdict(_cf_table(kept=0.98), result)
    assert not v["kept"] and "which the construction forbids" in v["text"]


def _record(read, labels, nn=(1.1, 1.3), copies=(0.0, 0.0)):
    mem = dict(nn_ratio=sum(nn) / 2, copy_share=copies[0], intervals=dict(
        nn_ratio=list(nn), copy_share=list(copies)), status=dict(
        nn_ratio=quality.judge("nn_ratio", nn), copy_share=quality.judge("copy_share", copies)))
    rec = quality.combine(quality.conditional_gates(read, labels), mem)
    return dict(rec, sampler=dict(method="midpoint", steps=10, guidance=1.0), seed=2)


def test_gate_verdict_passes_only_on_passing_gates_and_a_live_sample_that_does_not_fail():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (4000, 9), generator=g)
    good = _record(labels.clone(), labels)
    live = quality.conditional_gates(labels[:40].clone(), labels[:40])
    v = tables.gate_verdict(good, live)
    assert v["ok"] and not v["not_passed"]
    assert "on 4,000 samples of seed 2 is 1.000 [1.000, 1.000]" in v["text"]
    assert "no guidance" in v["text"] and "stand." in v["text"]
    # one attribute read back on 95% of samples: its interval straddles the limit
    read = labels.clone()
    wrong = torch.rand(4000, generator=g) < 0.05
    read[wrong, 0] = 1 - read[wrong, 0]
    v = tables.gate_verdict(_record(read, labels), live)
    assert not v["ok"] and v["not_passed"] == ["min_accuracy (borderline)"]
    assert "provisional" in v["text"]
    # memorization failing
    v = tables.gate_verdict(_record(labels.clone(), labels, nn=(0.5, 0.6)), live)
    assert not v["ok"] and v["not_passed"] == ["nn_ratio (fail)"]
    # stored gates pass, the live sample fails
    bad_live = labels[:40].clone()
    bad_live[:20, 3] = 1 - bad_live[:20, 3]
    v = tables.gate_verdict(good, quality.conditional_gates(bad_live, labels[:40]))
    assert not v["ok"] and "the live read-back (fail)" in v["not_passed"]


def _probes(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(n, 9, generator=g)
    change = torch.rand(n, 9, generator=g) * 2e-4          # about half below 1e-4
    return dict(jvp=torch.randn(n, 2, 9, generator=g), out=out, paper_change=change)


def test_paper_rule_table_and_verdict():
    scm, sd = _seeing_doing()
    measured, _ = tables.image_table(sd, scm, seed=0, n_boot=50)
    probes = _probes()
    table = tables.paper_rule_table(probes, scm, measured)
    assert list(table.index) == list(STRUCTURES)
    for kind, (a, b, m) in STRUCTURES.items():
        keep = probes["paper_change"][:, scm.index(m)] < 1e-4
        assert table.loc[kind, "paper's rule: kept"] == int(keep.sum())
        share = float((probes["out"][keep, scm.index(m)] > 0).double().mean())
        assert table.loc[kind, "paper's rule: share m=1"] == pytest.approx(share)
        assert table.loc[kind, "images: do"] == measured[kind][f"do {m}=1"][0][0]
    passing = dict(status=dict(readable="pass", marginal_error="pass"), readable=0.95,
                   marginal_error=0.02, intervals=dict(readable=[0.93, 0.96],
                                                       marginal_error=[0.01, 0.03]))
    v = tables.paper_rule_verdict(table, measured, scm_flow_gates=passing)
    assert v["mixed"] == list(STRUCTURES) and not v["scm_flow_not_passed"]
    assert "in 3 of 3 structures" in v["text"] and not v["text"].startswith("(Provisional")
    # a selection of one value of m everywhere, from a flow that fails its marginal gate
    one_sided = table.assign(**{"paper's rule: share m=1": [0.95, 0.02, 0.99]})
    failing = dict(passing, status=dict(readable="pass", marginal_error="fail"))
    v = tables.paper_rule_verdict(one_sided, measured, scm_flow_gates=failing, flow_ok=False)
    assert v["mixed"] == [] and v["scm_flow_not_passed"] == ["marginal_error (fail)"]
    assert "in every structure it keeps mostly one value" in v["text"]
    assert v["text"].startswith("(Provisional: the unconditional SCM flow")
    assert "(Provisional: the conditional flow" in v["text"]


def _lf_table(plain=(0.95, 0.21, 0.16), projected=(0.975, 0.205, 0.308), exact_q=0.432):
    rows = {"plain gradient": plain, "projected": projected,
            "exact do (counterfactual)": (1.0, 0.0, exact_q)}
    return pd.DataFrame({name: {"flipped M": r[0], "P changed (do: 0)": r[1], "Q changed": r[2],
                                "others changed": 0.2} for name, r in rows.items()}).T


def test_label_free_verdict_compares_with_do_by_binomial_errors():
    # 39 of 40 latents flipped: the child's error 2 * sqrt(0.432 * 0.568 / 39) = 0.159
    v = tables.label_free_verdict(_lf_table(), 40, readable_ok=False)
    assert v["child_like_do"] and not v["parent_kept"]
    assert v["text"].startswith("(Provisional: the unconditional mode fails")
    assert "it is not an intervention on the causal variable" in v["text"]
    v = tables.label_free_verdict(_lf_table(projected=(0.975, 0.0, 0.9)), 40, readable_ok=True)
    assert not v["child_like_do"] and v["parent_kept"]
    assert "at a rate that do() would not" in v["text"] and "leaves the parent alone" in v["text"]
    assert not v["text"].startswith("(Provisional")
    # just inside and just outside two standard errors of the parent's rate 0
    se_p = (0.25 / 39) ** 0.5
    assert tables.label_free_verdict(_lf_table(projected=(0.975, 2 * se_p - 1e-9, 0.4)), 40,
                                     readable_ok=True)["parent_kept"]
    assert not tables.label_free_verdict(_lf_table(projected=(0.975, 2 * se_p + 1e-9, 0.4)), 40,
                                         readable_ok=True)["parent_kept"]


def test_a_record_from_before_intervals_is_judged_on_its_own_gates_only():
    """The pixel-range statistic of a training-time record is not a gate of this flow."""
    old = dict(min_accuracy=0.991, in_range=0.994, passed=True,
               memorization=dict(nn_ratio=1.28, copy_share=0.0),
               sampler=dict(method="midpoint", steps=10, guidance=1.0))
    rows = tables.conditional_gate_rows(old)
    assert [r["gate"] for r in rows] == ["min_accuracy", "nn_ratio", "copy_share"]
    assert all(r["status"] == "pass (point)" and r["low"] is None for r in rows)
    labels = torch.randint(0, 2, (40, 9), generator=torch.Generator().manual_seed(1))
    v = tables.gate_verdict(old, quality.conditional_gates(labels.clone(), labels))
    assert v["ok"] and "when it was trained is 0.991 (limit >= 0.95: pass (point))" in v["text"]
    # a record with a status table keeps exactly its gates
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (400, 9), generator=g)
    new = dict(_record(labels.clone(), labels), in_range=0.5)
    assert {r["gate"] for r in tables.conditional_gate_rows(new)} == set(new["status"])
