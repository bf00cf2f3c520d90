"""Morpho-MNIST counterfactuals by the published protocol (pipelines.morpho_counterfactuals) and its runner (tools/run_morpho_counterfactuals.py)."""
import gzip
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import draw

from flowjac.base import repo_root
from flowjac.data import morpho
from flowjac.engine.checkpoints import save_checkpoint
from flowjac.models.classifiers import AttributeNet
from flowjac.models.morpho_gates import _scale
from flowjac.models.nets import FlowUNet
from flowjac.pipelines import morpho_counterfactuals as mc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import run_morpho_counterfactuals as runner  # noqa: E402

PUBLISHED = repo_root().parent / "shared" / "morpho-mnist-dscm"


class Toy:
    """A hand-made conditional flow: v(x, t; c) = a x + b(c), b linear in the code, with
    classifier-free guidance as the package's ``_Given`` applies it. Its flow map is
    x1 = e^a z + (e^a - 1) / a b(c) (a = 0: z + b(c))."""

    def __init__(self, a=0.0, scale=0.05):
        self.a = a
        g = torch.Generator().manual_seed(0)
        self.patterns = scale * torch.randn(12, 1, 28, 28, generator=g, dtype=torch.float64)

    def given(self, code, guidance=1.0):
        code = torch.as_tensor(code, dtype=torch.float64)
        b = torch.einsum("nc,chw->nhw", code, self.patterns[:, 0]).unsqueeze(1)

        def velocity(x, t):
            return self.a * x + guidance * b.to(x.dtype)
        return velocity


def ring(n=4):
    """Synthetic digits (rings of grey 200) on 28 x 28, as uint8."""
    out = np.zeros((n, 28, 28), dtype=np.uint8)
    for k in range(n):
        rr, cc = draw.disk((14, 14), 8 + k % 2)
        out[k][rr, cc] = 200
        rr, cc = draw.disk((14, 14), 5 + k % 2)
        out[k][rr, cc] = 0
    return out


def parents(n, seed=3):
    draw_ = morpho.sample_scm(n, seed)
    return draw_["t"], draw_["i"], np.arange(n) % 10


def test_round_trip_is_exact_to_solver_tolerance_for_a_linear_velocity():
    toy = Toy(a=-0.7)
    x = torch.rand(3, 1, 28, 28, dtype=torch.float64)
    t, i, d = parents(3)
    fine = mc.round_trip_error(toy, x, t, i, d, method="rk4", steps=50)
    coarse = mc.round_trip_error(toy, x, t, i, d, method="euler", steps=2)
    assert fine.shape == (3,) and fine.max() < 1e-6
    assert coarse.min() > 1.0            # the metric sees a solver's error
    # abduction recovers the closed-form latent of the linear flow
    z = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    b = Toy(a=-0.7).given(mc._code(t, i, d))(torch.zeros_like(z), 0.0)
    x1 = np.exp(-0.7) * z + (np.exp(-0.7) - 1) / -0.7 * b
    back = mc.abduct(toy, x1, t, i, d, method="rk4", steps=50)
    assert float((back - z).abs().max()) < 1e-6


def test_null_composition_of_an_exact_flow_is_zero_and_counterfactuals_follow_the_scm():
    toy = Toy(a=0.0)                     # Euler is exact for a constant velocity
    x = torch.from_numpy(ring(4)).double().div(255).unsqueeze(1)
    t, i, d = parents(4)
    cur = x
    for _ in range(10):
        cur = mc.counterfactual_images(toy, cur, t, i, d, None, method="euler", steps=1,
                                       clip=False)["images"]
    assert mc._l1(cur, x).max() < 1e-9
    # do(t): i follows the SCM with the abducted noise; the image moves by b(c*) - b(c)
    cf = mc.counterfactual_images(toy, x, t, i, d, {"t": 2.0}, method="euler", steps=1,
                                  clip=False)
    t_star, i_star = morpho.counterfactual(t, i, do_t=2.0)
    np.testing.assert_allclose(cf["t"], 2.0)
    np.testing.assert_allclose(cf["i"], i_star)
    np.testing.assert_allclose(cf["eps_i"], morpho.abduct(t, i))
    shift = toy.given(mc._code(t_star, i_star, d))(x, 0.0) - toy.given(mc._code(t, i, d))(x, 0.0)
    assert float((cf["images"] - x - shift).abs().max()) < 1e-12
    cf = mc.counterfactual_images(toy, x, t, i, d, {"digit": 7}, method="euler", steps=1)
    assert (cf["digits"] == 7).all() and np.allclose(cf["t"], t) and np.allclose(cf["i"], i)
    with pytest.raises(ValueError, match="do"):
        mc.counterfactual_images(toy, x, t, i, d, {"slant": 1.0})


class Renderer:
    """A flow whose velocity is the render of its conditioning, constant in x and t: with one
    Euler step it maps z to z + R(c), so an image R(c) abducts to z = 0 and decodes to R(c*)."""

    def __init__(self, base):
        self.base, self.cache = base.astype(np.float64), {}

    def render(self, code):
        mean_t, sd_t, mean_i, sd_i = _scale()
        out = []
        for row in code.double():
            t, i = float(row[0]) * sd_t + mean_t, float(row[1]) * sd_i + mean_i
            key = (round(t, 6), round(i, 6))
            if key not in self.cache:
                img = morpho.set_intensity(morpho.set_thickness(self.base, t), i)
                self.cache[key] = torch.from_numpy(img / 255.0)
            out.append(self.cache[key])
        return torch.stack(out).unsqueeze(1)

    def given(self, code, guidance=1.0):
        r = self.render(torch.as_tensor(code))
        return lambda x, t: r.to(x.dtype)


def test_effectiveness_on_a_known_toy_beats_the_null_baseline():
    base = ring(1)[0]
    toy = Renderer(base)
    t, i, d = np.array([1.8, 2.6, 3.4]), np.array([120.0, 180.0, 230.0]), np.array([0, 0, 0])
    x = toy.render(mc._code(t, i, d)).float()
    targets = {"t": np.array([3.2, 1.6, 2.2])}
    cf = mc.counterfactual_images(toy, x, t, i, d, targets, method="euler", steps=1)
    m = mc.measure_samples(cf["images"])
    err_t = np.abs(m["thickness"] - cf["t"])
    err_i = np.abs(m["intensity"] - cf["i"])
    null_t = np.abs(mc.measure_samples(x)["thickness"] - cf["t"])
    assert err_t.mean() < 0.35 and err_t.mean() < 0.3 * null_t.mean()
    assert err_i.mean() < 2.0            # i* from the SCM (abducted noise), rendered


def tiny_classifier():
    torch.manual_seed(0)
    return AttributeNet(n_attr=10, in_channels=1, width=4, stages=1).eval()


def test_summary_intervals_floors_baselines_and_padding():
    toy = Toy(a=-0.3)
    n = 8
    x = ring(n)
    t, i, d = parents(n)
    rows = mc.evaluate_batch(toy, x, t, i, d, mc.intervention_targets(range(n)),
                             tiny_classifier(), method="rk4", steps=8, clip=False)
    assert rows["composition"].shape == (n, 10)
    assert rows["do_t.features"].shape == (n, 4)
    s = mc.summarize(rows)
    assert set(s["composition"]) == {1, 10}
    for stat in [s["round_trip"], *s["composition"].values(),
                 *(v["reversibility"] for v in s["interventions"].values())]:
        lo, hi = stat["interval"]
        assert lo <= stat["value"] <= hi
        assert stat["padded"] == pytest.approx(stat["value"] * 784 / 1024)
    for name, v in s["interventions"].items():
        for key in ("t_mae", "i_mae", "digit_accuracy"):
            assert v[key]["interval"][0] <= v[key]["value"] <= v[key]["interval"][1]
        # the null baseline is the unchanged image against the target, computed here
        target = rows[f"do_{name}.target_t"]
        assert v["null"]["t_mae"]["value"] == pytest.approx(
            np.abs(rows["real.measured_t"] - target).mean())
    assert s["floor"]["t_mae"]["value"] == pytest.approx(
        np.abs(rows["real.measured_t"] - t).mean())
    table = mc.counterfactual_table(s)
    assert table[0]["metric"].startswith("round trip") and len(table) == 3 + 3 * 5


def test_a_flow_that_ignores_its_conditioning_is_as_effective_as_doing_nothing():
    toy = Toy(a=0.0, scale=0.0)          # v = 0: every counterfactual is the image itself
    n = 6
    x = ring(n)
    t, i, d = parents(n)
    rows = mc.evaluate_batch(toy, x, t, i, d, mc.intervention_targets(range(n)),
                             tiny_classifier(), method="euler", steps=1, cycles=2)
    s = mc.summarize(rows)
    assert s["composition"][1]["value"] == 0 and s["round_trip"]["value"] == 0
    for v in s["interventions"].values():
        assert v["reversibility"]["value"] == 0
        for key in ("t_mae", "i_mae", "digit_accuracy"):
            assert v[key]["value"] == pytest.approx(v["null"][key]["value"])


def test_targets_are_fixed_per_row_and_drawn_from_the_marginals():
    whole = mc.intervention_targets(range(2000))
    part = mc.intervention_targets([3, 4, 1500])
    for k in ("t", "i", "digit"):
        np.testing.assert_array_equal(part[k], whole[k][[3, 4, 1500]])
    m = morpho.scm_moments()
    assert abs(whole["t"].mean() - m["mean_t"]) < 4 * np.sqrt(m["var_t"] / 2000)
    assert abs(whole["i"].mean() - m["mean_i"]) < 4 * np.sqrt(m["var_i"] / 2000)
    assert set(np.unique(whole["digit"])) == set(range(10))
    with pytest.raises(ValueError, match="rows"):
        mc.intervention_targets([10_000])


def test_frechet_distance_of_shifted_features_is_the_squared_shift():
    a = torch.randn(500, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    shift = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    assert mc.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert mc.frechet_distance(a, a + shift) == pytest.approx(float((shift ** 2).sum()))
    assert mc.frechet_distance(a, 2 * a) > 0.5
    with pytest.raises(ValueError, match="feature sets"):
        mc.frechet_distance(a, a[:, :2])


def summary_with(lo, hi, value=None):
    value = (lo + hi) / 2 if value is None else value
    return {"composition": {10: {"value": value, "interval": [lo, hi]}},
            "round_trip": {"value": 0.1, "interval": [0.05, 0.15]}}


@pytest.mark.parametrize("lo, hi, status", [(0.2, 0.6, "pass"), (1.5, 2.5, "fail"),
                                            (0.8, 1.3, "borderline")])
def test_the_composition_rule(lo, hi, status):
    v = mc.composition_verdict(summary_with(lo, hi))
    assert v["status"] == status and "round trip" in v["text"]


def test_the_composition_rule_without_ten_cycles_is_undecided():
    assert mc.composition_verdict({"composition": {1: {"value": 0.1, "interval": [0, 1]}},
                                   "round_trip": {"value": 0.0}})["status"] == "undecided"


def test_diagnosis_names_the_solver_when_more_steps_remove_the_error():
    toy = Toy(a=-1.0)
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    t, i, d = parents(2)
    rows = mc.composition_diagnosis(
        toy, x, t, i, d, cycles=3,
        settings=({"name": "euler 2", "method": "euler", "steps": 2, "clip": False},
                  {"name": "euler 32", "method": "euler", "steps": 32, "clip": False}))
    assert [r["name"] for r in rows] == ["euler 2", "euler 32"]
    assert rows[1]["composition"] < 0.2 * rows[0]["composition"]
    assert rows[1]["round_trip"] < rows[0]["round_trip"]


def test_an_untrained_flow_unet_runs_the_protocol_and_its_guidance():
    torch.manual_seed(0)
    net = FlowUNet(base_channels=8, channel_mult=(1, 2), time_dim=16, norm_groups=4,
                   num_labels=12).eval()
    x = ring(2)
    t, i, d = parents(2)
    z1 = mc.abduct(net, x, t, i, d, steps=2)
    z2 = mc.abduct(net, x, t, i, d, steps=2, guidance=2.0)
    assert z1.shape == (2, 1, 28, 28) and not torch.allclose(z1, z2)
    cf = mc.counterfactual_images(net, x, t, i, d, {"i": 100.0}, steps=2)
    assert cf["images"].min() >= 0 and cf["images"].max() <= 1


# ------------------------------------------------------------------ the runner
def write_published(root: Path, n=4):
    """A stand-in for the published set: IDX images and labels, gzipped, and the csv."""
    root.mkdir(parents=True)
    images = ring(n)
    labels = np.arange(n, dtype=np.uint8) % 10
    t, i, _ = parents(n)
    with gzip.open(root / morpho.PUBLISHED_FILES[0], "wb") as fh:
        fh.write(np.array([2051, n, 28, 28], dtype=">u4").tobytes() + images.tobytes())
    with gzip.open(root / morpho.PUBLISHED_FILES[1], "wb") as fh:
        fh.write(np.array([2049, n], dtype=">u4").tobytes() + labels.tobytes())
    rows = "\n".join(f"{k},{t[k]},{i[k]}" for k in range(n))
    (root / morpho.PUBLISHED_FILES[2]).write_text("index,thickness,intensity\n" + rows + "\n")


def test_the_runner_resumes_and_refuses_to_overwrite(tmp_path):
    root = tmp_path / "published"
    write_published(root)
    torch.manual_seed(0)
    net = FlowUNet(base_channels=4, channel_mult=(1,), time_dim=8, norm_groups=2,
                   num_labels=12).eval()
    flow = save_checkpoint(tmp_path / "flow.pt", net)
    clf = save_checkpoint(tmp_path / "clf.pt", tiny_classifier())
    quiet = lambda msg: None  # noqa: E731
    kw = dict(n=4, batch=2, classifier=clf, root=root, log=quiet)
    whole = runner.run(tmp_path / "whole.pt", flow, **kw)
    out = tmp_path / "run.pt"
    assert runner.run(out, flow, stop_after=1, **kw) is None
    assert not out.exists() and (tmp_path / "run.pt.partial").exists()
    resumed = runner.run(out, flow, **kw)
    assert not (tmp_path / "run.pt.partial").exists()
    for k, v in whole["rows"].items():
        assert torch.equal(v, resumed["rows"][k]), k
    back = torch.load(out, weights_only=True)
    assert back["meta"]["complete"] and back["meta"]["n"] == 4
    assert back["summary"]["verdict"]["status"] in ("pass", "fail", "borderline")
    assert back["meta"]["weights_sha256"]["flow"] == runner.sha256(flow)
    with pytest.raises(SystemExit, match="--force"):
        runner.run(out, flow, **kw)
    assert runner.run(out, flow, force=True, **kw) is not None
    # a partial file of other settings is refused
    assert runner.run(tmp_path / "b.pt", flow, stop_after=1, **kw) is None
    with pytest.raises(SystemExit, match="other settings"):
        runner.run(tmp_path / "b.pt", flow, **dict(kw, batch=1))


@pytest.fixture
def published():
    if not PUBLISHED.is_dir():
        pytest.skip(f"the published Morpho-MNIST test set is not under {PUBLISHED}")
    return morpho.load_published(PUBLISHED)


def test_the_floor_on_published_digits_is_the_measurement_error(published):
    n = 8
    toy = Toy(a=0.0, scale=0.0)
    rows = mc.evaluate_batch(toy, published.images[:n], published.t[:n], published.i[:n],
                             published.digits[:n], mc.intervention_targets(range(n)),
                             tiny_classifier(), method="euler", steps=1, cycles=1)
    s = mc.summarize(rows)
    assert s["floor"]["t_mae"]["value"] < 0.3 and s["floor"]["i_mae"]["value"] < 2.0
    # the targets are far from the images' own parents: the null baseline is not the floor
    assert s["interventions"]["t"]["null"]["t_mae"]["value"] > 2 * s["floor"]["t_mae"]["value"]
