"""Figures shared by chapters (matplotlib; imported lazily so the package does not need a display).

Explained where each is used: ``draw_graph`` in :ref:`sec_causal_structures`.
"""
from __future__ import annotations

import numpy as np

__all__ = ["draw_graph"]


def draw_graph(endpoints, names, ax=None, title=None, highlight=None):
    """Draw an endpoint-matrix graph (directed and undirected edges) with matplotlib; :ref:`sec_causal_structures`."""
    import matplotlib.pyplot as plt
    import networkx as nx

    G = np.asarray(endpoints)
    d = G.shape[0]
    if G.shape != (d, d) or len(names) != d:
        raise ValueError(f"endpoints must be ({len(names)}, {len(names)}) to "
                         f"match names, got {G.shape}")
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 4))
    graph = nx.DiGraph()
    graph.add_nodes_from(range(d))
    directed, undirected = [], []
    for i in range(d):
        for j in range(i + 1, d):
            a, b = G[i, j], G[j, i]
            if a == -1 and b == 1:
                directed.append((i, j))
            elif a == 1 and b == -1:
                directed.append((j, i))
            elif a != 0 or b != 0:
                undirected.append((i, j))
    pos = nx.circular_layout(graph)
    colours = ["#f4a261" if highlight and names[i] in highlight else "#a8dadc"
               for i in range(d)]
    nx.draw_networkx_nodes(graph, pos, ax=ax, node_color=colours, node_size=900)
    # labels outside the circle, beside their node, so long names
    # (``Y_striped``, ``Z_framed``) are not cut by the node or the axes
    label_pos = {i: 1.28 * np.asarray(p) for i, p in pos.items()}
    nx.draw_networkx_labels(graph, label_pos, {i: n for i, n in enumerate(names)},
                            ax=ax, font_size=9)
    nx.draw_networkx_edges(graph, pos, edgelist=directed, ax=ax, arrows=True,
                           arrowsize=15, node_size=900)
    nx.draw_networkx_edges(graph, pos, edgelist=undirected, ax=ax, arrows=False,
                           style="dashed", node_size=900)
    ax.set_xlim(-1.6, 1.6)
    ax.set_ylim(-1.45, 1.45)
    ax.set_aspect("equal")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    return ax
