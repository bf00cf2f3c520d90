"""Bring your own model: flowjac.models.adapters against torchcfm, flow_matching
and torchdiffeq (the interop extra; those tests skip, with the reason, when a
peer is not installed), and the tangent rules against torch.func.jvp."""
import argparse
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jvp as func_jvp

from flowjac.engine.jvp import flow_jvp
from flowjac.engine.ode import integrate, time_grid
from flowjac.estimators.spectra import log_likelihood, standard_normal_log_density
from flowjac.models.adapters import (
    INSTALL_HINT,
    from_callable,
    from_flow_matching,
    from_torchcfm,
    joint_jvp,
    load_flow_matching_checkpoint,
    load_torchcfm_checkpoint,
)
from flowjac.utils import repo_root


@pytest.fixture(autouse=True)
def _seeded():
    """Every test draws its inputs from its own fixed stream."""
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        yield


def need(module):
    return pytest.importorskip(module, reason=f"{module} is not installed ({INSTALL_HINT})")


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def rk4(fn, x, steps):
    """A plain classical RK4 of fn(x, t), independent of flowjac's solver."""
    h = 1.0 / steps
    for i in range(steps):
        t = torch.tensor(i * h, dtype=x.dtype)
        k1 = fn(x, t)
        k2 = fn(x + h / 2 * k1, t + h / 2)
        k3 = fn(x + h / 2 * k2, t + h / 2)
        k4 = fn(x + h * k3, t + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


# -- the tangent rules, without any peer ---------------------------------------

with torch.random.fork_rng():   # fixed modules, without touching the global stream
    torch.manual_seed(0)
    _LIN = nn.Linear(6, 5).double()
    _CONV = nn.Conv2d(4, 8, 3, padding=1).double()
    _GN = nn.GroupNorm(2, 8).double()
    _LN = nn.LayerNorm(6).double()
    _BN = nn.BatchNorm2d(4).double().eval()
    with torch.no_grad():
        for p in [*_GN.parameters(), *_LN.parameters(), *_BN.parameters()]:
            p.add_(torch.randn_like(p))
        _BN.running_mean.normal_()
        _BN.running_var.uniform_(0.5, 2)
    _W = torch.randn(6, 6, dtype=torch.float64)


def _attention(x):                      # torchcfm's legacy QKV attention, (B, 6, 4)
    q, k, v = torch.cat([x, x.flip(1), x * 2], 1).reshape(x.shape[0], 18, 4).split(6, 1)
    w = torch.einsum("bct,bcs->bts", q * 0.7, k * 0.7)
    return torch.einsum("bts,bcs->bct", torch.softmax(w.float().double(), dim=-1), v)


def _inplace(x):
    h = x * 1.0
    alias = h
    h += 2 * x
    return alias * h


RULES = {   # name: (fn, x shape); x is float64
    "linear, silu, sum": (lambda x: F.silu(_LIN(x)).sum(-1, keepdim=True) * x[:, :1], (3, 6)),
    "conv, group norm, silu": (lambda x: nn.SiLU()(_GN(_CONV(x))), (2, 4, 5, 5)),
    "layer norm, gelu": (lambda x: F.gelu(_LN(x)) + F.gelu(x, approximate="tanh"), (3, 6)),
    "batch norm (eval), avg pool, interpolate": (
        lambda x: F.interpolate(F.avg_pool2d(_BN(x), 2), scale_factor=2), (2, 4, 4, 4)),
    "pads": (lambda x: F.pad(x, (1, 1), mode="reflect") + F.pad(x, (1, 1), value=1.0)[..., :6]
             .expand(2, 3, 6)[..., :6], (2, 3, 4)),
    "softmax, log_softmax": (lambda x: x.softmax(-1) * F.log_softmax(x, dim=1), (3, 6)),
    "einsum attention": (_attention, (2, 6, 4)),
    "scaled_dot_product_attention": (   # torch.func.jvp cannot: the reference is explicit
        lambda x: F.scaled_dot_product_attention(x, x @ _W, x.tanh(), is_causal=True),
        (2, 3, 6)),
    "matmul, div, pow, sqrt": (
        lambda x: (x @ x.transpose(-1, -2)) / (1 + x.pow(2).sum(-1, keepdim=True).sqrt()),
        (2, 3, 6)),
    "pointwise zoo": (
        lambda x: torch.sigmoid(x) * x.exp() - F.softplus(x) + F.leaky_relu(x, 0.1)
        + F.elu(x) + torch.tanh(x) / (2 + x.cos()) + x.clamp(-0.5, 0.5), (3, 6)),
    "shapes and plain operands": (
        lambda x: torch.cat([x.permute(0, 2, 1).reshape(2, -1), torch.ones(2, 3)], 1)
        .unsqueeze(1).expand(2, 3, 15)[:, 1:, ::2].flatten(1).chunk(2, 1)[1]
        * torch.stack([x.mean((1, 2)), x[:, 0, 1]], 1).sum(1, keepdim=True), (2, 4, 3)),
    "where, in-place aliasing": (
        lambda x: torch.where(x > 0, _inplace(x), -x) + torch.zeros_like(x), (3, 6)),
}


def _explicit_attention(x):
    w = (x @ (x @ _W).transpose(-1, -2)) / 6 ** 0.5
    w = w.masked_fill(~torch.ones(3, 3, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(w, -1) @ x.tanh()


REFERENCES = {"scaled_dot_product_attention": _explicit_attention}


@pytest.mark.parametrize("name", sorted(RULES))
@pytest.mark.parametrize("k", [None, 3])
def test_joint_tangents_match_torch_func(name, k):
    fn, shape = RULES[name]
    ref = REFERENCES.get(name, fn)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    vshape = shape if k is None else (shape[0], k, *shape[1:])
    v = torch.randn(vshape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y, yd = joint_jvp(fn, x, v)
        assert torch.allclose(y, fn(x), rtol=1e-13, atol=1e-15)   # the model's own primal
        for j in range(1 if k is None else k):
            vj = v if k is None else v[:, j]
            want = func_jvp(ref, (x,), (vj,))[1]
            got = yd if k is None else yd[:, j]
            assert torch.allclose(got, want, rtol=1e-10, atol=1e-12), name


def test_joint_names_what_it_cannot_follow():
    x, v = torch.randn(2, 3), torch.randn(2, 3)
    with pytest.raises(ValueError, match="cumsum"):
        joint_jvp(lambda z: torch.cumsum(z, 1), x, v)

    def write(z):
        z[0] = 1.0
        return z
    with pytest.raises(ValueError, match="in-place assignment"):
        joint_jvp(write, x, v)
    with pytest.raises(ValueError, match="tangents must have shape"):
        joint_jvp(torch.sin, x, torch.randn(3, 2))


def test_velocity_falls_back_to_torch_func_with_a_warning():
    x, v = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, 3, dtype=torch.float64)
    vel = from_callable(lambda x, t: torch.cumsum(x, 1) * t, order="x,t")
    with pytest.warns(RuntimeWarning, match="cumsum"):
        y, yd = vel.jvp(x, 0.5, v)
    assert vel.last_path == "torch.func"
    assert torch.allclose(yd, 0.5 * torch.cumsum(v, 2))
    # code that reads as something else to the rules is caught by the first-call check
    tricky = from_callable(lambda x, t: x * (2 if isinstance(x, torch.Tensor) else 3),
                           order="x,t")
    with pytest.warns(RuntimeWarning, match="differs from torch.func"):
        y, yd = tricky.jvp(x, 0.5, v)
    assert tricky.last_path == "torch.func" and torch.allclose(yd, 2 * v)


def test_fused_attention_keeps_the_fast_path_unchecked():
    x, v = torch.randn(2, 3, 6, dtype=torch.float64), torch.randn(2, 3, 6, dtype=torch.float64)
    vel = from_callable(lambda x, t: F.scaled_dot_product_attention(x, x @ _W, x.tanh(),
                                                                    is_causal=True) * t,
                        order="x,t")
    with pytest.warns(RuntimeWarning, match="could not be checked"):
        y, yd = vel.jvp(x, 0.5, v)
    assert vel.last_path == "fast"
    want = func_jvp(lambda z: _explicit_attention(z) * 0.5, (x,), (v,))[1]
    assert torch.allclose(yd, want, rtol=1e-10, atol=1e-12)
    slow = from_callable(lambda x, t: torch.tanh(x) * t, order="x,t", fast=False)
    assert torch.allclose(slow.jvp(x, 0.5, v)[1], 0.5 * v / torch.cosh(x) ** 2)
    assert slow.last_path == "torch.func"


def test_from_callable_order_is_explicit():
    x = torch.randn(3, 2, dtype=torch.float64)
    xt = from_callable(lambda x, t: x * t, order="x,t")
    tx = from_callable(lambda t, x: x - t, order="t,x")
    assert torch.allclose(xt(x, 0.25), 0.25 * x)
    assert torch.allclose(tx(x, 0.25), x - 0.25)
    with pytest.raises(ValueError, match="order must be one of"):
        from_callable(lambda x, t: x, order="xt")
    with pytest.raises(TypeError):
        from_callable(lambda x, t: x)        # no default: the order is never guessed


def test_import_flowjac_needs_no_peer():
    code = ("import sys, flowjac, flowjac.models.adapters; "
            "bad = [m for m in ('torchcfm', 'flow_matching', 'torchdiffeq', 'ot') "
            "if m in sys.modules]; assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo_root(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-1000:]


# -- flow_matching and torchdiffeq ----------------------------------------------

def fm_wrapper(hidden=16, seed=0):
    """flow_matching's 2-D example network (MLP + Swish) in a ModelWrapper, float64."""
    from flow_matching.utils import ModelWrapper

    class MLP(nn.Module):
        def __init__(self, hidden_dim):
            super().__init__()
            self.main = nn.Sequential(nn.Linear(3, hidden_dim), nn.SiLU(),
                                      nn.Linear(hidden_dim, hidden_dim), nn.SiLU(),
                                      nn.Linear(hidden_dim, 2))

        def forward(self, x, t, shift=0.0):
            t = t.reshape(-1, 1).expand(x.shape[0], 1)
            return self.main(torch.cat([x, t], dim=1)) + shift

    class Wrapped(ModelWrapper):
        def forward(self, x, t, **extras):
            return self.model(x, t, **extras)

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Wrapped(MLP(hidden)).double().eval()


@pytest.mark.parametrize("method, theirs", [("euler", "euler"), ("midpoint", "midpoint"),
                                            ("heun", "heun2")])
def test_fixed_grid_solvers_match_flow_matching(method, theirs):
    need("flow_matching")
    from flow_matching.solver import ODESolver
    wrapper = fm_wrapper()
    x0 = torch.randn(5, 2, dtype=torch.float64)
    mine = integrate(from_flow_matching(wrapper), x0, 8, method)
    ref = ODESolver(velocity_model=wrapper).sample(
        x_init=x0, step_size=None, method=theirs, time_grid=time_grid(8))
    assert torch.allclose(mine, ref, rtol=0, atol=1e-12)


def test_rk4_converges_to_dopri5():
    need("torchdiffeq")
    from torchdiffeq import odeint
    wrapper = fm_wrapper()
    vel = from_flow_matching(wrapper)
    x0 = torch.randn(5, 2, dtype=torch.float64)
    with torch.no_grad():
        ref = odeint(lambda t, x: wrapper(x=x, t=t), x0,
                     torch.tensor([0.0, 1.0], dtype=torch.float64), method="dopri5",
                     rtol=1e-13, atol=1e-13)[-1]
        err = [float((integrate(vel, x0, n) - ref).abs().max()) for n in (2, 4, 8)]
    assert err[2] < 1e-8
    assert err[0] / err[1] > 12 and err[1] / err[2] > 12     # fourth order: 16


@pytest.mark.parametrize("method", ["euler", "midpoint"])
def test_log_likelihood_matches_compute_likelihood(method):
    need("flow_matching")
    from flow_matching.solver import ODESolver
    wrapper = fm_wrapper()
    x1 = torch.randn(4, 2, dtype=torch.float64)
    mine = log_likelihood(from_flow_matching(wrapper), x1, steps=6, method=method)
    _, ref = ODESolver(velocity_model=wrapper).compute_likelihood(
        x_1=x1, log_p0=standard_normal_log_density, step_size=None, method=method,
        time_grid=time_grid(6, 1.0, 0.0), exact_divergence=True)
    assert torch.allclose(mine, ref, rtol=0, atol=1e-10)


def test_flow_matching_exact_jvp_matches_func_jvp_through_plain_rk4():
    need("flow_matching")
    wrapper = fm_wrapper()
    vel = from_flow_matching(wrapper, shift=0.5)
    x0 = torch.randn(6, 2, dtype=torch.float64)
    vk = torch.randn(6, 3, 2, dtype=torch.float64)
    x1, jv = flow_jvp(vel, x0, vk, steps=5)
    assert vel.last_path == "fast"
    with torch.no_grad():
        for j in range(3):
            want = func_jvp(lambda z: rk4(lambda x, t: wrapper(x=x, t=t, shift=0.5), z, 5),
                            (x0,), (vk[:, j],))
            assert torch.allclose(x1, want[0], atol=1e-12)
            assert torch.allclose(jv[:, j], want[1], rtol=1e-10, atol=1e-12)


def test_fast_tangents_are_differentiable():
    """create_graph=True (a Jacobian penalty) differentiates the fast path itself."""
    need("flow_matching")
    wrapper = fm_wrapper()
    vel = from_flow_matching(wrapper)
    x0, v = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    grads = []
    for mode in ("auto", "func"):
        _, jv = flow_jvp(vel, x0, v, steps=3, create_graph=True, jvp_mode=mode)
        grads.append(torch.autograd.grad(jv.pow(2).sum(), list(wrapper.parameters())))
        if mode == "auto":
            assert vel.last_path == "fast"
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_flow_matching_time_forms_and_errors():
    need("flow_matching")
    wrapper = fm_wrapper()
    vel = from_flow_matching(wrapper)
    x = torch.randn(3, 2, dtype=torch.float64)
    ref = wrapper(x=x, t=torch.tensor(0.5, dtype=torch.float64))
    for t in (0.5, torch.tensor(0.5), torch.full((3,), 0.5, dtype=torch.float64)):
        assert torch.equal(vel(x, t), ref)
    assert torch.allclose(from_flow_matching(wrapper, shift=1.0)(x, 0.5), ref + 1.0)
    with pytest.raises(ValueError, match=r"t must be .* \(3,\) tensor"):
        vel(x, torch.zeros(4))
    with pytest.raises(ValueError, match="t must be"):
        vel(x, True)
    with pytest.raises(ValueError, match="dtype torch.float32"):
        vel(x.float(), 0.3)
    wrapper.train()
    wrapper.model.main.insert(1, nn.Dropout(0.1))
    with pytest.raises(ValueError, match="model.eval"):
        from_flow_matching(wrapper)


def test_load_flow_matching_checkpoint(tmp_path):
    need("flow_matching")
    trained = fm_wrapper(seed=1)
    x = torch.randn(3, 2, dtype=torch.float64)
    path = tmp_path / "checkpoint-9.pth"
    state = {f"module.{k}": v for k, v in trained.model.state_dict().items()}   # DDP keys
    torch.save({"model": state, "epoch": 9, "args": argparse.Namespace(lr=1e-3)}, path)
    vel = load_flow_matching_checkpoint(fm_wrapper(seed=2), path)
    assert torch.equal(vel(x, 0.4), trained(x=x, t=torch.tensor(0.4, dtype=torch.float64)))
    assert not vel.model.training
    with pytest.raises(ValueError, match=r"mismatched keys .*main\.0\.weight"):
        load_flow_matching_checkpoint(fm_wrapper(hidden=8), path)
    with pytest.raises(ValueError, match="no 'ema' entry"):
        load_flow_matching_checkpoint(fm_wrapper(), path, key="ema")
    torch.save({"model": state, "fn": nn.Linear(2, 2)}, tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match="pickled Python objects"):
        load_flow_matching_checkpoint(fm_wrapper(), tmp_path / "pickled.pth")
    with pytest.raises(FileNotFoundError):
        load_flow_matching_checkpoint(fm_wrapper(), tmp_path / "missing.pth")


# -- torchcfm --------------------------------------------------------------------

TINY = {   # two small UNetModelWrapper configurations covering its branches
    "class-conditional, legacy attention": dict(
        dim=(1, 8, 8), num_channels=32, num_res_blocks=1, channel_mult=(1, 2),
        attention_resolutions="4", num_classes=3, class_cond=True),
    "scale-shift norm, resblock up/down, new attention order": dict(
        dim=(2, 8, 8), num_channels=32, num_res_blocks=1, channel_mult=(1, 2),
        attention_resolutions="8,4", num_heads=2, use_scale_shift_norm=True,
        resblock_updown=True, use_new_attention_order=True),
}


def tiny_unet(name, seed=0):
    need("torchcfm")
    from torchcfm.models.unet.unet import UNetModelWrapper
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        net = UNetModelWrapper(**TINY[name]).eval()
        for p in net.parameters():   # torchcfm zero-initialises output layers
            p.add_(0.1 * torch.randn_like(p))
    return net


@pytest.mark.parametrize("name", sorted(TINY))
def test_torchcfm_exact_jvp_matches_func_jvp_through_plain_rk4(name):
    net = tiny_unet(name)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    labels = torch.tensor([0, 2, 1]) if net.num_classes else None
    vel = from_torchcfm(net, y=labels)
    x0 = torch.randn(3, *TINY[name]["dim"])
    v = torch.randn(3, 2, *TINY[name]["dim"])
    t = torch.full((3,), 0.3)
    with torch.no_grad():
        assert torch.equal(vel(x0, t), net(t, x0, labels))
        y, yd = vel.jvp(x0, t, v)
        assert torch.equal(y, net(t, x0, labels))       # the fast path's primal
        assert vel.last_path == "fast"
        want = func_jvp(lambda z: net(t, z, labels), (x0,), (v[:, 1],))[1]
        assert rel(yd[:, 1], want) < 1e-5
        x1, jv = flow_jvp(vel, x0, v, steps=2)
        assert vel.last_path == "fast"
        for j in range(2):
            ref = func_jvp(lambda z: rk4(lambda x, s: net(s.expand(3), x, labels), z, 2),
                           (x0,), (v[:, j],))
            assert rel(x1, ref[0]) < 1e-6 and rel(jv[:, j], ref[1]) < 1e-5
    assert all(torch.equal(before[k], w) for k, w in net.state_dict().items())
    assert not net.training


def test_torchcfm_time_forms_and_labels():
    net = tiny_unet("class-conditional, legacy attention")
    x = torch.randn(3, 1, 8, 8)
    vel = from_torchcfm(net, y=2)
    ref = net(torch.full((3,), 0.6), x, torch.full((3,), 2))
    for t in (0.6, torch.tensor(0.6), torch.full((3,), 0.6)):
        assert torch.allclose(vel(x, t), ref, atol=1e-6)
    assert torch.allclose(from_torchcfm(net, y=torch.tensor([2, 2, 2]))(x, 0.6), ref)
    assert not torch.allclose(from_torchcfm(net, y=torch.tensor([0, 1, 2]))(x, 0.6), ref)
    with pytest.raises(ValueError, match="class-conditional"):
        from_torchcfm(net)
    with pytest.raises(ValueError, match=r"labels in \[0, 3\)"):
        from_torchcfm(net, y=3)
    with pytest.raises(ValueError, match="one label or 3 labels"):
        from_torchcfm(net, y=torch.tensor([0, 1]))(x, 0.6)
    with pytest.raises(ValueError, match="computes in torch.float32"):
        from_torchcfm(net.double(), y=1)(x.double(), 0.6)
    plain = tiny_unet("scale-shift norm, resblock up/down, new attention order")
    with pytest.raises(ValueError, match="not class-conditional"):
        from_torchcfm(plain, y=1)
    from torchcfm.models.unet.unet import UNetModelWrapper
    with pytest.raises(ValueError, match="model.eval"):   # a new module trains by default
        from_torchcfm(UNetModelWrapper(dim=(1, 8, 8), num_channels=32, num_res_blocks=1,
                                       channel_mult=(1,), dropout=0.1))


def test_load_torchcfm_checkpoint(tmp_path):
    name = "class-conditional, legacy attention"
    net, ema = tiny_unet(name, seed=1), tiny_unet(name, seed=2)
    optim = torch.optim.Adam(net.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda=lambda step: 1.0)
    ddp = {k: {f"module.{n}": w for n, w in m.state_dict().items()}
           for k, m in (("net_model", net), ("ema_model", ema))}
    path = tmp_path / "otcfm_weights_step_20.pt"
    torch.save({**ddp, "sched": sched.state_dict(), "optim": optim.state_dict(),
                "step": 20}, path)
    x, t = torch.randn(2, 1, 8, 8), torch.full((2,), 0.5)
    vel = load_torchcfm_checkpoint(path, y=1, **TINY[name])
    assert vel.step == 20 and not vel.model.training
    assert torch.equal(vel(x, t), ema(t, x, torch.tensor([1, 1])))
    raw = load_torchcfm_checkpoint(path, ema=False, y=1, **TINY[name])
    assert torch.equal(raw(x, t), net(t, x, torch.tensor([1, 1])))
    wider = {**TINY[name], "num_channels": 64}
    with pytest.raises(ValueError, match=r"mismatched keys \(\d+\): .*input_blocks"):
        load_torchcfm_checkpoint(path, y=1, **wider)
    torch.save({"model": ddp["net_model"]}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"no 'ema_model' entry; its entries are \['model'\]"):
        load_torchcfm_checkpoint(tmp_path / "other.pt", y=1, **TINY[name])
    with pytest.raises(ValueError, match="unet_kwargs"):
        load_torchcfm_checkpoint(path, y=1, dim=(1, 8, 8))
