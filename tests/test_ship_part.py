"""tools/ship_part.py: a part ships only with passing gates on a fresh seed, and never replaces silently."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from flowjac.models import pretrained

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("ship_part", ROOT / "tools" / "ship_part.py")
ship_part = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ship_part)

RK4 = {"method": "rk4", "steps": 10}


@pytest.fixture
def weights(tmp_path):
    out = tmp_path / "weights"
    shutil.copytree(pretrained.WEIGHTS_DIR, out)
    return out


def _record(tmp_path, weights, **gate_changes):
    current = json.loads((weights / "manifest.json").read_text())["parts"]["scm-flow"]
    gates = {"sampler": RK4, "n": 4000, "seed": 2, "passed": True,
             "status": {"readable": "pass", "marginal_error": "pass"}}
    gates.update(gate_changes)
    midpoint = dict(gates, sampler={"method": "midpoint", "steps": 10}, passed=False,
                    status={"readable": "pass", "marginal_error": "borderline"})
    record = {k: v for k, v in current.items() if k not in ("sha256", "gates_by_sampler")}
    record.update(gates=midpoint, gates_by_sampler=[midpoint, gates],
                  started_from={"file": "stage1.pt", "sha256": current["sha256"]},
                  gates_along_training=[])
    path = tmp_path / "scm-flow.json"
    path.write_text(json.dumps(record))
    new = tmp_path / "new_flow.pt"
    new.write_bytes(b"not the shipped flow")
    return path, new, current


def test_ships_the_named_samplers_gates_and_keeps_the_first_stage(tmp_path, weights):
    record, new, old = _record(tmp_path, weights)
    before = json.loads((weights / "manifest.json").read_text())["parts"]
    with pytest.raises(SystemExit, match="--replace"):
        ship_part.ship(record, new, RK4, weights)
    assert pretrained.sha256(weights / "scm_flow.pt") == old["sha256"]   # untouched
    entry = ship_part.ship(record, new, RK4, weights, replace=True, note="why rk4")
    assert entry["sha256"] == pretrained.sha256(new) == pretrained.sha256(weights / "scm_flow.pt")
    assert entry["sampler"] == RK4 and entry["gates"]["sampler"] == RK4
    assert entry["gates"]["passed"] and entry["notes"] == "why rk4"
    assert entry["first_stage"]["sha256"] == old["sha256"]
    assert entry["first_stage"]["gates_along_training"] == old["gates_along_training"]
    after = json.loads((weights / "manifest.json").read_text())["parts"]
    assert {p: e for p, e in after.items() if p != "scm-flow"} == \
        {p: e for p, e in before.items() if p != "scm-flow"}


@pytest.mark.parametrize("change, message", [
    (dict(status={"readable": "pass", "marginal_error": "borderline"}), "do not all pass"),
    (dict(passed=False), "do not all pass"),
    (dict(n=2000), "n >= 4000"),
    (dict(seed=1), "seed other than 1"),
])
def test_refuses_gates_that_do_not_pass_on_a_fresh_seed(tmp_path, weights, change, message):
    record, new, old = _record(tmp_path, weights, **change)
    with pytest.raises(SystemExit, match=message):
        ship_part.ship(record, new, RK4, weights, replace=True)
    assert pretrained.sha256(weights / "scm_flow.pt") == old["sha256"]


def test_refuses_a_sampler_without_gates_and_a_recipe_not_the_packages(tmp_path, weights):
    record, new, _ = _record(tmp_path, weights)
    with pytest.raises(SystemExit, match="no gates measured"):
        ship_part.ship(record, new, {"method": "euler", "steps": 99}, weights, replace=True)
    rec = json.loads(record.read_text())
    rec["recipe"]["lr"] = 1.0
    record.write_text(json.dumps(rec))
    with pytest.raises(SystemExit, match="not the package's recipe"):
        ship_part.ship(record, new, RK4, weights, replace=True)


def test_sampler_argument_is_checked():
    assert ship_part._sampler("rk4:10") == RK4
    for bad in ("rk4", "rk4:0", ":10", "rk4:ten"):
        with pytest.raises(SystemExit, match="--sampler"):
            ship_part._sampler(bad)


def test_a_shipped_fine_tune_reads_as_two_stages(tmp_path, weights):
    record, new, old = _record(tmp_path, weights)
    rec = json.loads(record.read_text())
    rec["hardware"] = {"cpu": "AMD EPYC", "torch_threads": 1}
    rec["gates_along_training"] = [{"step": 3500, "readable": 0.9, "marginal_error": 0.1}]
    record.write_text(json.dumps(rec))
    entry = ship_part.ship(record, new, RK4, weights, replace=True)
    text = pretrained.training_history(entry)
    first = entry["first_stage"]
    assert f"trained for {first['train_steps']:,} steps on" in text
    assert f"fine-tuned for {entry['train_steps'] - first['train_steps']:,} steps" in text
    assert "AMD EPYC CPU (1 thread(s))" in text
    along = pretrained.gates_along_training(entry)
    assert along[:-1] == old["gates_along_training"] and along[-1]["step"] == 3500
    # a part trained in one stage reads as one
    one = json.loads((weights / "manifest.json").read_text())["parts"]["mnist-fives"]
    assert "fine-tuned" not in pretrained.training_history(one)
    assert pretrained.gates_along_training(one) == one["gates_along_training"]


def _readout_record(tmp_path, record_changes=None, **gate_changes):
    record_changes = record_changes or {}
    from flowjac.models import morpho_models

    gates = {"n": 10000, "heldout": "the published set", "passed": True,
             "status": {"t_mae": "pass", "i_mae": "pass"}}
    gates.update(gate_changes)
    new = tmp_path / "regressor.pt"
    new.write_bytes(b"a readout")
    record = {"part": "morpho-regressor", "file": "morpho-regressor.pt", "train_steps": 16000,
              "recipe": json.loads(json.dumps(morpho_models.MORPHO_RECIPES["morpho-regressor"])),
              "hardware": {"cpu": "test"}, "train_seconds": 1.0, "gates": gates,
              "finished": True, "sha256": pretrained.sha256(new)}
    record.update(record_changes)
    path = tmp_path / "morpho-regressor.json"
    path.write_text(json.dumps({k: v for k, v in record.items() if v is not None}))
    return path, new


def test_a_readout_ships_without_a_sampler_and_only_on_held_out_passing_gates(tmp_path, weights):
    before = json.loads((weights / "manifest.json").read_text())["parts"]
    record, new = _readout_record(tmp_path)
    with pytest.raises(SystemExit, match="has no sampler; omit it"):
        ship_part.ship(record, new, RK4, weights)
    for change, why in (({"n": 3999}, "n=3999"), ({"heldout": None}, "held out: None"),
                        ({"status": {"t_mae": "pass", "i_mae": "fail"}}, "i_mae")):
        bad, _ = _readout_record(tmp_path, **change)
        with pytest.raises(SystemExit, match=why):
            ship_part.ship(bad, new, None, weights, replace=True)
    # the gates are tied to the weights, and to the recipe's whole training
    for change, why in (({"sha256": None}, "names no sha256"), ({"sha256": "0" * 64}, "--weights"),
                        ({"train_steps": 12000}, "trained 12000 steps"),
                        ({"finished": False}, "finished: False")):
        bad, _ = _readout_record(tmp_path, change)
        with pytest.raises(SystemExit, match=why):
            ship_part.ship(bad, new, None, weights, replace=True)
    record, new = _readout_record(tmp_path)
    if (weights / "morpho-regressor.pt").exists():
        with pytest.raises(SystemExit, match="--replace"):
            ship_part.ship(record, new, None, weights)
    entry = ship_part.ship(record, new, None, weights, replace=True)
    assert "sampler" not in entry and entry["sha256"] == pretrained.sha256(new)
    after = json.loads((weights / "manifest.json").read_text())["parts"]
    assert {p: e for p, e in after.items() if p != "morpho-regressor"} == \
        {p: e for p, e in before.items() if p != "morpho-regressor"}
    # a flow still needs its sampler named
    flow, new_flow, _ = _record(tmp_path, weights)
    with pytest.raises(SystemExit, match="--sampler: scm-flow needs one"):
        ship_part.ship(flow, new_flow, None, weights)
    # and so does a classifier of the recipes: the readout's path is for Morpho parts only
    clf = json.loads(flow.read_text())
    clf["part"] = "mnist-digits"
    clf["recipe"] = json.loads(json.dumps(pretrained.RECIPES["mnist-digits"]))
    flow.write_text(json.dumps(clf))
    with pytest.raises(SystemExit, match="--sampler: mnist-digits needs one"):
        ship_part.ship(flow, new_flow, None, weights)
