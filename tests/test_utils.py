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


def test_resume_state_resumes_its_own_partial_and_refuses_others(tmp_path):
    from flowjac.base import atomic_torch_save, resume_state

    out = tmp_path / "run.pt"
    fresh = {"done": 0, "meta": {"settings": {"n": 4}}}
    partial, state = resume_state(out, {"n": 4}, fresh)
    assert partial == tmp_path / "run.pt.partial" and state is fresh
    atomic_torch_save(partial, {"done": 2, "meta": {"settings": {"n": 4}}})
    assert resume_state(out, {"n": 4}, fresh)[1]["done"] == 2
    with pytest.raises(SystemExit, match="other settings"):
        resume_state(out, {"n": 5}, fresh)
    assert torch.load(partial, weights_only=True)["done"] == 2      # kept as it was
    out.write_bytes(b"a finished run")
    with pytest.raises(SystemExit, match="--force"):
        resume_state(out, {"n": 4}, fresh)
    assert resume_state(out, {"n": 4}, fresh, force=True)[1]["done"] == 2
    assert out.read_bytes() == b"a finished run"


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


def test_glued_strings_read_back_as_written():
    """MyST-NB's text role literal_evals a glued text/plain: every glued string
    must come back unchanged, commas and digits included."""
    from ast import literal_eval

    from flowjac.utils import _Plain

    def shown(text):           # myst_nb.core.variables.format_plain_text
        try:
            return str(literal_eval(repr(_Plain(text))))
        except (ValueError, SyntaxError):
            return repr(_Plain(text))

    for text in ("3,000", "holds", "1, 7", "0.3", "1e-10", "(a, b)", "[1]",
                 "does not separate them", "u* names its five", "'quoted'"):
        assert shown(text) == text, text
    assert repr(_Plain("holds")) == "holds"     # a bare word stays unquoted


def test_page_print_wraps_long_lines_only(capsys):
    from flowjac.utils import page_print

    page_print("short line")
    page_print("  " + "word " * 40, width=30)
    page_print("a", "b", sep="-")
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "short line"
    wrapped = out[1:-1]
    assert len(wrapped) > 1 and all(len(line) <= 30 for line in wrapped)
    assert wrapped[0].startswith("  word") and wrapped[1].startswith("    word")
    assert " ".join(w.strip() for w in wrapped).split() == ["word"] * 40
    assert out[-1] == "a-b"


def test_a_failed_write_removes_only_its_own_temporary(tmp_path, monkeypatch):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    user = tmp_path / ".out.bin.flowjac-tmp-mine"   # even a look-alike survives
    user.write_bytes(b"the user's")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(utils.os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space"):
        utils.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old" and user.read_bytes() == b"the user's"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".out.bin.flowjac-tmp-mine", "out.bin"]


def test_written_files_keep_the_users_umask(tmp_path):
    import os
    import stat

    old = os.umask(0o027)
    try:
        for mask, name in [(0o027, "a.bin"), (0o002, "b.json")]:
            os.umask(mask)
            path = (utils.atomic_write_bytes(tmp_path / name, b"x")
                    if name.endswith(".bin") else
                    utils.save_json(tmp_path / name, {"a": 1}))
            assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, name
    finally:
        os.umask(old)


def test_concurrent_writers_of_one_path_each_leave_a_whole_file(tmp_path):
    import threading

    target = tmp_path / "shared.bin"
    payloads = [bytes([i]) * (1 << 20) for i in range(6)]
    errors, seen = [], []

    def write(data):
        try:
            for _ in range(5):
                utils.atomic_write_bytes(target, data)
                seen.append(target.read_bytes() in payloads)
        except Exception as err:           # a writer broken by another
            errors.append(err)

    threads = [threading.Thread(target=write, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and all(seen) and len(seen) == 30
    assert target.read_bytes() in payloads
    assert [p.name for p in tmp_path.iterdir()] == ["shared.bin"]


def test_hardware_text_names_the_gpu_or_the_cpu_and_threads():
    from flowjac.base import hardware, hardware_text

    assert hardware_text({"cpu": "AMD EPYC", "gpu": "NVIDIA H200", "torch_threads": 4}) \
        == "NVIDIA H200"
    assert hardware_text({"cpu": "AMD EPYC", "torch_threads": 1}) == "AMD EPYC (1 thread)"
    assert hardware_text({"cpu": "AMD EPYC", "torch_threads": 2}) == "AMD EPYC (2 threads)"
    assert hardware_text(hardware())
    with pytest.raises(ValueError, match="hardware"):
        hardware_text({})


def test_image_rows_draws_one_labelled_row_per_entry():
    import matplotlib
    matplotlib.use("Agg")
    from flowjac import plotting

    fig = plotting.image_rows({"flow samples": torch.rand(10, 1, 8, 8),
                               "data": torch.rand(12, 1, 8, 8)}, n=10)
    axes = fig.axes
    assert len(axes) == 20 and axes[0].get_ylabel() == "flow\nsamples"
    with pytest.raises(ValueError, match="at least 10 images"):
        plotting.image_rows({"few": torch.rand(3, 1, 8, 8)})
