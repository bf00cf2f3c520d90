"""Loud failures (issue 34, items 4 and 6): NaN or inf met in probing,
divergences, bootstrap intervals, interventions and adapted velocities is
one clear ValueError naming its source, before further work."""
import pytest
import torch

from flowjac.causal import label_interventions
from flowjac.causal.scm import default_scm
from flowjac.engine import probing
from flowjac.estimators import intervals, spectra
from flowjac.models.adapters import from_callable
from flowjac.pipelines import image_interventions

NAN = float("nan")


class Linear:
    """velocity(x, t) = a x, NaN from time ``bad_after`` on (None: never)."""

    def __init__(self, bad_after=None):
        self.bad_after, self.calls = bad_after, 0

    def _scale(self, t):
        return NAN if self.bad_after is not None and float(t) >= self.bad_after else -0.5

    def __call__(self, x, t):
        self.calls += 1
        return self._scale(t) * x

    def jvp(self, x, t, tangents):
        self.calls += 1
        a = self._scale(t)
        return a * x, a * tangents


def test_probe_refuses_nan_velocities_and_readouts_at_the_first_batch():
    velocity = Linear(bad_after=0.5)
    with pytest.raises(ValueError, match=r"probe: the velocity Linear gives NaN or inf "
                                         r"samples at latents 0-1"):
        probing.probe(velocity, lambda x: x, (3,), 6, k=1, steps=2, batch_size=2)
    # stopped at the first batch: one solve with its JVPs and the diagnosis
    assert velocity.calls <= 2 * 2 + 2 * 2

    def readout(x):
        return torch.log(x - 10)           # NaN on every sample
    with pytest.raises(ValueError, match="the readout function gives NaN or inf .* "
                                         "on finite samples at latents 0-1"):
        probing.probe(Linear(), readout, (3,), 6, k=1, steps=2, batch_size=2)
    with pytest.raises(ValueError, match="plain_outputs: the velocity Linear"):
        probing.plain_outputs(Linear(bad_after=0.0), lambda x: x, (3,), 4, steps=2)
    out = probing.probe(Linear(), lambda x: x, (3,), 4, k=1, steps=2, batch_size=2)
    assert torch.isfinite(out["jvp"]).all()


def test_partial_files_are_read_by_the_one_safe_read(tmp_path):
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))
    torch.save({"settings": Evil(), "done": 0, "res": {}, "secs": {}},
               tmp_path / "p.pt")
    with pytest.raises(ValueError, match="partial_path .* is unsafe"):
        probing.probe(Linear(), lambda x: x, (3,), 4, k=1, steps=2,
                      partial_path=tmp_path / "p.pt")
    assert not (tmp_path / "ran").exists()
    torch.save({"some": "dict"}, tmp_path / "q.pt")
    with pytest.raises(ValueError, match="is not a partial run"):
        probing.plain_outputs(Linear(), lambda x: x, (3,), 4, steps=2,
                              partial_path=tmp_path / "q.pt")


def test_divergence_names_a_velocity_that_gives_nan():
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"the velocity Linear gives a NaN or inf "
                                         r"velocity \(12 entries\) at t = 0.7"):
        spectra.divergence(Linear(bad_after=0.5), x, 0.7)
    with pytest.raises(ValueError, match="the velocity Linear gives a NaN"):
        spectra.volume_change(Linear(bad_after=0.5), x, steps=4)
    torch.testing.assert_close(spectra.divergence(Linear(), x, 0.7),
                               torch.full((4,), -1.5, dtype=torch.float64))


def test_bootstrap_refuses_nonfinite_data_and_infinite_statistics():
    data = torch.tensor([1.0, NAN, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"data must be finite; 1 of its 4 rows .* row 1"):
        intervals.bootstrap_ci(lambda d: d.mean(), data)
    with pytest.raises(ValueError, match="fn must return finite values .* fn.data. is inf"):
        intervals.bootstrap_ci(lambda d: d.sum() / 0, torch.tensor([1.0, 2.0, 3.0]))
    est, lo, hi = intervals.bootstrap_ci(lambda d: d.mean(), torch.tensor([1.0, 2.0, 3.0]),
                                         n_boot=50, generator=torch.Generator().manual_seed(0))
    assert lo <= est <= hi


def test_adapted_velocity_refuses_a_nonfinite_t():
    velocity = from_callable(lambda x, t: x * t, order="x,t")
    x = torch.randn(2, 3)
    for t in (NAN, float("inf"), torch.tensor(NAN), torch.tensor([0.5, NAN])):
        with pytest.raises(ValueError, match="t must be finite"):
            velocity(x, t)
        with pytest.raises(ValueError, match="t must be finite"):
            velocity.jvp(x, t, torch.randn(2, 3))
    torch.testing.assert_close(velocity(x, 0.5), x * 0.5)


def test_interventions_refuse_nan_inputs_and_outputs():
    scm = default_scm()
    u = torch.rand(5, len(scm.nodes), dtype=torch.float64)
    u[2, 1] = NAN
    with pytest.raises(ValueError, match="noise must be uniform draws in .0, 1.; 1 entries"):
        label_interventions.propagate(scm, u)
    with pytest.raises(ValueError, match="images must be finite; it has 1 NaN"):
        image_interventions.read(torch.nn.Identity(), torch.tensor([[0.0, NAN]]))

    class NanClassifier(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1) * NAN
    with pytest.raises(ValueError, match="the classifier NanClassifier gives NaN or inf "
                                         "probabilities for 2 of 2 rows"):
        image_interventions.read(NanClassifier(), torch.zeros(2, 3))
    z = torch.randn(3, 4)
    sampler = dict(method="euler", steps=2)
    with pytest.raises(ValueError, match="the flow composed with the classifier Linear"):
        image_interventions.attribute_gradients(Linear(bad_after=0.0), torch.nn.Linear(4, 2),
                                                z, sampler=sampler)
    grads = torch.randn(3, 2, 4)
    for kwargs, fragment in [(dict(target=0, value=2), "value must be 0 or 1"),
                             (dict(target=5, value=1), "target must be < 2"),
                             (dict(target=0, value=1, z=z * NAN), "z must be finite")]:
        args = dict(dict(z=z, project=False, sampler=sampler, grads=grads), **kwargs)
        with pytest.raises(ValueError, match=fragment):
            image_interventions.latent_intervention(Linear(), torch.nn.Linear(4, 2), **args)
