"""Causal discovery on binary labels: the PC algorithm, CPDAGs and the structural Hamming distance.

PC is causal-learn's; this module adapts its input and output and scores the
estimate against the true DAG. Explained in :ref:`sec_causal_structures` (``book/causal_structures.md``).
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["pc_discovery", "cpdag_matrix", "structural_hamming_distance"]


def pc_discovery(labels, names, alpha: float = 0.01, test: str = "gsq"):
    """causal-learn's PC on binary labels with a chi-square or G^2 test; :ref:`sec_causal_structures`.

    Returns the estimated CPDAG as causal-learn's endpoint matrix
    (``G[i, j] = -1, G[j, i] = 1`` for i -> j; both -1 for i - j).
    """
    from causallearn.search.ConstraintBased.PC import pc

    if test not in ("chisq", "gsq"):
        raise ValueError(f"test must be 'chisq' or 'gsq', got {test!r}")
    if not (0.0 < alpha < 1.0):
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    data = np.asarray(labels.cpu() if torch.is_tensor(labels) else labels)
    if data.ndim != 2 or data.shape[1] != len(names):
        raise ValueError(f"labels must be (n, {len(names)}) to match names, "
                         f"got {data.shape}")
    cg = pc(data.astype(float), alpha, test, stable=True, show_progress=False,
            node_names=list(names))
    return np.asarray(cg.G.graph, dtype=int)


def cpdag_matrix(adjacency) -> np.ndarray:
    """The true DAG's CPDAG (Markov equivalence class) as an endpoint matrix; :ref:`sec_causal_structures`."""
    from causallearn.graph.Dag import Dag
    from causallearn.graph.GraphNode import GraphNode
    from causallearn.utils.DAG2CPDAG import dag2cpdag

    adj = np.asarray(adjacency)
    if adj.ndim != 2 or adj.shape[0] != adj.shape[1]:
        raise ValueError(f"adjacency must be square, got shape {adj.shape}")
    nodes = [GraphNode(f"X{i + 1}") for i in range(adj.shape[0])]
    g = Dag(nodes)
    for i, j in zip(*np.nonzero(adj)):
        g.add_directed_edge(nodes[i], nodes[j])
    return np.asarray(dag2cpdag(g).graph, dtype=int)


def structural_hamming_distance(est, truth) -> int:
    """SHD between two endpoint matrices: missing, extra or differently marked edges; :ref:`sec_causal_structures`."""
    est, truth = np.asarray(est), np.asarray(truth)
    if est.shape != truth.shape or est.ndim != 2:
        raise ValueError(f"est and truth must be square of one shape, got "
                         f"{est.shape} and {truth.shape}")
    d = est.shape[0]
    return int(sum((est[i, j], est[j, i]) != (truth[i, j], truth[j, i])
                   for i in range(d) for j in range(i + 1, d)))
