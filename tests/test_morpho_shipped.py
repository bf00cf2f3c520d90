"""The shipped Morpho-MNIST readout: loaded with its sha256 checked, it reads published digits
inside its gates (apart from test_morpho_models, whose tiny recipes replace the shipped ones)."""
from __future__ import annotations

import numpy as np
import pytest

from flowjac.data import morpho
from flowjac.models import morpho_models as mm


def test_the_shipped_readout_loads_checked_and_reads_published_digits(tmp_path):
    import shutil

    from flowjac.models import pretrained

    readout = mm.load_readout()
    assert isinstance(readout, mm.MorphoReadout) and readout.intensity == "measured"
    assert not any(p.requires_grad for p in readout.parameters())
    entry = pretrained.manifest()["morpho-regressor"]
    assert entry["gates"]["passed"] and entry["gates"]["regressor_alone"]["status"]["i_mae"] == "fail"
    wdir = tmp_path / "weights"
    shutil.copytree(pretrained.WEIGHTS_DIR, wdir)
    with open(wdir / entry["file"], "ab") as f:
        f.write(b"x")
    with pytest.raises(ValueError, match="sha256"):
        mm.load_readout(weights_dir=wdir)
    with pytest.raises(ValueError, match="^part "):
        mm.load("morpho-nope")
    try:
        data = morpho.load_published()
    except FileNotFoundError:
        return
    # the shipped gates' statistics, on the first 500 digits, inside their limits
    g = mm.readout_gates(readout, n=500)
    assert g["t_mae"] < entry["gates"]["limits"]["t_mae"][1] and g["passed"], g["status"]
    pred = mm.predict_attributes(readout, data.images[:500])
    np.testing.assert_allclose(pred["i"], morpho.intensity(data.images[:500]), atol=1e-3)
