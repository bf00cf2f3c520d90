"""Stored probe runs: load them, check them against a live recomputation, summarize them honestly.

``tools/probe_shipped.py`` pushes N = 10,000 latents through a shipped flow
and a readout on a GPU and stores the raw tensors under ``results/``
(``attributes_probes.pt``, ``mnist_probes.pt``). The chapters compute every
number from those tensors, and first recompute a few latents live on the
CPU (``reproduce``) so that a reader sees that the stored file belongs to
the shipped model. ``group_spread`` gives the spread of a statistic over
disjoint groups of latents: for heavy-tailed JVP statistics it is the
honest picture of how unstable an estimate of that size is, where a
percentile bootstrap of the whole sample understates it.

Explained in :ref:`sec_attributes`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from flowjac._checks import check_int
from flowjac.base import repo_root

__all__ = ["load_probes", "reproduce", "group_spread", "selection_verdict", "label_corr",
           "PAPER_FD_ATTRIBUTES", "fd_changes_verdict", "fd_comparison"]

#: The paper's own estimator on the attribute latents (issue 32.6), fixed
#: before its run (``tools/run_paper_fd.py``): float32 forward differences
#: of the classifier's logits, (c(phi(z + eps v)) - c(phi(z))) / eps, with
#: the paper's eps for attributes and its Euler solver of 99 steps, along
#: the first probe v of the first ``n`` latents of
#: ``results/attributes_probes.pt`` (the size one CPU core computes in
#: about half an hour); ``batch`` latents per partial write.
PAPER_FD_ATTRIBUTES = dict(eps=1e-2, steps=99, method="euler", dtype="float32",
                           n=500, probe=0, batch=25, n_boot=1000, boot_seed=0)

_KEYS = ("out", "jvp", "rho", "out_pair", "jvp_pair", "plain", "meta")


def load_probes(name: str, results_dir=None) -> dict:
    """Load ``results/<name>.pt`` (a stored probe run) with ``weights_only=True``; :ref:`sec_attributes`."""
    path = Path(results_dir or repo_root() / "results") / f"{name}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"stored probe run {path} is missing; make it "
                                "with tools/probe_shipped.py (see "
                                "results/README.md)")
    from flowjac.engine.checkpoints import read_checkpoint

    data = read_checkpoint(path, "stored probe run")
    if not isinstance(data, dict):
        raise ValueError(f"stored probe run {path} holds a "
                         f"{type(data).__name__}, not a dict")
    missing = [k for k in _KEYS if k not in data]
    if missing:
        raise ValueError(f"stored probe run {path} lacks {missing}")
    n = data["meta"]["n"]
    for key in ("out", "jvp", "rho", "out_pair", "jvp_pair"):
        if data[key].shape[0] != n:
            raise ValueError(f"stored probe run {path}: {key} has "
                             f"{data[key].shape[0]} rows, meta says n = {n}")
    return data


def reproduce(velocity, readout, latent_shape, stored: dict, n: int = 2,
              dtype=torch.float32) -> dict:
    """Recompute the first ``n`` stored latents live and return the largest relative errors; :ref:`sec_attributes`.

    Redraws the stored run's first ``n`` latents and probes exactly as
    ``probing.probe`` drew them (``probing.redraw``), and compares ``out``
    and ``jvp``. Returns ``{"out": err,
    "jvp": err, "n": n}`` with err = ``max |live - stored| / max |stored|``.
    """
    from flowjac.engine.composite import attribute_jvp
    from flowjac.engine.probing import redraw

    meta = stored["meta"]
    n = check_int("n", n, minimum=1)
    b = min(meta["batch_size"], meta["n"])
    if n > b:
        raise ValueError(f"n must be <= the stored batch size {b}, got {n}")
    z, v, _ = redraw(meta, latent_shape, range(n))
    with torch.no_grad():
        out, jv = attribute_jvp(velocity, readout, z.to(dtype),
                                tangents=v.to(dtype), steps=meta["steps"],
                                method=meta["method"])
    so, sj = stored["out"][:n].double(), stored["jvp"][:n].double()
    return dict(n=n,
                out=float((out.double() - so).abs().max() / so.abs().max()),
                jvp=float((jv.double() - sj).abs().max() / sj.abs().max()))


def group_spread(stat, *arrays, groups: int = 10) -> tuple:
    """``stat`` on the whole sample and its median, min and max over disjoint groups of rows; :ref:`sec_attributes`.

    ``arrays`` share their first dimension; ``stat(*arrays)`` returns a
    number. Returns ``(full, median, low, high)``.
    """
    groups = check_int("groups", groups, minimum=2)
    n = arrays[0].shape[0]
    if any(a.shape[0] != n for a in arrays) or n < groups:
        raise ValueError(f"arrays must share a first dimension of at least "
                         f"{groups} rows")
    edges = np.linspace(0, n, groups + 1).astype(int)
    vals = [float(stat(*(a[lo:hi] for a in arrays)))
            for lo, hi in zip(edges[:-1], edges[1:])]
    return (float(stat(*arrays)), float(np.nanmedian(vals)),
            float(np.nanmin(vals)), float(np.nanmax(vals)))


def selection_verdict(unselected: tuple, selected: tuple) -> tuple:
    """Does a selection lower a correlation towards 0, and has the test the power to say? :ref:`sec_attributes`.

    Both arguments are ``group_spread`` results ``(full, median, low,
    high)`` of one correlation over disjoint groups of latents: all of them
    and the selected ones. Criteria, fixed before any data: the test has
    power only if the unselected groups all lie on one side of 0 (there is a
    correlation to remove) and the selected groups' range is narrower than
    the unselected median's distance from 0 (a fall to 0 would be seen).
    Without power: ``"inconclusive"``. With it: ``"holds"`` when every
    selected group lies nearer 0 than every unselected group and the
    selected range covers 0 or lies between 0 and the unselected groups,
    else ``"fails"``. Returns ``(verdict, reason)``.
    """
    _, un_med, un_lo, un_hi = (float(v) for v in unselected)
    _, sel_med, sel_lo, sel_hi = (float(v) for v in selected)
    if any(v != v for v in (un_med, un_lo, un_hi, sel_med, sel_lo, sel_hi)):
        return "inconclusive", "too few latents kept for ten groups"
    if un_lo <= 0 <= un_hi:
        return "inconclusive", (f"no power: the unselected groups span {un_lo:+.2f} to "
                                f"{un_hi:+.2f}, across 0")
    if sel_hi - sel_lo >= abs(un_med):
        return "inconclusive", (f"no power: the selected groups span {sel_hi - sel_lo:.2f}, "
                                f"as wide as the correlation to remove ({abs(un_med):.2f})")
    sign = 1.0 if un_med > 0 else -1.0
    lo, hi = sorted((sign * sel_lo, sign * sel_hi))
    if hi < sign * (un_lo if sign > 0 else un_hi) and lo > -abs(un_med):
        return "holds", (f"every selected group ({sel_lo:+.2f} to {sel_hi:+.2f}) lies nearer 0 "
                         f"than every unselected group ({un_lo:+.2f} to {un_hi:+.2f})")
    return "fails", (f"the selected groups ({sel_lo:+.2f} to {sel_hi:+.2f}) do not all lie "
                     f"nearer 0 than the unselected ones ({un_lo:+.2f} to {un_hi:+.2f})")


def fd_changes_verdict(exact: tuple, fd: tuple, baseline: float) -> tuple:
    """Does the paper's forward difference change a verdict that exact JVPs give? :ref:`sec_attributes`.

    ``exact`` and ``fd``: 95% intervals ``(low, high)`` of one error (e.g. an
    off-diagonal MAE) of the same estimator computed with exact JVPs and
    with the paper's forward differences on the same latents; ``baseline``:
    the trivial baseline's error. Each is placed, by a rule fixed before
    the run, as ``"beats"`` the baseline (interval below it), ``"loses"``
    (above) or ``"ties"`` (straddles it). Returns ``(changes, exact_place,
    fd_place)``: ``changes`` is True when the two places differ.
    """
    def place(iv):
        lo, hi = (float(v) for v in iv)
        return "beats" if hi < baseline else "loses" if lo > baseline else "ties"

    a, b = place(exact), place(fd)
    return a != b, a, b


def fd_comparison(exact: torch.Tensor, fd: torch.Tensor, truth: torch.Tensor,
                  baseline: float, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """The paper's normalised E[dd^T] from exact JVPs and from its forward differences on the same latents, against ``truth``; :ref:`sec_attributes`.

    ``exact``, ``fd``: (m, p) JVPs of the same latents along the same
    probe; ``truth``: the (p, p) correlation both estimate; ``baseline``:
    the error of the trivial estimate (zeros). Returns ``est``, ``low``,
    ``high`` (the off-diagonal MAE of each, exact then forward difference,
    with a 95% percentile bootstrap over latents, the same resamples for
    both), ``rel`` (each latent's relative error ||fd - exact|| / ||exact||),
    ``heavy`` (the fewest latents carrying half of the exact second moment)
    and ``fd_changes_verdict``'s ``changes``, ``place_exact``, ``place_fd``.
    """
    from flowjac.estimators import intervals, moments
    from flowjac.models.quality import offdiag_mae

    exact, fd = exact.double(), fd.double()
    if exact.shape != fd.shape or exact.ndim != 2:
        raise ValueError(f"exact and fd must be (m, p) of one shape, got "
                         f"{tuple(exact.shape)} and {tuple(fd.shape)}")
    p = exact.shape[1]
    ref = np.asarray(truth, dtype=float)

    def maes(rows):
        return torch.tensor([offdiag_mae(moments.moment_to_corr(
            moments.second_moment(rows[:, j:j + p])).numpy(), ref) for j in (0, p)])

    est, low, high = intervals.bootstrap_ci(
        maes, torch.cat([exact, fd], 1), n_boot=n_boot,
        generator=torch.Generator().manual_seed(seed))
    sq = (exact ** 2).sum(1)
    order = sq.argsort(descending=True)
    heavy = order[:int((sq[order].cumsum(0) < 0.5 * sq.sum()).sum()) + 1]
    changes, place_exact, place_fd = fd_changes_verdict(
        (low[0], high[0]), (low[1], high[1]), baseline)
    return dict(est=est, low=low, high=high,
                rel=(fd - exact).norm(dim=1) / exact.norm(dim=1), heavy=heavy,
                changes=changes, place_exact=place_exact, place_fd=place_fd)


def label_corr(labels: torch.Tensor, i: int, j: int) -> float:
    """Pearson correlation of 0/1 columns i and j (nan if either is constant); :ref:`sec_attributes`."""
    x = labels[:, i].double()
    y = labels[:, j].double()
    if x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(torch.corrcoef(torch.stack([x, y]))[0, 1])
