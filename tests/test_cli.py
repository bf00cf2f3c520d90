"""The ``flowjac`` command line: error paths, agreement with the library,
and 2-process runs under torchrun (gloo): DDP training with an exact
resume, and sharded probing equal to the single-process result."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist

from flowjac import cli
from flowjac.engine import distributed
from flowjac.engine.checkpoints import save_checkpoint
from flowjac.models.classifiers import AttributeNet
from flowjac.utils import repo_root

# 8x8 SCM images, base channels 8: a few ms per step
TINY = ["--data", "scm", "--size", "8", "--base-channels", "8",
        "--n-train", "64", "--batch-size", "8", "--no-progress"]


def subprocess_env():
    """This environment, one thread, and the repository on the path."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(repo_root())] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def run_cli(capsys, *argv):
    """(exit status, stderr lines) of ``flowjac argv`` run in this process."""
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, err


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A flow trained for 2 steps by ``flowjac train`` and a random classifier."""
    root = tmp_path_factory.mktemp("models")
    assert cli.main(["train", *TINY, "--train-steps", "2",
                     "--out", str(root / "flow")]) == 0
    torch.manual_seed(0)
    clf = AttributeNet(n_attr=3, in_channels=3, width=4, stages=2)
    save_checkpoint(root / "clf.pt", clf)
    return root / "flow" / "checkpoint.pt", root / "clf.pt"


# -- bad input: one line on stderr, non-zero status, no traceback ----------

def test_bad_input_gives_one_line_and_nonzero_status(models, tmp_path, capsys):
    flow, clf = models
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    out = tmp_path / "p.json"
    cases = [
        (["probe", "--checkpoint", tmp_path / "missing.pt", "--n", 4,
          "--out", out], 1, "does not exist"),
        (["sample", "--checkpoint", tmp_path / "missing.pt", "--n", 4,
          "--out", tmp_path / "s.pt"], 1, "does not exist"),
        (["probe", "--checkpoint", clf, "--n", 4, "--out", out], 1,
         "AttributeNet, not a flow"),
        (["probe", "--checkpoint", flow, "--classifier", flow, "--n", 4,
          "--out", out], 1, "FlowUNet, not an AttributeNet"),
        (["probe", "--checkpoint", junk, "--n", 4, "--out", out], 1,
         "corrupted or not a torch checkpoint"),
        (["train", "--data", "cifar", "--train-steps", 2, "--out",
          tmp_path / "t"], 1, "data must be one of ('mnist', 'scm')"),
        (["probe", "--checkpoint", flow, "--n", -3, "--out", out], 1,
         "n must be >= 2, got -3"),
        (["probe", "--checkpoint", flow, "--n", 4, "--k", 0, "--out", out], 1,
         "k must be >= 1, got 0"),
        (["train", *TINY, "--train-steps", -1, "--out", tmp_path / "t"], 1,
         "train_steps must be >= 1, got -1"),
        (["sample", "--checkpoint", flow, "--n", 4, "--out",
          tmp_path / "s.txt"], 1, "out must end with .pt or .png"),
        (["probe", "--checkpoint", flow, "--n", "four", "--out", out], 2,
         "expected an integer, got 'four'"),
        (["train", *TINY, "--steps", 2, "--out", tmp_path / "t"], 2,
         "give the optimiser steps as --train-steps"),
        (["train", *TINY, "--train-steps", 2, "--out", flow.parent], 1,
         "already holds a checkpoint; pass --resume"),
        (["train", *TINY[:-3], "--batch-size", 16, "--train-steps", 3,
          "--out", flow.parent, "--resume"], 1,
         "other settings: batch_size 8 there, 16 now"),
        (["train", *TINY, "--train-steps", 1, "--out", flow.parent,
          "--resume"], 1, "train_steps (1) is smaller than the step"),
        (["train", *TINY[:4], "--base-channels", 16, *TINY[6:],
          "--train-steps", 3, "--out", flow.parent, "--resume"], 1,
         "holds a FlowUNet with config"),
    ]
    for argv, status, text in cases:
        code, err = run_cli(capsys, *argv)
        assert code == status, (argv, code, err)
        assert len(err) == 1 and text in err[0], (argv, err)
        assert not out.exists()


def test_module_entry_point_reports_errors_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "flowjac", "probe", "--checkpoint",
         str(tmp_path / "missing.pt"), "--n", "4", "--out",
         str(tmp_path / "p.json")], capture_output=True, text=True,
        env=subprocess_env(), timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"flowjac probe: error: checkpoint '{tmp_path / 'missing.pt'}' does "
        "not exist"]


# -- one process: the commands agree with the library -----------------------

def test_one_process_training_is_train_flow_bit_for_bit():
    from flowjac.engine.train import train_flow
    from flowjac.models.nets import MLPFlow

    data = torch.randn(50, 3, generator=torch.Generator().manual_seed(1))
    nets = []
    for trainer in ("train_flow", "distributed"):
        torch.manual_seed(0)
        net = MLPFlow(3, hidden=16, depth=2)
        kwargs = dict(batch_size=10, lr=1e-2, ema_decay=0.9, seed=3,
                      progress=False)
        if trainer == "train_flow":
            hist = train_flow(net, data, steps=5, **kwargs)
        else:
            hist = distributed.train_flow_distributed(net, data, train_steps=5,
                                                      **kwargs)
        nets.append((net.state_dict(), hist["loss"]))
    (a, la), (b, lb) = nets
    assert la == lb
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_sample_and_probe_equal_the_library(models, tmp_path, capsys):
    from flowjac.engine.probing import probe
    from flowjac.estimators.moments import second_moment
    from flowjac.models.pretrained import sample

    flow, _ = models
    _, velocity, shape, _ = cli.load_flow(flow)
    code, err = run_cli(capsys, "sample", "--checkpoint", flow, "--n", 5,
                        "--batch-size", 2, "--seed", 4, "--out",
                        tmp_path / "s.pt", "--no-progress")
    assert code == 0, err
    got = torch.load(tmp_path / "s.pt", weights_only=True)
    want = sample(velocity, shape, 5, method="midpoint", steps=10, seed=4,
                  batch_size=2)
    assert torch.equal(got["x"], want)

    code, err = run_cli(capsys, "probe", "--checkpoint", flow, "--patch", 2, 3,
                        2, "--n", 5, "--k", 2, "--batch-size", 2, "--seed", 7,
                        "--out", tmp_path / "p.json", "--no-progress")
    assert code == 0, err
    res = json.loads((tmp_path / "p.json").read_text())
    _, velocity64, _, _ = cli.load_flow(flow, dtype=torch.float64)
    lib = probe(velocity64, lambda x: x[:, :, 2:4, 3:5].flatten(1), shape, 5,
                k=2, steps=10, seed=7, batch_size=2, pairs=False)
    ref = second_moment(lib["jvp"].reshape(-1, 12).double())
    assert res["p"] == 12 and res["hardware"]["torch"]
    torch.testing.assert_close(torch.tensor(res["second_moment"],
                                            dtype=torch.float64), ref,
                               rtol=1e-5, atol=1e-7)
    # what to read for covariances: the plain sample covariance, with its
    # standard error, and the second moment's standard error over latents
    assert set(res["what_to_read"]) == set(cli._WHAT_TO_READ)
    f = lib["out"].double()
    torch.testing.assert_close(torch.tensor(res["sample_covariance"],
                                            dtype=torch.float64),
                               torch.cov(f.T), rtol=1e-4, atol=1e-7)
    fc = f - f.mean(0)
    terms = fc[:, :, None] * fc[:, None, :]
    torch.testing.assert_close(torch.tensor(res["sample_covariance_stderr"],
                                            dtype=torch.float64),
                               terms.std(0) / 5 ** 0.5, rtol=1e-3, atol=1e-7)
    d = lib["jvp"].reshape(5, 2, 12).double()
    per = torch.einsum("ikp,ikq->ipq", d, d) / 2       # each latent's mean
    torch.testing.assert_close(torch.tensor(res["second_moment_stderr"],
                                            dtype=torch.float64),
                               per.std(0) / 5 ** 0.5, rtol=1e-4, atol=1e-8)


def test_sample_and_probe_replace_no_file_unasked(models, tmp_path, capsys):
    import shutil
    import stat

    flow, _ = models
    ckpt = tmp_path / "c.pt"
    shutil.copy(flow, ckpt)
    as_json = tmp_path / "c.json"          # a checkpoint with a .json name
    shutil.copy(flow, as_json)
    original = ckpt.read_bytes()
    (tmp_path / "link.pt").symlink_to(ckpt)
    os.link(ckpt, tmp_path / "hard.pt")
    (tmp_path / "a_file").write_text("not a folder")
    out = tmp_path / "s.pt"
    out.write_bytes(b"the user's")
    sample = ["sample", "--checkpoint", ckpt, "--n", 2, "--no-progress"]
    refused = [
        (sample + ["--out", out], "s.pt' exists; pass --force"),
        (sample + ["--out", ckpt], "is the input --checkpoint"),
        (sample + ["--out", ckpt, "--force"], "is the input --checkpoint"),
        (sample + ["--out", tmp_path / "link.pt", "--force"],
         "is the input --checkpoint"),
        (sample + ["--out", tmp_path / "hard.pt", "--force"],
         "is the input --checkpoint"),
        (sample + ["--out", tmp_path / "a_file" / "s.pt"],
         "a_file' is a file, not a folder"),
        (["probe", "--checkpoint", as_json, "--n", 2, "--out", as_json,
          "--force", "--no-progress"], "is the input --checkpoint"),
    ]
    for argv, fragment in refused:
        code, err = run_cli(capsys, *argv)
        assert code == 1 and len(err) == 1 and fragment in err[0], (argv, err)
    assert ckpt.read_bytes() == original and as_json.read_bytes() == original
    assert out.read_bytes() == b"the user's"
    code, err = run_cli(capsys, *sample, "--out", out, "--force")
    assert code == 0, err
    assert torch.load(out, weights_only=True)["x"].shape[0] == 2
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~mask


def test_failures_are_loud_one_line_and_status_1(models, tmp_path, capsys,
                                                 monkeypatch):
    import errno

    flow, _ = models
    good = torch.load(flow, weights_only=True)

    def variant(name, change):
        payload = {k: (dict(v) if isinstance(v, dict) else v)
                   for k, v in good.items()}
        payload["model"] = dict(good["model"])
        payload["arch"] = {"class": good["arch"]["class"],
                           "config": dict(good["arch"]["config"])}
        change(payload)
        torch.save(payload, tmp_path / name)
        return tmp_path / name

    first = next(iter(good["model"]))
    nan = variant("nan.pt", lambda p: p["model"].__setitem__(
        first, torch.full_like(good["model"][first], float("nan"))))
    nan_ema = variant("nan_ema.pt", lambda p: p.__setitem__("ema", {
        k: v * float("inf") for k, v in good["model"].items()}))
    bad_ema = variant("bad_ema.pt", lambda p: p.__setitem__("ema", {
        k: v[..., :1] for k, v in good["model"].items()}))
    bad_key = variant("bad_key.pt", lambda p: p["arch"]["config"].__setitem__(
        "bogus", 1))

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))
    torch.save({"format": "flowjac-checkpoint-1", "model": Evil()},
               tmp_path / "evil.pt")
    (tmp_path / "a_file").write_text("x")
    out = tmp_path / "o.pt"
    sample = ["sample", "--n", 2, "--out", out, "--no-progress"]
    cases = [
        (["train", *TINY[:-3], "--batch-size", 0, "--train-steps", 2, "--out",
          tmp_path / "t0"], "batch_size must be >= 1, got 0"),
        (["train", *TINY, "--lr", "1e30", "--train-steps", 3, "--out",
          tmp_path / "nan_run"], "training stopped: the CFM loss was"),
        (["train", *TINY, "--train-steps", 2, "--out", tmp_path / "a_file" / "t"],
         "a_file' is a file, not a folder"),
        (["train", *TINY[:2], "--size", 10 ** 6, *TINY[4:], "--train-steps", 2,
          "--out", tmp_path / "t1"], "GiB of memory, more than"),
        (["sample", "--checkpoint", flow, "--n", 10 ** 13, "--out", out],
         "GiB of memory, more than"),
        (sample + ["--checkpoint", nan], f"checkpoint '{nan}' holds NaN or inf"),
        (sample + ["--checkpoint", nan_ema], "(EMA weights) holds NaN or inf"),
        (sample + ["--checkpoint", bad_ema], "EMA weights do not match"),
        (sample + ["--checkpoint", bad_key],
         "stores a FlowUNet config that does not build one"),
        (sample + ["--checkpoint", tmp_path / "evil.pt"],
         "is unsafe: it holds pickled Python objects"),
        (sample + ["--checkpoint", tmp_path / "evil.pt", "--format", "torchcfm",
                   "--arch", '{"dim": [1, 8, 8]}'],
         "is unsafe: it holds pickled Python objects"),
    ]
    for argv, fragment in cases:
        code, err = run_cli(capsys, *argv)
        assert code == 1 and len(err) == 1 and fragment in err[0], (argv, err)
        assert "weights_only" not in err[0]
    assert not out.exists() and not (tmp_path / "ran").exists()
    assert not (tmp_path / "nan_run" / "checkpoint.pt").exists()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr("flowjac.utils.os.fsync", full)
    code, err = run_cli(capsys, *sample, "--checkpoint", flow)
    assert code == 1 and err == [f"flowjac sample: error: disk full: no space "
                                 f"left on the device while writing ('{out}')"]
    assert [p.name for p in tmp_path.glob(".o.pt*")] == []


def test_help_is_fast_and_says_what_to_read(tmp_path):
    # no torch import before the command runs: --help costs what argparse costs
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, time; t = time.perf_counter(); "
         "from flowjac.cli import main; code = main(['probe', '--help']); "
         "print('torch' in sys.modules, time.perf_counter() - t)"],
        capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    *text, last = proc.stdout.strip().splitlines()
    assert last.split()[0] == "False", last
    text = " ".join(" ".join(text).split())
    assert "What to read for what" in text
    assert "covariances and correlations of the outputs: sample_covariance" in text
    assert "unbiased Monte Carlo estimate" in text
    assert "exact covariance" not in text and "not an exact value" in text


def test_value_range_and_load_results_take_what_the_docs_show(models, tmp_path,
                                                             capsys):
    import flowjac as fj

    flow, _ = models
    for i, argv in enumerate([["--value-range", "-1,1"], ["--value-range=-1,1"],
                              ["--value-range", "0,1"]]):
        out = tmp_path / f"s{i}.png"
        code, err = run_cli(capsys, "sample", "--checkpoint", flow, "--n", 2,
                            *argv, "--out", out, "--no-progress")
        assert code == 0 and out.stat().st_size > 0, (argv, err)
    code, err = run_cli(capsys, "sample", "--checkpoint", flow, "--n", 2,
                        "--value-range", "-2,1", "--out", tmp_path / "x.png")
    assert code == 2 and "invalid choice: '-2,1'" in err[-1]
    # a probe's --out reads back with load_results, by path
    code, err = run_cli(capsys, "probe", "--checkpoint", flow, "--patch", 0, 0, 1,
                        "--n", 3, "--k", 1, "--out", tmp_path / "r" / "p.json",
                        "--no-progress")
    assert code == 0, err
    for path in (tmp_path / "r" / "p.json", str(tmp_path / "r" / "p.json")):
        assert fj.load_results(path)["n"] == 3
    with pytest.raises(FileNotFoundError, match="results file .*q.json' does not"):
        fj.load_results(tmp_path / "r" / "q.json")
    (tmp_path / "r" / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json' is not valid JSON"):
        fj.load_results(tmp_path / "r" / "bad.json")
    assert fj.load_results("no_such_stored_result") is None


# -- two processes under torchrun (gloo) -----------------------------------

needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in "
           "this torch build")

# Several `flowjac` commands in one torchrun launch (one process group, which
# every command reuses): each launch costs about 15 s of start-up on a loaded
# 2-core machine. `python -m flowjac` itself is tested above.
DRIVER = textwrap.dedent("""\
    import json, sys
    import torch.distributed as dist
    from flowjac.cli import main
    dist.init_process_group("gloo")
    for argv in json.loads(sys.argv[1]):
        code = main(argv)
        if code:
            sys.exit(code)
    dist.destroy_process_group()
    """)


def torchrun(args, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         "--nproc_per_node=2", *args], capture_output=True, text=True,
        env=subprocess_env(), cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def numbers(res):
    """The estimates of a probe JSON (not its timing or process count)."""
    keys = ("second_moment", "second_moment_corr", "mean_output", "covariance")
    return {key: res[key] for key in keys if key in res}


def max_abs_diff(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        return max(max_abs_diff(a[key], b[key]) for key in a)
    ta, tb = (torch.tensor(json.loads(json.dumps(x).replace("null", "NaN")),
                           dtype=torch.float64) for x in (a, b))
    assert ta.shape == tb.shape and torch.equal(ta.isnan(), tb.isnan())
    return float((ta - tb).nan_to_num().abs().max())


@needs_gloo
def test_two_processes_train_resume_exactly_and_probe_as_one(models, tmp_path,
                                                             capsys):
    flow, clf = models
    train = ["train", *TINY, "--checkpoint-every", "2"]
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    probe = ["probe", "--checkpoint", str(flow), "--classifier", str(clf),
             "--n", "7", "--k", "2", "--batch-size", "2", "--seed", "5", "--estimator",
             "covariance", "--no-progress"]
    (tmp_path / "driver.py").write_text(DRIVER)
    torchrun(["driver.py", json.dumps([
        train + ["--train-steps", "3", "--out", str(resumed)],
        train + ["--train-steps", "5", "--out", str(resumed), "--resume"],
        train + ["--train-steps", "5", "--out", str(straight)],
        # as `torchrun ... -m flowjac -- probe ...` passes it ("--" keeps
        # torchrun's parser off --n)
        ["--", *probe, "--out", str(tmp_path / "two.json")],
    ])], tmp_path)

    # training: DDP on 2 ranks, resumed run == uninterrupted run, bit for bit
    a = torch.load(resumed / "checkpoint.pt", weights_only=True)
    b = torch.load(straight / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 5 and a["extra"]["world_size"] == 2
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][key], b[part][key]) for key in a[part])
    assert torch.equal(a["extra"]["rng_ranks"], b["extra"]["rng_ranks"])
    assert not torch.equal(a["extra"]["rng_ranks"][0], a["extra"]["rng_ranks"][1])
    assert a["extra"]["loss"] == b["extra"]["loss"]
    rec = json.loads((resumed / "train.json").read_text())
    assert rec["resumed_from"] == 3 and rec["world_size"] == 2

    # another world size continues from the weights with re-seeded streams
    code, err = run_cli(capsys, *train, "--train-steps", "6", "--out", resumed,
                        "--resume")
    assert code == 0 and len(err) == 1 and "re-seeded at step 5" in err[0]

    # probing: 2 shards == 1 process, to float round-off
    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # as in the torchrun workers
    try:
        code, err = run_cli(capsys, *probe, "--out",
                            tmp_path / "one.json")
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["covariance"]["cov"] is not None
    assert max_abs_diff(numbers(one), numbers(two)) < 1e-12


# -- checkpoints written by the peers' libraries (--format) -----------------

CFM_ARCH = {"dim": [1, 8, 8], "num_channels": 32, "num_res_blocks": 1,
            "channel_mult": [1, 2], "attention_resolutions": "4"}


@pytest.fixture(scope="module")
def torchcfm_checkpoint(tmp_path_factory):
    """A torchcfm-format training checkpoint (DDP prefixes) of a tiny UNet."""
    pytest.importorskip("torchcfm")
    from torchcfm.models.unet.unet import UNetModelWrapper

    root = tmp_path_factory.mktemp("torchcfm")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = UNetModelWrapper(**dict(CFM_ARCH, dim=(1, 8, 8)))
        ema = UNetModelWrapper(**dict(CFM_ARCH, dim=(1, 8, 8)))
        with torch.no_grad():
            for p in list(net.parameters()) + list(ema.parameters()):
                p.add_(0.1 * torch.randn_like(p))
    torch.save({"net_model": {f"module.{k}": v for k, v in net.state_dict().items()},
                "ema_model": {f"module.{k}": v for k, v in ema.state_dict().items()},
                "step": 7}, root / "cfm.pt")
    (root / "arch.json").write_text(json.dumps(CFM_ARCH))
    return root / "cfm.pt", root / "arch.json", net.eval(), ema.eval()


def test_torchcfm_checkpoint_sampled_and_probed_without_python(torchcfm_checkpoint,
                                                               tmp_path, capsys):
    from flowjac.engine.probing import probe
    from flowjac.estimators.moments import second_moment
    from flowjac.models.adapters import from_torchcfm
    from flowjac.models.pretrained import sample

    path, arch, net, ema = torchcfm_checkpoint
    code, err = run_cli(capsys, "sample", "--format", "torchcfm", "--arch", arch,
                        "--checkpoint", path, "--n", 3, "--seed", 2,
                        "--out", tmp_path / "s.pt", "--no-progress")
    assert code == 0, err
    got = torch.load(tmp_path / "s.pt", weights_only=True)
    assert got["meta"]["format"] == "torchcfm"
    want = sample(from_torchcfm(ema), (1, 8, 8), 3, seed=2)
    torch.testing.assert_close(got["x"], want, rtol=1e-5, atol=1e-6)
    # the raw weights differ from the EMA ones, and --raw-weights takes them
    code, err = run_cli(capsys, "sample", "--format", "torchcfm", "--arch",
                        json.dumps(CFM_ARCH), "--raw-weights", "--checkpoint", path,
                        "--n", 3, "--seed", 2, "--out", tmp_path / "r.pt", "--no-progress")
    assert code == 0, err
    raw = torch.load(tmp_path / "r.pt", weights_only=True)["x"]
    torch.testing.assert_close(raw, sample(from_torchcfm(net), (1, 8, 8), 3, seed=2),
                               rtol=1e-5, atol=1e-6)
    assert not torch.allclose(raw, got["x"])
    code, err = run_cli(capsys, "sample", "--format", "torchcfm", "--arch", arch,
                        "--checkpoint", path, "--n", 4, "--out", tmp_path / "s.png",
                        "--no-progress")
    assert code == 0 and (tmp_path / "s.png").stat().st_size > 0, err

    code, err = run_cli(capsys, "probe", "--format", "torchcfm", "--arch", arch,
                        "--checkpoint", path, "--patch", 2, 3, 2, "--n", 4, "--k", 2,
                        "--batch-size", 2, "--seed", 5, "--out", tmp_path / "p.json",
                        "--no-progress")
    assert code == 0, err
    res = json.loads((tmp_path / "p.json").read_text())
    assert res["format"] == "torchcfm" and res["dtype"] == "float32"
    lib = probe(from_torchcfm(ema), lambda x: x[:, :, 2:4, 3:5].flatten(1), (1, 8, 8),
                4, k=2, steps=10, seed=5, batch_size=2, pairs=False, dtype=torch.float32)
    ref = second_moment(lib["jvp"].reshape(-1, 4).double())
    torch.testing.assert_close(torch.tensor(res["second_moment"], dtype=torch.float64),
                               ref, rtol=1e-5, atol=1e-7)
    code, err = run_cli(capsys, "probe", "--format", "torchcfm", "--arch", arch,
                        "--checkpoint", path, "--n", 4, "--dtype", "float64",
                        "--out", tmp_path / "q.json", "--no-progress")
    assert code == 1 and len(err) == 1 and "float32" in err[0], err


def test_flow_matching_checkpoint_through_a_user_class(tmp_path, capsys):
    pytest.importorskip("flow_matching")
    from flowjac.models.adapters import from_flow_matching
    from flowjac.models.pretrained import sample

    module = tmp_path / "my_fm_models.py"
    module.write_text(textwrap.dedent("""\
        import torch
        from flow_matching.utils import ModelWrapper

        class Net(torch.nn.Module):
            def __init__(self, dim, hidden):
                super().__init__()
                self.lin1 = torch.nn.Linear(dim + 1, hidden)
                self.lin2 = torch.nn.Linear(hidden, dim)
            def forward(self, x, t):
                t = t.reshape(-1, 1).expand(x.shape[0], 1)
                return self.lin2(torch.tanh(self.lin1(torch.cat([x, t], 1))))

        class Wrapped(ModelWrapper):
            def __init__(self, dim, hidden):
                super().__init__(Net(dim, hidden))
        """))
    sys.path.insert(0, str(tmp_path))
    try:
        import my_fm_models
        torch.manual_seed(1)
        model = my_fm_models.Wrapped(3, 16)
        torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "fm.pt")
        code, err = run_cli(capsys, "sample", "--format", "flow_matching",
                            "--model-class", "my_fm_models:Wrapped",
                            "--arch", '{"dim": 3, "hidden": 16}', "--latent-shape", 3,
                            "--checkpoint", tmp_path / "fm.pt", "--n", 5, "--seed", 1,
                            "--out", tmp_path / "s.pt", "--no-progress")
        assert code == 0, err
        got = torch.load(tmp_path / "s.pt", weights_only=True)["x"]
        want = sample(from_flow_matching(model.eval()), (3,), 5, seed=1)
        torch.testing.assert_close(got, want)
        bad = [  # (argv, fragment of the one error line)
            (["--model-class", "my_fm_models:Nope", "--arch", '{"dim": 3, "hidden": 16}',
              "--latent-shape", 3], "has no 'Nope'"),
            (["--model-class", "my_fm_models:Wrapped", "--arch", '{"dim": 3}',
              "--latent-shape", 3], "arch does not fit"),
            (["--model-class", "my_fm_models:Wrapped", "--arch", '{"dim": 4, "hidden": 16}',
              "--latent-shape", 4], "mismatched keys"),
            (["--model-class", "my_fm_models:Wrapped", "--arch", '{"dim": 3, "hidden": 16}'],
             "latent_shape"),
            (["--arch", '{"dim": 3, "hidden": 16}', "--latent-shape", 3], "model_class"),
        ]
        for extra, fragment in bad:
            code, err = run_cli(capsys, "sample", "--format", "flow_matching", *extra,
                                "--checkpoint", tmp_path / "fm.pt", "--n", 2,
                                "--out", tmp_path / "x.pt", "--no-progress")
            assert code == 1 and len(err) == 1 and fragment in err[0], (extra, err)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("my_fm_models", None)


def test_foreign_format_errors_are_one_line(models, torchcfm_checkpoint, tmp_path, capsys):
    flow, _ = models
    path, arch, _, _ = torchcfm_checkpoint
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    cases = [
        (["--format", "torchcfm", "--checkpoint", path], "needs arch"),
        (["--format", "torchcfm", "--arch", "missing.json", "--checkpoint", path],
         "neither an inline JSON object"),
        (["--format", "torchcfm", "--arch", bad_json, "--checkpoint", path],
         "is not valid JSON"),
        (["--format", "torchcfm", "--arch", "[1, 2]", "--checkpoint", path],
         "neither an inline JSON object"),
        (["--format", "torchcfm", "--arch", '{"dim": [1, 8, 8], "num_channels": 64, '
          '"num_res_blocks": 1, "channel_mult": [1, 2], "attention_resolutions": "4"}',
          "--checkpoint", path], "mismatched keys"),
        (["--format", "torchcfm", "--arch", '{"num_channels": 32}', "--checkpoint", path],
         "must give dim"),
        (["--format", "torchcfm", "--arch", arch, "--label", 3, "--checkpoint", path],
         "not class-conditional"),
        (["--format", "torchcfm", "--arch", arch, "--checkpoint", flow],
         "no 'ema_model' entry"),
        (["--format", "torchcfm", "--arch", arch, "--latent-shape", 1, 8, 8,
          "--checkpoint", path], "flow_matching only"),
        (["--arch", arch, "--checkpoint", flow], "apply to --format torchcfm"),
        (["--format", "flowjac", "--checkpoint", path], "not a flowjac checkpoint"),
    ]
    for extra, fragment in cases:
        code, err = run_cli(capsys, "sample", *extra, "--n", 2, "--out", tmp_path / "x.pt",
                            "--no-progress")
        assert code == 1 and len(err) == 1 and fragment in err[0], (extra, err)
    code, err = run_cli(capsys, "sample", "--format", "keras", "--checkpoint", path,
                        "--n", 2, "--out", tmp_path / "x.pt")
    assert code == 2 and "invalid choice" in err[-1]


def test_torchcfm_readme_mlp_from_the_command_line(tmp_path, capsys):
    pytest.importorskip("torchcfm")
    from torch.func import jvp

    from torchcfm.models.models import MLP

    from flowjac.models.adapters import from_torchcfm
    from flowjac.models.pretrained import sample

    torch.manual_seed(0)
    mlp = MLP(dim=2, w=16, time_varying=True).eval()
    arch = '{"dim": 2, "w": 16, "time_varying": true}'
    # torchcfm's README calls it on cat([x, t]); the adapter does the same
    x, t = torch.randn(5, 2), torch.tensor(0.3)
    v = from_torchcfm(mlp)
    torch.testing.assert_close(v(x, t), mlp(torch.cat([x, t.expand(5, 1)], 1)))
    tangent = torch.randn(5, 2)
    ref = jvp(lambda z: mlp(torch.cat([z, t.expand(5, 1)], 1)), (x,), (tangent,))
    torch.testing.assert_close(v.jvp(x, t, tangent)[1], ref[1])
    assert v.last_path == "fast"
    want = sample(v, (2,), 6, seed=3)
    state = mlp.state_dict()
    files = {"bare.pt": state,
             "script.pt": {"ema_model": state, "net_model": state, "step": 9},
             "wrapper.pt": {f"model.{k}": w for k, w in state.items()}}
    for name, payload in files.items():
        torch.save(payload, tmp_path / name)
        code, err = run_cli(capsys, "sample", "--format", "torchcfm", "--arch", arch,
                            "--checkpoint", tmp_path / name, "--n", 6, "--seed", 3,
                            "--out", tmp_path / f"{name}.s.pt", "--no-progress")
        assert code == 0, (name, err)
        got = torch.load(tmp_path / f"{name}.s.pt", weights_only=True)["x"]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    code, err = run_cli(capsys, "probe", "--format", "torchcfm", "--arch", arch,
                        "--checkpoint", tmp_path / "bare.pt", "--n", 4, "--k", 2,
                        "--out", tmp_path / "p.json", "--no-progress")
    assert code == 0, err
    res = json.loads((tmp_path / "p.json").read_text())
    assert res["p"] == 2 and all(a is not None for row in res["second_moment"]
                                 for a in row)
    for arch_bad, fragment in [('{"dim": 2, "w": 8, "time_varying": true}',
                                "does not match MLP"),
                               ('{"dim": 2, "width": 8}', "do not describe a "
                                "torchcfm MLP"),
                               ('{"dim": [2, 3]}', "dim must be [C, H, W]")]:
        code, err = run_cli(capsys, "sample", "--format", "torchcfm", "--arch",
                            arch_bad, "--checkpoint", tmp_path / "bare.pt",
                            "--n", 2, "--out", tmp_path / "x.pt")
        assert code == 1 and len(err) == 1 and fragment in err[0], (arch_bad, err)


def test_flow_matching_wrapped_model_pattern(tmp_path, capsys, monkeypatch):
    pytest.importorskip("flow_matching")
    from flowjac.models.adapters import from_flow_matching
    from flowjac.models.pretrained import sample

    (tmp_path / "fm_wrapped_example.py").write_text(textwrap.dedent("""\
        import torch
        from flow_matching.utils import ModelWrapper

        class MLP(torch.nn.Module):      # as flow_matching's 2D example
            def __init__(self, input_dim=2, hidden_dim=16):
                super().__init__()
                self.main = torch.nn.Sequential(
                    torch.nn.Linear(input_dim + 1, hidden_dim), torch.nn.SiLU(),
                    torch.nn.Linear(hidden_dim, input_dim))
            def forward(self, x, t):
                t = t.reshape(-1, 1).expand(x.shape[0], 1)
                return self.main(torch.cat([x, t], 1))

        class WrappedModel(ModelWrapper):
            def forward(self, x, t, **extras):
                return self.model(x, t)
        """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        import fm_wrapped_example as ex
        torch.manual_seed(2)
        net = ex.MLP(2, 16)
        want = sample(from_flow_matching(ex.WrappedModel(net).eval()), (2,), 4,
                      seed=1)
        torch.save(net.state_dict(), tmp_path / "vf.pt")            # the network's
        torch.save({"model": ex.WrappedModel(net).state_dict()},
                   tmp_path / "wrapped.pt")                          # the wrapper's
        common = ["--format", "flow_matching", "--model-class",
                  "fm_wrapped_example:MLP", "--arch",
                  '{"input_dim": 2, "hidden_dim": 16}', "--latent-shape", 2,
                  "--n", 4, "--seed", 1, "--no-progress"]
        for name in ("vf.pt", "wrapped.pt"):
            code, err = run_cli(capsys, "sample", *common, "--wrapper",
                                "fm_wrapped_example:WrappedModel", "--checkpoint",
                                name, "--out", f"{name}.s.pt")
            assert code == 0, (name, err)
            got = torch.load(tmp_path / f"{name}.s.pt", weights_only=True)["x"]
            torch.testing.assert_close(got, want)
        for wrapper, fragment in [("os:system", "wrapper 'os:system' is a"),
                                  ("fm_wrapped_example:torch", "is a module, not a class"),
                                  ("subprocess:Popen", "not a torch.nn.Module")]:
            code, err = run_cli(capsys, "sample", *common, "--wrapper", wrapper,
                                "--checkpoint", "vf.pt", "--out", "x.pt")
            assert code == 1 and len(err) == 1 and fragment in err[0], (wrapper, err)
    finally:
        sys.modules.pop("fm_wrapped_example", None)
