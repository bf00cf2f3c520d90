"""The Morpho chapter's readouts of the published set: three readouts judged against the
measurement as the floor, a stored run that a live recomputation reproduces, a runner that
never overwrites; on a stand-in published set of real renders."""
from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from flowjac.data import morpho
from flowjac.models import morpho_models as mm
from flowjac.pipelines import morpho_published as mp

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def renders():
    return morpho.build_dataset(1, 3, n_digits=40, split="test", cache_dir=None, progress=False)


def _write(root: Path, data) -> Path:
    """The renders in the published set's files: gzipped IDX images and digits, the csv of (t, i)."""
    root.mkdir(parents=True)
    n = len(data)
    with gzip.open(root / morpho.PUBLISHED_FILES[0], "wb") as fh:
        fh.write(np.array([2051, n, 28, 28], dtype=">u4").tobytes() + data.images.tobytes())
    with gzip.open(root / morpho.PUBLISHED_FILES[1], "wb") as fh:
        fh.write(np.array([2049, n], dtype=">u4").tobytes() + data.digits.astype(np.uint8).tobytes())
    rows = "\n".join(f"{k},{data.t[k]},{data.i[k]}" for k in range(n))
    (root / morpho.PUBLISHED_FILES[2]).write_text("index,thickness,intensity\n" + rows + "\n")
    return root


def test_three_readouts_judged_against_the_measurement_as_floor(renders):
    readout = mm.load_readout()
    pred = mp.predictions(renders.images, readout)
    assert set(pred) == set(mp.READOUTS)
    np.testing.assert_array_equal(pred["measurement"]["t"], renders.t_measured)
    # the readout's intensity is the measurement; its thickness is the regressor's
    np.testing.assert_allclose(pred["readout"]["i"], renders.i_measured, atol=1e-3)
    np.testing.assert_array_equal(pred["readout"]["t"], pred["regressor"]["t"])
    summ = mp.summaries(pred, renders.t, renders.i)
    floor = summ["measurement"]["floor"]
    assert floor["t"] == pytest.approx(np.abs(renders.t_measured - renders.t).mean())
    assert summ["measurement"]["t_mae"] == pytest.approx(floor["t"])
    assert summ["readout"]["limits"]["t_mae"] == ["max", 2 * floor["t"]]
    table = mp.table(summ)
    assert list(table.index) == [*mp.READOUTS, "SCM mean (baseline)"]
    assert table.loc["measurement", "within limits"] == "the floor itself"
    text = mp.verdict(summ)["text"]
    assert f"{summ['readout']['t_mae']:.3f}" in text
    # a readout that ignores the image fails: its slopes are zero
    flat = {k: {"t": np.full(len(renders), 2.5), "i": np.full(len(renders), 150.0)}
            for k in mp.READOUTS}
    flat["measurement"] = pred["measurement"]
    bad = mp.summaries(flat, renders.t, renders.i)
    assert not bad["readout"]["passed"] and bad["readout"]["status"]["slope_min"] == "fail"
    assert "fails" in mp.verdict(bad)["text"] or "does not pass" in mp.verdict(bad)["text"]
    with pytest.raises(ValueError, match="^readout "):
        mp.predictions(renders.images, readout.regressor)


def test_the_runner_stores_readings_that_a_live_check_reproduces(renders, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "run_morpho_published", ROOT / "tools" / "run_morpho_published.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    root = _write(tmp_path / "published", renders)
    out = tmp_path / "readings.pt"
    result = tool.run(out, root)
    stored = torch.load(out, map_location="cpu", weights_only=True)
    assert stored["meta"]["n"] == len(renders) and "t" not in stored   # no labels stored
    readout = mm.load_readout()
    data = morpho.load_published(root)
    assert mp.check(stored, data.images, readout, 10) < 1e-9
    before = out.read_bytes()
    with pytest.raises(SystemExit, match="--force"):
        tool.run(out, root)
    assert out.read_bytes() == before
    assert tool.run(out, root, force=True)["summaries"]["readout"]["n"] == len(renders)
    # a stored file of other readings is caught by the live check
    stored["predictions"]["readout"]["t"][3] += 0.5
    assert mp.check(stored, data.images, readout, 10) == pytest.approx(0.5, abs=1e-6)
    assert result["meta"]["regressor_sha256"]
