"""Training with torchcfm's own parts (flowjac.models.torchcfm_recipe): exact
resume, torchcfm's checkpoint format read back by the public loader."""
import pytest
import torch

pytest.importorskip("torchcfm")

from flowjac.models import adapters, pretrained  # noqa: E402
from flowjac.models.torchcfm_recipe import shipped_payload, train_torchcfm  # noqa: E402

TINY = dict(unet=dict(dim=[1, 8, 8], num_channels=32, num_res_blocks=1,
                      channel_mult=[1, 2], attention_resolutions="4"),
            batch_size=8, lr=1e-3, warmup=2, ema_decay=0.9, grad_clip=1.0, seed=3)


def data(n=32):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def test_resume_ends_where_an_uninterrupted_run_ends(tmp_path):
    whole = train_torchcfm(data(), tmp_path / "a.pt", train_steps=6, chunk=3, **TINY)
    assert whole["train_steps"] == 6
    part = train_torchcfm(data(), tmp_path / "b.pt", train_steps=3, chunk=3, **TINY)
    assert part["train_steps"] == 3
    rest = train_torchcfm(data(), tmp_path / "b.pt", train_steps=6, chunk=3, **TINY)
    assert rest["train_steps"] == 6
    a = torch.load(tmp_path / "a.pt", weights_only=True)
    b = torch.load(tmp_path / "b.pt", weights_only=True)
    assert set(a) >= {"net_model", "ema_model", "optim", "sched", "step"}
    for key in ("net_model", "ema_model"):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), (key, name)
    assert torch.equal(a["losses"], b["losses"])
    # the EMA moved away from the raw weights, and training changed the weights
    moved = [not torch.equal(a["net_model"][k], a["ema_model"][k]) for k in a["net_model"]
             if a["net_model"][k].is_floating_point()]
    assert any(moved)


def test_a_stopping_rule_ends_the_run_where_a_shorter_run_ends(tmp_path):
    seen = []

    def stop_at_3(model, step):
        seen.append(step)
        return step >= 3            # e.g. "the gates passed"

    stopped = train_torchcfm(data(), tmp_path / "s.pt", train_steps=9, chunk=3,
                             on_chunk=stop_at_3, **TINY)
    assert stopped["train_steps"] == 3 and seen == [3]
    short = train_torchcfm(data(), tmp_path / "t.pt", train_steps=3, chunk=3, **TINY)
    assert short["train_steps"] == 3
    a = torch.load(tmp_path / "s.pt", weights_only=True)
    b = torch.load(tmp_path / "t.pt", weights_only=True)
    for name, value in a["ema_model"].items():
        assert torch.equal(value, b["ema_model"][name]), name
    # a rule that returns None (no verdict) does not stop it
    train_torchcfm(data(), tmp_path / "n.pt", train_steps=6, chunk=3,
                   on_chunk=lambda m, s: None, **TINY)
    assert torch.load(tmp_path / "n.pt", weights_only=True)["step"] == 6


def test_lr_cooldown_is_fixed_in_absolute_steps_and_ends_at_zero(tmp_path):
    cool = dict(TINY, lr_cooldown=(3, 6))
    # before the cool-down starts the schedule is the plain one, so a plain
    # 3-step checkpoint resumed with the cool-down equals a cool-down run
    train_torchcfm(data(), tmp_path / "r.pt", train_steps=3, chunk=3, **TINY)
    train_torchcfm(data(), tmp_path / "r.pt", train_steps=6, chunk=3, **cool)
    train_torchcfm(data(), tmp_path / "c.pt", train_steps=6, chunk=3, **cool)
    plain = train_torchcfm(data(), tmp_path / "p.pt", train_steps=6, chunk=3, **TINY)
    assert plain["train_steps"] == 6
    r, c, p = (torch.load(tmp_path / f, weights_only=True) for f in ("r.pt", "c.pt", "p.pt"))
    for name, value in c["net_model"].items():
        assert torch.equal(value, r["net_model"][name]), name
    assert any(not torch.equal(v, p["net_model"][k]) for k, v in c["net_model"].items())
    assert c["optim"]["param_groups"][0]["lr"] == 0.0
    assert p["optim"]["param_groups"][0]["lr"] == TINY["lr"]
    # past its end the learning rate stays 0: the raw weights stop moving
    train_torchcfm(data(), tmp_path / "c.pt", train_steps=8, chunk=2, **cool)
    after = torch.load(tmp_path / "c.pt", weights_only=True)
    for name, value in c["net_model"].items():
        assert torch.equal(value, after["net_model"][name]), name
    for bad in [(5, 5), (6, 3), (-1, 2), (1.5, 3), [1, 2, 3], "1,2"]:
        with pytest.raises(ValueError, match="lr_cooldown"):
            train_torchcfm(data(), tmp_path / "x.pt", train_steps=2, chunk=2,
                           **dict(TINY, lr_cooldown=bad))


def test_shipped_file_is_read_by_the_public_loader(tmp_path):
    train_torchcfm(data(), tmp_path / "work.pt", train_steps=2, chunk=2, **TINY)
    payload = shipped_payload(tmp_path / "work.pt")
    assert set(payload) == {"ema_model", "step"} and payload["step"] == 2
    torch.save(payload, tmp_path / "ship.pt")
    unet = dict(TINY["unet"], dim=(1, 8, 8))
    vel = adapters.load_torchcfm_checkpoint(tmp_path / "ship.pt", **unet)
    assert vel.step == 2
    state = vel.model.state_dict()
    for name, value in payload["ema_model"].items():
        assert torch.equal(state[name], value)
    x = torch.randn(3, 1, 8, 8)
    v = vel(x, 0.5)
    assert v.shape == x.shape and torch.isfinite(v).all()
    # the shipped payload has no raw weights: asking for them is one clear error
    with pytest.raises(ValueError, match="net_model"):
        adapters.load_torchcfm_checkpoint(tmp_path / "ship.pt", ema=False, **unet)


def test_bad_inputs_are_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="images"):
        train_torchcfm(torch.rand(4, 8, 8), tmp_path / "x.pt", train_steps=1, **TINY)
    with pytest.raises(ValueError, match="train_steps"):
        train_torchcfm(data(), tmp_path / "x.pt", train_steps=0, **TINY)


def test_recipe_part_builds_torchcfm_unet_and_loads_its_weights(tmp_path):
    net = pretrained.build("mnist-fives-torchcfm")
    assert type(net).__name__ == "UNetModelWrapper"
    torch.save({"ema_model": net.state_dict(), "step": 0}, tmp_path / "w.pt")
    other = pretrained.load_weights("mnist-fives-torchcfm", tmp_path / "w.pt")
    for name, value in net.state_dict().items():
        assert torch.equal(other.state_dict()[name], value)
    vel = pretrained.velocity_of("mnist-fives-torchcfm", other)
    assert vel(torch.zeros(2, 1, 28, 28), 0.3).shape == (2, 1, 28, 28)


def test_train_shipped_set_overrides_a_copy_of_the_recipe():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    from train_shipped import main, override

    r = pretrained.RECIPES["mnist-fives-torchcfm"]
    o = override(r, "unet.dropout=0.2")
    o = override(o, "lr_cooldown=[5000, 5500]")
    assert o["unet"]["dropout"] == 0.2 and o["lr_cooldown"] == [5000, 5500]
    # the recipe is untouched
    assert r["unet"]["dropout"] == 0.1 and "lr_cooldown" not in r
    for bad, match in [("lr", "KEY=JSON"), ("lr=abc", "KEY=JSON"), ("=1", "KEY=JSON"),
                       ("nope.x=1", "no setting group 'nope'")]:
        with pytest.raises(ValueError, match=match):
            override(r, bad)
    with pytest.raises(SystemExit):
        main(["mnist-fives-torchcfm", "--out", "unused", "--set", "lr"])


def test_train_shipped_refuses_to_discard_an_interrupted_run(tmp_path, monkeypatch):
    """Without --resume, a work checkpoint in --out stops the run with one
    message naming --resume; the checkpoint is left as it was."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import train_shipped

    monkeypatch.setattr(train_shipped, "_classifier", lambda *a: None)
    work = tmp_path / ".mnist-fives-training.pt"
    work.write_bytes(b"an interrupted run")
    with pytest.raises(SystemExit, match=r"mnist-fives: .*earlier run's training "
                                         r"checkpoint.*--resume"):
        train_shipped.main(["mnist-fives", "--out", str(tmp_path), "--no-along"])
    assert work.read_bytes() == b"an interrupted run"


def _gates(step, copying=False):
    status = dict(share="pass", in_range="pass" if step >= 750 else "fail",
                  nn_ratio="fail" if copying else "pass",
                  copy_share="fail" if copying else "pass")
    return dict(status=status, passed=all(v == "pass" for v in status.values()),
                samples=torch.zeros(1, 1, 28, 28))


def _fake_training(monkeypatch, train_shipped, steps, interrupt_after=None, copying_from=None):
    """train_shipped.main around a fake trainer that reports chunks at ``steps`` (and is
    interrupted after ``interrupt_after`` of them) and fake gates (copying from a step)."""
    seen = []

    def train_part(part, out, *, on_chunk, resume, **kw):
        for k, step in enumerate(steps):
            if interrupt_after is not None and k == interrupt_after:
                raise KeyboardInterrupt
            seen.append(step)
            if on_chunk(None, step):
                break
        return dict(part=part, file="mnist_fives.pt", train_steps=seen[-1],
                    train_seconds=1.0)

    def evaluate_part(part, model, *, seed, **kw):
        assert seed == 1                      # the gates along training: the rule's seed
        step = steps[len(calls)]
        calls.append(step)
        return _gates(step, copying_from is not None and step >= copying_from)
    calls = []
    monkeypatch.setattr(train_shipped, "_classifier", lambda *a: object())
    monkeypatch.setattr(train_shipped.pretrained, "train_part", train_part)
    monkeypatch.setattr(train_shipped.pretrained, "evaluate_part", evaluate_part)
    monkeypatch.setattr(train_shipped.pretrained, "load_weights",
                        lambda part, path: torch.nn.Identity())
    monkeypatch.setattr(train_shipped, "_measure", lambda *a: [
        dict(_gates(10_000), sampler=dict(method="midpoint", steps=10))])
    monkeypatch.setattr(train_shipped, "to_uint8", lambda samples, part: samples)
    return seen


def test_train_shipped_keeps_the_gates_along_training_across_a_resume(tmp_path, monkeypatch):
    """An interrupted run's gates along training are kept beside its checkpoint and the
    resumed run continues the list; the finished record holds all of them."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import train_shipped

    args = ["mnist-fives", "--out", str(tmp_path), "--stop-when-passed", "--resume"]
    _fake_training(monkeypatch, train_shipped, [250, 500, 750], interrupt_after=2)
    with pytest.raises(KeyboardInterrupt):
        train_shipped.main(args)
    kept = json.loads((tmp_path / ".mnist-fives-along.json").read_text())
    assert [g["step"] for g in kept] == [250, 500]
    _fake_training(monkeypatch, train_shipped, [750, 1000])
    train_shipped.main(args)
    rec = json.loads((tmp_path / "mnist-fives.json").read_text())
    assert [g["step"] for g in rec["gates_along_training"]] == [250, 500, 750]
    assert rec["train_steps"] == 750 and not (tmp_path / ".mnist-fives-along.json").exists()


def test_train_shipped_stops_where_both_memorization_gates_fail(tmp_path, monkeypatch):
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import train_shipped

    seen = _fake_training(monkeypatch, train_shipped, [250, 500, 750, 1000], copying_from=500)
    train_shipped.main(["mnist-fives", "--out", str(tmp_path / "a"), "--stop-when-passed",
                        "--stop-on-memorization"])
    assert seen == [250, 500]
    rec = json.loads((tmp_path / "a" / "mnist-fives.json").read_text())
    assert rec["gates_along_training"][-1]["status"]["copy_share"] == "fail"
    # without the flag the run goes on to the first chunk whose gates pass (none here)
    seen = _fake_training(monkeypatch, train_shipped, [250, 500, 750, 1000], copying_from=500)
    train_shipped.main(["mnist-fives", "--out", str(tmp_path / "b"), "--stop-when-passed"])
    assert seen == [250, 500, 750, 1000]
