"""Figures shared by chapters (matplotlib; imported lazily so the package does not need a display).

Explained where each is used: ``draw_graph`` in :ref:`sec_causal_structures`,
``save_image_grid`` (what ``flowjac sample --out FILE.png`` writes) in
:ref:`sec_running_at_scale`, ``image_rows`` in :ref:`sec_byom_live`.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["draw_graph", "save_image_grid", "image_rows"]


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


def save_image_grid(path, x) -> None:
    """Write images (N, C, H, W) of pixels in [0, 1] (clamped) as one PNG grid, atomically; :ref:`sec_running_at_scale`.

    The images sit in rows of ceil(sqrt(N)), one white pixel between them;
    one channel is drawn in grey. Raises ValueError for samples that are
    not images (not 4-dimensional).
    """
    import io

    import matplotlib.image
    import torch

    from flowjac.base import atomic_write_bytes

    if x.ndim != 4:
        raise ValueError(f"out as .png needs image samples, got shape "
                         f"{tuple(x.shape[1:])}; write a .pt file instead")
    x = x.clamp(0, 1)
    n, c, h, w = x.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = torch.ones(c, rows * (h + 1) + 1, cols * (w + 1) + 1)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[:, 1 + r * (h + 1):1 + r * (h + 1) + h,
             1 + q * (w + 1):1 + q * (w + 1) + w] = x[i]
    img = grid.permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    # matplotlib.image.imsave is what pyplot.imsave calls, without pyplot
    # and so without choosing a backend for the caller
    matplotlib.image.imsave(buf, img[..., 0] if c == 1 else img,
                            cmap="gray" if c == 1 else None, vmin=0, vmax=1,
                            format="png")
    atomic_write_bytes(path, buf.getvalue())


def image_rows(rows: dict, n: int = 10, size: float = 0.8):
    """A figure of one row of ``n`` grey images per entry of ``rows`` (``{title: (N, 1, H, W) in [0, 1]}``, white 0), each row labelled by its title; :ref:`sec_byom_live`."""
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("rows must hold at least one row of images")
    for title, imgs in rows.items():
        if getattr(imgs, "ndim", 0) != 4 or imgs.shape[0] < n:
            raise ValueError(f"rows[{title!r}] must be at least {n} images (N, 1, H, W), "
                             f"got shape {tuple(getattr(imgs, 'shape', ()))}")
    fig, axes = plt.subplots(len(rows), n, figsize=(size * n, 0.9 * size * len(rows) + 0.3),
                             squeeze=False)
    for r, (title, imgs) in enumerate(rows.items()):
        for c in range(n):
            axes[r, c].imshow(imgs[c, 0].detach().cpu().numpy(), cmap="gray_r", vmin=0, vmax=1)
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(title.replace(" ", "\n", 1), fontsize=7)
    fig.tight_layout()
    return fig
