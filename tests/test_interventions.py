"""do(), abduction and counterfactuals against brute force, on the book's SCM and a held-out DAG."""
import itertools

import numpy as np
import pytest
import torch

from flowjac.causal import label_interventions
from flowjac.causal.scm import BinarySCM, default_scm


def held_out_scm():
    """A DAG the module was not written around: a diamond with a tail and noisy mechanisms."""
    nodes = ("R", "S", "T", "V", "W")
    parents = {"R": (), "S": ("R",), "T": ("R",), "V": ("S", "T"), "W": ("V", "R")}
    cpt = {"R": {(): 0.3},
           "S": {(0,): 0.2, (1,): 0.7},
           "T": {(0,): 0.6, (1,): 0.1},
           "V": {(0, 0): 0.05, (0, 1): 0.5, (1, 0): 0.6, (1, 1): 0.9},
           "W": {(0, 0): 0.3, (0, 1): 0.8, (1, 0): 0.4, (1, 1): 0.95}}
    return BinarySCM(nodes, parents, cpt)


def brute_do_joint(scm, values):
    """P(x) under do(values) by the truncated factorisation, written independently."""
    d = len(scm.nodes)
    states = np.array(list(itertools.product((0, 1), repeat=d)))
    prob = np.ones(len(states))
    for j, v in enumerate(scm.nodes):
        if v in values:
            prob *= states[:, j] == values[v]
            continue
        pa = [scm.nodes.index(p) for p in scm.parents[v]]
        p1 = np.array([scm.cpt[v][tuple(s[pa])] for s in states])
        prob *= np.where(states[:, j] == 1, p1, 1 - p1)
    return states, prob


@pytest.mark.parametrize("make", [default_scm, held_out_scm])
def test_do_is_the_truncated_factorisation(make):
    scm = make()
    name = scm.nodes[len(scm.nodes) // 2]
    for val in (0, 1):
        mut = scm.do(**{name: val})
        s1, p1 = mut.joint()
        s2, p2 = brute_do_joint(scm, {name: val})
        assert np.array_equal(s1, s2) and np.allclose(p1, p2, atol=1e-15)
        assert abs(mut.marginals()[scm.index(name)] - val) < 1e-12
        # non-descendants keep their observational marginals
        below = label_interventions.descendants(scm, name)
        keep = [v for v in scm.nodes if v != name and v not in below]
        for v in keep:
            assert abs(mut.marginals()[scm.index(v)] - scm.marginals()[scm.index(v)]) < 1e-12


def test_exact_tables_of_the_three_structures():
    tab = label_interventions.structure_table(default_scm())
    for kind, row in tab.items():
        for val in (0, 1):
            m = {"common cause": "C_warm", "collider": "Z_framed", "chain": "M_marker"}[kind]
            # do() on the middle node: endpoints independent in all three
            assert abs(row[f"do {m}={val}"]) < 1e-12, (kind, val)
    assert tab["common cause"]["observe"] > 0.2
    assert abs(tab["common cause"]["condition C_warm=1"]) < 1e-12
    assert abs(tab["collider"]["observe"]) < 1e-12
    assert tab["collider"]["condition Z_framed=1"] < -0.1         # Berkson
    assert tab["chain"]["observe"] > 0.2
    assert abs(tab["chain"]["condition M_marker=1"]) < 1e-12


@pytest.mark.parametrize("make", [default_scm, held_out_scm])
def test_sample_and_propagate_share_the_noise(make):
    scm = make()
    g = torch.Generator().manual_seed(0)
    labels, u = scm.sample(500, g, return_noise=True)
    assert torch.equal(label_interventions.propagate(scm, u), labels)
    low, high = label_interventions.noise_posterior(scm, labels)
    assert bool(((u >= low) & (u < high)).all())
    # abducted noise reproduces the observed labels
    u2 = label_interventions.abduct_noise(scm, labels, torch.Generator().manual_seed(1))
    assert torch.equal(label_interventions.propagate(scm, u2), labels)


@pytest.mark.parametrize("make", [default_scm, held_out_scm])
def test_counterfactual_matches_the_twin_network(make):
    """Exact counterfactual vs Monte Carlo of the twin network: prior noise,
    factual and counterfactual worlds on the same U, kept where the factual
    world equals the observation."""
    scm = make()
    d = len(scm.nodes)
    g = torch.Generator().manual_seed(3)
    obs = scm.sample(1, g)[0]
    target = scm.nodes[1]
    new = 1 - int(obs[1])
    states, prob = label_interventions.counterfactual(scm, obs, **{target: new})
    assert abs(prob.sum() - 1) < 1e-12
    n = 400_000 if d <= 5 else 2_000_000
    u = torch.rand(n, d, generator=g, dtype=torch.float64)
    fact = label_interventions.propagate(scm, u)
    keep = (fact == obs).all(1)
    cf = label_interventions.propagate(scm, u[keep], **{target: new})
    idx = (cf * (2 ** torch.arange(d - 1, -1, -1))).sum(1)
    mc = np.bincount(idx.numpy(), minlength=2 ** d) / int(keep.sum())
    se = np.sqrt(prob * (1 - prob) / int(keep.sum()))
    assert np.all(np.abs(mc - prob) < 5 * se + 1e-3), int(keep.sum())
    # non-descendants of the target keep their observed value with probability 1
    nd = [j for j, v in enumerate(scm.nodes)
          if v != target and v not in label_interventions.descendants(scm, target)]
    support = states[prob > 0]
    assert np.all(support[:, nd] == obs.numpy()[nd])
    assert np.all(support[:, 1] == new)


def test_errors():
    scm = default_scm()
    with pytest.raises(ValueError, match="must be 0 or 1"):
        scm.do(C_warm=2)
    with pytest.raises(ValueError, match="name must be one of"):
        scm.do(nope=1)
    with pytest.raises(ValueError, match="at least one intervention"):
        label_interventions.do(scm)
    with pytest.raises(ValueError, match="labels must have shape"):
        label_interventions.noise_posterior(scm, torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be integers 0 or 1"):
        label_interventions.noise_posterior(scm, torch.full((1, 9), 2))
    det = BinarySCM(("a", "b"), {"a": (), "b": ("a",)},
                    {"a": {(): 0.5}, "b": {(0,): 0.0, (1,): 1.0}})
    with pytest.raises(ValueError, match="probability zero"):
        label_interventions.noise_posterior(det, torch.tensor([[1, 0]]))


def test_randomized_experiment_is_do():
    """Rows of draw_labels(randomize=[m]) with m = v follow do(m = v) exactly:
    their empirical joint matches the mutilated SCM's (chi-square-free check
    on correlations and marginals, 20,000 rows)."""
    from flowjac.pipelines import image_interventions

    scm = default_scm()
    g = torch.Generator().manual_seed(5)
    lab = image_interventions.draw_labels(scm, 20_000, g, randomize=["C_warm", "M_marker"])
    for m in ("C_warm", "M_marker"):
        im = scm.index(m)
        assert abs(lab[:, im].double().mean() - 0.5) < 0.02
        for val in (0, 1):
            rows = lab[lab[:, im] == val].double()
            exact = scm.do(**{m: val}).marginals()
            assert np.allclose(rows.mean(0).numpy(), exact, atol=0.03), (m, val)
    # the randomized middle is independent of its parent in the chain
    ip, im = scm.index("P_right"), scm.index("M_marker")
    assert abs(np.corrcoef(lab[:, ip].numpy(), lab[:, im].numpy())[0, 1]) < 0.03


def test_counterfactual_images_round_trip_and_keep_the_latent():
    """Abduction inverts the discrete flow (to solver accuracy) and the
    counterfactual is rendered from the abducted latent."""
    from flowjac.models.conditional import LabelVelocity
    from flowjac.models.nets import FlowUNet
    from flowjac.pipelines import image_interventions

    torch.manual_seed(0)
    net = FlowUNet(3, 8, (1, 2), 16, 8, 1, 4, num_labels=9).double().eval()
    lv = LabelVelocity(net)
    scm = default_scm()
    g = torch.Generator().manual_seed(1)
    labels = scm.sample(4, g)
    x = torch.rand(4, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    smp = dict(method="rk4", steps=40)
    out = image_interventions.counterfactual_images(lv, scm, x, labels, g, sampler=smp, M_marker=1)
    assert (out["round_trip"] - x).abs().max() < 1e-5
    assert bool((out["labels"][:, scm.index("M_marker")] == 1).all())
    again, _ = image_interventions.generate(lv, out["labels"], z=out["z"], **smp)
    assert torch.allclose(again, out["images"])


def test_latent_intervention_reuses_precomputed_gradients():
    from flowjac.pipelines import image_interventions

    torch.manual_seed(0)
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    velocity = lambda x, t: 0.5 * torch.tanh(x) - 0.2 * x   # noqa: E731
    z = torch.randn(5, 3, 2, 2)
    smp = dict(method="midpoint", steps=4)
    grads = image_interventions.attribute_gradients(velocity, clf, z, sampler=smp, grad_batch=2)
    assert grads.shape == (5, 3, 12)
    # against the gradient of one logit by hand, row by row
    zr = z[:1].clone().requires_grad_(True)
    from flowjac.engine.ode import integrate
    (g1,) = torch.autograd.grad(clf(integrate(velocity, zr, 4, "midpoint"))[0, 1], zr)
    torch.testing.assert_close(grads[0, 1], g1.flatten())
    for project in (False, True):
        a = image_interventions.latent_intervention(velocity, clf, z, 0, value=1,
                                                    project=project, sampler=smp)
        b = image_interventions.latent_intervention(velocity, clf, z, 0, value=1,
                                                    project=project, sampler=smp, grads=grads)
        for key in ("after", "flipped", "step"):
            assert torch.equal(a[key].nan_to_num(-1), b[key].nan_to_num(-1)), key
    with pytest.raises(ValueError, match="grads must be"):
        image_interventions.latent_intervention(velocity, clf, z, 0, value=1, project=True,
                                                sampler=smp, grads=grads[:3])


def _tiny_conditional(seed=0):
    from flowjac.models.classifiers import AttributeNet
    from flowjac.models.conditional import LabelVelocity
    from flowjac.models.nets import FlowUNet

    torch.manual_seed(seed)
    net = FlowUNet(3, 8, (1, 2), 16, 8, 1, 4, num_labels=9).eval().requires_grad_(False)
    clf = AttributeNet(n_attr=9, in_channels=3, width=4, stages=2).eval().requires_grad_(False)
    return LabelVelocity(net), clf


def test_studies_are_deterministic_and_their_tables_follow_the_scm():
    """The stored run and the chapter's live check rely on this: same seeds, same numbers."""
    from flowjac.pipelines import interventions_study, interventions_tables

    lv, clf = _tiny_conditional()
    scm = default_scm()
    smp = dict(method="midpoint", steps=2, guidance=1.0)
    a = interventions_study.seeing_doing(lv, clf, scm, 6, seed=3, sampler=smp)
    b = interventions_study.seeing_doing(lv, clf, scm, 6, seed=3, sampler=smp)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the experiment's middle nodes are fair coins, independent of their parents
    big = interventions_study.seeing_doing(lv, clf, scm, 1, seed=3, sampler=smp)
    assert big["lab_exp"].shape == (1, 9)

    cf = interventions_study.counterfactuals(lv, clf, scm, 5, seed=3, sampler=smp, size=8,
                                             keep=2)
    assert cf["x_real"].shape == (2, 3, 8, 8) and cf["rt_mean"].shape == (5,)
    table = interventions_tables.counterfactual_table(cf, scm)
    assert (table["non-descendants kept (labels)"] == 1).all()
    idx = {v: i for i, v in enumerate(scm.nodes)}
    for m, r in cf["do"].items():
        assert torch.equal(r["labels"][:, idx[m]], 1 - cf["labels"][:, idx[m]])   # flipped
        assert ((r["p_change"] >= 0) & (r["p_change"] <= 1 + 1e-12)).all()

    lf = interventions_study.label_free(lv, clf, scm, 3, seed=3, sampler=smp,
                                        latent_shape=(3, 8, 8))
    exact = lf["p_change_exact"]
    assert torch.allclose(exact[:, idx["M_marker"]], torch.ones(3, dtype=torch.float64))
    assert torch.all(exact[:, idx["P_right"]] == 0)          # a parent never changes under do()
    lt = interventions_tables.label_free_table(lf, scm)
    assert lt.loc["exact do (counterfactual)", "P changed (do: 0)"] == 0
    assert set(lt.index) == {"plain gradient", "projected", "exact do (counterfactual)"}

    # a stored run made of these studies is recomputed in part from the same model
    meta = dict(n_images=6, n_cf=5, n_latent=3, seed=3, sampler=smp, weights_sha256="abc",
                seconds=dict(seeing_doing=60.0, counterfactuals=30.0, label_free=30.0),
                hardware=dict(cpu="a CPU", torch_threads=1))
    stored_run = dict(seeing_doing=a, counterfactuals=cf, label_free=lf, meta=meta)
    kwargs = dict(sampler=smp, seed=3, weights_sha256="abc", latent_shape=(3, 8, 8))
    diffs = interventions_study.check_stored_run(stored_run, lv, clf, **kwargs)
    assert set(diffs) == {"observation readings", "counterfactual images",
                          "unconditional readings"}
    assert max(diffs.values()) < 1e-5, diffs
    text = interventions_study.stored_run_text(meta, diffs)
    assert "6 images per setting, 5 counterfactual images and 3 latents" in text
    assert "a CPU (1 thread) in 2 minutes" in text
    # another model's numbers are not reproduced, and another design is refused
    other, _ = _tiny_conditional(seed=1)
    assert max(interventions_study.check_stored_run(stored_run, other, clf,
                                                    **kwargs).values()) > 1e-3
    for key, value in (("weights_sha256", "def"), ("seed", 4),
                       ("sampler", dict(smp, guidance=2.0))):
        with pytest.raises(ValueError, match=f"the stored run has {key} = "):
            interventions_study.check_stored_run(stored_run, lv, clf,
                                                 **dict(kwargs, **{key: value}))
