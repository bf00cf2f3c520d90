"""Three readouts of thickness and intensity on the published Morpho-MNIST test set, stored and checked.

The chapter :ref:`sec_morpho` asks how well (t, i) can be read off a real
digit before any flow is involved. Three readouts of the 10,000 published
DSCM test digits (``morpho.load_published``), each against the set's own
labels (the values the SCM sampled and the published renderer applied):

* ``measurement``: ``morpho.measure``, the Morpho-MNIST measurement (its
  MAE is the floor every model is judged against);
* ``readout``: ``MorphoReadout``, the shipped regressor's thickness and the
  measured intensity in torch (the differentiable readout the soft study
  uses, shipped on these gates);
* ``regressor``: the shipped regressor alone (its intensity failed its gate).

``predictions`` reads every digit with all three; ``summaries`` judges each
by ``morpho_gates.regressor_gates`` against the measurement's MAE as the
floor, with the predict-the-SCM-mean baseline beside. ``tools/run_morpho_
published.py`` stores the per-digit predictions (never the labels: the
project does not ship the published set) and the summaries in
``results/morpho_readings.pt``; ``check`` recomputes the first digits live
and ``summaries`` recomputes the whole table from the stored predictions
when the published set is at hand.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from flowjac._checks import check_int
from flowjac.data import morpho
from flowjac.models import morpho_models as mm

__all__ = ["READOUTS", "predictions", "summaries", "check", "table", "verdict"]

READOUTS = ("measurement", "readout", "regressor")


def predictions(images: np.ndarray, readout: mm.MorphoReadout) -> dict:
    """``{name: {"t": ..., "i": ...}}`` of the three readouts on uint8 grey-level digits (N, 28, 28); :ref:`sec_morpho`."""
    if not isinstance(readout, mm.MorphoReadout):
        raise ValueError(f"readout must be a MorphoReadout (morpho_models.load_readout()), "
                         f"got {type(readout).__name__}")
    m = morpho.measure(images, progress=False)
    return {"measurement": {"t": m["thickness"], "i": m["intensity"]},
            "readout": mm.predict_attributes(readout, images),
            "regressor": mm.predict_attributes(readout.regressor, images)}


def summaries(pred: dict, t, i) -> dict:
    """``regressor_gates`` of each readout against labels ``t``, ``i``, the measurement's MAE as the floor; :ref:`sec_morpho`."""
    t, i = np.asarray(t, dtype=np.float64), np.asarray(i, dtype=np.float64)
    floor = {"t": float(np.abs(pred["measurement"]["t"] - t).mean()),
             "i": float(np.abs(pred["measurement"]["i"] - i).mean()), "n": len(t),
             "source": "the measurement's MAE on these digits"}
    return {name: mm.regressor_gates(pred[name]["t"], pred[name]["i"], t, i, floor)
            for name in READOUTS}


def check(stored: dict, images: np.ndarray, readout: mm.MorphoReadout, n: int) -> float:
    """The largest difference between the stored predictions of the first ``n`` digits and a live recomputation; :ref:`sec_morpho`."""
    n = check_int("n", n, minimum=1)
    live = predictions(images[:n], readout)
    return max(float(np.abs(np.asarray(stored["predictions"][name][k][:n]) - live[name][k]).max())
               for name in READOUTS for k in ("t", "i"))


def table(summ: dict, digits: int = 3):
    """One row per readout: MAE of t and i with 95% intervals, the worst slopes, the limits' verdict; :ref:`sec_morpho`."""
    rows = []
    for name, g in summ.items():
        row = {"readout": name}
        for key in ("t_mae", "i_mae", "slope_min", "slope_max"):
            lo, hi = g["intervals"][key]
            row[key] = f"{g[key]:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
        row["within limits"] = "the floor itself" if name == "measurement" else (
            "yes" if g["passed"] else "no: " + ", ".join(
                k for k, v in g["status"].items() if v != "pass"))
        rows.append(row)
    base = next(iter(summ.values()))["baseline_mae"]
    rows.append({"readout": "SCM mean (baseline)", "t_mae": f"{base['t']:.{digits}f}",
                 "i_mae": f"{base['i']:.{digits}f}", "slope_min": "0", "slope_max": "0",
                 "within limits": "no"})
    return pd.DataFrame(rows).set_index("readout")


def verdict(summ: dict) -> dict:
    """Whether the shipped readout passes, how close it comes to the measurement, and the regressor's failure, in words; :ref:`sec_morpho`."""
    r, m, g = summ["readout"], summ["measurement"], summ["regressor"]
    ratio_t = r["t_mae"] / m["t_mae"]
    failed = [k for k, v in g["status"].items() if v != "pass"]
    slopes_ok = r["status"]["slope_min"] == "pass" and r["status"]["slope_max"] == "pass"
    text = (f"The readout the soft study uses {'passes' if r['passed'] else 'does not pass'} "
            f"every gate on {r['n']:,} published digits: its thickness error is "
            f"{ratio_t:.2f} times the measurement's ({r['t_mae']:.3f} against "
            f"{m['t_mae']:.3f}), its intensity is the measurement itself "
            f"({r['i_mae']:.3f} grey levels, so that gate holds by construction), and "
            f"prediction against label has slopes {r['slope_min']:.3f} to "
            f"{r['slope_max']:.3f}: "
            + ("inside their limits, so nothing saturates. " if slopes_ok else
               "outside their limits, so the readout flattens where it saturates. "))
    text += (f"The regressor alone fails {', '.join(failed)} (intensity MAE "
             f"{g['i_mae']:.2f} grey levels against a limit of "
             f"{g['limits']['i_mae'][1]:.2f}), which is why intensity is measured."
             if failed else "The regressor alone passes too.")
    return {"passed": bool(r["passed"]), "ratio_t": ratio_t, "regressor_failed": failed,
            "text": text}
