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

Explained in "Common causes, colliders and chains" (``book/causal_structures.md``)
and used in "Attribute dependencies through a classifier".
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from .utils import check_choice, check_int

__all__ = [
    "ATTRIBUTES", "STRUCTURES", "BinarySCM", "default_scm", "dag",
    "render", "SCMImages", "pc_discovery", "cpdag_matrix",
    "structural_hamming_distance", "draw_graph",
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
    """A structural causal model on binary variables, sampled and enumerated exactly; "Common causes, colliders and chains".

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
        """Column of attribute ``name``; "Common causes, colliders and chains"."""
        if name not in self.nodes:
            raise ValueError(f"name must be one of {self.nodes}, got {name!r}")
        return self.nodes.index(name)

    def edges(self) -> list:
        """The DAG's edges as (parent, child) pairs; "Common causes, colliders and chains"."""
        return [(p, v) for v in self.nodes for p in self.parents.get(v, ())]

    def adjacency(self) -> np.ndarray:
        """Adjacency matrix, ``adj[i, j] = 1`` for an edge i -> j; "Common causes, colliders and chains"."""
        adj = np.zeros((len(self.nodes),) * 2, dtype=int)
        for p, v in self.edges():
            adj[self.index(p), self.index(v)] = 1
        return adj

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Ancestral sampling of ``n`` label vectors (n, d) int64; "Common causes, colliders and chains"."""
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
        return out

    def joint(self) -> tuple[np.ndarray, np.ndarray]:
        """All 2^d states (2^d, d) and their exact probabilities; "Common causes, colliders and chains"."""
        d = len(self.nodes)
        states = np.array(list(itertools.product((0, 1), repeat=d)), dtype=int)
        prob = np.ones(len(states))
        for j, v in enumerate(self.nodes):
            pa = [self.index(p) for p in self.parents.get(v, ())]
            p1 = np.array([float(self.cpt[v][tuple(s[pa])]) for s in states])
            prob *= np.where(states[:, j] == 1, p1, 1.0 - p1)
        return states, prob

    def correlation(self, given: dict | None = None) -> np.ndarray:
        """Exact Pearson correlation of the labels, optionally given fixed values; "Common causes, colliders and chains".

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
        """Exact P(attribute = 1) for every attribute; "Common causes, colliders and chains"."""
        states, prob = self.joint()
        return prob @ states


def default_scm(strength: float = 0.85, collider_noise: float = 0.1) -> BinarySCM:
    """The book's nine-attribute SCM (common cause, collider, chain); "Common causes, colliders and chains".

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
    """The true DAG: nodes, edges, adjacency and the three triples; "Common causes, colliders and chains"."""
    scm = scm or default_scm()
    return {"nodes": list(scm.nodes), "edges": scm.edges(),
            "adjacency": scm.adjacency(), "structures": dict(STRUCTURES)}


_BG = torch.tensor([[0.12, 0.16, 0.40], [0.92, 0.80, 0.55]])   # C: cool / warm
_FG = torch.tensor([[0.15, 0.75, 0.25], [0.90, 0.15, 0.10]])   # B: green / red
_FRAME = torch.tensor([0.85, 0.25, 0.90])                       # Z: magenta
_MARK = torch.tensor([0.10, 0.95, 0.95])                        # M: cyan dot


def render(labels: torch.Tensor, size: int = 32,
           generator: torch.Generator | None = None,
           noise: float = 0.03) -> torch.Tensor:
    """Render label vectors (n, 9) as RGB images (n, 3, size, size) in [0, 1]; "Common causes, colliders and chains".

    C: background warm/cool; A: square/circle; B: red/green; X: large/small;
    Y: striped/plain; Z: magenta frame; P: object right/left; M: cyan
    marker dot; Q: object low/high. Position, size, colour and stripe phase
    are jittered and pixel noise of standard deviation ``noise`` is added.
    """
    size = check_int("size", size, minimum=8)
    if not torch.is_tensor(labels) or labels.ndim != 2 or \
            labels.shape[1] != len(ATTRIBUTES):
        raise ValueError(f"labels must be a (n, {len(ATTRIBUTES)}) tensor, got "
                         f"{getattr(labels, 'shape', type(labels))}")
    if not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError("labels must hold only 0 and 1")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    lab = labels.long()
    n = lab.shape[0]
    C, A, B, X, Y, Z, P, M, Q = lab.unbind(1)
    g = generator

    def jitter(scale, *shape):
        return (torch.rand(n, *shape, generator=g) * 2 - 1) * scale

    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    yy, xx = coords[None, :, None], coords[None, None, :]
    sharp = size * 1.5                      # soft edges about 2/3 pixel wide

    bg = _BG[C] + jitter(0.05, 3)
    img = bg[:, :, None, None].expand(n, 3, size, size).clone()

    cx = (0.36 + 0.28 * P.float() + jitter(0.03))[:, None, None]
    cy = (0.38 + 0.24 * Q.float() + jitter(0.03))[:, None, None]
    r = (0.17 + 0.11 * X.float() + jitter(0.015))[:, None, None]
    dx, dy = xx - cx, yy - cy
    sd_circle = r - torch.sqrt(dx ** 2 + dy ** 2)
    sd_square = r - torch.maximum(dx.abs(), dy.abs())
    sd = torch.where(A.bool()[:, None, None], sd_square, sd_circle)
    obj = torch.sigmoid(sd * sharp)[:, None]
    fg = (_FG[B] + jitter(0.05, 3))[:, :, None, None]
    phase = torch.rand(n, 1, 1, generator=g) * 2 * math.pi
    stripe = 0.5 + 0.5 * torch.sin(2 * math.pi * 5.0 * (xx + yy) + phase)
    shade = 1.0 - 0.6 * Y.float()[:, None, None] * torch.sigmoid(
        (stripe - 0.5) * 8.0)
    img = img * (1 - obj) + fg * shade[:, None] * obj

    w = 0.07
    edge = torch.minimum(torch.minimum(xx, 1 - xx), torch.minimum(yy, 1 - yy))
    frame = torch.sigmoid((w - edge) * sharp)[:, None] * Z.float()[:, None, None, None]
    img = img * (1 - frame) + _FRAME[None, :, None, None] * frame

    mr = 0.075
    md = mr - torch.sqrt((xx - 0.17) ** 2 + (yy - 0.83) ** 2)
    mark = torch.sigmoid(md * sharp)[None] * M.float()[:, None, None, None]
    img = img * (1 - mark) + _MARK[None, :, None, None] * mark

    if noise > 0:
        img = img + noise * torch.randn(img.shape, generator=g)
    return img.clamp(0.0, 1.0)


class SCMImages(Dataset):
    """A torch Dataset of rendered SCM images and their labels, deterministic from a seed; "Common causes, colliders and chains".

    ``ds[i]`` is ``(image (3, size, size) float32 in [0, 1], labels (9,) int64)``;
    ``ds.images`` and ``ds.labels`` hold everything at once.
    """

    def __init__(self, n: int, size: int = 32, seed: int = 0,
                 scm: BinarySCM | None = None, noise: float = 0.03):
        n = check_int("n", n, minimum=1)
        size = check_int("size", size, minimum=8)
        seed = check_int("seed", seed, minimum=0)
        self.scm = scm or default_scm()
        self.size, self.seed = size, seed
        g = torch.Generator().manual_seed(seed)
        self.labels = self.scm.sample(n, generator=g)
        chunks = [render(self.labels[i:i + 2048], size, generator=g, noise=noise)
                  for i in range(0, n, 2048)]
        self.images = torch.cat(chunks)
        self.attr_names = list(self.scm.nodes)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def pc_discovery(labels, names, alpha: float = 0.01, test: str = "gsq"):
    """causal-learn's PC on binary labels with a chi-square or G^2 test; "Common causes, colliders and chains".

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
    """The true DAG's CPDAG (Markov equivalence class) as an endpoint matrix; "Common causes, colliders and chains"."""
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
    """SHD between two endpoint matrices: missing, extra or differently marked edges; "Common causes, colliders and chains"."""
    est, truth = np.asarray(est), np.asarray(truth)
    if est.shape != truth.shape or est.ndim != 2:
        raise ValueError(f"est and truth must be square of one shape, got "
                         f"{est.shape} and {truth.shape}")
    d = est.shape[0]
    return int(sum((est[i, j], est[j, i]) != (truth[i, j], truth[j, i])
                   for i in range(d) for j in range(i + 1, d)))


def draw_graph(endpoints, names, ax=None, title=None, highlight=None):
    """Draw an endpoint-matrix graph (directed and undirected edges) with matplotlib; "Common causes, colliders and chains"."""
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
    nx.draw_networkx_labels(graph, pos, {i: n for i, n in enumerate(names)},
                            ax=ax, font_size=7)
    nx.draw_networkx_edges(graph, pos, edgelist=directed, ax=ax, arrows=True,
                           arrowsize=15, node_size=900)
    nx.draw_networkx_edges(graph, pos, edgelist=undirected, ax=ax, arrows=False,
                           style="dashed", node_size=900)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    return ax
