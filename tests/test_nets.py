"""Tests of flowjac.models.nets: shapes, and the engine's tangents of the networks vs torch.func.jvp."""
import pytest
import torch
from torch.func import jvp, vmap

from flowjac.engine.jvp import flow_jvp, reference_jvp
from flowjac.engine.ode import integrate
from flowjac.engine.velocity import velocity_fn
from flowjac.models.nets import FlowUNet, MLPFlow, timestep_embedding

F64 = torch.float64


def tiny_unet(**kw):
    torch.manual_seed(0)
    args = dict(base_channels=8, channel_mult=(1, 2), time_dim=16,
                norm_groups=4)
    args.update(kw)
    return FlowUNet(**args).double()


def func_jvp_k(model, x, t, v):
    return torch.stack([jvp(lambda z: model(z, t), (x,), (v[:, j],))[1]
                        for j in range(v.shape[1])], 1)


def test_mlp_shapes_and_time_forms():
    m = MLPFlow(3, hidden=16, depth=2, time_dim=8)
    x = torch.randn(5, 3)
    y = m(x, 0.3)
    assert y.shape == (5, 3)
    assert torch.allclose(y, m(x, torch.full((5,), 0.3)), atol=1e-6)
    assert torch.allclose(m(x[0], torch.tensor(0.3)), y[0], atol=1e-6)


@pytest.mark.parametrize("k", [None, 1, 3])
def test_mlp_forward_jvp_matches_torch_func_jvp(k):
    torch.manual_seed(1)
    m = MLPFlow(2, hidden=32, depth=3).double()
    x = torch.randn(7, 2, dtype=F64)
    t = torch.rand(7, dtype=F64)
    v = torch.randn(7, 2, dtype=F64) if k is None else \
        torch.randn(7, k, 2, dtype=F64)
    y, yd = m.forward_jvp(x, t, v)
    ref = func_jvp_k(m, x, t, v if k else v[:, None])
    assert torch.allclose(y, m(x, t), atol=1e-14)
    assert torch.allclose(yd, ref if k else ref[:, 0], atol=1e-12)


@pytest.mark.parametrize("image_size, mult", [(28, (1, 2)), (28, (1, 2, 2, 2)),
                                              (12, (1, 2))])
def test_unet_shapes_and_padding(image_size, mult):
    u = tiny_unet(channel_mult=mult, image_size=image_size)
    x = torch.randn(2, 1, image_size, image_size, dtype=F64)
    assert u(x, 0.5).shape == x.shape
    assert u(x[0], 0.5).shape == x.shape[1:]
    if len(mult) == 4:
        assert u.pad == (2, 2)  # 28 -> 32 for three 2x downsamplings


def test_unet_forward_jvp_matches_torch_func_jvp():
    u = tiny_unet(in_channels=2, image_size=6, num_res_blocks=2)
    x = torch.randn(2, 2, 6, 6, dtype=F64)
    v = torch.randn(2, 2, 2, 6, 6, dtype=F64)
    t = torch.tensor([0.1, 0.9], dtype=F64)
    y, yd = u.forward_jvp(x, t, v)
    ref = func_jvp_k(u, x, t, v)
    assert torch.allclose(y, u(x, t), atol=1e-12)
    assert torch.allclose(yd, ref, atol=1e-10 * float(ref.detach().abs().max()))


def test_jvp_primal_is_the_forward_bit_for_bit():
    # float32, padded, label-conditional: forward_jvp runs forward's own code
    torch.manual_seed(2)
    u = FlowUNet(3, base_channels=8, channel_mult=(1, 2, 2, 2), time_dim=16,
                 image_size=12, norm_groups=4, num_labels=2)
    x = torch.randn(2, 3, 12, 12)
    cond = torch.tensor([[1.0, -1.0], [0.0, 1.0]])
    y, yd = u.forward_jvp(x, 0.3, torch.randn(2, 4, 3, 12, 12), cond)
    assert torch.equal(y, u(x, 0.3, cond)) and yd.shape == (2, 4, 3, 12, 12)
    y1, yd1 = u.forward_jvp(x[0], 0.3, torch.randn(3, 12, 12), cond[0])
    assert torch.equal(y1, u(x[:1], 0.3, cond[:1])[0]) and yd1.shape == (3, 12, 12)
    m = MLPFlow(2, hidden=16, depth=2)
    xm = torch.randn(5, 2)
    assert torch.equal(m.forward_jvp(xm, 0.7, torch.randn(5, 2))[0], m(xm, 0.7))


def test_unet_goes_exactly_through_flow_jvp():
    u = tiny_unet(image_size=8)
    x0 = torch.randn(1, 1, 8, 8, dtype=F64)
    v = torch.randn(1, 2, 1, 8, 8, dtype=F64)
    vel = velocity_fn(u)
    with torch.no_grad():
        x1, jv = flow_jvp(vel, x0, v, steps=2, method="midpoint")
        x1f, jvf = flow_jvp(vel, x0, v, steps=2, method="midpoint",
                            jvp_mode="func")
        x1r, jvr = reference_jvp(vel, x0, v, steps=2, method="midpoint")
    assert torch.allclose(x1, x1r, atol=1e-12)
    assert torch.allclose(jv, jvr, atol=1e-10)
    assert torch.allclose(jvf, jvr, atol=1e-10)


def test_mlp_under_vmap_and_x1_velocity_jvp():
    torch.manual_seed(3)
    m = MLPFlow(2, hidden=16, depth=2).double()
    x0 = torch.randn(4, 2, dtype=F64)
    batched = vmap(lambda z: integrate(velocity_fn(m), z, 5))(x0)
    assert torch.allclose(batched, integrate(velocity_fn(m), x0, 5),
                          atol=1e-12)
    vel = velocity_fn(m, "x1")
    v = torch.randn(4, 3, 2, dtype=F64)
    _, jv = flow_jvp(vel, x0, v, steps=6)
    _, jvr = reference_jvp(vel, x0, v, steps=6)
    assert torch.allclose(jv, jvr, atol=1e-9 * float(jvr.detach().abs().max()))


def test_timestep_embedding():
    e = timestep_embedding(torch.tensor([0.0, 0.5]), 6)
    assert e.shape == (2, 6)
    assert torch.allclose(e[0], torch.tensor([1.0, 1, 1, 0, 0, 0]))
    with pytest.raises(ValueError, match="dim must be even"):
        timestep_embedding(torch.zeros(2), 5)


def test_error_paths():
    with pytest.raises(ValueError, match="hidden must be >= 1"):
        MLPFlow(2, hidden=0)
    with pytest.raises(ValueError, match="time_dim must be even"):
        MLPFlow(2, time_dim=7)
    with pytest.raises(ValueError, match="norm_groups must divide"):
        FlowUNet(base_channels=12, norm_groups=8)
    with pytest.raises(ValueError, match="channel_mult must be"):
        FlowUNet(channel_mult=())
    m = MLPFlow(2, hidden=8, depth=1)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 2\)"):
        m(torch.zeros(3, 3), 0.1)
    with pytest.raises(ValueError, match="t must be a scalar"):
        m(torch.zeros(3, 2), torch.zeros(2))
    with pytest.raises(ValueError, match="tangents must have shape"):
        m.forward_jvp(torch.zeros(3, 2), 0.1, torch.zeros(3, 1))
    u = tiny_unet()
    with pytest.raises(ValueError, match="x must have shape"):
        u(torch.zeros(2, 1, 27, 27, dtype=F64), 0.1)
