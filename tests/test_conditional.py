"""Label-conditional FlowUNet, LabelVelocity and conditional CFM training."""
import pytest
import torch
from torch.func import jvp

from flowjac.engine.jvp import flow_jvp
from flowjac.engine.train import train_flow
from flowjac.models.conditional import LabelVelocity, sample_given
from flowjac.models.nets import FlowUNet

F64 = torch.float64


def _net():
    torch.manual_seed(0)
    return FlowUNet(3, 8, (1, 2), 16, 8, 1, 4, num_labels=4).double()


def test_label_code_changes_the_velocity_and_tangents_are_exact():
    net = _net()
    x = torch.randn(3, 3, 8, 8, dtype=F64)
    cond = torch.tensor([[1., -1, 0, 1], [-1, -1, 1, 0], [0, 0, 0, 0]], dtype=F64)
    # train-like init leaves label_emb random: codes move the output
    assert not torch.allclose(net(x, 0.3, cond), net(x, 0.3, -cond))
    v = torch.randn(3, 2, 3, 8, 8, dtype=F64)
    y, yd = net.forward_jvp(x, 0.3, v, cond)
    for j in range(2):
        _, ref = jvp(lambda u: net(u, 0.3, cond), (x,), (v[:, j],))
        assert torch.allclose(yd[:, j], ref, atol=1e-11)
    assert torch.allclose(y, net(x, 0.3, cond))
    # all-zero code is the unconditional call
    assert torch.allclose(net(x, 0.3, torch.zeros_like(cond)), net(x, 0.3))


def test_label_velocity_guidance_and_errors():
    net = _net()
    lv = LabelVelocity(net)
    labels = torch.tensor([[1, 0, 0, 1], [0, 1, 1, 0]])
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    t = torch.tensor(0.4, dtype=F64)
    c = 2 * labels.double() - 1
    assert torch.allclose(lv(x, t, labels), net(x, t, c))
    w = 2.5
    guided = lv.given(labels, guidance=w)
    v0, v1 = net(x, t, torch.zeros_like(c)), net(x, t, c)
    assert torch.allclose(guided(x, t), v0 + w * (v1 - v0))
    tang = torch.randn(2, 3, 3, 8, 8, dtype=F64)
    _, gd = guided.jvp(x, t, tang)
    _, ref = jvp(lambda u: guided(u, t), (x,), (tang[:, 1],))
    assert torch.allclose(gd[:, 1], ref, atol=1e-11)
    # the flow's JVP through the guided velocity uses the exact tangents
    _, a = flow_jvp(guided, x, tang, steps=2, method="midpoint")
    _, b = flow_jvp(guided, x, tang, steps=2, method="midpoint", jvp_mode="func")
    assert torch.allclose(a, b, atol=1e-10)
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        lv.given(torch.tensor([[2, 0, 0, 1]]))
    with pytest.raises(ValueError, match="labels must have shape"):
        lv.given(torch.tensor([[1, 0]]))
    with pytest.raises(ValueError, match="guidance must be a number"):
        lv.given(labels, guidance=-1)
    with pytest.raises(ValueError, match="num_labels > 0"):
        LabelVelocity(FlowUNet(3, 8, (1, 2), 16, 8, 1, 4))
    with pytest.raises(ValueError, match="cond is only accepted"):
        FlowUNet(3, 8, (1, 2), 16, 8, 1, 4)(x.float(), 0.1, c.float())


def test_conditional_training_resumes_exactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = torch.randn(32, 3, 8, 8, generator=g)
    labels = torch.randint(0, 2, (32, 4), generator=g)
    kw = dict(batch_size=8, lr=1e-3, progress=False, labels=labels,
              label_dropout=0.2, seed=1)

    def fresh():
        torch.manual_seed(0)
        return FlowUNet(3, 8, (1, 2), 16, 8, 1, 4, num_labels=4)

    a = fresh()
    train_flow(a, data, steps=4, **kw)
    b = fresh()
    ck = tmp_path / "c.pt"
    train_flow(b, data, steps=2, checkpoint_path=ck, **kw)
    b2 = fresh()
    hist = train_flow(b2, data, steps=4, checkpoint_path=ck, **kw)
    assert hist["resumed_from"] == 2
    for p, q in zip(a.parameters(), b2.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="label_dropout"):
        train_flow(fresh(), data, steps=4, checkpoint_path=ck,
                   **dict(kw, label_dropout=0.5))
    with pytest.raises(ValueError, match="labels must be a"):
        train_flow(fresh(), data, steps=1, **dict(kw, labels=labels[:5]))
    with pytest.raises(ValueError, match="label_dropout must be"):
        train_flow(fresh(), data, steps=1, **dict(kw, label_dropout=1.0))
    x = sample_given(LabelVelocity(a.eval()), labels[:3], steps=2, seed=0)
    assert x.shape == (3, 3, 8, 8) and torch.isfinite(x).all()
