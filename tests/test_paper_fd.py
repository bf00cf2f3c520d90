"""The paper's own estimator on the stored attribute latents: its verdict rule (pipelines.stored) and its runner (tools/run_paper_fd.py)."""
import sys
from pathlib import Path

import pytest
import torch

from flowjac.base import repo_root
from flowjac.engine import probing
from flowjac.models import pretrained
from flowjac.pipelines import patch_study
from flowjac.pipelines.stored import PAPER_FD_ATTRIBUTES, fd_changes_verdict
from flowjac.pipelines.stored import fd_comparison as stored_fd_comparison

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import run_paper_fd  # noqa: E402


def test_fd_changes_verdict_places_each_interval_against_the_baseline():
    assert fd_changes_verdict((0.5, 0.7), (0.05, 0.09), 0.13) == (True, "loses", "beats")
    assert fd_changes_verdict((0.5, 0.7), (0.4, 0.6), 0.13) == (False, "loses", "loses")
    assert fd_changes_verdict((0.1, 0.2), (0.01, 0.12), 0.13) == (True, "ties", "beats")


def test_design_is_the_papers():
    assert PAPER_FD_ATTRIBUTES["eps"] == 1e-2 and PAPER_FD_ATTRIBUTES["steps"] == 99
    assert PAPER_FD_ATTRIBUTES["method"] == "euler" and PAPER_FD_ATTRIBUTES["dtype"] == "float32"


def test_run_resumes_exactly_and_keeps_its_output(tmp_path):
    """A tiny design: interrupted after one batch, resumed, the same numbers
    as the estimator computed directly on the redrawn latents; the output is
    not replaced without force and another design's partial file is refused."""
    design = dict(PAPER_FD_ATTRIBUTES, n=4, batch=2, steps=3)
    out = tmp_path / "fd.pt"
    logs = []
    assert run_paper_fd.run(out, design, stop_after=1, log=logs.append) is None
    assert (tmp_path / "fd.pt.partial").exists() and not out.exists()
    res = run_paper_fd.run(out, design, log=logs.append)
    assert any("resuming" in m and "2 of 4" in m for m in logs)
    assert res["fd"].shape == (4, 9) and not (tmp_path / "fd.pt.partial").exists()
    scm = pretrained.load("scm")
    meta = torch.load(repo_root() / "results" / "attributes_probes.pt",
                      map_location="cpu", weights_only=True)["meta"]
    z, v, _ = probing.redraw(meta, scm.latent_shape, range(4))
    direct = patch_study.paper_fd(scm.velocity, scm.classifier, z, v[:, 0], eps=1e-2,
                                  steps=3, method="euler").float()
    assert torch.equal(res["fd"], direct)
    with pytest.raises(SystemExit, match="exists; pass --force"):
        run_paper_fd.run(out, design)
    torch.save(dict(design=dict(design, eps=1e-3), sha256="x", fd=[], seconds=0.0),
               tmp_path / "other.pt.partial")
    with pytest.raises(SystemExit, match="another design"):
        run_paper_fd.run(tmp_path / "other.pt", design)


def test_fd_comparison_same_numbers_same_place_and_the_heavy_latents():
    g = torch.Generator().manual_seed(0)
    exact = torch.randn(200, 3, generator=g, dtype=torch.float64)
    exact[:, 1] += exact[:, 0]
    exact[7] *= 100                      # one latent carries most of the moment
    truth = torch.eye(3, dtype=torch.float64)
    res = stored_fd_comparison(exact, exact.clone(), truth, 0.5, n_boot=50)
    assert torch.equal(res["est"][0], res["est"][1]) and not res["changes"]
    assert res["place_exact"] == res["place_fd"] and res["heavy"].tolist() == [7]
    assert float(res["rel"].abs().max()) == 0.0
    # a forward difference that zeroes the correlation moves below the baseline
    fd = exact.clone()
    fd[:, 1] = torch.randn(200, generator=g, dtype=torch.float64)
    fd[:, 0] = torch.randn(200, generator=g, dtype=torch.float64)
    res = stored_fd_comparison(exact, fd, truth, 0.2, n_boot=200)
    assert res["place_fd"] == "beats" and res["place_exact"] == "loses" and res["changes"]
    with pytest.raises(ValueError, match="one shape"):
        stored_fd_comparison(exact, fd[:, :2], truth, 0.2)
