"""Morpho-MNIST counterfactuals by the published protocol: abduction by the conditional flow's backward ODE, action and prediction by the SCM, and the axiomatic metrics.

Longer than 400 lines because the protocol is one contract: its fixed
design (``PROTOCOL``), the three steps of a counterfactual, the per-image
rows of a stored run and their reduction to the published table (with the
floors and null baselines computed beside every metric) belong together.

**A counterfactual of an image** x with parents (t, i, digit) (Pearl's three
steps; Monteiro et al., ICLR 2023; Ribeiro et al., ICML 2023):

1. *abduction*: the latent z by integrating the conditional flow's ODE
   backwards from t = 1 to t = 0 under the observed conditioning
   (``abduct``), and the intensity noise eps_i exactly by the SCM
   (``morpho.abduct``); thickness noise needs no abduction (t is a root);
2. *action*: do(t = t*), do(i = i*) or do(digit = d*);
3. *prediction*: the counterfactual parents by the SCM
   (``morpho.counterfactual``: under do(t) the intensity follows with the
   abducted eps_i), and the image by integrating the flow forwards from z
   under the new conditioning.

**Metrics** (``summarize``; grey levels [0, 255], images 28 x 28, means
over the 784 pixels; the published tables pad to 32 x 32 with zeros, so
a mean over 1,024 pixels is the 28 x 28 mean times 784 / 1024, printed
beside): *composition*, the L1 distance to the original after m null
cycles (m = 1 and 10); *reversibility*, do(pa*) then do(pa) back, L1 to
the original; *effectiveness*, the Morpho measurements of t and i (MAE)
and the digit classifier's accuracy on the counterfactual against its
counterfactual parents; *realism*, the Frechet distance between the digit
classifier's features of counterfactuals and of real images. Beside each:
the *floor* (the same measurement of the real images against their own
labels; real against real for realism) and the *null baseline* (the
unchanged image measured against the counterfactual target). The
abduction's own error, the *round trip* (backward then forward under the
same conditioning), is part of the table. Every number carries a 95%
interval over images (``intervals.mean_interval``, studentized; a paired
percentile bootstrap for the Frechet distance).

Explained in :ref:`sec_morpho`.
"""
from __future__ import annotations

import copy

import numpy as np
import torch

from flowjac._checks import check_choice, check_int
from flowjac.data import morpho
from flowjac.estimators import intervals
from flowjac.models.morpho_gates import (
    _column, _digits, judge_interval, measure_samples, read_digits)

__all__ = ["PROTOCOL", "abduct", "decode", "round_trip_error", "counterfactual_images",
           "intervention_targets", "classifier_features", "frechet_distance",
           "evaluate_batch", "summarize", "composition_verdict", "counterfactual_table",
           "composition_diagnosis"]

PROTOCOL = {
    # the numbers of null cycles after which composition is read (Monteiro et al.)
    "cycles": (1, 10),
    "interventions": ("t", "i", "digit"),
    # one target per row of the published set, drawn once from target_seed, so
    # a subset (the quick profile) uses the stored run's targets row by row
    "targets": ("t* and i* from one draw of the SCM (morpho.sample_scm, the exact "
                "marginals of thickness and intensity), digit* uniform on 0-9 (the "
                "training renders' classes are balanced): the published benchmarks "
                "(causal-gen's train_cf.py, counterfactual-benchmark's evaluator) draw "
                "the intervened parent from its marginal in the training set; a digit "
                "target may equal the original digit, as there (about 1 in 10)"),
    "target_seed": 0,
    "target_rows": 10_000,
    # the conditional recipe's sampler; guidance 1 is the learned conditional law
    "sampler": dict(method="midpoint", steps=10, guidance=1.0),
    "clip": True,              # every counterfactual is an image: pixels clipped to [0, 1]
    "grey": 255.0,
    "image_size": 28,
    "padded_size": 32,         # the published tables' padding (zeros)
    "n_stored": 10_000,        # all of the published test set
    # its first rows, live: 3.4 s an image with the recipe's FlowUNet (midpoint 10,
    # 10 cycles, three interventions and their reversals: about 30 solves an image)
    # on one shared CPU thread, so 30 images take about 2 minutes
    "n_quick": 30,
    "level": 0.95,
    "n_boot": 2000,
    "interval_seed": 0,
    "composition_limit": 1.0,  # grey levels, mean L1 over 28 x 28 after 10 cycles
    "rule": ("composition passes when the 95% interval of the mean L1 (grey levels, "
             "28 x 28) after 10 null cycles lies at or below 1 grey level, fails when "
             "it lies above, borderline otherwise (judge_interval)"),
    # what composition_diagnosis varies, one at a time, to say why it fails
    "diagnosis": ({"name": "protocol"},
                  {"name": "steps x4", "steps": 40},
                  {"name": "rk4", "method": "rk4"},
                  {"name": "float64", "dtype": "float64"},
                  {"name": "no clipping", "clip": False},
                  {"name": "guidance 2", "guidance": 2.0}),
}

_SOLVER_KEYS = ("method", "steps", "guidance")


# -------------------------------------------------------------- the flow
def _pixels(images) -> torch.Tensor:
    """Images as float pixels (n, 1, H, W) in [0, 1]: uint8 grey levels (n, H, W) or pixels."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 3:
            raise ValueError("images as a NumPy array must be uint8 grey levels (n, H, W)")
        return torch.from_numpy(images).float().div_(255.0).unsqueeze(1)
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 1 \
            or len(images) < 1 or not images.is_floating_point():
        raise ValueError(f"images must be uint8 grey levels (n, H, W) or a float tensor "
                         f"(n, 1, H, W) of pixels in [0, 1], got "
                         f"{getattr(images, 'shape', type(images).__name__)}")
    if not torch.isfinite(images).all():
        raise ValueError("images must be finite")
    return images


def _velocity(model, code, guidance):
    """The velocity (x, t) at a fixed code: ``model.given`` or ``MorphoVelocity(model).given``."""
    if callable(getattr(model, "given", None)):
        return model.given(code, guidance)
    from flowjac.models.morpho_models import MorphoVelocity

    return MorphoVelocity(model).given(code, guidance)


def _solve(model, x, code, *, t0, t1, method, steps, guidance, dtype=None):
    from flowjac.engine.ode import integrate

    dtype = x.dtype if dtype is None else dtype
    velocity = _velocity(model, code.to(dtype), guidance)
    with torch.no_grad():
        return integrate(velocity, x.to(dtype), steps, method=method, t0=t0, t1=t1)


def _code(t, i, digits) -> torch.Tensor:
    from flowjac.models.morpho_models import conditioning

    return conditioning(t, i, digits)


def abduct(model, images, t, i, digits, *, method: str = "midpoint", steps: int = 10,
           guidance: float = 1.0, dtype=None) -> torch.Tensor:
    """The latents z of images: the conditional flow's ODE integrated backwards from t = 1 to 0 under their parents; :ref:`sec_morpho`.

    ``model`` is the conditional ``FlowUNet`` (12 conditions) or any object
    with ``given(code, guidance)`` returning a velocity (x, t). With
    ``guidance`` other than 1 the velocity is ``u(x, t, 0) + w (u(x, t, c) -
    u(x, t, 0))``, an extrapolation that is no conditional velocity of any
    law: its flow is still invertible (the same ODE run backwards), but the
    latents it abducts are not those of the conditional law p(image | c),
    and forward and backward solves of a stiffer field disagree more.
    ``dtype``: the precision of the solve (default the images').
    """
    x = _pixels(images)
    code = _code(t, i, digits)
    if len(code) != len(x):
        raise ValueError(f"t, i and digits must have one value per image ({len(x)})")
    return _solve(model, x, code, t0=1.0, t1=0.0, method=method, steps=steps,
                  guidance=guidance, dtype=dtype)


def decode(model, z, t, i, digits, *, method: str = "midpoint", steps: int = 10,
           guidance: float = 1.0, dtype=None) -> torch.Tensor:
    """Images from latents z under parents (t, i, digit): the flow integrated forwards from t = 0 to 1; :ref:`sec_morpho`."""
    code = _code(t, i, digits)
    if not torch.is_tensor(z) or len(z) != len(code):
        raise ValueError(f"z must be a tensor with one latent per row of t ({len(code)})")
    return _solve(model, z, code, t0=0.0, t1=1.0, method=method, steps=steps,
                  guidance=guidance, dtype=dtype)


def _l1(a, b, grey=255.0) -> np.ndarray:
    """Mean absolute pixel difference per image, in grey levels."""
    return ((a.double() - b.double()).abs().flatten(1).mean(1) * grey).cpu().numpy()


def round_trip_error(model, images, t, i, digits, **solver) -> np.ndarray:
    """The abduction's own error per image: backwards to z, forwards again, mean L1 in grey levels [0, 255]; :ref:`sec_morpho`."""
    x = _pixels(images)
    z = abduct(model, x, t, i, digits, **solver)
    return _l1(decode(model, z, t, i, digits, **solver), x)


# ------------------------------------------------------ counterfactuals
def _intervention(do, n):
    """``do`` as (name, values (n,)) or (None, None) for the null intervention."""
    if do is None or do == {}:
        return None, None
    if not isinstance(do, dict) or len(do) != 1:
        raise ValueError(f"do must be None (the null intervention) or a dict with one "
                         f"of 't', 'i', 'digit', got {do!r}")
    (name, value), = do.items()
    check_choice("do", name, ("t", "i", "digit"))
    arr = np.broadcast_to(np.asarray(value, dtype=np.float64), (n,)).copy()
    if name == "digit":
        return name, _digits(arr, n)
    return name, _column(f"do[{name!r}]", arr, n)


def counterfactual_images(model, images, t, i, digits, do=None, *, method: str = "midpoint",
                          steps: int = 10, guidance: float = 1.0, clip: bool = True,
                          dtype=None) -> dict:
    """Counterfactual images: abduct z (the flow) and eps_i (the SCM), act by ``do``, predict (t*, i*, digit*) by the SCM, decode; :ref:`sec_morpho`.

    ``do``: None (the null intervention: the parents unchanged) or one of
    ``{"t": ...}``, ``{"i": ...}``, ``{"digit": ...}`` (a value or one per
    image). Returns ``images`` (n, 1, H, W) pixels (clipped to [0, 1] with
    ``clip``), the counterfactual parents ``t``, ``i``, ``digits``, the
    abducted ``z`` and ``eps_i``.
    """
    x = _pixels(images)
    n = len(x)
    t, i, d = _column("t", t, n), _column("i", i, n), _digits(digits, n)
    name, value = _intervention(do, n)
    solver = dict(method=method, steps=steps, guidance=guidance, dtype=dtype)
    z = abduct(model, x, t, i, d, **solver)
    eps_i = morpho.abduct(t, i)
    t_new, i_new = morpho.counterfactual(t, i, do_t=value if name == "t" else None,
                                         do_i=value if name == "i" else None)
    d_new = value if name == "digit" else d
    out = decode(model, z, t_new, i_new, d_new, **solver).to(x.dtype)
    if clip:
        out = out.clamp(0.0, 1.0)
    return dict(images=out, t=t_new, i=i_new, digits=d_new, z=z, eps_i=eps_i)


def intervention_targets(rows, seed: int | None = None, total: int | None = None) -> dict:
    """The do() values of the given rows of the published set, drawn once for all its rows (``PROTOCOL["targets"]``); :ref:`sec_morpho`."""
    seed = PROTOCOL["target_seed"] if seed is None else check_int("seed", seed, minimum=0)
    total = PROTOCOL["target_rows"] if total is None else check_int("total", total, minimum=1)
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if not len(rows) or rows.min() < 0 or rows.max() >= total:
        raise ValueError(f"rows must be indices in [0, {total}), got "
                         f"{rows[:5].tolist() if len(rows) else rows.tolist()}")
    rng = np.random.default_rng(seed)
    draw = morpho.sample_scm(total, rng)
    digits = rng.integers(0, 10, total)
    return {"t": draw["t"][rows], "i": draw["i"][rows], "digit": digits[rows]}


# ------------------------------------------------------------- readouts
def classifier_features(classifier, images) -> torch.Tensor:
    """The digit classifier's penultimate features (an ``AttributeNet``'s pooled activations; logits otherwise) of images read as ``read_digits`` reads them; :ref:`sec_morpho`."""
    import torch.nn.functional as F

    x = _pixels(images).detach().cpu().double().clamp(0, 1).float()
    peak = x.flatten(1).amax(1).clamp_min(1 / 255)[:, None, None, None]
    x = x / peak
    classifier.eval()
    dev = next(classifier.parameters()).device
    rows = []
    with torch.no_grad():
        for s in range(0, len(x), 256):
            b = x[s:s + 256].to(dev)
            if all(hasattr(classifier, k) for k in ("stem", "blocks", "head")):
                h = F.silu(classifier.blocks(classifier.stem(b))).mean(dim=(2, 3))
            else:
                h = classifier(b)
            rows.append(h.double().cpu())
    return torch.cat(rows)


def frechet_distance(a, b) -> float:
    """The Frechet distance between Gaussians fitted to two feature sets (n, f): ``|mu_a - mu_b|^2 + tr(Sa + Sb - 2 (Sa^1/2 Sb Sa^1/2)^1/2)``; :ref:`sec_morpho`."""
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"a and b must be (n, f) feature sets with n >= 2 and one f, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    sa, sb = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    lam, vec = torch.linalg.eigh(sa)
    root = (vec * lam.clamp_min(0).sqrt()) @ vec.T
    cross = torch.linalg.eigvalsh(root @ sb @ root).clamp_min(0).sqrt().sum()
    mean = ((a.mean(0) - b.mean(0)) ** 2).sum()
    return float(mean + torch.trace(sa) + torch.trace(sb) - 2 * cross)


def _read(images, classifier) -> dict:
    m = measure_samples(images)
    return dict(measured_t=m["thickness"], measured_i=m["intensity"],
                digit_read=read_digits(classifier, images).argmax(1).numpy(),
                features=classifier_features(classifier, images).numpy())


# --------------------------------------------------------- a stored run
def evaluate_batch(model, images, t, i, digits, targets: dict, classifier, *,
                   cycles: int | None = None, method: str | None = None,
                   steps: int | None = None, guidance: float | None = None,
                   clip: bool | None = None, dtype=None) -> dict:
    """Every per-image number of the protocol for one batch: round trip, composition at each cycle, and per intervention its target, readings and reversibility; :ref:`sec_morpho`.

    ``targets``: ``{"t": ..., "i": ..., "digit": ...}`` one do() value per
    image (``intervention_targets``). Solver settings default to
    ``PROTOCOL``. Returns flat NumPy arrays (keys ``"real.measured_t"``,
    ``"composition"`` (n, cycles), ``"do_t.reversibility"``, ...), so that
    the batches of a run concatenate row by row (``summarize``).
    """
    s = PROTOCOL["sampler"]
    solver = dict(method=method or s["method"], steps=steps or s["steps"],
                  guidance=s["guidance"] if guidance is None else guidance, dtype=dtype)
    clip = PROTOCOL["clip"] if clip is None else bool(clip)
    cycles = max(PROTOCOL["cycles"]) if cycles is None else check_int("cycles", cycles, 1)
    x = _pixels(images)
    n = len(x)
    t, i, d = _column("t", t, n), _column("i", i, n), _digits(digits, n)
    if not isinstance(targets, dict) or set(targets) != set(PROTOCOL["interventions"]):
        raise ValueError(f"targets must be a dict with keys {PROTOCOL['interventions']}")
    out = {"t": t, "i": i, "digits": d,
           "round_trip": round_trip_error(model, x, t, i, d, **solver)}
    out.update({f"real.{k}": v for k, v in _read(x, classifier).items()})
    comp, cur = [], x
    for _ in range(cycles):
        cur = counterfactual_images(model, cur, t, i, d, None, clip=clip, **solver)["images"]
        comp.append(_l1(cur, x))
    out["composition"] = np.stack(comp, 1)
    for name in PROTOCOL["interventions"]:
        cf = counterfactual_images(model, x, t, i, d, {name: targets[name]}, clip=clip,
                                   **solver)
        back = {"t": t, "i": i, "digit": d}[name]
        rev = counterfactual_images(model, cf["images"], cf["t"], cf["i"], cf["digits"],
                                    {name: back}, clip=clip, **solver)["images"]
        key = f"do_{name}"
        out[f"{key}.target_t"], out[f"{key}.target_i"] = cf["t"], cf["i"]
        out[f"{key}.target_digit"] = np.asarray(cf["digits"], dtype=np.int64)
        out[f"{key}.reversibility"] = _l1(rev, x)
        out.update({f"{key}.{k}": v for k, v in _read(cf["images"], classifier).items()})
    return out


def _interval(values, seed):
    g = torch.Generator().manual_seed(seed)
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return [float("nan"), float("nan")]
    if np.ptp(v) == 0:
        return [float(v[0]), float(v[0])]
    lo, hi = intervals.mean_interval(v, level=PROTOCOL["level"], method="studentized",
                                     n_boot=PROTOCOL["n_boot"], generator=g)
    return [lo, hi]


def _stat(values, seed) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"value": float(v.mean()), "interval": _interval(v, seed)}


def _realism(features, real, seed) -> dict:
    """Frechet distance of features of the even rows to real features of the odd rows,
    with a paired percentile bootstrap (the pairs resampled together)."""
    half = len(real) // 2
    if half < 3:
        return {"value": float("nan"), "interval": [float("nan"), float("nan")]}
    a, b = torch.as_tensor(features[0:2 * half:2]), torch.as_tensor(real[1:2 * half:2])
    f = a.shape[1]
    est, lo, hi = intervals.bootstrap_ci(
        lambda r: frechet_distance(r[:, :f], r[:, f:]), torch.cat([a, b], 1),
        n_boot=max(2, PROTOCOL["n_boot"] // 10), alpha=1 - PROTOCOL["level"],
        generator=torch.Generator().manual_seed(seed))
    return {"value": float(est), "interval": [float(lo), float(hi)]}


def summarize(rows: dict) -> dict:
    """The protocol's table from per-image rows (``evaluate_batch``, batches joined): means with 95% intervals, floors, null baselines and the verdict; :ref:`sec_morpho`.

    Composition, reversibility and the round trip in grey levels over
    28 x 28 (``value``) and over the published 32 x 32 padding
    (``padded``, times 784 / 1024). Effectiveness per intervention: ``t_mae``,
    ``i_mae`` (the Morpho measurements of the counterfactual against its
    counterfactual parents) and ``digit_accuracy`` (the classifier), each
    with its ``floor`` (the real images measured against their own labels;
    the classifier's accuracy on them) and ``null`` (the unchanged image
    measured against the target). Realism: the Frechet distance of
    classifier features, counterfactuals of the even rows against real
    images of the odd rows, and its floor (real even rows against the same
    odd rows).
    """
    seed = PROTOCOL["interval_seed"]
    n = len(rows["round_trip"])
    pad = PROTOCOL["image_size"] ** 2 / PROTOCOL["padded_size"] ** 2

    def grey(values):
        s = _stat(values, seed)
        s["padded"] = s["value"] * pad
        return s

    real_t, real_i, real_d = rows["real.measured_t"], rows["real.measured_i"], rows["real.digit_read"]
    out = {"n": n, "units": "grey levels [0, 255]; mean over 28 x 28 pixels (padded: "
                            "over the published 32 x 32, times 784 / 1024)",
           "round_trip": grey(rows["round_trip"]),
           "composition": {int(m): grey(rows["composition"][:, m - 1])
                           for m in PROTOCOL["cycles"] if m <= rows["composition"].shape[1]},
           "floor": {"t_mae": _stat(np.abs(real_t - rows["t"]), seed),
                     "i_mae": _stat(np.abs(real_i - rows["i"]), seed),
                     "digit_accuracy": _stat(real_d == rows["digits"], seed),
                     "realism": _realism(rows["real.features"][:, :], rows["real.features"],
                                         seed)},
           "interventions": {}}
    for name in PROTOCOL["interventions"]:
        k = f"do_{name}"
        tt, ti, td = rows[f"{k}.target_t"], rows[f"{k}.target_i"], rows[f"{k}.target_digit"]
        out["interventions"][name] = {
            "reversibility": grey(rows[f"{k}.reversibility"]),
            "t_mae": _stat(np.abs(rows[f"{k}.measured_t"] - tt), seed),
            "i_mae": _stat(np.abs(rows[f"{k}.measured_i"] - ti), seed),
            "digit_accuracy": _stat(rows[f"{k}.digit_read"] == td, seed),
            "null": {"t_mae": _stat(np.abs(real_t - tt), seed),
                     "i_mae": _stat(np.abs(real_i - ti), seed),
                     "digit_accuracy": _stat(real_d == td, seed)},
            "realism": _realism(rows[f"{k}.features"], rows["real.features"], seed),
            "unchanged_digit_share": float(np.mean(td == rows["digits"])),
        }
    out["verdict"] = composition_verdict(out)
    return out


def composition_verdict(summary: dict) -> dict:
    """``PROTOCOL["rule"]`` on a summary: composition after 10 null cycles within about one grey level, with the round trip beside; :ref:`sec_morpho`.

    Returns ``status`` (pass, borderline, fail, or undecided when the
    summary has no 10-cycle composition) and a sentence naming the share
    of the error the abduction's round trip already shows.
    """
    m = max(PROTOCOL["cycles"])
    comp = summary.get("composition", {}).get(m)
    if comp is None or any(v != v for v in comp["interval"]):
        return {"status": "undecided", "text": f"no composition after {m} cycles"}
    limit = PROTOCOL["composition_limit"]
    status = judge_interval(comp["interval"], limit, "max")
    rt = summary["round_trip"]["value"]
    lo, hi = comp["interval"]
    text = (f"composition after {m} null cycles: {comp['value']:.3g} grey levels "
            f"[{lo:.3g}, {hi:.3g}] against a limit of {limit:g}: {status}; one round trip "
            f"of the abduction alone costs {rt:.3g} grey levels")
    return {"status": status, "limit": limit, "text": text}


def counterfactual_table(summary: dict) -> list[dict]:
    """One row per metric of a summary (value, interval, floor, null baseline, padded value), in the published tables' order; :ref:`sec_morpho`."""
    rows = [dict(metric="round trip (abduction)", do="-", **_row(summary["round_trip"]))]
    for m, s in summary["composition"].items():
        rows.append(dict(metric=f"composition ({m} cycle{'s' if m > 1 else ''})", do="null",
                         **_row(s)))
    floor = summary["floor"]
    for name, s in summary["interventions"].items():
        rows.append(dict(metric="reversibility", do=name, **_row(s["reversibility"])))
        for key in ("t_mae", "i_mae", "digit_accuracy"):
            rows.append(dict(metric=key, do=name, **_row(s[key]),
                             floor=floor[key]["value"], null=s["null"][key]["value"]))
        rows.append(dict(metric="realism (Frechet, classifier features)", do=name,
                         **_row(s["realism"]), floor=floor["realism"]["value"]))
    return rows


def _row(s):
    return dict(value=s["value"], low=s["interval"][0], high=s["interval"][1],
                padded=s.get("padded"))


def composition_diagnosis(model, images, t, i, digits, *, cycles: int | None = None,
                          settings=None) -> list[dict]:
    """Composition after ``cycles`` null cycles and the round trip under each setting of ``PROTOCOL["diagnosis"]`` (more steps, RK4, float64, no clipping, guidance), one change at a time; :ref:`sec_morpho`.

    The setting whose change removes most of the error names its cause:
    the solver's discretisation (steps, method), the precision, the
    clipping of each cycle's image to [0, 1], or guidance.
    """
    cycles = max(PROTOCOL["cycles"]) if cycles is None else check_int("cycles", cycles, 1)
    x = _pixels(images)
    n = len(x)
    t, i, d = _column("t", t, n), _column("i", i, n), _digits(digits, n)
    out = []
    for setting in settings or PROTOCOL["diagnosis"]:
        s = dict(PROTOCOL["sampler"], clip=PROTOCOL["clip"], dtype=None)
        s.update({k: v for k, v in setting.items() if k != "name"})
        dtype = {None: None, "float64": torch.float64, "float32": torch.float32}[s["dtype"]]
        solver = {k: s[k] for k in _SOLVER_KEYS}
        net, x0 = model, x if dtype is None else x.to(dtype)
        if dtype is not None and isinstance(model, torch.nn.Module):
            net = copy.deepcopy(model).to(dtype)
        cur = x0
        for _ in range(cycles):
            cur = counterfactual_images(net, cur, t, i, d, None, clip=s["clip"],
                                        dtype=dtype, **solver)["images"]
        rt = round_trip_error(net, x0, t, i, d, dtype=dtype, **solver)
        out.append(dict(name=setting.get("name", str(setting)),
                        composition=float(_l1(cur, x0).mean()), round_trip=float(rt.mean())))
    return out
