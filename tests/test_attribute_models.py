"""The attribute chapters' model pipeline end to end at toy scale: profile
settings, training and caching of the flow and classifier (MLP and UNet,
including the full profile's network sizes), and the probes of c∘φ."""
import pytest
import torch

from flowjac import scm
from flowjac.ode import integrate


def tiny(profile="quick", arch=None, **over):
    cfg = scm.profile_settings(profile, arch=arch, flow_steps=2, n_train=16)
    models = dict(cfg["models"], clf_steps=2, flow_batch=4, **over)
    return cfg, models


def test_profile_settings_defaults_and_overrides():
    q, f = scm.profile_settings("quick"), scm.profile_settings("full")
    assert (q["size"], q["models"]["arch"]) == (32, "mlp")
    assert (f["size"], f["models"]["arch"], f["n_samples"]) == (64, "unet", 10_000)
    assert f["models"]["base_channels"] == 64
    u = scm.profile_settings("quick", arch="unet", flow_steps=7, n_samples=9)
    assert u["models"]["arch"] == "unet" and u["models"]["flow_steps"] == 7
    assert u["n_samples"] == 9 and u["models"]["size"] == 32


@pytest.mark.parametrize("kw, word", [
    (dict(profile="medium"), "profile"),
    (dict(profile="quick", arch="cnn"), "arch"),
    (dict(profile="quick", flow_steps=0), "flow_steps"),
    (dict(profile="quick", n_samples=1), "n_samples"),
    (dict(profile="quick", n_probes=2.5), "n_probes"),
])
def test_profile_settings_rejects_bad_values(kw, word):
    with pytest.raises(ValueError, match=word):
        scm.profile_settings(**kw)


def test_unet_pipeline_trains_caches_and_probes_exactly(tmp_path):
    cfg, kw = tiny(arch="unet")
    models = scm.prepare_models(tmp_path, seed=0, **kw)
    assert models["trained"] == ["flow", "classifier"]
    assert models["latent_shape"] == (3, 32, 32)
    res = scm.probe_flow(models, n_samples=4, k=2, ode_steps=2, batch_size=3)
    assert res["logits"].shape == (4, 9) and res["deltas"].shape == (4, 2, 9)
    for a in ("C_warm", "Z_framed", "M_marker"):
        assert res[f"norm/{a}"].shape == (4,)
        assert torch.all(res[f"norm/{a}"] > 0)

    # The same settings load from the cache and give the same probes.
    again = scm.prepare_models(tmp_path, seed=0, **kw)
    assert again["trained"] == []
    res2 = scm.probe_flow(again, n_samples=4, k=2, ode_steps=2, batch_size=3)
    for key in res:
        assert torch.equal(res[key], res2[key]), key

    # The JVPs are those of c∘φ, checked against reverse-mode autograd; the
    # latents and probes are drawn as probe_flow draws them.
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 3, 32, 32, generator=g)
    v = torch.randn(4, 2, 3, 32, 32, generator=g)
    f = lambda zz: models["classifier"](integrate(models["velocity"], zz, 2))
    jac = torch.autograd.functional.jacobian(lambda zz: f(zz[None])[0], z[0])
    want = torch.einsum("pchw,kchw->kp", jac, v[0])
    assert torch.allclose(res["deltas"][0], want, rtol=1e-4, atol=1e-5)
    grad_c = jac[scm.ATTRIBUTES.index("C_warm")].norm()
    assert torch.allclose(res["norm/C_warm"][0], grad_c, rtol=1e-4)


def test_full_profile_networks_build_and_run(tmp_path):
    cfg, kw = tiny("full")
    assert kw["size"] == 64 and kw["base_channels"] == 64
    models = scm.prepare_models(tmp_path, seed=0, **kw)
    assert models["latent_shape"] == (3, 64, 64)
    res = scm.probe_flow(models, n_samples=2, k=1, ode_steps=1,
                         norm_attrs=("C_warm",))
    assert res["deltas"].shape == (2, 1, 9)
    assert torch.isfinite(res["deltas"]).all()


def test_mlp_pipeline_composes_on_flat_latents(tmp_path):
    cfg, kw = tiny()
    models = scm.prepare_models(tmp_path, seed=0, **kw)
    assert models["latent_shape"] == (3 * 32 * 32,)
    x = torch.zeros(2, 3 * 32 * 32)
    assert models["classifier"](x).shape == (2, 9)


def test_prepare_models_rejects_a_bad_arch(tmp_path):
    with pytest.raises(ValueError, match="arch"):
        scm.prepare_models(tmp_path, arch="transformer")
