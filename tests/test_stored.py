"""flowjac.pipelines.stored: stored probe runs load, reproduce live, and summarize."""
import pytest
import torch

from flowjac.engine import probing
from flowjac.engine.velocity import velocity_fn
from flowjac.models.nets import MLPFlow
from flowjac.pipelines import stored


def _run(tmp_path):
    torch.manual_seed(0)
    net = MLPFlow(4, hidden=16, depth=2).eval().requires_grad_(False)
    readout = torch.nn.Linear(4, 3).requires_grad_(False)
    res = probing.probe(velocity_fn(net), readout, (4,), 6, k=2, steps=3,
                        method="midpoint", batch_size=4, dtype=torch.float32)
    res["plain"], _ = probing.plain_outputs(velocity_fn(net), readout, (4,), 5,
                                            steps=3, method="midpoint",
                                            dtype=torch.float32)
    torch.save(res, tmp_path / "toy_probes.pt")
    return net, readout


def test_load_and_reproduce(tmp_path):
    net, readout = _run(tmp_path)
    data = stored.load_probes("toy_probes", results_dir=tmp_path)
    rep = stored.reproduce(velocity_fn(net), readout, (4,), data, n=3)
    assert rep["out"] < 1e-6 and rep["jvp"] < 1e-5
    # a different network does not reproduce the file
    torch.manual_seed(1)
    other = MLPFlow(4, hidden=16, depth=2).eval().requires_grad_(False)
    assert stored.reproduce(velocity_fn(other), readout, (4,), data, n=3)["out"] > 1e-3
    with pytest.raises(ValueError, match="batch size"):
        stored.reproduce(velocity_fn(net), readout, (4,), data, n=5)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="probe_shipped"):
        stored.load_probes("nothing", results_dir=tmp_path)
    torch.save({"out": torch.zeros(2, 1), "meta": {"n": 2}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="lacks"):
        stored.load_probes("bad", results_dir=tmp_path)


def test_group_spread_and_label_corr():
    x = torch.arange(100.0)
    full, med, lo, hi = stored.group_spread(lambda a: a.mean(), x, groups=10)
    assert full == pytest.approx(49.5) and lo == pytest.approx(4.5)
    assert hi == pytest.approx(94.5) and med == pytest.approx(49.5)
    with pytest.raises(ValueError, match="first dimension"):
        stored.group_spread(lambda a, b: 0.0, x, x[:50])
    lab = torch.tensor([[0, 0], [1, 1], [0, 0], [1, 1]])
    assert stored.label_corr(lab, 0, 1) == pytest.approx(1.0)
    lab[:, 1] = 1
    assert stored.label_corr(lab, 0, 1) != stored.label_corr(lab, 0, 1)   # nan


def test_selection_verdict_states_its_power():
    from flowjac.pipelines.stored import selection_verdict

    # a correlation of about 0.5 in every group, removed by the selection
    assert selection_verdict((0.5, 0.5, 0.4, 0.6), (0.0, 0.02, -0.1, 0.1))[0] == "holds"
    # the same for a negative correlation
    assert selection_verdict((-0.5, -0.5, -0.6, -0.4), (0.0, -0.02, -0.1, 0.1))[0] == "holds"
    # not moved: fails, since the test could have seen a fall
    assert selection_verdict((0.5, 0.5, 0.4, 0.6), (0.5, 0.5, 0.45, 0.55))[0] == "fails"
    # unselected groups across 0: nothing the test could remove
    v, why = selection_verdict((0.3, 0.14, -0.2, 0.86), (0.0, 0.0, -0.1, 0.1))
    assert v == "inconclusive" and "no power" in why
    # selected groups as wide as the effect: a fall to 0 would not be seen
    v, why = selection_verdict((0.5, 0.5, 0.4, 0.6), (0.1, 0.1, -0.5, 0.4))
    assert v == "inconclusive" and "as wide" in why
    assert selection_verdict((0.5, 0.5, 0.4, 0.6), (float("nan"),) * 4)[0] == "inconclusive"
