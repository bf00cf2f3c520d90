"""The generated SCM image dataset: exact correlations, sampling, rendering,
determinism, the DAG and causal discovery."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowjac.causal import discovery, scm
from flowjac.data import scm_images


@pytest.fixture(scope="module")
def model():
    return scm.default_scm()


def test_dag_has_the_three_triples(model):
    d = scm.dag(model)
    edges = set(d["edges"])
    assert {("C_warm", "A_square"), ("C_warm", "B_red")} <= edges
    assert {("X_large", "Z_framed"), ("Y_striped", "Z_framed")} <= edges
    assert {("P_right", "M_marker"), ("M_marker", "Q_low")} <= edges
    assert len(edges) == 6 and len(d["nodes"]) == 9
    assert d["adjacency"].sum() == 6


def test_joint_is_a_distribution(model):
    states, prob = model.joint()
    assert states.shape == (512, 9)
    assert abs(prob.sum() - 1) < 1e-12 and (prob >= 0).all()


def test_exact_correlations_match_closed_forms(model):
    c = model.correlation()
    s = 0.85
    r = 2 * s - 1                 # corr of a parent and its noisy copy
    i = model.index
    assert abs(c[i("C_warm"), i("A_square")] - r) < 1e-12
    assert abs(c[i("A_square"), i("B_red")] - r ** 2) < 1e-12
    assert abs(c[i("P_right"), i("Q_low")] - r ** 2) < 1e-12
    assert abs(c[i("X_large"), i("Y_striped")]) < 1e-12


def test_conditioning_separates_and_berkson(model):
    i = model.index
    for v in (0, 1):
        c = model.correlation({"C_warm": v})
        assert abs(c[i("A_square"), i("B_red")]) < 1e-12   # common cause
        c = model.correlation({"M_marker": v})
        assert abs(c[i("P_right"), i("Q_low")]) < 1e-12    # chain
    c = model.correlation({"Z_framed": 1})
    assert c[i("X_large"), i("Y_striped")] < -0.3            # collider


def test_sampled_labels_match_exact_correlations(model):
    g = torch.Generator().manual_seed(0)
    labels = model.sample(200_000, generator=g).numpy()
    emp = np.corrcoef(labels.T)
    assert np.abs(emp - model.correlation()).max() < 0.01
    assert np.abs(labels.mean(0) - model.marginals()).max() < 0.01


@settings(max_examples=15, deadline=None)
@given(st.floats(0.55, 0.99))
def test_copy_strength_gives_correlation_2s_minus_1(s):
    m = scm.default_scm(strength=s)
    c = m.correlation()
    assert abs(c[m.index("C_warm"), m.index("B_red")] - (2 * s - 1)) < 1e-9


def test_dataset_is_deterministic_and_in_range():
    a, b = scm_images.SCMImages(16, 32, seed=3), scm_images.SCMImages(16, 32, seed=3)
    c = scm_images.SCMImages(16, 32, seed=4)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    x, y = a[0]
    assert x.shape == (3, 32, 32) and y.shape == (9,) and len(a) == 16
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0 <= float(a.images.min()) and float(a.images.max()) <= 1
    assert scm_images.SCMImages(2, 64).images.shape == (2, 3, 64, 64)


@pytest.mark.parametrize("j", range(9))
def test_every_attribute_changes_the_image(j):
    base = torch.zeros(1, 9, dtype=torch.long)
    flip = base.clone()
    flip[0, j] = 1
    g = lambda: torch.Generator().manual_seed(0)     # same noise for both
    x0 = scm_images.render(base, 32, generator=g(), noise=0.0)
    x1 = scm_images.render(flip, 32, generator=g(), noise=0.0)
    changed = ((x0 - x1).abs().amax(1) > 0.2).float().mean()
    assert changed > 0.01, f"{scm.ATTRIBUTES[j]} changes {changed:.3%} of pixels"


def test_noise_varies_images_within_a_configuration():
    labels = torch.zeros(2, 9, dtype=torch.long)
    x = scm_images.render(labels, 32, generator=torch.Generator().manual_seed(0))
    assert (x[0] - x[1]).abs().mean() > 0.01


def test_pc_recovers_the_cpdag(model):
    labels = model.sample(20_000, generator=torch.Generator().manual_seed(1))
    est = discovery.pc_discovery(labels, model.nodes, alpha=0.01, test="gsq")
    truth = discovery.cpdag_matrix(model.adjacency())
    assert discovery.structural_hamming_distance(est, truth) == 0
    # the collider is the only v-structure, so only it is oriented
    i = model.index
    assert truth[i("X_large"), i("Z_framed")] == -1 and \
        truth[i("Z_framed"), i("X_large")] == 1
    assert truth[i("C_warm"), i("A_square")] == truth[i("A_square"), i("C_warm")] == -1


def test_shd_counts_edge_differences():
    t = np.zeros((3, 3), int)
    t[0, 1], t[1, 0] = -1, 1            # 0 -> 1
    e = t.copy()
    e[0, 1], e[1, 0] = 1, -1            # reversed
    e[1, 2] = e[2, 1] = -1              # extra undirected edge
    assert discovery.structural_hamming_distance(e, t) == 2
    assert discovery.structural_hamming_distance(t, t) == 0


def test_bad_inputs(model):
    with pytest.raises(ValueError, match="strength"):
        scm.default_scm(strength=0.4)
    with pytest.raises(ValueError, match="name"):
        model.index("D")
    with pytest.raises(ValueError, match="given"):
        model.correlation({"C_warm": 2})
    with pytest.raises(ValueError, match="labels"):
        scm_images.render(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        scm_images.render(torch.full((1, 9), 2))
    with pytest.raises(ValueError, match="size"):
        scm_images.SCMImages(4, size=4)
    with pytest.raises(ValueError, match="n"):
        scm_images.SCMImages(0)
    with pytest.raises(ValueError, match="topological"):
        scm.BinarySCM(("a", "b"), {"a": ("b",)}, {"a": {(0,): .5, (1,): .5},
                                                  "b": {(): .5}})
    with pytest.raises(ValueError, match="cpt"):
        scm.BinarySCM(("a",), {}, {"a": {(): 1.5}})
    with pytest.raises(ValueError, match="test"):
        discovery.pc_discovery(np.zeros((10, 9)), model.nodes, test="fisherz")
