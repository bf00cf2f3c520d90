"""probing.probe: JVPs, pair JVPs, true gradient norms and the paper's change agree with their definitions."""
import pytest
import torch

from flowjac.engine import probing
from flowjac.engine.ode import integrate
from flowjac.engine.velocity import velocity_fn
from flowjac.models.nets import MLPFlow


@pytest.fixture(scope="module")
def flow():
    torch.manual_seed(0)
    net = MLPFlow(4, hidden=16, depth=2).double().eval().requires_grad_(False)
    readout = torch.nn.Linear(4, 3).double().requires_grad_(False)
    return velocity_fn(net), (lambda x: torch.tanh(readout(x)))


def test_probe_matches_definitions(flow):
    velocity, readout = flow
    res = probing.probe(velocity, readout, (4,), 7, k=3, steps=4,
                        method="rk4", batch_size=3, grad_outputs=[0, 2],
                        eps=1e-3)
    assert res["jvp"].shape == (7, 3, 3) and res["grad_norm"].shape == (7, 2)
    # redraw the same latents and probes (same generator order per batch)
    g = torch.Generator().manual_seed(0)
    torch.randperm(7, generator=g)
    torch.rand(7, generator=g, dtype=torch.float64)
    z = torch.randn(3, 4, generator=g, dtype=torch.float64)
    v = torch.randn(3, 3, 4, generator=g, dtype=torch.float64)
    zp = torch.randn(3, 4, generator=g, dtype=torch.float64)

    def f(x):
        return readout(integrate(velocity, x, 4, "rk4"))

    jac = torch.stack([torch.autograd.functional.jacobian(f, zi[None])[0, :, 0]
                       for zi in z])                              # (3, p, d)
    assert torch.allclose(res["out"][:3].double(), f(z), atol=1e-6)
    assert torch.allclose(res["jvp"][:3].double(),
                          torch.einsum("bpd,bkd->bkp", jac, v), atol=1e-5)
    assert torch.allclose(res["grad_norm"][:3].double(),
                          jac[:, [0, 2]].norm(dim=2), atol=1e-5)
    rho = res["rho"][:3].double()
    zr = rho[:, None] * z + (1 - rho[:, None] ** 2).sqrt() * zp
    jr = torch.stack([torch.autograd.functional.jacobian(f, zi[None])[0, :, 0]
                      for zi in zr])
    assert torch.allclose(res["jvp_pair"][:3].double(),
                          torch.einsum("bpd,bkd->bkp", jr, v), atol=1e-5)
    u = v[:, 0] / v[:, 0].norm(dim=1, keepdim=True)
    change = (f(z + 1e-3 * u) - f(z)).abs()
    assert torch.allclose(res["paper_change"][:3].double(), change, atol=1e-7)
    # stratified rho: one value in each of the 7 cells of [0, 1]
    cells = (res["rho"].double() * 7).floor().long().sort().values
    assert cells.tolist() == list(range(7))
    assert res["meta"]["evaluations"]["jvp"] == 7 * 16 * 4


def test_plain_outputs_and_errors(flow):
    velocity, readout = flow
    out, secs = probing.plain_outputs(velocity, readout, (4,), 5, steps=2)
    assert out.shape == (5, 3) and secs >= 0
    with pytest.raises(ValueError, match="n must be"):
        probing.probe(velocity, readout, (4,), 1)
    with pytest.raises(ValueError, match="k must be"):
        probing.probe(velocity, readout, (4,), 4, k=0)
    with pytest.raises(ValueError, match="method"):
        probing.stage_count("rk45", 3)
    with pytest.raises(ValueError, match="eps"):
        probing.probe(velocity, readout, (4,), 4, eps=0)


def test_redraw_returns_the_rows_that_probe_used(flow):
    velocity, readout = flow
    res = probing.probe(velocity, readout, (4,), 7, k=2, steps=3,
                        method="midpoint", batch_size=3)
    rows = [5, 0, 3]                       # across batches, in any order
    z, v, zr = probing.redraw(res["meta"], (4,), rows)
    assert z.shape == (3, 4) and v.shape == (3, 2, 4) and zr.shape == (3, 4)
    from flowjac.engine.composite import attribute_jvp
    out, d = attribute_jvp(velocity, readout, z, tangents=v, steps=3,
                           method="midpoint")
    outp, _ = attribute_jvp(velocity, readout, zr, tangents=v, steps=3,
                            method="midpoint")
    assert torch.allclose(out.float(), res["out"][rows], atol=1e-6)
    assert torch.allclose(d.float(), res["jvp"][rows], atol=1e-5)
    assert torch.allclose(outp.float(), res["out_pair"][rows], atol=1e-6)
    with pytest.raises(ValueError, match="rows"):
        probing.redraw(res["meta"], (4,), [7])


def test_interrupted_probe_and_plain_runs_resume_to_the_same_tensors(flow, tmp_path):
    velocity, readout = flow
    kw = dict(k=2, steps=3, method="midpoint", batch_size=3, grad_outputs=[1], seed=4)
    calls = {"n": 0, "die_after": None}

    def counted(x):
        calls["n"] += 1
        if calls["die_after"] is not None and calls["n"] > calls["die_after"]:
            raise KeyboardInterrupt
        return readout(x)
    whole = probing.probe(velocity, counted, (4,), 8, **kw)
    per_run = calls["n"]
    part = tmp_path / "probe.partial"
    calls.update(n=0, die_after=per_run // 2)      # dies in the second of three batches
    with pytest.raises(KeyboardInterrupt):
        probing.probe(velocity, counted, (4,), 8, partial_path=part, **kw)
    assert torch.load(part, weights_only=True)["done"] == 3
    resumed = probing.probe(velocity, readout, (4,), 8, partial_path=part, **kw)
    for key in ("out", "jvp", "rho", "out_pair", "jvp_pair", "grad_norm", "paper_change"):
        assert torch.equal(whole[key], resumed[key]), key
    with pytest.raises(ValueError, match="partial_path .* other settings .*k: 2 there, 3 now"):
        probing.probe(velocity, readout, (4,), 8, partial_path=part, **dict(kw, k=3))
    plain, _ = probing.plain_outputs(velocity, readout, (4,), 10, steps=3, batch_size=4)
    ppart = tmp_path / "plain.partial"
    calls.update(n=0, die_after=1)                 # one batch of three, then dies
    with pytest.raises(KeyboardInterrupt):
        probing.plain_outputs(velocity, counted, (4,), 10, steps=3, batch_size=4,
                              partial_path=ppart)
    assert torch.load(ppart, weights_only=True)["done"] == 4
    again, _ = probing.plain_outputs(velocity, readout, (4,), 10, steps=3, batch_size=4,
                                     partial_path=ppart)
    assert torch.equal(plain, again)
