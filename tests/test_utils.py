"""Tests of flowjac.utils: parameters, devices, seeding, atomic files."""
import json

import pytest
import torch

import flowjac as fj
from flowjac import utils
from flowjac.closedform import mixture, unified
from flowjac.estimators import intervals


def test_setup_valid(tmp_path):
    run = fj.setup("demo", "quick", 3, "auto", tmp_path, n_samples=10)
    assert run.output_dir == tmp_path / "demo" and run.output_dir.is_dir()
    assert run.pick(quick=1, full=2) == 1
    assert run.device.type in ("cpu", "cuda")


@pytest.mark.parametrize("kwargs, msg", [
    (dict(profile="medium"), "profile must be one of"),
    (dict(seed=-1), "seed must be >= 0"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(device="tpu"), "device must be one of"),
    (dict(n_samples=-5), "n_samples must be >= 1"),
    (dict(n_samples=0), "n_samples must be >= 1"),
])
def test_setup_rejects_bad_parameters(tmp_path, kwargs, msg):
    args = dict(profile="quick", seed=0, device="cpu", output_dir=tmp_path)
    counts = {k: v for k, v in kwargs.items() if k.startswith("n_")}
    args.update({k: v for k, v in kwargs.items() if not k.startswith("n_")})
    with pytest.raises(ValueError, match=msg):
        fj.setup("demo", **args, **counts)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="no CUDA GPU"):
        fj.get_device("cuda")
    assert fj.get_device("auto").type == "cpu"


def test_seed_everything_reproducible():
    fj.seed_everything(7)
    a = torch.randn(5)
    fj.seed_everything(7)
    assert torch.equal(a, torch.randn(5))


def test_save_json_atomic(tmp_path):
    path = utils.save_json(tmp_path / "sub" / "r.json",
                           {"x": torch.tensor([1.0, 2.0]), "p": tmp_path})
    assert json.loads(path.read_text())["x"] == [1.0, 2.0]
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]


def test_value_range_of_numbers_and_tensors():
    from flowjac._checks import value_range
    assert value_range(0.25, "t") == (0.25, 0.25)
    assert value_range(torch.tensor([0.5, 0.1, 0.9]), "t") == pytest.approx((0.1, 0.9))
    assert value_range(torch.tensor([3, 1]), "t") == (1.0, 3.0)
    assert value_range(torch.empty(0), "t") is None
    for bad, word in [("half", "t must be a number"), (float("inf"), "t must be finite"),
                      (torch.tensor([0.1, float("nan")]), "t must be finite")]:
        with pytest.raises(ValueError, match=word):
            value_range(bad, "t")


def test_numpy_integers_are_accepted_where_a_count_is_meant():
    """Issue 15, item 9: valid numpy integers were rejected."""
    import numpy as np
    import torch


    gm = mixture.GaussianMixture(torch.tensor([0.5, 0.5]),
                                 torch.tensor([[-1.0], [1.0]]),
                                 torch.full((2, 1, 1), 0.25))
    assert gm.sample(np.int64(5)).shape == (5, 1)
    assert gm.sample_base(np.int32(3)).shape == (3, 1)
    assert unified.sample_times(np.int64(5)).shape == (5,)
    ci = intervals.bootstrap_ci(lambda x: x.mean(), torch.randn(20, 2),
                                 n_boot=np.int64(50),
                                 generator=torch.Generator().manual_seed(0))
    assert len(ci) == 3


def test_heap_helpers_run_everywhere():
    from flowjac.utils import bound_heap, release_memory

    assert isinstance(bound_heap(), bool)
    release_memory()
