"""The gates of the Morpho-MNIST models: measured attributes of samples against their conditions, the measured law of an unconditional flow, a regressor against the published labels; :ref:`sec_morpho`.

Limits in ``MORPHO_GATES``; the measurement floor ``FLOOR`` (the
measurement's error on the published test set against its labels). Each
statistic comes with a 95% bootstrap interval and is judged as
``quality.judge`` judges, against these limits (``judge_interval``).
The models and their recipes are in ``morpho_models``, which re-exports
every name here.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

from flowjac._checks import check_choice, check_int
from flowjac.data import morpho
from flowjac.models import quality

MORPHO_GATES = {
    "mae_floor_factor": 2.0,      # measured (or regressed) t and i: MAE <= 2 x floor
    "digit_min_readback": 0.95,   # conditional flow: the requested digit read back
    "mean_max_error": 0.10,       # unconditional: |mean - data's| in SCM sds
    "sd_max_error": 0.10,         # |sd / data's sd - 1|
    "corr_max_error": 0.05,       # |corr(t, i) - data's|
    "slope_min": 0.9,             # regressor: prediction on label, worst attribute
    "slope_max": 1.1,
}

# The measurement's MAE on all 10,000 published test digits against their
# labels, measured here (morpho.measure): used when the published set is absent.
FLOOR = {"t": 0.0932, "i": 0.515}


# the SCM units of the conditioning and the argument checks the gates share
@functools.lru_cache(maxsize=1)
def _scale() -> tuple:
    m = morpho.scm_moments()
    return m["mean_t"], float(np.sqrt(m["var_t"])), m["mean_i"], float(np.sqrt(m["var_i"]))


def _column(name, x, n=None) -> np.ndarray:
    if torch.is_tensor(x):
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be numbers, got {type(x).__name__}") from None
    if not len(arr) or not np.isfinite(arr).all():
        raise ValueError(f"{name} must be a non-empty array of finite numbers")
    if n is not None and len(arr) != n:
        raise ValueError(f"{name} must have one value per sample ({n}), got {len(arr)}")
    return arr


def _digits(digits, n) -> np.ndarray:
    d = _column("digits", digits, n)
    if not ((d == np.round(d)) & (d >= 0) & (d <= 9)).all():
        raise ValueError("digits must be whole numbers from 0 to 9")
    return d.astype(np.int64)


# ------------------------------------------------------------ measurements
def _samples(samples) -> torch.Tensor:
    if not torch.is_tensor(samples) or samples.ndim != 4 or samples.shape[1] != 1 \
            or samples.shape[0] < 2:
        raise ValueError(f"samples must be a (n, 1, H, W) tensor of pixels with n >= 2, got "
                         f"{getattr(samples, 'shape', type(samples).__name__)}")
    if not torch.isfinite(samples).all():
        raise ValueError("samples must be finite")
    return samples.detach().cpu().double()


def to_grey(samples) -> np.ndarray:
    """Pixels in [0, 1] (n, 1, H, W) as uint8 grey levels (n, H, W), clipped and rounded like the data; :ref:`sec_morpho`."""
    x = _samples(samples).clamp(0, 1)[:, 0].numpy()
    return np.rint(x * 255).astype(np.uint8)


def measure_samples(samples) -> dict:
    """Thickness and intensity of samples (pixels in [0, 1]) by ``morpho.measure``; a blank image measures 0 and its grey level; :ref:`sec_morpho`."""
    grey = to_grey(samples)
    flat = grey.reshape(len(grey), -1)
    blank = flat.max(1) == flat.min(1)
    t, i = np.zeros(len(grey)), flat[:, 0].astype(np.float64)
    if (~blank).any():
        m = morpho.measure(grey[~blank], progress=False)
        t[~blank], i[~blank] = m["thickness"], m["intensity"]
    return {"thickness": t, "intensity": i, "blank": int(blank.sum())}


def read_digits(classifier: nn.Module, samples) -> torch.Tensor:
    """The digit classifier's logits (n, 10) on samples clipped to [0, 1] and scaled to a maximum of 1; :ref:`sec_morpho`."""
    from flowjac.models.classifiers import predict_logits

    x = _samples(samples).clamp(0, 1).float()
    peak = x.flatten(1).amax(1).clamp_min(1 / 255)[:, None, None, None]
    return predict_logits(classifier, x / peak)


@functools.lru_cache(maxsize=4)
def measurement_floor(root=None, n: int | None = None) -> dict:
    """The measurement's MAE (t, i) on the published test set against its labels (``FLOOR`` if the set is absent); :ref:`sec_morpho`.

    ``n``: the first n digits only (all 10,000: about 35 s on one thread).
    """
    try:
        data = morpho.load_published(root)
    except FileNotFoundError:
        return dict(FLOOR, n=0, source="FLOOR constants (published test set not found)")
    k = len(data) if n is None else min(check_int("n", n, minimum=2), len(data))
    m = morpho.measure(data.images[:k], progress=False)
    return {"t": float(np.abs(m["thickness"] - data.t[:k]).mean()),
            "i": float(np.abs(m["intensity"] - data.i[:k]).mean()), "n": k,
            "source": f"measured on {data.source}"}


# -------------------------------------------------------------------- gates
def judge_interval(interval, limit: float, side: str) -> str:
    """``quality.judge``'s rule with the limit given: pass when the whole interval is on the good side; :ref:`sec_morpho`."""
    check_choice("side", side, ("min", "max"))
    lo, hi = (float(v) for v in interval)
    if not lo <= hi:
        raise ValueError(f"interval must be (low, high) with low <= high, got {interval!r}")
    good = lo >= limit if side == "min" else hi <= limit
    bad = hi < limit if side == "min" else lo > limit
    return "pass" if good else "fail" if bad else "borderline"


def _judged(out: dict, limits: dict, lo, hi) -> dict:
    """Intervals, limits and status of the gates named in ``limits`` (in its order)."""
    for k, (name, (side, limit)) in enumerate(limits.items()):
        bounds = [float(lo[k]), float(hi[k])]
        out.setdefault("limits", {})[name] = [side, float(limit)]
        if np.isnan(bounds).any():          # the statistic is undefined on these samples
            out.setdefault("intervals", {})[name] = [None, None]
            out.setdefault("status", {})[name] = "fail"
            continue
        out.setdefault("intervals", {})[name] = bounds
        out.setdefault("status", {})[name] = judge_interval(bounds, limit, side)
    out["passed"] = all(v == "pass" for v in out["status"].values())
    return out


def _floor(floor) -> dict:
    floor = measurement_floor() if floor is None else floor
    if not isinstance(floor, dict) or not all(isinstance(floor.get(k), (int, float))
                                              and floor[k] > 0 for k in ("t", "i")):
        raise ValueError(f"floor must be a dict with positive 't' and 'i' (measurement_floor()), "
                         f"got {floor!r}")
    return dict(floor)


def conditional_gates(samples, t, i, digits, logits, floor=None) -> dict:
    """Gates of conditional samples: measured t and i against their conditioning values, the digit read back; :ref:`sec_morpho`.

    ``samples`` (n, 1, H, W) pixels in [0, 1] drawn at ``t``, ``i``,
    ``digits``; ``logits`` (n, 10) from ``read_digits``; ``floor`` the
    measurement floor (default ``measurement_floor()``). Returns ``t_mae``,
    ``i_mae`` (limits ``2 x floor``), ``digit_readback`` (>= 0.95), the
    signed mean errors, their ``intervals``, ``limits``, ``status`` and
    ``passed``.
    """
    x = _samples(samples)
    n = len(x)
    t, i, d = _column("t", t, n), _column("i", i, n), _digits(digits, n)
    if not torch.is_tensor(logits) or tuple(logits.shape) != (n, 10):
        raise ValueError(f"logits must be a ({n}, 10) tensor, got "
                         f"{getattr(logits, 'shape', type(logits).__name__)}")
    floor = _floor(floor)
    m = measure_samples(x)
    rows = torch.from_numpy(np.stack([np.abs(m["thickness"] - t), np.abs(m["intensity"] - i),
                                      (logits.argmax(1).numpy() == d).astype(np.float64)], 1))
    est, lo, hi = quality._bootstrap(lambda r: r.mean(0), rows)
    out = dict(n=n, t_mae=float(est[0]), i_mae=float(est[1]), digit_readback=float(est[2]),
               t_bias=float((m["thickness"] - t).mean()), i_bias=float((m["intensity"] - i).mean()),
               blank=m["blank"], floor=floor,
               in_range=float(((x >= -0.05) & (x <= 1.05)).double().mean()))
    limits = planned_limits("conditional", floor)
    return _judged(out, {k: limits[k] for k in ("t_mae", "i_mae", "digit_readback")}, lo, hi)


def _moments(t, i) -> list:
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = float(np.corrcoef(t, i)[0, 1])
    corr = 0.0 if np.isnan(corr) else corr      # a constant measurement: no association
    return [float(t.mean()), float(i.mean()), float(t.std()), float(i.std()), corr]


def unconditional_gates(samples, logits, reference: dict, class_shares) -> dict:
    """Gates of unconditional samples: their measured (t, i) law against the real renders' and the SCM's, the class balance; :ref:`sec_morpho`.

    ``reference``: ``{"t": ..., "i": ...}`` measured on the real renders
    (``MorphoData.t_measured``, ``.i_measured``). Gates: means within 0.1
    SCM sds, sds within 10% and corr(t, i) within 0.05 of the reference,
    and ``quality.digit_sample_gates`` of ``logits`` (``read_digits``)
    with ``class_shares``. ``scm`` and ``reference_moments`` are printed
    beside (mean t, mean i, sd t, sd i, corr).
    """
    x = _samples(samples)
    if not isinstance(reference, dict) or not {"t", "i"} <= set(reference):
        raise ValueError("reference must be a dict with the real renders' measured 't' and 'i'")
    ref_t = _column("reference['t']", reference["t"])
    ref_i = _column("reference['i']", reference["i"], len(ref_t))
    m = measure_samples(x)
    ref = _moments(ref_t, ref_i)
    _, sd_t, _, sd_i = _scale()
    scale = torch.tensor([sd_t, sd_i, ref[2], ref[3], 1.0], dtype=torch.float64)
    target = torch.tensor(ref, dtype=torch.float64)

    def stats(r):
        got = torch.tensor(_moments(r[:, 0].numpy(), r[:, 1].numpy()), dtype=torch.float64)
        return (got - target).abs() / scale

    rows = torch.from_numpy(np.stack([m["thickness"], m["intensity"]], 1))
    est, lo, hi = quality._bootstrap(stats, rows)
    scm = morpho.scm_moments()
    names = ("mean_t", "mean_i", "sd_t", "sd_i", "corr_ti")
    out = dict(n=len(x), blank=m["blank"], sample_moments=dict(zip(names, _moments(
        m["thickness"], m["intensity"]))), reference_moments=dict(zip(names, ref)),
        scm=dict(zip(names, [scm["mean_t"], scm["mean_i"], float(np.sqrt(scm["var_t"])),
                             float(np.sqrt(scm["var_i"])), scm["corr_ti"]])))
    out.update({f"{k}_error": float(v) for k, v in zip(names, est)})
    limits = planned_limits("unconditional")
    _judged(out, {f"{k}_error": limits[f"{k}_error"] for k in names}, lo, hi)
    digit = quality.digit_sample_gates(logits, x.float(), digit=None, class_shares=class_shares)
    for name in ("share", "in_range", "class_error"):
        out[name] = digit[name]
        out["intervals"][name] = digit["intervals"][name]
        out["limits"][name] = limits[name]
        out["status"][name] = digit["status"][name]
    out["class_histogram"] = digit["class_histogram"]
    out["passed"] = all(v == "pass" for v in out["status"].values())
    return out


def regressor_gates(pred_t, pred_i, t, i, floor=None) -> dict:
    """Gates of the (t, i) regressor on labelled images: MAE within 2 x the floor, slopes in [0.9, 1.1], baseline beside; :ref:`sec_morpho`.

    The slope is the least-squares slope of prediction on label per
    attribute (a saturating readout flattens it); ``slope_min`` and
    ``slope_max`` are the worst of the two. ``baseline_mae`` predicts the
    SCM's mean; ``floor`` is the measurement's MAE (``measurement_floor()``).
    """
    pt = _column("pred_t", pred_t)
    n = len(pt)
    if n < 2:
        raise ValueError("pred_t must hold at least 2 predictions")
    pi, t, i = _column("pred_i", pred_i, n), _column("t", t, n), _column("i", i, n)
    floor = _floor(floor)

    def stats(r):
        err = (r[:, :2] - r[:, 2:]).abs().mean(0)
        y = r[:, 2:] - r[:, 2:].mean(0)
        slope = ((r[:, :2] - r[:, :2].mean(0)) * y).sum(0) / (y * y).sum(0)
        return torch.cat([err, slope.min().reshape(1), slope.max().reshape(1)])

    rows = torch.from_numpy(np.stack([pt, pi, t, i], 1))
    est, lo, hi = quality._bootstrap(stats, rows)
    mean_t, _, mean_i, _ = _scale()
    out = dict(n=n, t_mae=float(est[0]), i_mae=float(est[1]), slope_min=float(est[2]),
               slope_max=float(est[3]), floor=floor,
               baseline_mae={"t": float(np.abs(t - mean_t).mean()),
                             "i": float(np.abs(i - mean_i).mean())},
               prediction_range={"t": [float(pt.min()), float(pt.max())],
                                 "i": [float(pi.min()), float(pi.max())]},
               label_range={"t": [float(t.min()), float(t.max())],
                            "i": [float(i.min()), float(i.max())]})
    g = MORPHO_GATES
    return _judged(out, {"t_mae": ("max", g["mae_floor_factor"] * floor["t"]),
                         "i_mae": ("max", g["mae_floor_factor"] * floor["i"]),
                         "slope_min": ("min", g["slope_min"]),
                         "slope_max": ("max", g["slope_max"])}, lo, hi)


def planned_limits(kind: str, floor=None) -> dict:
    """The limits a Morpho flow's gates are judged by, ``{gate: [side, limit]}`` in the order its gates report them, known before any sample is drawn; :ref:`sec_morpho`.

    ``kind`` is ``"conditional"`` (``conditional_gates``) or
    ``"unconditional"`` (``unconditional_gates``); both end with the
    memorization gates every flow passes (``quality.GATES``). ``floor`` as
    in ``conditional_gates``. The gate functions read their limits from
    here, so what a chapter prints before training is what judges.
    """
    check_choice("kind", kind, ("conditional", "unconditional"))
    g, q = MORPHO_GATES, quality.GATES
    if kind == "conditional":
        floor = _floor(floor)
        out = {"t_mae": ["max", g["mae_floor_factor"] * floor["t"]],
               "i_mae": ["max", g["mae_floor_factor"] * floor["i"]],
               "digit_readback": ["min", g["digit_min_readback"]]}
    else:
        out = {f"{k}_error": ["max", g[limit]] for k, limit in (
            ("mean_t", "mean_max_error"), ("mean_i", "mean_max_error"),
            ("sd_t", "sd_max_error"), ("sd_i", "sd_max_error"), ("corr_ti", "corr_max_error"))}
        for name in ("share", "in_range", "class_error"):
            key, side = quality.GATE_SIDES[name]
            out[name] = [side, q[key]]
    for name in ("nn_ratio", "copy_share"):
        key, side = quality.GATE_SIDES[name]
        out[name] = [side, q[key]]
    return {k: [side, float(limit)] for k, (side, limit) in out.items()}


def gate_table(gates: dict) -> list[dict]:
    """One row per gate of a record: value, 95% interval, limit and status; :ref:`sec_morpho`."""
    rows = []
    for name, status in gates["status"].items():
        value = gates.get(name, gates.get("memorization", {}).get(name))
        side, limit = gates["limits"][name]
        lo, hi = gates["intervals"][name]
        rows.append(dict(gate=name, value=value, low=lo, high=hi,
                         limit=f"{'>=' if side == 'min' else '<='} {limit:.4g}", status=status))
    return rows
