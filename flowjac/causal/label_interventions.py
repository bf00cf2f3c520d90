"""Interventions and counterfactuals on the labels of a binary SCM, exactly: no flow, no image.

Every mechanism of a ``BinarySCM`` is X_j = 1[U_j < p_j(pa_j)] with its own
exogenous noise U_j ~ Uniform(0, 1), independent across j: this is how
``BinarySCM.sample`` draws labels, so the noise is part of the model, not an
afterthought. Then

* **do()** (``do``): the intervened nodes become constants, every other
  mechanism is unchanged (the mutilated model); its joint, correlations and
  marginals are exact by enumeration, as for the observational SCM.
* **abduction** (``noise_posterior``, ``abduct_noise``): observing all labels
  x confines each U_j to an interval, [0, p_j) if x_j = 1 and [p_j, 1) if
  x_j = 0, independently across j. The noise is not identified (an interval,
  not a point), so a counterfactual is a distribution.
* **counterfactual** (``counterfactual``): abduct, intervene, predict.
  With the noise posterior uniform on those intervals, the counterfactual
  value X'_j given new parents with probability p'_j is 1 with probability
  min(p', p)/p if x_j = 1, and max(p' - p, 0)/(1 - p) if x_j = 0; the
  joint over all 2^d counterfactual states is their product along the
  topological order, exact. ``propagate`` runs the mechanisms on given noise
  (for sampling: abduct noise, then propagate under do()).

On labels only, no flow and no image: ``flowjac.pipelines.image_interventions``
carries these operations to images through a conditional flow, and
``flowjac.pipelines.interventions_study`` runs the chapter's studies.
Explained in :ref:`sec_interventions` (``book/interventions.md``).
"""
from __future__ import annotations

import itertools

import numpy as np
import torch

from flowjac.causal.scm import STRUCTURES, BinarySCM

__all__ = ["do", "noise_posterior", "abduct_noise", "propagate",
           "counterfactual", "descendants", "structure_table"]


def _check_values(scm: BinarySCM, values: dict) -> dict:
    if not values:
        raise ValueError("do() needs at least one intervention, e.g. "
                         f"do(scm, {scm.nodes[0]}=1)")
    out = {}
    for name, val in values.items():
        scm.index(name)
        if isinstance(val, bool) or val not in (0, 1):
            raise ValueError(f"the value of {name!r} must be 0 or 1, got {val!r}")
        out[name] = int(val)
    return out


def do(scm: BinarySCM, **values) -> BinarySCM:
    """The mutilated SCM: intervened nodes are constants, other mechanisms unchanged; :ref:`sec_interventions`."""
    values = _check_values(scm, values)
    parents = {v: (() if v in values else tuple(scm.parents.get(v, ())))
               for v in scm.nodes}
    cpt = {v: ({(): float(values[v])} if v in values else dict(scm.cpt[v]))
           for v in scm.nodes}
    return BinarySCM(scm.nodes, parents, cpt)


def _labels(scm: BinarySCM, labels) -> torch.Tensor:
    labels = torch.as_tensor(labels)
    if labels.ndim == 1:
        labels = labels[None]
    d = len(scm.nodes)
    if labels.ndim != 2 or labels.shape[1] != d:
        raise ValueError(f"labels must have shape (n, {d}) or ({d},), got "
                         f"{tuple(labels.shape)}")
    if labels.is_floating_point() or not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError("labels must be integers 0 or 1")
    return labels.long()


def _probs(scm: BinarySCM, v: str, labels: torch.Tensor) -> torch.Tensor:
    """p_v(pa_v) for every row of labels (float64)."""
    pa = [scm.index(p) for p in scm.parents.get(v, ())]
    prob = torch.zeros(len(labels), dtype=torch.float64)
    for key, p in scm.cpt[v].items():
        hit = torch.ones(len(labels), dtype=torch.bool)
        for col, val in zip(pa, key):
            hit &= labels[:, col] == val
        prob[hit] = float(p)
    return prob


def noise_posterior(scm: BinarySCM, labels) -> tuple:
    """The interval [low, high) of each U_j given fully observed labels (n, d); :ref:`sec_interventions`.

    Raises ValueError for labels the SCM gives probability zero.
    """
    labels = _labels(scm, labels)
    low = torch.zeros(labels.shape, dtype=torch.float64)
    high = torch.ones(labels.shape, dtype=torch.float64)
    for j, v in enumerate(scm.nodes):
        p = _probs(scm, v, labels)
        one = labels[:, j] == 1
        high[:, j] = torch.where(one, p, high[:, j])
        low[:, j] = torch.where(one, low[:, j], p)
    if bool((high <= low).any()):
        raise ValueError("labels include a configuration of probability zero "
                         "under the SCM; its noise cannot be abducted")
    return low, high


def abduct_noise(scm: BinarySCM, labels, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
    """Draw U (n, d) from its posterior given observed labels; :ref:`sec_interventions`."""
    low, high = noise_posterior(scm, labels)
    u = torch.rand(low.shape, generator=generator, dtype=torch.float64)
    return low + u * (high - low)


def propagate(scm: BinarySCM, noise, **values) -> torch.Tensor:
    """Labels (n, d) from exogenous noise (n, d) through the mechanisms, under do(values); :ref:`sec_interventions`.

    ``propagate(scm, u)`` with u ~ Uniform(0, 1) reproduces ``scm.sample``
    (same noise, same labels); with values, the intervened nodes are set
    and their descendants follow.
    """
    noise = torch.as_tensor(noise, dtype=torch.float64)
    d = len(scm.nodes)
    if noise.ndim != 2 or noise.shape[1] != d:
        raise ValueError(f"noise must have shape (n, {d}), got {tuple(noise.shape)}")
    if not bool(((noise >= 0) & (noise <= 1)).all()):     # NaN fails both
        bad = int((~((noise >= 0) & (noise <= 1))).sum())
        raise ValueError(f"noise must be uniform draws in [0, 1]; {bad} entries "
                         "are outside it or NaN")
    model = do(scm, **values) if values else scm
    out = torch.zeros(noise.shape, dtype=torch.int64)
    for j, v in enumerate(model.nodes):
        out[:, j] = (noise[:, j] < _probs(model, v, out)).long()
    return out


def counterfactual(scm: BinarySCM, labels, **values) -> tuple:
    """Exact distribution of the counterfactual labels given observed labels (d,) under do(values); :ref:`sec_interventions`.

    Returns ``(states, prob)``: all 2^d states and their probabilities.
    """
    labels = _labels(scm, labels)
    if len(labels) != 1:
        raise ValueError("counterfactual takes one observed label vector")
    values = _check_values(scm, values)
    low, high = noise_posterior(scm, labels)
    low, high = low[0].numpy(), high[0].numpy()
    d = len(scm.nodes)
    states = np.array(list(itertools.product((0, 1), repeat=d)), dtype=int)
    prob = np.ones(len(states))
    for j, v in enumerate(scm.nodes):
        if v in values:
            prob *= states[:, j] == values[v]
            continue
        pa = [scm.index(p) for p in scm.parents.get(v, ())]
        p_new = np.array([float(scm.cpt[v][tuple(s[pa])]) for s in states])
        # P(U_j < p_new | U_j in [low, high))
        p1 = np.clip(np.minimum(p_new, high[j]) - low[j], 0, None) / (high[j] - low[j])
        prob *= np.where(states[:, j] == 1, p1, 1.0 - p1)
    return states, prob


def descendants(scm: BinarySCM, name: str) -> set:
    """The nodes downstream of ``name`` (excluding it); :ref:`sec_interventions`."""
    scm.index(name)
    out, frontier = set(), {name}
    while frontier:
        nxt = {v for v in scm.nodes for p in scm.parents.get(v, ())
               if p in frontier and v not in out}
        out |= nxt
        frontier = nxt
    return out


def structure_table(scm: BinarySCM, structures: dict | None = None) -> dict:
    """Exact corr(endpoints) per structure under observation, conditioning and do() on the middle node; :ref:`sec_interventions`.

    ``structures`` maps a name to (endpoint, endpoint, middle), default
    ``STRUCTURES``. Conditioning and do() are reported for middle = 1 and
    middle = 0.
    """
    out = {}
    for kind, (a, b, m) in (structures or STRUCTURES).items():
        i, j = scm.index(a), scm.index(b)
        row = {"observe": float(scm.correlation()[i, j])}
        for val in (1, 0):
            row[f"condition {m}={val}"] = float(
                scm.correlation({m: val})[i, j])
            row[f"do {m}={val}"] = float(do(scm, **{m: val}).correlation()[i, j])
        out[kind] = row
    return out

