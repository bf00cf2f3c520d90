"""Quality gates for learned models: is the flow's output the data, and can the classifier read it?

A learned model's numbers are interpreted only after it passes gates that
are measured, printed and asserted. This module computes them:

* ``attribute_sample_gates``: a classifier's reading of flow samples of the
  SCM images: the fraction of *readable* samples (every attribute's
  probability <= 0.1 or >= 0.9), every attribute marginal against the exact
  one, and the off-diagonal MAE of the predicted-label correlations against
  the exact correlations (with the all-zeros matrix as a baseline);
* ``edge_disagreement_accuracy``: for every edge of the DAG, the
  classifier's accuracy on images whose parent and child disagree (a
  classifier that reads one attribute off another fails here);
* ``digit_sample_gates``: the share of flow samples that a digit classifier
  calls the target digit with high probability, the pixel range and the
  background haze (``background_mask``; for a flow of all digits, the
  confident share and the class balance);
* ``memorization``: nearest-neighbour distances of samples to the training
  set against those of held-out real images.

Thresholds are in ``GATES``. Each sample gate comes with a 95% percentile
bootstrap interval over samples (whole images are resampled, so pixel
statistics are clustered by image; ``GATE_INTERVAL``), and ``judge`` reads
it against its limit: ``"pass"`` when the whole interval is on the good
side, ``"fail"`` when it is wholly on the bad side, ``"borderline"`` when it
straddles the limit. ``passed`` is true only when every gate passes, the
memorization limits included. Gates that decide a shipped model are
measured on at least ``GATE_MIN_N`` samples drawn with a seed that no
stopping rule has seen. Explained in :ref:`sec_attributes` and :ref:`sec_mnist`.

Longer than 400 lines because every gate and its interval live together:
one table of limits (``GATES``, ``GATE_SIDES``), one judge, and the sample
statistics each model kind is judged by; split, the limits and the
statistics they bound would drift apart.
"""
from __future__ import annotations

import numpy as np
import torch

from flowjac._checks import check_int
from flowjac.closedform.empirical import nearest_distances

__all__ = ["GATES", "GATE_INTERVAL", "GATE_MIN_N", "GATE_SIDES", "judge",
           "attribute_sample_gates", "edge_disagreement_accuracy",
           "digit_sample_gates", "memorization",
           "offdiag_mae", "background_mask", "combine", "conditional_gates", "gate_rows", "accuracy_gate",
           "check_gates"]

GATES = {
    # attribute classifier, on independent-attribute images
    "classifier_min_accuracy": 0.95,
    # attribute flow, read by that classifier
    "readable_min": 0.90,
    "marginal_max_error": 0.05,
    "corr_max_mae": 0.05,
    # label-conditional flow: labels drawn independently, read back per attribute
    "conditional_min_accuracy": 0.95,
    # digit classifier, held out
    "digit_min_accuracy": 0.97,
    # flow of fives
    "fives_min_share": 0.90,
    "fives_min_prob": 0.9,
    "pixel_range": (-0.05, 1.05),
    "pixel_in_range_min": 0.999,
    # background haze of a flow of digits: on pixels below 0.01 in every
    # training image (background_mask), the samples' mean grey level at most
    # 0.01 (2.6 grey levels): fixed from the held-out real fives before any
    # flow was measured with it (mean 0.00011, the worst single five 0.0097)
    "background_ink": 0.01,
    "background_max": 0.01,
    # flow of all ten digits: share read as each digit within 0.03 of the
    # data's (fixed before its training, training-set-size study)
    "class_max_error": 0.03,
    # every flow: samples no closer to the training set than 0.75 of what
    # held-out real images are, and at most 1% copies
    "nn_ratio_min": 0.75,
    "copy_share_max": 0.01,
}

# the gate statistic, its limit in GATES and the side the limit bounds
GATE_SIDES = {
    "readable": ("readable_min", "min"),
    "marginal_error": ("marginal_max_error", "max"),
    "corr_mae": ("corr_max_mae", "max"),
    "share": ("fives_min_share", "min"),
    "in_range": ("pixel_in_range_min", "min"),
    "class_error": ("class_max_error", "max"),
    "background": ("background_max", "max"),
    "min_accuracy": ("conditional_min_accuracy", "min"),
    "classifier_accuracy": ("classifier_min_accuracy", "min"),
    "edge_accuracy": ("classifier_min_accuracy", "min"),
    "digit_accuracy": ("digit_min_accuracy", "min"),
    "nn_ratio": ("nn_ratio_min", "min"),
    "copy_share": ("copy_share_max", "max"),
}
GATE_INTERVAL = dict(alpha=0.05, n_boot=1000, seed=0)
GATE_MIN_N = 4000


def judge(name: str, interval) -> str:
    """``"pass"``, ``"borderline"`` or ``"fail"`` of a gate statistic's interval against its limit; :ref:`sec_attributes`."""
    if name not in GATE_SIDES:
        raise ValueError(f"name must be one of {sorted(GATE_SIDES)}, got {name!r}")
    key, side = GATE_SIDES[name]
    limit = GATES[key]
    lo, hi = (float(v) for v in interval)
    if not lo <= hi:
        raise ValueError(f"interval must be (low, high) with low <= high, got {interval!r}")
    good = lo >= limit if side == "min" else hi <= limit
    bad = hi < limit if side == "min" else lo > limit
    return "pass" if good else "fail" if bad else "borderline"


def _bootstrap(fn, rows: torch.Tensor) -> tuple:
    from flowjac.estimators.intervals import bootstrap_ci

    g = torch.Generator().manual_seed(GATE_INTERVAL["seed"])
    est, lo, hi = bootstrap_ci(fn, rows, n_boot=GATE_INTERVAL["n_boot"],
                               alpha=GATE_INTERVAL["alpha"], generator=g)
    return est, lo, hi


def conditional_gates(read: torch.Tensor, labels: torch.Tensor) -> dict:
    """Gates of a label-conditional flow: each requested attribute read back, with intervals; :ref:`sec_interventions`.

    ``read`` and ``labels`` are (n, d) 0/1 tensors (the classifier's reading
    and the requested labels). Returns ``accuracy_per_attribute``,
    ``min_accuracy`` (the gate: ``GATES["conditional_min_accuracy"]``),
    ``all_attributes``, their ``intervals``, ``status`` and ``passed``.
    """
    if not (torch.is_tensor(read) and torch.is_tensor(labels)) or read.shape != labels.shape \
            or read.ndim != 2 or read.shape[0] < 2:
        raise ValueError("read and labels must be (n, d) tensors of one shape, n >= 2")
    agree = (read == labels).double()
    out = dict(n=int(agree.shape[0]), accuracy_per_attribute=agree.mean(0).tolist(),
               min_accuracy=float(agree.mean(0).min()),
               all_attributes=float(agree.all(1).double().mean()))
    _judged(out, ("min_accuracy",), *_bootstrap(lambda r: r.mean(0).min().reshape(1), agree))
    out["passed"] = _passed(out)
    return out


def accuracy_gate(name: str, correct: torch.Tensor, masks=None) -> dict:
    """A classifier's worst accuracy over columns (or over masked subsets) with its interval, judged; :ref:`sec_attributes`.

    ``correct`` (n, d) of 0/1: whether each of n held-out images is read
    right on each of d outputs. ``masks`` (n, m) of 0/1 restricts column
    ``cols[j]`` to the rows of mask j (the edge gate: images where parent
    and child disagree) and is given as ``(masks, cols)``. Returns
    ``{name: value, "n": n, "intervals", "status", "passed"}``.
    """
    if name not in ("classifier_accuracy", "edge_accuracy", "digit_accuracy"):
        raise ValueError(f"name must be an accuracy gate, got {name!r}")
    if not torch.is_tensor(correct) or correct.ndim != 2 or correct.shape[0] < 2:
        raise ValueError("correct must be an (n, d) tensor of 0/1 with n >= 2")
    c = correct.double()
    if masks is None:
        def stat(r):
            return r.mean(0).min().reshape(1)
        rows = c
    else:
        m, cols = masks
        d = c.shape[1]

        def stat(r):
            acc = [(r[:, col] * r[:, d + j]).sum() / r[:, d + j].sum().clamp_min(1)
                   for j, col in enumerate(cols)]
            return torch.stack(acc).min().reshape(1)
        rows = torch.cat([c, m.double()], 1)
    out = {name: float(stat(rows)), "n": int(c.shape[0])}
    _judged(out, (name,), *_bootstrap(stat, rows))
    out["passed"] = _passed(out)
    return out


def _judged(out: dict, names, est, lo, hi) -> dict:
    out.setdefault("intervals", {})
    out.setdefault("status", {})
    for i, name in enumerate(names):
        out["intervals"][name] = [float(lo[i]), float(hi[i])]
        out["status"][name] = judge(name, out["intervals"][name])
    return out


def _passed(out: dict) -> bool:
    return bool(out["status"]) and all(v == "pass" for v in out["status"].values())


def offdiag_mae(a, b) -> float:
    """Mean absolute difference of the off-diagonal entries of two square matrices; :ref:`sec_attributes`."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"a and b must be square matrices of one shape, got "
                         f"{a.shape} and {b.shape}")
    mask = ~np.eye(a.shape[0], dtype=bool)
    return float(np.nanmean(np.abs(a - b)[mask]))


def _probs(logits: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(logits) or logits.ndim != 2:
        raise ValueError(f"logits must be a (n, d) tensor, got "
                         f"{getattr(logits, 'shape', type(logits))}")
    if not torch.isfinite(logits).all():
        raise ValueError("logits must be finite")
    return torch.sigmoid(logits.double().cpu())


def attribute_sample_gates(logits: torch.Tensor, scm) -> dict:
    """Gates of flow samples read by the attribute classifier (logits (n, d)); :ref:`sec_attributes`.

    Returns ``readable`` (share of samples with every probability <= 0.1 or
    >= 0.9), ``marginals`` and ``exact_marginals``, ``marginal_error`` (the
    largest absolute difference), ``corr`` (predicted-label correlations),
    ``corr_mae`` (off-diagonal MAE against ``scm.correlation()``),
    ``zeros_mae`` (the same for a matrix of zeros) and ``passed`` with the
    thresholds of ``GATES``.
    """
    p = _probs(logits)
    if p.shape[1] != len(scm.nodes):
        raise ValueError(f"logits must have {len(scm.nodes)} columns, got "
                         f"{p.shape[1]}")
    if p.shape[0] < 2:
        raise ValueError("logits must hold at least 2 samples")
    readable = float(((p <= 0.1) | (p >= 0.9)).all(1).double().mean())
    labels = (p > 0.5).double().numpy()
    marg = labels.mean(0)
    exact_m = scm.marginals()
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.corrcoef(labels.T)
    exact = scm.correlation()
    out = dict(n=int(p.shape[0]), readable=readable, marginals=marg.tolist(),
               exact_marginals=exact_m.tolist(),
               marginal_error=float(np.abs(marg - exact_m).max()),
               corr=corr.tolist(), corr_mae=offdiag_mae(corr, exact),
               zeros_mae=offdiag_mae(np.zeros_like(exact), exact))
    exact_t = torch.as_tensor(exact_m, dtype=torch.float64)
    mask = ~np.eye(len(exact), dtype=bool)

    def stats(rows):
        lab = rows[:, 1:]
        with np.errstate(invalid="ignore", divide="ignore"):
            c = np.corrcoef(lab.numpy().T)
        return torch.tensor([float(rows[:, 0].mean()),
                             float((lab.mean(0) - exact_t).abs().max()),
                             float(np.nanmean(np.abs(c - exact)[mask]))],
                            dtype=torch.float64)

    rows = torch.cat([((p <= 0.1) | (p >= 0.9)).all(1, keepdim=True).double(),
                      torch.as_tensor(labels)], 1)
    _judged(out, ("readable", "marginal_error", "corr_mae"), *_bootstrap(stats, rows))
    out["passed"] = _passed(out)
    return out


def edge_disagreement_accuracy(classifier, scm, size: int = 32, n: int = 4000,
                               seed: int = 0) -> dict:
    """For every DAG edge, the classifier's accuracy on images where parent and child disagree; :ref:`sec_attributes`.

    Images are rendered with *independent* fair-coin attributes (seeded),
    mapped to the flow's space 2x - 1, and the rows where parent != child
    kept. Returns ``{"parent->child": {"parent": acc, "child": acc, "n": m}}``.
    """
    from flowjac.data.scm_images import render
    from flowjac.models.classifiers import predict_logits

    n = check_int("n", n, minimum=2)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n, len(scm.nodes)), generator=g)
    x = render(labels, size, generator=g) * 2 - 1
    pred = (predict_logits(classifier, x) > 0).long()
    out = {}
    for parent, child in scm.edges():
        i, j = scm.index(parent), scm.index(child)
        rows = labels[:, i] != labels[:, j]
        out[f"{parent}->{child}"] = dict(
            n=int(rows.sum()),
            parent=float((pred[rows, i] == labels[rows, i]).float().mean()),
            child=float((pred[rows, j] == labels[rows, j]).float().mean()))
    return out


def background_mask(train: torch.Tensor) -> torch.Tensor:
    """The background of a training set of digits: pixels below ``GATES["background_ink"]`` in every training image; :ref:`sec_mnist`.

    ``train`` (n, 1, H, W) in pixel space [0, 1]; returns a boolean (H * W,)
    mask. For the 400 training fives it holds 277 of 784 pixels (the border).
    """
    if not torch.is_tensor(train) or train.ndim < 2 or train.shape[0] < 1:
        raise ValueError(f"train must be a tensor of images (n, ...), got "
                         f"{getattr(train, 'shape', type(train))}")
    return train.detach().cpu().flatten(1).amax(0) < GATES["background_ink"]


def digit_sample_gates(logits: torch.Tensor, samples: torch.Tensor,
                       digit: int | None = 5, class_shares=None,
                       background=None) -> dict:
    """Gates of a flow of one digit (or of all ten): the classifier's confident share, the pixel range, the background haze (and the class balance); :ref:`sec_mnist`.

    ``logits`` (n, 10) from the digit classifier on ``samples`` (n, 1, H, W)
    in pixel space [0, 1]. Returns ``share`` (P(digit) >= 0.9), ``in_range``
    (share of pixels within ``GATES["pixel_range"]``), ``pixel_min``,
    ``pixel_max``, ``class_histogram`` and ``passed``.
    ``background`` (a ``background_mask``) adds ``background``: the mean
    over samples of each sample's mean grey level, clipped to [0, 1], on
    pixels that no training image inks (limit ``GATES["background_max"]``):
    a grey haze that stays inside the pixel range passes the range gate
    but not this one.
    ``digit=None`` judges a flow of all digits: ``share`` is then the share
    whose most likely digit has P >= 0.9, and ``class_error`` (limit
    ``GATES["class_max_error"]``) the worst gap between the share of
    samples read as a digit and ``class_shares``, the data's (10 shares).
    """
    if not torch.is_tensor(logits) or logits.ndim != 2 or logits.shape[1] != 10:
        raise ValueError(f"logits must be a (n, 10) tensor, got "
                         f"{getattr(logits, 'shape', type(logits))}")
    if not torch.is_tensor(samples) or samples.shape[0] != logits.shape[0]:
        raise ValueError("samples must be a tensor with one row per logit row")
    if not torch.isfinite(samples).all():
        raise ValueError("samples must be finite")
    if (digit is None) != (class_shares is not None):
        raise ValueError("class_shares must be given exactly when digit is None "
                         "(a flow of all digits)")
    prob = torch.softmax(logits.double().cpu(), 1)
    lo, hi = GATES["pixel_range"]
    s = samples.detach().cpu().double()
    # one digit: P(digit) >= 0.9; all digits: P(its most likely digit) >= 0.9
    p_read = prob[:, digit] if digit is not None else prob.max(1).values
    confident = (p_read >= GATES["fives_min_prob"]).double()
    in_range = ((s >= lo) & (s <= hi)).flatten(1).double().mean(1)
    out = dict(n=int(s.shape[0]), share=float(confident.mean()),
               in_range=float(in_range.mean()),
               pixel_min=float(s.min()), pixel_max=float(s.max()),
               class_histogram=torch.bincount(prob.argmax(1), minlength=10).tolist())
    names, cols = ["share", "in_range"], [confident, in_range]
    if background is not None:
        mask = torch.as_tensor(background, dtype=torch.bool).flatten().cpu()
        if mask.numel() != s[0].numel() or not mask.any():
            raise ValueError(f"background must be a non-empty mask of {s[0].numel()} "
                             f"pixels (background_mask), got {mask.numel()} entries")
        haze = s.flatten(1)[:, mask].clamp(0, 1).mean(1)
        out["background"] = float(haze.mean())
        out["background_pixels"] = int(mask.sum())
        names.append("background")
        cols.append(haze)
    rows = torch.stack(cols, 1)
    if digit is None:
        # the class balance: the worst |share read as c - the data's share of c|
        shares = torch.as_tensor(class_shares, dtype=torch.float64).flatten()
        if shares.numel() != 10 or not torch.isfinite(shares).all() or (shares < 0).any() \
                or abs(float(shares.sum()) - 1) > 1e-6:
            raise ValueError("class_shares must be 10 non-negative shares summing to 1")
        onehot = torch.nn.functional.one_hot(prob.argmax(1), 10).double()
        k = len(names)
        rows = torch.cat([rows, onehot], 1)

        def stats(r):
            return torch.cat([r[:, :k].mean(0), (r[:, k:].mean(0) - shares).abs().max()[None]])

        out["class_error"] = float(stats(rows)[k])
        out["class_shares"] = shares.tolist()
        names.append("class_error")
    else:
        def stats(r):
            return r.mean(0)
    _judged(out, tuple(names), *_bootstrap(stats, rows))
    out["passed"] = _passed(out)
    return out


def memorization(samples: torch.Tensor, train: torch.Tensor,
                 heldout: torch.Tensor, device="cpu") -> dict:
    """Nearest-neighbour distances of samples and of held-out images to the training set; :ref:`sec_mnist`.

    All three in one space (flattened). Returns the medians of the nearest
    distance (``sample_nn``, ``heldout_nn``), their ratio ``nn_ratio``
    (near 1: samples are as far from the training set as new real images;
    near 0: copies), and the share of samples (``copy_share``) and of
    held-out images (``heldout_copy_share``) whose nearest training image is
    under a third of the second nearest (a common copy criterion).
    """
    for name, x in (("samples", samples), ("train", train), ("heldout", heldout)):
        if not torch.is_tensor(x) or x.ndim < 2 or x.shape[0] < 2:
            raise ValueError(f"{name} must be a tensor of at least 2 rows")
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} must be finite")
    if not (samples.shape[1:] == train.shape[1:] == heldout.shape[1:]):
        raise ValueError("samples, train and heldout must share one shape per row")
    ds = nearest_distances(samples, train, device=device)
    dh = nearest_distances(heldout, train, device=device)
    out = dict(sample_nn=float(ds[:, 0].median()),
               heldout_nn=float(dh[:, 0].median()),
               copy_share=float((ds[:, 0] < ds[:, 1] / 3).double().mean()),
               heldout_copy_share=float((dh[:, 0] < dh[:, 1] / 3).double().mean()))
    out["nn_ratio"] = out["sample_nn"] / out["heldout_nn"]
    # both sets resampled: samples and held-out images are independent draws
    g = torch.Generator().manual_seed(GATE_INTERVAL["seed"])
    reps = []
    ds, dh = ds.double().cpu(), dh.double().cpu()
    for _ in range(GATE_INTERVAL["n_boot"]):
        i = torch.randint(len(ds), (len(ds),), generator=g)
        j = torch.randint(len(dh), (len(dh),), generator=g)
        reps.append([float(ds[i, 0].median() / dh[j, 0].median()),
                     float((ds[i, 0] < ds[i, 1] / 3).double().mean())])
    q = torch.tensor(reps, dtype=torch.float64).quantile(torch.tensor(
        [GATE_INTERVAL["alpha"] / 2, 1 - GATE_INTERVAL["alpha"] / 2], dtype=torch.float64), dim=0)
    _judged(out, ("nn_ratio", "copy_share"), None, q[0], q[1])
    out["passed"] = _passed(out)
    return out


def combine(sample_gates: dict, memorization_gates: dict) -> dict:
    """A flow's sample gates with its memorization gates joined: one ``status`` table and one ``passed``; :ref:`sec_attributes`."""
    out = dict(sample_gates, memorization=memorization_gates)
    out["intervals"] = {**sample_gates.get("intervals", {}),
                        **memorization_gates.get("intervals", {})}
    out["status"] = {**sample_gates.get("status", {}),
                     **memorization_gates.get("status", {})}
    out["borderline"] = sorted(k for k, v in out["status"].items() if v == "borderline")
    out["failed"] = sorted(k for k, v in out["status"].items() if v == "fail")
    out["passed"] = _passed(out)
    return out


def _value(gates: dict, name: str):
    if name in gates:
        return gates[name]
    return gates.get("memorization", {}).get(name)


def gate_rows(gates: dict) -> list[dict]:
    """One row per gate of a gate record: value, 95% interval, limit and status; :ref:`sec_attributes`.

    Records measured before intervals existed (no ``status``) are judged on
    their point value, and their status says so (``"pass (point)"``).
    """
    rows = []
    names = list(gates.get("status") or [n for n in GATE_SIDES if _value(gates, n) is not None])
    for name in names:
        key, side = GATE_SIDES[name]
        value = _value(gates, name)
        interval = (gates.get("intervals") or {}).get(name)
        if gates.get("status"):
            status = gates["status"][name]
        else:
            ok = value >= GATES[key] if side == "min" else value <= GATES[key]
            status = "pass (point)" if ok else "fail (point)"
        rows.append(dict(gate=name, value=value,
                         low=None if interval is None else interval[0],
                         high=None if interval is None else interval[1],
                         limit=f"{'>=' if side == 'min' else '<='} {GATES[key]}",
                         status=status))
    return rows


def check_gates(name: str, gates: dict) -> None:
    """Raise AssertionError naming the model and the failing gate unless ``gates['passed']``; :ref:`sec_attributes`."""
    if not gates.get("passed", False):
        shown = {k: v for k, v in gates.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)}
        raise AssertionError(f"{name} fails its quality gates: {shown}")
