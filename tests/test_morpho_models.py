"""Morpho-MNIST models: tiny recipes train, checkpoint and resume exactly; the gates judge
intervals, fail on noise and pass on real renders; the training command refuses to overwrite."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flowjac.data import morpho
from flowjac.models import morpho_models as mm
from flowjac.models.classifiers import train_classifier

TINY_NET = dict(in_channels=1, base_channels=8, channel_mult=[1, 2], time_dim=16,
                image_size=28, num_res_blocks=1, norm_groups=4)
DATA = dict(draws_per_digit=1, seed=0, split="train", n_digits=40)
HELDOUT = dict(draws_per_digit=1, seed=1, split="test", n_digits=10)
STEPS = dict(train_steps=4, batch_size=4, lr_cooldown=[2, 4])
MEASUREMENT_FLOOR = mm.measurement_floor     # the tiny fixture replaces it by the constants


def _tiny_recipes() -> dict:
    r = mm.MORPHO_RECIPES
    return {
        "morpho-conditional": dict(r["morpho-conditional"], data=DATA, heldout=HELDOUT, **STEPS,
                                   net=dict(TINY_NET, num_labels=12),
                                   sampler=dict(method="euler", steps=2, guidance=1.0)),
        "morpho-conditional-ot": dict(r["morpho-conditional-ot"], data=DATA, heldout=HELDOUT,
                                      **STEPS, net=dict(TINY_NET, num_labels=12),
                                      sampler=dict(method="euler", steps=2, guidance=1.0)),
        "morpho-flow": dict(r["morpho-flow"], data=DATA, heldout=HELDOUT, **STEPS,
                            net=dict(TINY_NET), sampler=dict(method="euler", steps=2)),
        "morpho-regressor": dict(r["morpho-regressor"], data=DATA, train_steps=5, batch_size=8,
                                 finetune=dict(steps=3, lr=1e-4, seed=1),
                                 net=dict(n_attr=2, in_channels=1, width=4, stages=2,
                                          blocks_per_stage=1, stem_stride=1)),
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny recipes on 40 renders (10 held out), cached in a temporary folder; the floor's constants."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mm, "CACHE_DIR", tmp_path_factory.mktemp("morpho-cache"))
        for part, recipe in _tiny_recipes().items():
            mp.setitem(mm.MORPHO_RECIPES, part, recipe)
        mp.setattr(mm, "measurement_floor",
                   lambda root=None, n=None: dict(mm.FLOOR, n=0, source="test"))
        yield mm.training_data("morpho-flow")


@pytest.fixture(scope="module")
def digits_classifier():
    from flowjac.models import pretrained

    return pretrained.load("mnist-digits").classifier


def test_the_shipped_recipes_are_fixed_and_consistent():
    r = mm.MORPHO_RECIPES
    assert r["morpho-conditional"]["net"]["num_labels"] == mm.N_CONDITIONS == 12
    assert "num_labels" not in r["morpho-flow"]["net"]
    for part in ("morpho-conditional", "morpho-flow"):
        assert r[part]["train_steps"] == 12_000 and r[part]["lr_cooldown"] == [8_000, 12_000]
        assert r[part]["data"] == dict(draws_per_digit=5, seed=0, split="train")
    assert r["morpho-conditional"]["sampler"]["guidance"] == 1.0
    # the coupling study's flows: the conditional recipe with one thing changed
    base = r["morpho-conditional"]
    for part, changed in (("morpho-conditional-ot", {"coupling": "ot"}),
                          ("morpho-conditional-seed1", {"seed": 1})):
        other = {k: v for k, v in r[part].items() if k != "file"}
        assert other == dict({k: v for k, v in base.items() if k != "file"}, **changed), part
        assert isinstance(mm.recipe(part), mm.MorphoConditionalRecipe)
    assert mm.recipe("morpho-regressor").loss == "mse"
    assert isinstance(mm.recipe("morpho-conditional"), mm.MorphoConditionalRecipe)


def test_conditioning_standardises_and_codes_the_digit():
    m = morpho.scm_moments()
    code = mm.conditioning([m["mean_t"], 3.0], [m["mean_i"], 100.0], [0, 7])
    assert code.shape == (2, 12) and code.dtype == torch.float32
    assert torch.allclose(code[0, :2], torch.zeros(2), atol=1e-6)
    assert abs(float(code[1, 0]) - (3.0 - 2.5) / np.sqrt(0.4)) < 1e-6
    assert code[1, 2 + 7] == 1 and (code[1, 2:].sum() == -8)
    assert (code[:, 2:] != 0).all()        # no real condition is the dropped all-zero code


@pytest.mark.parametrize("args, name", [
    (([2.0], [100.0], [10]), "digits"), (([2.0], [100.0, 90.0], [1]), "i"),
    (([np.nan], [100.0], [1]), "t"), (([2.0], [100.0], [1.5]), "digits")])
def test_conditioning_refuses_bad_input_naming_it(args, name):
    with pytest.raises(ValueError, match=rf"^{name} "):
        mm.conditioning(*args)


def test_row_codes_look_up_each_rows_condition_and_zero_is_unknown():
    seen = []

    class Net(torch.nn.Module):
        config = {}

        def forward(self, x, t, cond):
            seen.append(cond)
            return x

    table = torch.randn(11, 12)
    wrapped = mm._RowCoded(Net(), table)
    bits = wrapped.row_bits()
    assert bits.shape == (11, 4) and set(bits.unique().tolist()) <= {0, 1}
    code = 2 * bits.float() - 1
    code[3] = 0                               # dropped: unknown
    wrapped(torch.zeros(11, 1, 28, 28), torch.zeros(11), code)
    expect = table.clone()
    expect[3] = 0
    assert torch.equal(seen[0], expect)


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_conditional_recipe_judges_the_planned_limits_memorization_included(tiny, tmp_path,
                                                                          digits_classifier):
    rec = mm.recipe("morpho-conditional")
    model, _ = rec.train(tmp_path, chunk=4)
    gates = rec.gates(model, n=8, seed=2, classifier=digits_classifier, floor=mm.FLOOR)
    planned = mm.planned_limits("conditional", mm.FLOOR)
    assert gates["limits"] == planned and list(gates["limits"]) == list(planned)
    assert set(gates["status"]) == set(planned)


def test_conditional_flow_trains_checkpoints_and_resumes_bit_identically(tiny, tmp_path):
    rec = mm.recipe("morpho-conditional")
    whole, record = rec.train(tmp_path / "whole", chunk=2)
    assert record["train_steps"] == 4 and record["finished"] and record["seconds_per_step"] > 0
    assert not (tmp_path / "whole" / ".morpho-conditional-training.pt").exists()
    stops = []
    part, first = rec.train(tmp_path / "cut", chunk=2, resume=True,
                            on_chunk=lambda m, s: stops.append(s) or True)
    assert stops == [2] and not first["finished"]
    again, second = rec.train(tmp_path / "cut", chunk=2, resume=True)
    assert second["finished"]
    a, b = _weights(whole), _weights(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the saved file is the bare FlowUNet, loadable by the recipe
    path = rec.save(again, tmp_path / "c.pt", step=4)
    loaded = rec.load_file(path)
    assert all(torch.equal(loaded.state_dict()[k], b[k]) for k in b)
    assert loaded.num_labels == 12


def test_unconditional_flow_trains_and_its_gates_have_intervals(tiny, tmp_path, digits_classifier):
    rec = mm.recipe("morpho-flow")
    model, record = rec.train(tmp_path, chunk=4)
    gates = rec.gates(model, n=8, seed=2, classifier=digits_classifier)
    assert gates["samples"].shape == (8, 1, 28, 28)
    for name in ("mean_t_error", "corr_ti_error", "class_error", "nn_ratio", "copy_share"):
        lo, hi = gates["intervals"][name]
        assert lo <= hi and gates["status"][name] in ("pass", "borderline", "fail")
        assert name in gates["limits"]
    assert gates["passed"] is False         # four steps do not make digits
    assert set(gates["scm"]) == set(gates["reference_moments"])
    # every gate the recipe judges, memorization included, was planned with its limit
    assert gates["limits"] == mm.planned_limits("unconditional")
    assert list(gates["limits"]) == list(mm.planned_limits("unconditional"))


def test_conditional_gates_fail_on_noise_and_pass_on_real_renders(tiny, digits_classifier):
    data = tiny
    real = data.float_images()
    gates = mm.conditional_gates(real, data.t, data.i, data.digits,
                                 mm.read_digits(digits_classifier, real), floor=mm.FLOOR)
    assert gates["status"]["t_mae"] == "pass" and gates["status"]["i_mae"] == "pass"
    assert gates["t_mae"] < 2 * mm.FLOOR["t"] and gates["digit_readback"] >= 0.9
    # the limits the chapter prints before any flow is trained are the ones judged
    planned = mm.planned_limits("conditional", mm.FLOOR)
    assert {k: v for k, v in planned.items() if k in gates["limits"]} == gates["limits"]
    assert list(planned)[:3] == list(gates["limits"])
    noise = torch.rand(len(data), 1, 28, 28, generator=torch.Generator().manual_seed(0))
    bad = mm.conditional_gates(noise, data.t, data.i, data.digits,
                               mm.read_digits(digits_classifier, noise), floor=mm.FLOOR)
    assert bad["status"]["t_mae"] == "fail" and bad["status"]["i_mae"] == "fail"
    assert not bad["passed"]
    with pytest.raises(ValueError, match=r"^logits "):
        mm.conditional_gates(real, data.t, data.i, data.digits, torch.zeros(3, 10))


def test_unconditional_gates_pass_the_data_against_itself_and_fail_noise(tiny, digits_classifier):
    data = tiny
    real = data.float_images()
    ref = {"t": data.t_measured, "i": data.i_measured}
    shares = np.full(10, 0.1)
    ok = mm.unconditional_gates(real, mm.read_digits(digits_classifier, real), ref, shares)
    for name in ("mean_t_error", "mean_i_error", "sd_t_error", "sd_i_error", "corr_ti_error"):
        assert ok[name] < 1e-6 and ok["status"][name] != "fail", name
    planned = mm.planned_limits("unconditional")
    assert {k: v for k, v in planned.items() if k in ok["limits"]} == ok["limits"]
    assert list(planned)[:len(ok["limits"])] == list(ok["limits"])
    with pytest.raises(ValueError, match="^kind "):
        mm.planned_limits("regressor")
    noise = torch.rand(len(data), 1, 28, 28, generator=torch.Generator().manual_seed(1))
    bad = mm.unconditional_gates(noise, mm.read_digits(digits_classifier, noise), ref, shares)
    assert bad["status"]["mean_t_error"] == "fail" and bad["status"]["sd_i_error"] == "fail"
    # saturated samples: every intensity 255, so corr(t, i) is undefined and counts as 0
    flat = (noise > 0.5).float()
    sat = mm.unconditional_gates(flat, mm.read_digits(digits_classifier, flat), ref, shares)
    assert sat["sd_i_error"] == 1.0 and sat["status"]["corr_ti_error"] == "fail"
    assert abs(sat["corr_ti_error"] - ok["reference_moments"]["corr_ti"]) < 1e-12
    with pytest.raises(ValueError, match=r"^reference "):
        mm.unconditional_gates(real, mm.read_digits(digits_classifier, real), {"t": [1]}, shares)


def test_regressor_gates_print_the_floor_and_baseline_and_catch_saturation():
    rng = np.random.default_rng(0)
    draw = morpho.sample_scm(500, rng)
    t, i = draw["t"], draw["i"]
    good = mm.regressor_gates(t + 0.01 * rng.standard_normal(500), i + 0.1, t, i, floor=mm.FLOOR)
    assert good["passed"] and good["floor"]["t"] == mm.FLOOR["t"]
    assert good["baseline_mae"]["i"] > 30 and abs(good["slope_min"] - 1) < 0.02
    # a saturating readout: right in the middle, flat at the ends
    flat = mm.regressor_gates(np.clip(t, 2.2, 2.8), np.clip(i, 140, 175), t, i, floor=mm.FLOOR)
    assert flat["status"]["slope_min"] == "fail" and not flat["passed"]
    mean = mm.regressor_gates(np.full(500, 2.5), np.full(500, 157.79), t, i, floor=mm.FLOOR)
    assert abs(mean["t_mae"] - mean["baseline_mae"]["t"]) < 1e-9
    with pytest.raises(ValueError, match=r"^floor "):
        mm.regressor_gates(t, i, t, i, floor={"t": -1})


def test_regressor_trains_on_standardised_labels_and_predicts_scm_units(tiny, tmp_path):
    rec = mm.recipe("morpho-regressor")
    model, record = rec.train(tmp_path)
    assert record["train_steps"] == 5 + 3 and record["seconds_per_step"] > 0   # and the finetune
    pred = mm.predict_attributes(model, tiny.images[:6])
    assert pred["t"].shape == (6,) and np.isfinite(pred["i"]).all()
    with pytest.raises(ValueError, match=r"^images "):
        mm.predict_attributes(model, tiny.images[:6].astype(np.float32))
    # with resume both stages' checkpoints are kept, and a second call trains
    # nothing and ends with the same weights
    first, _ = rec.train(tmp_path / "res", chunk=2, resume=True)
    assert (tmp_path / "res" / ".morpho-regressor-training.pt").exists()
    assert (tmp_path / "res" / ".morpho-regressor-finetune-training.pt").exists()
    again, rec2 = rec.train(tmp_path / "res", chunk=2, resume=True)
    assert rec2["train_steps"] == 8
    for k, v in first.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    for k, v in model.state_dict().items():            # chunks do not change the run
        assert torch.equal(v, first.state_dict()[k]), k
    with pytest.raises(FileExistsError, match="earlier run's training checkpoint"):
        rec.train(tmp_path / "res", chunk=2)


def test_mse_regression_in_train_classifier():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 8, 8, generator=g)
    y = torch.stack([x.mean((1, 2, 3)), x.amax((1, 2, 3))], 1) * 4
    from flowjac.models.classifiers import AttributeNet

    torch.manual_seed(0)
    net = AttributeNet(n_attr=2, in_channels=1, width=4, stages=1)
    hist = train_classifier(net, x, y, steps=60, batch_size=32, lr=1e-2, loss="mse")
    assert np.mean(hist["loss"][-10:]) < np.mean(hist["loss"][:3])
    with pytest.raises(ValueError, match=r"^labels must be finite"):
        train_classifier(net, x, y * np.nan, steps=1, loss="mse")
    with pytest.raises(ValueError, match=r"^loss must be 'bce', 'ce' or 'mse'"):
        train_classifier(net, x, y, steps=1, loss="l1")


def test_an_undefined_statistic_fails_its_gate():
    out = mm._judged({}, {"x": ("max", 1.0), "y": ("min", 0.5)}, [float("nan"), 0.6], [0.2, 0.7])
    assert out["status"] == {"x": "fail", "y": "pass"} and out["intervals"]["x"] == [None, None]
    assert out["passed"] is False


def test_judge_interval_is_quality_judges_rule():
    from flowjac.models import quality

    for interval in ([0.96, 0.99], [0.94, 0.97], [0.90, 0.93]):
        assert mm.judge_interval(interval, 0.95, "min") == quality.judge("min_accuracy", interval)
    assert mm.judge_interval([0.1, 0.2], 0.25, "max") == "pass"
    with pytest.raises(ValueError, match=r"^side "):
        mm.judge_interval([0, 1], 0.5, "above")
    with pytest.raises(ValueError, match=r"^part "):
        mm.recipe("morpho-nothing")


def test_measurement_floor_on_published_digits_or_the_constants(tmp_path):
    try:
        morpho.load_published()
    except FileNotFoundError:
        pytest.skip("the published Morpho-MNIST test set is not here")
    floor = MEASUREMENT_FLOOR(n=300)
    assert floor["n"] == 300 and abs(floor["t"] - mm.FLOOR["t"]) < 0.03
    assert abs(floor["i"] - mm.FLOOR["i"]) < 0.3
    assert MEASUREMENT_FLOOR(tmp_path)["source"].startswith("FLOOR constants")


def test_the_training_command_writes_its_outputs_and_never_overwrites(tiny, tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "train_morpho", Path(__file__).resolve().parent.parent / "tools" / "train_morpho.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    args = ["morpho-flow", "--out", str(tmp_path), "--chunk", "2", "--n-gate", "6"]
    assert tool.main(args) == 0
    record = json.loads((tmp_path / "morpho-flow.json").read_text())
    assert record["train_steps"] == 4 and record["gates"]["n"] == 6
    assert record["gates"]["decides_shipping"] is False and "hardware" in record
    saved = torch.load(tmp_path / "morpho-flow_samples.pt", weights_only=True)
    assert saved["samples"].dtype == torch.uint8 and saved["samples"].shape == (6, 28, 28)
    before = (tmp_path / "morpho-flow.pt").read_bytes()
    assert tool.main(args) == 2 and "--force" in capsys.readouterr().err
    assert (tmp_path / "morpho-flow.pt").read_bytes() == before
    # the work file was kept: --force without --resume starts afresh, same weights
    assert (tmp_path / ".morpho-flow-training.pt").exists()
    assert tool.main(args + ["--force"]) == 0
    assert (tmp_path / "morpho-flow.pt").stat().st_size == len(before)
    (tmp_path / "morpho-flow.pt").unlink()
    (tmp_path / "morpho-flow.json").unlink()
    (tmp_path / "morpho-flow_samples.pt").unlink()
    assert tool.main(args) == 2 and "--resume" in capsys.readouterr().err
    clock = json.loads((tmp_path / ".morpho-flow-clock.json").read_text())
    assert clock["step"] == 4
    # a resumed run counts the earlier runs' training time from the clock
    (tmp_path / ".morpho-flow-clock.json").write_text(json.dumps(dict(clock, seconds=1000.0)))
    assert tool.main(args + ["--resume"]) == 0
    record = json.loads((tmp_path / "morpho-flow.json").read_text())
    # this run found the training finished: it measured the gates and added no time
    assert record["train_seconds"] == 1000.0 and record["train_seconds_this_run"] == 0.0
    from flowjac.models.recipe_settings import sha256
    assert record["sha256"] == sha256(tmp_path / "morpho-flow.pt")
    # a clock without its work file is stale: ignored
    (tmp_path / ".morpho-flow-training.pt").unlink()
    for f in ("morpho-flow.pt", "morpho-flow.json", "morpho-flow_samples.pt"):
        (tmp_path / f).unlink()
    assert tool.main(args + ["--resume"]) == 0
    record = json.loads((tmp_path / "morpho-flow.json").read_text())
    assert 0 < record["train_seconds"] == record["train_seconds_this_run"] < 1000.0
    assert tool.main(args + ["--force", "--train-steps", "0"]) == 2
    assert "--train-steps must be >= 1" in capsys.readouterr().err


def test_the_ot_recipe_trains_on_optimal_transport_pairs(tiny, tmp_path):
    from flowjac.engine import train as tr

    batches = []
    real = tr.ot_pairing
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tr, "ot_pairing", lambda x0, x1: batches.append(len(x0)) or real(x0, x1))
        _, record = mm.recipe("morpho-conditional-ot").train(tmp_path / "ot", chunk=2)
        assert batches == [STEPS["batch_size"]] * STEPS["train_steps"]
        batches.clear()
        mm.recipe("morpho-conditional").train(tmp_path / "independent", chunk=2)
        assert batches == []
    assert record["finished"]


def test_the_readout_measures_intensity_and_keeps_the_regressors_thickness(tmp_path):
    from flowjac.models.classifiers import AttributeNet

    torch.manual_seed(0)
    reg = AttributeNet(n_attr=2, in_channels=1, width=4, stages=2).eval()
    x = torch.rand(5, 1, 28, 28, dtype=torch.float64)
    reg = reg.double()
    both = mm.MorphoReadout(reg, intensity="regressor")
    hybrid = mm.MorphoReadout(reg)
    with torch.no_grad():
        z, h = both(x), hybrid(x)
    _, _, mean_i, sd_i = mm._scale()
    assert torch.equal(z, reg(x)) and torch.equal(h[:, 0], z[:, 0])
    torch.testing.assert_close(h[:, 1] * sd_i + mean_i, morpho.intensity_torch(x))
    with pytest.raises(ValueError, match="^intensity "):
        mm.MorphoReadout(reg, intensity="median")
    try:
        morpho.load_published()
    except FileNotFoundError:
        return
    # on the published set the measured intensity is the floor's own measurement
    g = mm.readout_gates(mm.MorphoReadout(reg.float()), n=200)
    data = morpho.load_published()
    assert abs(g["i_mae"] - np.abs(morpho.intensity(data.images[:200]) - data.i[:200]).mean()) < 1e-4



def test_the_build_command_records_its_time_and_never_overwrites(tiny, tmp_path, monkeypatch):
    import importlib.util
    from pathlib import Path

    monkeypatch.setattr(mm, "CACHE_DIR", tmp_path / "fresh-cache")     # nothing cached yet

    spec = importlib.util.spec_from_file_location(
        "build_morpho_data", Path(__file__).resolve().parent.parent / "tools" / "build_morpho_data.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "morpho_dataset.json"
    record = tool.build(out)
    assert record["data"]["renders"] == 40 and record["heldout"]["renders"] == 10
    assert record["data"]["seconds"] >= 0 and "cpu" in record["hardware"]
    assert json.loads(out.read_text()) == json.loads(json.dumps(record))
    with pytest.raises(SystemExit, match="--force"):
        tool.build(out)
    # the sets are cached now: reading them is no build, so nothing is recorded
    with pytest.raises(SystemExit, match="already cached"):
        tool.build(tmp_path / "again.json")
    assert not (tmp_path / "again.json").exists()
