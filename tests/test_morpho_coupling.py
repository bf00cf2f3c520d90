"""The coupling study of Morpho-MNIST counterfactuals (pipelines.morpho_coupling): gaps between flows of one conditional law, their summary and the rule."""
import numpy as np
import pytest
import torch

from flowjac.data import morpho
from flowjac.pipelines import morpho_coupling as cs
from flowjac.pipelines import morpho_counterfactuals as mc


class Toy:
    """v(x, t; c) = a x + b(c), b linear in the code (as in test_morpho_counterfactuals)."""

    def __init__(self, a=0.0, seed=0):
        self.a = a
        g = torch.Generator().manual_seed(seed)
        self.patterns = 0.05 * torch.randn(12, 1, 28, 28, generator=g, dtype=torch.float64)

    def given(self, code, guidance=1.0):
        b = torch.einsum("nc,chw->nhw", torch.as_tensor(code, dtype=torch.float64),
                         self.patterns[:, 0]).unsqueeze(1)
        return lambda x, t: self.a * x + guidance * b.to(x.dtype)


def observed(n=5):
    d = morpho.sample_scm(n, 4)
    g = torch.Generator().manual_seed(2)
    x = (0.5 + 0.1 * torch.randn(n, 1, 28, 28, generator=g)).clamp(0, 1)
    return x, d["t"], d["i"], np.arange(n) % 10


def test_gaps_are_zero_between_identical_flows_and_match_the_counterfactuals():
    x, t, i, d = observed()
    ref, same, other = Toy(), Toy(), Toy(a=0.4)
    targets = {"t": np.full(5, 3.0), "digit": (d + 1) % 10}
    rows = cs.gap_rows({"morpho-conditional": ref, "same": same, "other": other}, x, t, i, d,
                       targets, method="euler", steps=4)
    assert set(rows) == {"t", "digit"}
    for name, r in rows.items():
        assert np.all(r["gap"]["same"] == 0) and np.all(r["effect"] > 0)
        do = {name: targets[name]}
        a = mc.counterfactual_images(ref, x, t, i, d, do, method="euler", steps=4)["images"]
        b = mc.counterfactual_images(other, x, t, i, d, do, method="euler", steps=4)["images"]
        expect = (a.double() - b.double()).abs().flatten(1).mean(1).numpy() * 255
        np.testing.assert_allclose(r["gap"]["other"], expect, rtol=1e-12)
        np.testing.assert_allclose(
            r["effect"], (a.double() - x.double()).abs().flatten(1).mean(1).numpy() * 255,
            rtol=1e-12)


def test_bad_input_is_refused_naming_the_argument():
    x, t, i, d = observed(2)
    with pytest.raises(ValueError, match="^models "):
        cs.gap_rows({"morpho-conditional": Toy()}, x, t, i, d, {"t": [2.0, 3.0]})
    with pytest.raises(ValueError, match="^reference "):
        cs.gap_rows({"a": Toy(), "b": Toy()}, x, t, i, d, {"t": [2.0, 3.0]})
    with pytest.raises(ValueError, match="^targets "):
        cs.gap_rows({"morpho-conditional": Toy(), "b": Toy()}, x, t, i, d, {"slant": [1, 2]})


def summary(noise, other, effect=10.0):
    return {"t": {"n": 100, "effect": {"value": effect, "interval": [effect - 1, effect + 1]},
                  "gap": {"morpho-conditional-seed1": {"value": sum(noise) / 2,
                                                       "interval": list(noise)},
                          "morpho-conditional-ot": {"value": sum(other) / 2,
                                                    "interval": list(other)}}}}


@pytest.mark.parametrize("noise, other, status, material", [
    ((0.5, 0.7), (2.0, 2.4), "beyond training noise", True),
    ((0.5, 0.7), (0.6, 0.9), "no difference detected", False),
    ((0.5, 0.7), (0.8, 0.95), "beyond training noise", False),
    ((2.0, 3.0), (0.5, 0.7), "no difference detected", False)])
def test_the_rule(noise, other, status, material):
    v = cs.gap_verdict(summary(noise, other))["t"]
    assert v["status"] == status and v["material"] is material


def test_the_summary_has_intervals_and_shares_and_a_missing_flow_is_undecided():
    rows = {"i": {"effect": np.linspace(4, 6, 40),
                  "gap": {"morpho-conditional-seed1": np.linspace(0.1, 0.3, 40)}}}
    s = cs.gap_summary(rows)["i"]
    lo, hi = s["effect"]["interval"]
    assert s["n"] == 40 and lo < 5 < hi
    assert abs(s["gap"]["morpho-conditional-seed1"]["share_of_effect"] - 0.04) < 1e-12
    assert cs.gap_verdict({"i": s})["i"]["status"] == "undecided"


def test_the_runner_resumes_and_refuses_to_overwrite(tmp_path):
    import sys
    from pathlib import Path

    from flowjac.engine.checkpoints import save_checkpoint
    from flowjac.models.nets import FlowUNet
    from test_morpho_counterfactuals import write_published

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import run_morpho_coupling as runner

    root = tmp_path / "published"
    write_published(root)
    flows = {}
    for k, name in enumerate(cs.COUPLING_STUDY["flows"]):
        torch.manual_seed(k)
        net = FlowUNet(base_channels=4, channel_mult=(1,), time_dim=8, norm_groups=2,
                       num_labels=12).eval()
        flows[name] = save_checkpoint(tmp_path / f"{name}.pt", net)
    kw = dict(n=4, batch=2, root=root, log=lambda msg: None)
    whole = runner.run(tmp_path / "whole.pt", flows, **kw)
    out = tmp_path / "run.pt"
    assert runner.run(out, flows, stop_after=1, **kw) is None
    assert not out.exists() and (tmp_path / "run.pt.partial").exists()
    resumed = runner.run(out, flows, **kw)
    assert not (tmp_path / "run.pt.partial").exists()
    for name, r in whole["rows"].items():
        assert torch.equal(r["effect"], resumed["rows"][name]["effect"]), name
        for m, g in r["gap"].items():
            assert len(g) == 4 and torch.equal(g, resumed["rows"][name]["gap"][m]), (name, m)
    back = torch.load(out, weights_only=True)
    assert set(back["verdict"]) == {"t", "i", "digit"}
    assert back["meta"]["settings"]["weights_sha256"]["morpho-conditional-ot"] == \
        runner.sha256(flows["morpho-conditional-ot"])
    with pytest.raises(SystemExit, match="--force"):
        runner.run(out, flows, **kw)
    assert runner.run(tmp_path / "b.pt", flows, stop_after=1, **kw) is None
    with pytest.raises(SystemExit, match="other settings"):
        runner.run(tmp_path / "b.pt", flows, **dict(kw, batch=1))
    with pytest.raises(SystemExit, match="missing"):
        runner._flows([f"morpho-conditional={flows['morpho-conditional']}"])
    with pytest.raises(SystemExit, match="NAME=PATH"):
        runner._flows(["nope=x"])
