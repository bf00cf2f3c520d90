"""Attribute estimators and the small classifier, checked against a linear
flow whose Jacobian is a matrix exponential."""
import pytest
import torch
from torch import nn

from flowjac.engine import composite
from flowjac.estimators import moments
from flowjac.models import classifiers

D, P = 5, 3


@pytest.fixture(scope="module")
def linear():
    g = torch.Generator().manual_seed(0)
    A = 0.4 * torch.randn(D, D, generator=g, dtype=torch.float64)
    clf = nn.Linear(D, P).double()
    with torch.no_grad():
        clf.weight.copy_(torch.randn(P, D, generator=g, dtype=torch.float64))
        clf.bias.zero_()
    velocity = lambda x, t: x @ A.T
    J = clf.weight.detach() @ torch.linalg.matrix_exp(A)   # d c(phi(z)) / dz
    return velocity, clf, J


def test_attribute_jvp_is_exact(linear):
    velocity, clf, J = linear
    z = torch.randn(6, D, dtype=torch.float64)
    v = torch.randn(6, 4, D, dtype=torch.float64)
    logits, delta = composite.attribute_jvp(velocity, clf, z, tangents=v, steps=40)
    assert logits.shape == (6, P) and delta.shape == (6, 4, P)
    assert torch.allclose(delta, v @ J.T, atol=1e-8)
    assert torch.allclose(logits, z @ J.T, atol=1e-8)
    _, d1 = composite.attribute_jvp(velocity, clf, z, tangents=v[:, 0], steps=40)
    assert d1.shape == (6, 1, P) and torch.allclose(d1[:, 0], delta[:, 0])


def test_attribute_jvp_of_a_single_point_with_several_probes(linear):
    # One point and k probes once made an expanded view that make_dual rejects.
    velocity, clf, J = linear
    z = torch.randn(1, D, dtype=torch.float64)
    v = torch.randn(1, 3, D, dtype=torch.float64)
    _, delta = composite.attribute_jvp(velocity, clf, z, tangents=v, steps=40)
    assert torch.allclose(delta, v @ J.T, atol=1e-8)


def test_random_probes_give_jjt(linear):
    velocity, clf, J = linear
    z = torch.zeros(2000, D, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    _, delta = composite.attribute_jvp(velocity, clf, z, k=8, steps=10, generator=g)
    m = moments.second_moment(delta.reshape(-1, P))
    jjt = J @ J.T
    assert torch.allclose(m, jjt, rtol=0.06, atol=0.06 * jjt.diag().max())
    corr = moments.jvp_corr(delta)
    assert torch.allclose(corr, moments.moment_to_corr(jjt), atol=0.03)


def test_probe_grad_norm_estimates_the_true_norm(linear):
    # the linear flow's gradient of logit 1 is the row J[1] at every z
    velocity, clf, J = linear
    z = torch.randn(4, D, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    _, delta = composite.attribute_jvp(velocity, clf, z, k=20_000, steps=10, generator=g)
    est = moments.probe_grad_norm(delta, attr=1)
    assert torch.allclose(est, J[1].norm().expand(4), rtol=0.03)
    assert moments.probe_grad_norm(delta).shape == (4, P)


def test_below_threshold_value_and_quantile():
    x = torch.arange(10.0)
    assert moments.below_threshold(x, threshold=2.5).sum() == 3
    assert moments.below_threshold(x, quantile=0.5).sum() == 5
    assert moments.below_threshold(x, quantile=1.0).all()


def test_jvp_corr_on_a_mask():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(4000, 2, 1, generator=g)
    delta = torch.cat([a, a + 0.01 * torch.randn(4000, 2, 1, generator=g)], 2)
    mask = torch.zeros(4000, dtype=torch.bool)
    mask[:100] = True
    c = moments.jvp_corr(delta, mask)
    assert c.shape == (2, 2) and c[0, 1] > 0.99


def test_bad_estimator_inputs(linear):
    velocity, clf, _ = linear
    z = torch.randn(3, D, dtype=torch.float64)
    with pytest.raises(ValueError, match="k"):
        composite.attribute_jvp(velocity, clf, z, k=0)
    with pytest.raises(ValueError, match="tangents"):
        composite.attribute_jvp(velocity, clf, z, tangents=torch.randn(3, 2, D + 1))
    with pytest.raises(ValueError, match="attr"):
        moments.probe_grad_norm(torch.randn(3, 2, P), attr=P)
    with pytest.raises(ValueError, match="exactly one"):
        moments.below_threshold(torch.arange(3.0))
    with pytest.raises(ValueError, match="quantile"):
        moments.below_threshold(torch.arange(3.0), quantile=1.5)
    with pytest.raises(ValueError, match="mask"):
        moments.jvp_corr(torch.randn(3, 2, P), torch.zeros(3, dtype=torch.bool))


def test_attribute_net_learns_a_visible_attribute():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (512, 2), generator=g)
    x = 0.1 * torch.randn(512, 3, 16, 16, generator=g)
    x[:, 0] += y[:, :1, None].float()                 # red channel on/off
    x[:, 2, :8] += y[:, 1:, None].float()             # blue top half on/off
    net = classifiers.AttributeNet(n_attr=2, width=8, stages=2)
    hist = classifiers.train_classifier(net, x, y, steps=150, batch_size=64, lr=3e-3)
    assert hist["loss"][-1] < hist["loss"][0]
    acc = classifiers.per_attribute_accuracy(net, x, y)
    assert acc.shape == (2,) and bool((acc > 0.95).all())


def test_attribute_net_has_exact_forward_ad():
    torch.manual_seed(0)
    net = classifiers.AttributeNet(n_attr=3, width=8, stages=2).double()
    for p in net.parameters():       # make the residual branches non-trivial
        p.data.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    v = torch.randn_like(x)
    _, jv = torch.func.jvp(net, (x,), (v,))
    fd = (net(x + 1e-6 * v) - net(x - 1e-6 * v)) / 2e-6
    assert torch.allclose(jv, fd, atol=1e-7)


def test_classifier_cache_round_trip(tmp_path):
    torch.manual_seed(0)
    x, y = torch.rand(32, 3, 8, 8), torch.randint(0, 2, (32, 2))
    path = tmp_path / "clf.pt"
    a, trained = classifiers.load_or_train_classifier(
        path, classifiers.AttributeNet(2, width=4, stages=1), x, y, steps=2, batch_size=8)
    assert trained and path.exists()
    b, trained = classifiers.load_or_train_classifier(
        path, classifiers.AttributeNet(2, width=4, stages=1), x, y, steps=2, batch_size=8)
    assert not trained
    assert torch.equal(classifiers.predict_logits(a, x), classifiers.predict_logits(b, x))


def test_bad_classifier_inputs():
    net = classifiers.AttributeNet(2, width=4, stages=1)
    with pytest.raises(ValueError, match="width"):
        classifiers.AttributeNet(2, width=0)
    with pytest.raises(ValueError, match="labels"):
        classifiers.train_classifier(net, torch.rand(4, 3, 8, 8), torch.zeros(3, 2), steps=1)
    with pytest.raises(ValueError, match="steps"):
        classifiers.train_classifier(net, torch.rand(4, 3, 8, 8), torch.zeros(4, 2), steps=0)
    with pytest.raises(ValueError, match="images"):
        classifiers.predict_logits(net, torch.rand(3, 8, 8))


def test_train_classifier_resumes_exactly_and_refuses_other_settings(tmp_path):
    """Interrupted after 4 of 6 steps (checkpoints every 2) and resumed: the weights
    and losses of one uninterrupted run; a checkpoint of another lr is refused."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(40, 3, 8, 8, generator=g), torch.randint(0, 2, (40, 2), generator=g)

    def net():
        torch.manual_seed(3)
        return classifiers.AttributeNet(n_attr=2, width=8, stages=2)

    whole = net()
    h_whole = classifiers.train_classifier(whole, x, y, steps=6, batch_size=8, lr=1e-2)
    ck = tmp_path / "ck.pt"
    part = net()
    classifiers.train_classifier(part, x, y, steps=4, batch_size=8, lr=1e-2,
                                 checkpoint_path=ck, checkpoint_every=2)
    resumed = net()
    torch.manual_seed(99)                  # the checkpoint restores torch's RNG too
    h = classifiers.train_classifier(resumed, x, y, steps=6, batch_size=8, lr=1e-2,
                                     checkpoint_path=ck, checkpoint_every=2)
    assert h["resumed_from"] == 4 and h["loss"] == h_whole["loss"]
    for k, v in whole.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    with pytest.raises(ValueError, match="other settings"):
        classifiers.train_classifier(net(), x, y, steps=6, batch_size=8, lr=2e-2,
                                     checkpoint_path=ck)
    with pytest.raises(ValueError, match="past the 3 steps"):
        classifiers.train_classifier(net(), x, y, steps=3, batch_size=8, lr=1e-2,
                                     checkpoint_path=ck)
