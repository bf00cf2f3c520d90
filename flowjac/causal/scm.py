"""A generated image dataset whose attributes follow a known causal graph.

Nine binary attributes are drawn from an explicit structural causal model
(SCM) on a DAG with three textbook triples:

- a common cause ``C -> A``, ``C -> B`` (the paper's Heavy_Makeup -> Pointy_Nose,
  Rosy_Cheeks);
- a collider ``X -> Z <- Y`` (Berkson's paradox when conditioning on Z);
- a chain ``P -> M -> Q``.

Each attribute changes something visible in a rendered RGB image (background
colour, shape, colour, size, texture, frame, position, a marker), with noise
so that images vary within one attribute configuration. With nine binary
attributes the joint has 512 states, so every ground-truth (conditional)
correlation is computed exactly by enumeration.

Explained in :ref:`sec_causal_structures` (``book/causal_structures.md``)
and used in :ref:`sec_attributes`.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from flowjac._checks import check_int

__all__ = [
    "ATTRIBUTES", "STRUCTURES", "BinarySCM", "default_scm", "dag",
]

ATTRIBUTES = ("C_warm", "A_square", "B_red", "X_large", "Y_striped",
              "Z_framed", "P_right", "M_marker", "Q_low")

# Each triple: (kind, endpoint, endpoint, middle node we condition on).
STRUCTURES = {
    "common cause": ("A_square", "B_red", "C_warm"),
    "collider": ("X_large", "Y_striped", "Z_framed"),
    "chain": ("P_right", "Q_low", "M_marker"),
}


@dataclass
class BinarySCM:
    """A structural causal model on binary variables, sampled and enumerated exactly; :ref:`sec_causal_structures`.

    ``parents[name]`` lists the parents of ``name``; ``cpt[name]`` maps each
    tuple of parent values (in the order of ``parents[name]``) to
    P(name = 1 | parents). ``nodes`` must be in a topological order.
    """

    nodes: tuple
    parents: dict
    cpt: dict

    def __post_init__(self):
        self.nodes = tuple(self.nodes)
        if len(set(self.nodes)) != len(self.nodes) or not self.nodes:
            raise ValueError(f"nodes must be distinct and non-empty, got {self.nodes}")
        seen = set()
        for v in self.nodes:
            pa = tuple(self.parents.get(v, ()))
            bad = [p for p in pa if p not in seen]
            if bad:
                raise ValueError(f"nodes must be in topological order: parents "
                                 f"{bad} of {v!r} come later or are unknown")
            table = self.cpt.get(v)
            if table is None:
                raise ValueError(f"cpt lacks an entry for {v!r}")
            for key in itertools.product((0, 1), repeat=len(pa)):
                p = table.get(key)
                if p is None or not (0.0 <= float(p) <= 1.0):
                    raise ValueError(f"cpt[{v!r}][{key}] must be a probability "
                                     f"in [0, 1], got {p!r}")
            seen.add(v)

    def index(self, name: str) -> int:
        """Column of attribute ``name``; :ref:`sec_causal_structures`."""
        if name not in self.nodes:
            raise ValueError(f"name must be one of {self.nodes}, got {name!r}")
        return self.nodes.index(name)

    def edges(self) -> list:
        """The DAG's edges as (parent, child) pairs; :ref:`sec_causal_structures`."""
        return [(p, v) for v in self.nodes for p in self.parents.get(v, ())]

    def adjacency(self) -> np.ndarray:
        """Adjacency matrix, ``adj[i, j] = 1`` for an edge i -> j; :ref:`sec_causal_structures`."""
        adj = np.zeros((len(self.nodes),) * 2, dtype=int)
        for p, v in self.edges():
            adj[self.index(p), self.index(v)] = 1
        return adj

    def sample(self, n: int, generator: torch.Generator | None = None,
               return_noise: bool = False):
        """Ancestral sampling of ``n`` label vectors (n, d) int64; :ref:`sec_causal_structures`.

        Mechanism j is X_j = 1[U_j < P(X_j = 1 | parents)] with exogenous
        noise U_j ~ Uniform(0, 1); ``return_noise=True`` also returns U
        (n, d) float64 (:ref:`sec_interventions`).
        """
        n = check_int("n", n, minimum=1)
        u = torch.rand(n, len(self.nodes), generator=generator,
                       dtype=torch.float64)
        out = torch.zeros(n, len(self.nodes), dtype=torch.int64)
        for j, v in enumerate(self.nodes):
            pa = [self.index(p) for p in self.parents.get(v, ())]
            prob = torch.zeros(n, dtype=torch.float64)
            for key, p in self.cpt[v].items():
                hit = torch.ones(n, dtype=torch.bool)
                for col, val in zip(pa, key):
                    hit &= out[:, col] == val
                prob[hit] = float(p)
            out[:, j] = (u[:, j] < prob).long()
        return (out, u) if return_noise else out

    def do(self, **values) -> "BinarySCM":
        """The mutilated SCM under do(name=value, ...); :ref:`sec_interventions`."""
        from flowjac.causal.label_interventions import do

        return do(self, **values)

    def joint(self) -> tuple[np.ndarray, np.ndarray]:
        """All 2^d states (2^d, d) and their exact probabilities; :ref:`sec_causal_structures`."""
        d = len(self.nodes)
        states = np.array(list(itertools.product((0, 1), repeat=d)), dtype=int)
        prob = np.ones(len(states))
        for j, v in enumerate(self.nodes):
            pa = [self.index(p) for p in self.parents.get(v, ())]
            p1 = np.array([float(self.cpt[v][tuple(s[pa])]) for s in states])
            prob *= np.where(states[:, j] == 1, p1, 1.0 - p1)
        return states, prob

    def correlation(self, given: dict | None = None) -> np.ndarray:
        """Exact Pearson correlation of the labels, optionally given fixed values; :ref:`sec_causal_structures`.

        ``given`` maps attribute names to 0 or 1, e.g. ``{"C_warm": 1}``:
        the correlation under P(. | given), i.e. conditioning, not do().
        A constant attribute gets NaN correlations.
        """
        states, prob = self.joint()
        for name, val in (given or {}).items():
            if val not in (0, 1):
                raise ValueError(f"given[{name!r}] must be 0 or 1, got {val!r}")
            prob = prob * (states[:, self.index(name)] == val)
        total = prob.sum()
        if total <= 0:
            raise ValueError(f"given={given} has probability zero")
        prob = prob / total
        mean = prob @ states
        centred = states - mean
        cov = (centred * prob[:, None]).T @ centred
        sd = np.sqrt(np.diag(cov))
        with np.errstate(invalid="ignore", divide="ignore"):
            return cov / np.outer(sd, sd)

    def marginals(self) -> np.ndarray:
        """Exact P(attribute = 1) for every attribute; :ref:`sec_causal_structures`."""
        states, prob = self.joint()
        return prob @ states


def default_scm(strength: float = 0.85, collider_noise: float = 0.1) -> BinarySCM:
    """The book's nine-attribute SCM (common cause, collider, chain); :ref:`sec_causal_structures`.

    Roots are fair coins. An edge copies its parent with probability
    ``strength`` (else flips it). The collider is a noisy OR:
    P(Z=1 | X, Y) = ``collider_noise`` if X = Y = 0, 0.8 if exactly one is 1,
    0.95 if both are.
    """
    if not (0.5 < strength < 1.0):
        raise ValueError(f"strength must lie in (0.5, 1), got {strength}")
    if not (0.0 <= collider_noise < 0.8):
        raise ValueError(f"collider_noise must lie in [0, 0.8), got {collider_noise}")
    s = float(strength)
    copy = {(0,): 1.0 - s, (1,): s}
    coin = {(): 0.5}
    parents = {"C_warm": (), "A_square": ("C_warm",), "B_red": ("C_warm",),
               "X_large": (), "Y_striped": (), "Z_framed": ("X_large", "Y_striped"),
               "P_right": (), "M_marker": ("P_right",), "Q_low": ("M_marker",)}
    cpt = {"C_warm": coin, "A_square": copy, "B_red": copy,
           "X_large": coin, "Y_striped": coin,
           "Z_framed": {(0, 0): collider_noise, (1, 0): 0.8, (0, 1): 0.8,
                        (1, 1): 0.95},
           "P_right": coin, "M_marker": copy, "Q_low": copy}
    return BinarySCM(ATTRIBUTES, parents, cpt)


def dag(scm: BinarySCM | None = None) -> dict:
    """The true DAG: nodes, edges, adjacency and the three triples; :ref:`sec_causal_structures`."""
    scm = scm or default_scm()
    return {"nodes": list(scm.nodes), "edges": scm.edges(),
            "adjacency": scm.adjacency(), "structures": dict(STRUCTURES)}


