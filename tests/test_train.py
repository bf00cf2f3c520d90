"""Tests of flowjac.engine.train: CFM loss, velocity, reproducibility, checkpoints."""
import pytest
import torch

from flowjac.closedform import gaussian
from flowjac.engine.checkpoints import load_checkpoint, save_checkpoint
from flowjac.engine.ode import integrate
from flowjac.engine.train import cfm_loss, train_flow
from flowjac.engine.velocity import velocity_fn
from flowjac.models.nets import MLPFlow

F64 = torch.float64
COV = torch.tensor([[1.0, 0.55], [0.55, 1.0]], dtype=F64)
MEAN = torch.tensor([1.0, -2.0], dtype=F64)


def sample(n, generator):
    return torch.randn(n, 2, generator=generator) @ torch.linalg.cholesky(
        COV.float()).T


def new_model(seed=0, hidden=16):
    torch.manual_seed(seed)
    return MLPFlow(2, hidden=hidden, depth=2, time_dim=8)


class GaussianModel(torch.nn.Module):
    """Exact regressors for N(0, I) -> N(MEAN, COV): drift or E[X1 | X_t]."""

    def __init__(self, parameterization):
        super().__init__()
        self.parameterization = parameterization

    def forward(self, x, t):
        t = torch.as_tensor(t, dtype=x.dtype)
        d = gaussian.drift(x, t, MEAN, COV)
        tb = t if t.ndim == 0 else t[:, None]
        return d if self.parameterization == "velocity" else x + (1 - tb) * d


def test_cfm_loss_targets_and_exact_minimiser():
    x0 = torch.zeros(3, 2, dtype=F64)
    x1 = torch.ones(3, 2, dtype=F64)
    zero = lambda x, t: torch.zeros_like(x)
    assert float(cfm_loss(zero, x0, x1, 0.5)) == 1.0          # target x1 - x0
    assert float(cfm_loss(zero, x0, 2 * x1, 0.5, "x1")) == 4.0  # target x1
    # the exact drift beats a perturbed one on a large batch
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(20_000, 2, generator=g, dtype=F64)
    x1 = MEAN + torch.randn(20_000, 2, generator=g, dtype=F64) @ \
        torch.linalg.cholesky(COV).T
    t = torch.rand(20_000, generator=g, dtype=F64)
    for par in ("velocity", "x1"):
        exact = GaussianModel(par)
        worse = lambda x, tt: exact(x, tt) * 1.05
        assert cfm_loss(exact, x0, x1, t, par) < cfm_loss(worse, x0, x1, t, par)


@pytest.mark.parametrize("par", ["velocity", "x1"])
def test_velocity_fn_of_exact_regressor_gives_gaussian_flow(par):
    z = torch.randn(6, 2, dtype=F64)
    x1 = integrate(velocity_fn(GaussianModel(par), par, t_max=0.9999), z, 100)
    tol = 1e-6 if par == "velocity" else 1e-5  # x1: O(1 - t_max) last stage
    assert (x1 - gaussian.flow_map(z, 1.0, MEAN, COV)).abs().max() < tol


def test_seeded_cpu_training_is_reproducible_and_learns():
    runs = []
    for _ in range(2):
        m = new_model()
        hist = train_flow(m, sample, steps=20, batch_size=64, lr=1e-2,
                          seed=3, progress=False, ema_decay=0.9)
        runs.append((m.state_dict(), hist["loss"]))
    (s1, l1), (s2, l2) = runs
    assert l1 == l2 and len(l1) == 20
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    other = new_model()
    train_flow(other, sample, steps=20, batch_size=64, lr=1e-2, seed=4,
               progress=False, ema_decay=0.9)
    assert not torch.equal(other.state_dict()["out.weight"], s1["out.weight"])


def test_training_on_a_tensor_dataset_reduces_the_loss():
    data = sample(2000, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(5000, 2, generator=g)
    x1 = data[torch.randint(2000, (5000,), generator=g)]
    t = torch.rand(5000, generator=g)
    m = new_model(hidden=32)
    with torch.no_grad():
        before = float(cfm_loss(m, x0, x1, t))
    hist = train_flow(m, data, steps=150, batch_size=128, lr=1e-2,
                      progress=False, log_every=10)
    assert len(hist["loss"]) == 15 and hist["step"][-1] == 150
    with torch.no_grad():
        after = float(cfm_loss(m, x0, x1, t))
    assert after < 0.88 * before  # measured 1.94 -> 1.56


def test_checkpoint_resume_equals_uninterrupted_run(tmp_path):
    full = new_model()
    h_full = train_flow(full, sample, steps=12, batch_size=32, lr=1e-2,
                        seed=1, progress=False, ema_decay=0.8)
    ckpt = tmp_path / "ck.pt"
    part = new_model()
    train_flow(part, sample, steps=7, batch_size=32, lr=1e-2, seed=1,
               progress=False, ema_decay=0.8, checkpoint_path=ckpt,
               checkpoint_every=3)
    resumed = new_model(seed=99)  # different init: everything comes from ckpt
    h_res = train_flow(resumed, sample, steps=12, batch_size=32, lr=1e-2,
                       seed=1, progress=False, ema_decay=0.8,
                       checkpoint_path=ckpt, checkpoint_every=3)
    assert h_res["loss"] == h_full["loss"]
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    payload = load_checkpoint(ckpt, new_model(seed=5))
    assert payload["step"] == 12 and payload["config"]["seed"] == 1
    assert payload["ema"] is not None


def test_save_load_roundtrip_and_bad_files(tmp_path):
    m = new_model()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    path = save_checkpoint(tmp_path / "a.pt", m, opt, step=5,
                           config={"note": "x"})
    m2 = new_model(seed=7)
    payload = load_checkpoint(path, m2, torch.optim.AdamW(m2.parameters()))
    assert payload["step"] == 5 and payload["config"] == {"note": "x"}
    assert all(torch.equal(v, m2.state_dict()[k])
               for k, v in m.state_dict().items())
    with pytest.raises(ValueError, match="hidden.*32|config"):
        load_checkpoint(path, new_model(hidden=32))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(ValueError, match="corrupted"):
        load_checkpoint(bad, new_model())
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="not a flowjac checkpoint"):
        load_checkpoint(other, new_model())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt", new_model())


def test_error_paths():
    m = new_model()
    with pytest.raises(ValueError, match="parameterization must be one of"):
        cfm_loss(m, torch.zeros(2, 2), torch.zeros(2, 2), 0.5, "score")
    with pytest.raises(ValueError, match="same shape"):
        cfm_loss(m, torch.zeros(2, 2), torch.zeros(3, 2), 0.5)
    with pytest.raises(ValueError, match="t_max must be"):
        velocity_fn(m, "x1", t_max=1.0)
    for kw, match in [(dict(steps=0), "steps must be >= 1"),
                      (dict(lr=-1.0), "lr must be a positive"),
                      (dict(grad_clip=0), "grad_clip must be"),
                      (dict(ema_decay=1.5), "ema_decay must be")]:
        args = dict(steps=2, batch_size=4, lr=1e-3, progress=False)
        args.update(kw)
        with pytest.raises(ValueError, match=match):
            train_flow(m, sample, **args)
    with pytest.raises(ValueError, match="sample_x1 must be"):
        train_flow(m, "data", steps=2, batch_size=4, lr=1e-3, progress=False)


def test_checkpoint_configs_are_plain_and_load_errors_are_clear(tmp_path):
    """Issue 15's checkpoint defects: numpy/Path configs, full reasons, unsafe pickles, 0 bytes, folders."""
    import io
    import pickle

    import numpy as np

    m = new_model()
    path = save_checkpoint(tmp_path / "np.pt", m, step=1,
                           config={"lr": np.float64(1e-3), "n": np.int64(3),
                                   "out": tmp_path, "shape": (1, 2)})
    payload = load_checkpoint(path, new_model())
    assert payload["config"] == {"lr": 1e-3, "n": 3, "out": str(tmp_path),
                                 "shape": [1, 2]}
    with pytest.raises(ValueError, match=r"config\['f'\] must hold plain"):
        save_checkpoint(tmp_path / "f.pt", m, config={"f": object()})
    # numpy lr: train, checkpoint, resume
    h = train_flow(new_model(), sample, steps=2, batch_size=8,
                   lr=np.float64(1e-3), progress=False,
                   checkpoint_path=tmp_path / "r.pt")
    h2 = train_flow(new_model(), sample, steps=3, batch_size=8,
                    lr=np.float64(1e-3), progress=False,
                    checkpoint_path=tmp_path / "r.pt")
    assert h["resumed_from"] == 0 and h2["resumed_from"] == 2
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_checkpoint(empty, new_model())
    with pytest.raises(ValueError, match="directory"):
        load_checkpoint(tmp_path, new_model())

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pt"
    torch.save({"format": "flowjac-checkpoint-1", "x": Evil()}, evil)
    with pytest.raises(ValueError, match="arbitrary code") as info:
        load_checkpoint(evil, new_model())
    assert "weights_only=False" not in str(info.value)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(pickle.dumps([1, 2]) + b"garbage" * 10)
    with pytest.raises(ValueError, match="corrupted") as info:
        load_checkpoint(junk, new_model())
    assert "operand" in str(info.value)       # torch's reason is kept
    assert "weights_only=False" not in str(info.value)
    del io


def test_resume_refuses_changed_settings_and_fewer_steps(tmp_path):
    ck = tmp_path / "ck.pt"
    train_flow(new_model(), sample, steps=4, batch_size=8, lr=1e-3,
               progress=False, checkpoint_path=ck)
    for kw, word in [(dict(lr=2e-3), "lr"), (dict(batch_size=16), "batch_size"),
                     (dict(seed=3), "seed")]:
        args = dict(steps=6, batch_size=8, lr=1e-3, progress=False,
                    checkpoint_path=ck)
        args.update(kw)
        with pytest.raises(ValueError, match=f"{word} .* there"):
            train_flow(new_model(), sample, **args)
    with pytest.raises(ValueError, match="smaller than the step"):
        train_flow(new_model(), sample, steps=2, batch_size=8, lr=1e-3,
                   progress=False, checkpoint_path=ck)
    h = train_flow(new_model(), sample, steps=6, batch_size=8, lr=2e-3,
                   progress=False, checkpoint_path=ck, allow_config_change=True)
    assert h["resumed_from"] == 4 and h["lr"] == 2e-3
    assert load_checkpoint(ck, new_model())["config"]["lr"] == 2e-3


def test_unwritable_checkpoint_path_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="checkpoint_path"):
        train_flow(new_model(), sample, steps=10_000, batch_size=8, lr=1e-3,
                   progress=False, checkpoint_path=blocker / "sub" / "ck.pt")
    with pytest.raises(ValueError, match="is a directory"):
        train_flow(new_model(), sample, steps=10_000, batch_size=8, lr=1e-3,
                   progress=False, checkpoint_path=tmp_path)


def test_files_beside_the_target_are_never_removed(tmp_path):
    """A user's ``.out.bin.*`` files survive a write (the old write deleted
    them as 'stale temporaries'); only the write's own temporary goes."""
    from flowjac.utils import atomic_write_bytes

    mine = [tmp_path / ".out.bin.abc123", tmp_path / ".out.bin.orig"]
    for p in mine:
        p.write_bytes(b"the user's")
    atomic_write_bytes(tmp_path / "out.bin", b"whole")
    assert (tmp_path / "out.bin").read_bytes() == b"whole"
    assert all(p.read_bytes() == b"the user's" for p in mine)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".out.bin.abc123", ".out.bin.orig", "out.bin"]


def test_lr_cooldown_resumes_exactly_and_ends_with_still_weights(tmp_path):
    cool = dict(batch_size=16, lr=1e-2, seed=2, progress=False,
                lr_cooldown=(4, 8))
    full = new_model()
    h_full = train_flow(full, sample, steps=10, **cool)
    ck = tmp_path / "ck.pt"
    train_flow(new_model(), sample, steps=5, checkpoint_path=ck, **cool)
    resumed = new_model(seed=7)
    h_res = train_flow(resumed, sample, steps=10, checkpoint_path=ck, **cool)
    assert h_res["loss"] == h_full["loss"]
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    # past the end of the cool-down the learning rate is 0: nothing moves
    before = {k: v.clone() for k, v in resumed.state_dict().items()}
    train_flow(resumed, sample, steps=12, checkpoint_path=ck, **cool)
    for k, v in resumed.state_dict().items():
        assert torch.equal(v, before[k]), k
    # a changed schedule is a changed setting
    with pytest.raises(ValueError, match="lr_cooldown .* there"):
        train_flow(new_model(), sample, steps=14, checkpoint_path=ck,
                   **dict(cool, lr_cooldown=(4, 9)))
    for bad in [(5, 5), (-1, 3), [1], "4-8"]:
        with pytest.raises(ValueError, match="lr_cooldown"):
            train_flow(new_model(), sample, steps=3, **dict(cool, lr_cooldown=bad))


@pytest.mark.parametrize("ema_decay", [None, 0.9])
def test_a_non_finite_loss_stops_training_and_keeps_the_good_checkpoint(
        tmp_path, ema_decay):
    ck = tmp_path / "ck.pt"
    good = dict(batch_size=16, lr=1e-3, seed=0, progress=False, log_every=100,
                checkpoint_every=2, ema_decay=ema_decay, checkpoint_path=ck)
    train_flow(new_model(), sample, steps=4, **good)
    before = ck.read_bytes()
    with pytest.raises(ValueError, match=r"training stopped: the CFM loss was "
                       r"(nan|inf) at step \d+; the checkpoint .*ck.pt' keeps "
                       r"step 4; lower lr \(now 1e\+30\)"):
        train_flow(new_model(), sample, steps=40, allow_config_change=True,
                   **dict(good, lr=1e30))
    assert ck.read_bytes() == before
    payload = load_checkpoint(ck, new_model())
    assert payload["step"] == 4
    assert all(torch.isfinite(v).all() for v in payload["model"].values())
    # without a checkpoint, the error says that nothing was saved
    with pytest.raises(ValueError, match=r"at step \d+; nothing was saved"):
        train_flow(new_model(), sample, steps=40,
                   **dict(good, lr=1e30, checkpoint_path=None))


def test_ot_pairing_is_the_optimal_assignment():
    import itertools

    from flowjac.engine.train import ot_pairing

    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g) + 1.0
    perm = ot_pairing(x0, x1)
    assert sorted(perm.tolist()) == list(range(6))

    def cost(p):
        return float(((x1 - x0[list(p)]) ** 2).sum())
    best = min(cost(p) for p in itertools.permutations(range(6)))
    assert abs(cost(perm.tolist()) - best) < 1e-9
    # in one dimension the optimal pairing is the monotone one: sorted with sorted
    a, b = torch.randn(50, 1, generator=g), 3 * torch.randn(50, 1, generator=g)
    p1 = ot_pairing(a, b)
    order = torch.argsort(b[:, 0])
    assert torch.equal(a[p1][order, 0], torch.sort(a[:, 0]).values)


def test_ot_pairing_matches_pot_exact_transport_cost():
    ot = pytest.importorskip("ot")
    from flowjac.engine.train import ot_pairing

    g = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(64, 1, 4, 4, generator=g), torch.rand(64, 1, 4, 4, generator=g)
    perm = ot_pairing(x0, x1)
    ours = float(((x1.double() - x0[perm].double()) ** 2).flatten(1).sum(1).mean())
    M = (torch.cdist(x0.flatten(1).double(), x1.flatten(1).double()) ** 2).numpy()
    w = torch.full((64,), 1 / 64, dtype=F64).numpy()
    assert abs(ours - float(ot.emd2(w, w, M))) < 1e-9


def test_ot_coupling_trains_reproducibly_and_is_part_of_the_resume_check(tmp_path):
    from flowjac.engine import train as tr

    calls = []
    real = tr.ot_pairing

    def spy(x0, x1):
        calls.append(len(x0))
        return real(x0, x1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tr, "ot_pairing", spy)
        a, b = new_model(), new_model()
        ha = train_flow(a, sample, steps=5, batch_size=16, lr=1e-2, seed=2,
                        progress=False, coupling="ot")
        hb = train_flow(b, sample, steps=5, batch_size=16, lr=1e-2, seed=2,
                        progress=False, coupling="ot")
    assert calls == [16] * 10 and ha["loss"] == hb["loss"] and ha["coupling"] == "ot"
    hi = train_flow(new_model(), sample, steps=5, batch_size=16, lr=1e-2, seed=2,
                    progress=False)
    assert hi["loss"] != ha["loss"] and "coupling" not in hi    # independent: as before
    ck = tmp_path / "ck.pt"
    train_flow(new_model(), sample, steps=2, batch_size=8, lr=1e-3, progress=False,
               checkpoint_path=ck)
    with pytest.raises(ValueError, match="coupling None there, 'ot' now"):
        train_flow(new_model(), sample, steps=4, batch_size=8, lr=1e-3, progress=False,
                   checkpoint_path=ck, coupling="ot")
    with pytest.raises(ValueError, match="^coupling "):
        train_flow(new_model(), sample, steps=4, batch_size=8, lr=1e-3, progress=False,
                   coupling="sinkhorn")
