"""The closed-form velocity of flow matching on an empirical data law.

With X_0 ~ N(0, I), X_1 drawn uniformly from n training points x^(i) and
X_t = (1 - t) X_0 + t X_1, the minimiser of the flow-matching loss is

    u*(x, t) = sum_i lam_i(x, t) (x^(i) - x) / (1 - t),
    lam = softmax_i(-||x - t x^(i)||^2 / (2 (1 - t)^2)).

Everything here is computed in float64 (whatever the input dtype) and
chunked over the data, so that n = 60,000 images of 784 pixels fit in a
few hundred MiB. Derived in the chapter :ref:`sec_empirical`
(``book/empirical.md``). Closed forms only: u* and its posterior weights,
nearest neighbours, the energy distance, the Gaussian null's exact
velocity, the memorisation measures, the target's cosines and a network's
distance to u*. Integrating u* is the engine's
(``flowjac.engine.empirical_flow``), training on it too
(``flowjac.engine.small_flows``: ``efm_loss``, ``fit_optimal``), and the
hybrid sampler's study is a pipeline (``flowjac.pipelines.hybrid``).
"""
from __future__ import annotations

import math

import torch

from flowjac._checks import check_finite, check_int

__all__ = [
    "optimal_velocity", "posterior_weights", "nearest_neighbours",
    "nearest_distances", "energy_distance", "gaussian_velocity",
    "memorisation", "target_cosines", "approximation_error",
]

_F64 = torch.float64
# Elements of the (B, chunk) logit block and of the (chunk, D) data block.
_CHUNK_BUDGET = 2 ** 23


def _check_data(data) -> torch.Tensor:
    if not torch.is_tensor(data):
        raise ValueError(f"data must be a torch tensor of shape (n, ...), "
                         f"got {type(data).__name__}")
    if data.ndim < 2:
        raise ValueError(f"data must have shape (n, ...) with at least 2 "
                         f"dimensions, got {tuple(data.shape)}")
    if data.shape[0] == 0:
        raise ValueError("data must hold at least one point, got n = 0")
    if not (data.is_floating_point() or data.dtype in
            (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)):
        raise ValueError(f"data must be a real tensor, got {data.dtype}")
    if data.is_floating_point():
        check_finite("data", data)
    return data


def _check_x(x, data: torch.Tensor, name: str = "x") -> torch.Tensor:
    if not torch.is_tensor(x):
        raise ValueError(f"{name} must be a torch tensor, "
                         f"got {type(x).__name__}")
    feat = tuple(data.shape[1:])
    if x.ndim != data.ndim or tuple(x.shape[1:]) != feat:
        dims = ", ".join(map(str, feat))
        raise ValueError(f"{name} must have shape (B, {dims})"
                         f" to match data {tuple(data.shape)}, "
                         f"got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got {x.dtype}")
    return check_finite(name, x)


def _check_time(t, batch: int, device) -> torch.Tensor:
    """t as a float64 (B,) tensor in [0, 1); scalar or per-row input."""
    if torch.is_tensor(t):
        tt = t.detach().to(device=device, dtype=_F64)
    else:
        try:
            tt = torch.tensor(float(t), dtype=_F64, device=device)
        except (TypeError, ValueError):
            raise ValueError(f"t must be a number or a tensor in [0, 1), "
                             f"got {t!r}") from None
    if tt.ndim == 0:
        tt = tt.expand(batch)
    elif tuple(tt.shape) != (batch,):
        raise ValueError(f"t must be a scalar or have shape ({batch},) (one "
                         f"time per row of x), got {tuple(tt.shape)}")
    if batch == 0:
        return tt
    if not torch.isfinite(tt).all():
        raise ValueError("t must be finite")
    lo, hi = float(tt.min()), float(tt.max())
    if lo < 0.0 or hi >= 1.0:
        raise ValueError(f"t must lie in [0, 1) (the empirical velocity is "
                         f"singular at t = 1), got values in "
                         f"[{lo:.10g}, {hi:.10g}]")
    return tt


def _chunk(chunk_size, n: int, batch: int, dim: int) -> int:
    if chunk_size is None:
        return max(1, min(n, _CHUNK_BUDGET // max(1, batch + dim)))
    return min(n, check_int("chunk_size", chunk_size, minimum=1))


def _centre(flat: torch.Tensor, chunk: int, device) -> torch.Tensor:
    total = torch.zeros(flat.shape[1], dtype=_F64, device=device)
    for i in range(0, flat.shape[0], chunk):
        total = total + flat[i:i + chunk].to(device=device, dtype=_F64).sum(0)
    return total / flat.shape[0]


def optimal_velocity(x, t, data, chunk_size=None) -> torch.Tensor:
    """Exact empirical flow-matching velocity u*(x, t); :ref:`sec_empirical`.

    ``x`` has shape (B, ...) and ``data`` shape (n, ...) with the same
    trailing shape; ``t`` is a scalar or a (B,) tensor in [0, 1). The
    softmax is an online log-sum-exp over data chunks of ``chunk_size``
    rows (None: about 8M elements per block). Distances use the matmul
    expansion on data centred at its mean, in float64; the result has
    x's dtype. Differentiable in ``x`` (reverse and forward mode).
    """
    data = _check_data(data)
    x = _check_x(x, data)
    batch, n = x.shape[0], data.shape[0]
    tt = _check_time(t, batch, x.device)
    flat = data.reshape(n, -1)
    dim = flat.shape[1]
    chunk = _chunk(chunk_size, n, batch, dim)
    if batch == 0:
        return torch.zeros_like(x)
    if not torch.isfinite(x).all():
        raise ValueError("x must be finite")
    centre = _centre(flat, chunk, x.device)
    xc = x.reshape(batch, dim).to(_F64) - centre          # x - c
    xs = xc + (1.0 - tt)[:, None] * centre                # x - t c
    one_m = 1.0 - tt
    a = (tt / one_m ** 2)[:, None]                        # t / (1-t)^2
    b = (0.5 * tt ** 2 / one_m ** 2)[:, None]             # t^2 / (2(1-t)^2)
    run_max = torch.full((batch, 1), -math.inf, dtype=_F64, device=x.device)
    run_sum = torch.zeros(batch, 1, dtype=_F64, device=x.device)
    acc = torch.zeros(batch, dim, dtype=_F64, device=x.device)
    for i in range(0, n, chunk):
        d = flat[i:i + chunk].to(device=x.device, dtype=_F64) - centre
        if not torch.isfinite(d).all():
            raise ValueError("data must be finite")
        # -||x - t x_i||^2 / (2(1-t)^2) up to a per-row constant.
        logits = a * (xs @ d.T) - b * (d * d).sum(1)[None, :]
        new_max = torch.maximum(run_max, logits.max(1, keepdim=True).values)
        scale = torch.exp(run_max - new_max)
        w = torch.exp(logits - new_max)
        run_sum = run_sum * scale + w.sum(1, keepdim=True)
        acc = acc * scale + w @ d
        run_max = new_max
    mean_c = acc / run_sum                                # E[X1 | x] - c
    v = (mean_c - xc) / one_m[:, None]
    return v.to(x.dtype).reshape(x.shape)


def posterior_weights(x, t, data) -> torch.Tensor:
    """The weights lam_i(x, t) = P(X1 = x^(i) | Xt = x), shape (B, n); :ref:`sec_empirical`.

    Not chunked (it returns all B x n weights); float64, computed with the
    same centred matmul expansion as ``optimal_velocity``.
    """
    data = _check_data(data)
    x = _check_x(x, data)
    batch, n = x.shape[0], data.shape[0]
    tt = _check_time(t, batch, x.device)
    flat = data.reshape(n, -1).to(device=x.device, dtype=_F64)
    centre = flat.mean(0)
    d = flat - centre
    xs = x.reshape(batch, -1).to(_F64) - tt[:, None] * centre
    one_m = (1.0 - tt)[:, None]
    logits = (tt[:, None] / one_m ** 2) * (xs @ d.T) - (
        0.5 * tt[:, None] ** 2 / one_m ** 2) * (d * d).sum(1)[None, :]
    return torch.softmax(logits, dim=1)


def nearest_neighbours(x, data, chunk_size=None):
    """Euclidean distance and index of each row's nearest data point; :ref:`sec_empirical`.

    Returns ``(dist, idx)`` of shape (B,). The search uses the matmul
    expansion in chunks; the winning distance is then recomputed directly,
    so that distances near 0 (memorised samples) are accurate.
    """
    data = _check_data(data)
    x = _check_x(x, data)
    batch, n = x.shape[0], data.shape[0]
    flat = data.reshape(n, -1)
    dim = flat.shape[1]
    chunk = _chunk(chunk_size, n, batch, dim)
    xf = x.detach().reshape(batch, dim).to(_F64)
    best = torch.full((batch,), math.inf, dtype=_F64, device=x.device)
    idx = torch.zeros(batch, dtype=torch.long, device=x.device)
    xn = (xf * xf).sum(1)
    for i in range(0, n, chunk):
        d = flat[i:i + chunk].to(device=x.device, dtype=_F64)
        sq = xn[:, None] - 2 * xf @ d.T + (d * d).sum(1)[None, :]
        val, arg = sq.min(1)
        better = val < best
        best = torch.where(better, val, best)
        idx = torch.where(better, arg + i, idx)
    winner = flat[idx.to(flat.device)].to(device=x.device, dtype=_F64)
    dist = (xf - winner).norm(dim=1)
    return dist, idx


def _mean_dist(a: torch.Tensor, b: torch.Tensor, same: bool,
               chunk: int = 1024) -> torch.Tensor:
    total = torch.zeros((), dtype=_F64, device=a.device)
    for i in range(0, a.shape[0], chunk):
        total = total + torch.cdist(a[i:i + chunk], b).sum()
    m, k = a.shape[0], b.shape[0]
    return total / (m * (m - 1) if same else m * k)


def energy_distance(a, b) -> float:
    """Squared energy distance 2E|A-B| - E|A-A'| - E|B-B'| (U-statistics); :ref:`sec_empirical`.

    ``a`` (m, ...) and ``b`` (k, ...) with equal trailing shapes and
    m, k >= 2. Zero in expectation when both are drawn from the same law.
    """
    for name, s in (("a", a), ("b", b)):
        if not torch.is_tensor(s) or s.ndim < 2 or s.shape[0] < 2:
            got = (tuple(s.shape) if torch.is_tensor(s)
                   else type(s).__name__)
            raise ValueError(f"{name} must be a tensor of shape (m, ...) "
                             f"with m >= 2 samples, got {got}")
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"a and b must share their trailing shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    a = a.detach().reshape(a.shape[0], -1).to(_F64)
    b = b.detach().reshape(b.shape[0], -1).to(device=a.device, dtype=_F64)
    ab = _mean_dist(a, b, same=False)
    aa = _mean_dist(a, a, same=True)
    bb = _mean_dist(b, b, same=True)
    return float(2 * ab - aa - bb)


def gaussian_velocity(data):
    """The exact velocity of the Gaussian with ``data``'s mean and covariance, as a callable (x, t); :ref:`sec_empirical_hybrid`.

    u(x, t) = m + (t S - (1-t) I)((1-t)^2 I + t^2 S)^{-1} (x - t m) with the
    sample mean m and covariance S (float64, one eigendecomposition). A
    flow that knows only two moments of the data and cannot copy a
    training point: the null of the hybrid sampler. Defined on [0, 1].
    """
    data = _check_data(data)
    if data.shape[0] < 2:
        raise ValueError(f"data must hold at least 2 points for a "
                         f"covariance, got n = {data.shape[0]}")
    flat = data.detach().reshape(data.shape[0], -1).to(_F64)
    if not torch.isfinite(flat).all():
        raise ValueError("data must be finite")
    mean = flat.mean(0)
    lam, q = torch.linalg.eigh(torch.cov(flat.T).reshape(flat.shape[1], -1))
    lam = lam.clamp_min(0.0)
    feat = tuple(data.shape[1:])

    def velocity(x, t):
        x = _check_x(x, data)
        tt = float(t)
        if not 0.0 <= tt <= 1.0:
            raise ValueError(f"t must lie in [0, 1], got {tt}")
        y = (x.detach().reshape(x.shape[0], -1).to(_F64)
             - tt * mean.to(x.device)) @ q.to(x.device)
        c = (tt * lam - (1 - tt)) / ((1 - tt) ** 2 + tt ** 2 * lam)
        out = mean.to(x.device) + (c.to(x.device) * y) @ q.T.to(x.device)
        return out.to(x.dtype).reshape(x.shape[0], *feat)

    return velocity


def memorisation(samples, train, heldout, radius=0.1) -> dict:
    """Copy measures of samples against a training set, with held-out data as the reference; :ref:`sec_empirical`.

    Returns ``nn_ratio`` (median distance of samples to their nearest
    training point over that of held-out points: 1 for new data, 0 for
    copies), ``copy_share`` (share of samples whose nearest training point
    is under a third of the second nearest) and ``near_share`` (share
    within ``radius`` times the held-out median distance), each with its
    held-out value (``heldout_copy_share``, ``heldout_near_share``).
    """
    try:
        radius = float(radius)
    except (TypeError, ValueError):
        raise ValueError(f"radius must be a positive number, got {radius!r}") from None
    if not radius > 0:
        raise ValueError(f"radius must be a positive number, got {radius}")
    train = _check_data(train)
    if train.shape[0] < 2:
        raise ValueError(f"train must hold at least 2 points (the copy "
                         f"criterion uses the second nearest), got "
                         f"n = {train.shape[0]}")
    out = {}
    dists = {}
    for name, x in (("samples", samples), ("heldout", heldout)):
        x = _check_x(x, train, name)
        if x.shape[0] == 0:
            raise ValueError(f"{name} must hold at least one row")
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} must be finite")
        dists[name] = nearest_distances(x, train, k=2, device=x.device,
                                        dtype=_F64)
    ds, dh = dists["samples"], dists["heldout"]
    scale = float(dh[:, 0].median())
    out["sample_nn"] = float(ds[:, 0].median())
    out["heldout_nn"] = scale
    out["nn_ratio"] = out["sample_nn"] / scale
    for key, d in (("", ds), ("heldout_", dh)):
        out[key + "copy_share"] = float((d[:, 0] < d[:, 1] / 3).double().mean())
        out[key + "near_share"] = float((d[:, 0] < radius * scale)
                                        .double().mean())
    return out


def target_cosines(data, t_list, n, generator=None):
    """cos(u*(x_t, t), x1 - x0) and the posterior weight of the true x1, for n training pairs per time; :ref:`sec_empirical`.

    x1 is drawn uniformly from ``data`` and x0 from N(0, I) with
    ``generator`` (CPU). Returns ``(cosines, weights)``: two lists with
    one (n,) float64 tensor per time in ``t_list``; ``weights`` holds
    lam_i(x_t, t) of the index i that made x_t (1: x_t names its x1).
    """
    data = _check_data(data)
    n = check_int("n", n, minimum=1)
    cos, lam_true = [], []
    for tq in t_list:
        _check_time(tq, 1, "cpu")
        pick = torch.randint(0, data.shape[0], (n,), generator=generator)
        p1 = data[pick.to(data.device)].to(_F64)
        p0 = torch.randn(p1.shape, generator=generator,
                         dtype=_F64).to(data.device)
        xt = (1 - tq) * p0 + tq * p1
        flat = data.reshape(data.shape[0], -1).to(_F64)
        cs, ws = [], []
        for i in range(0, n, 256):     # one weight block serves both
            lam = posterior_weights(xt[i:i + 256], tq, data)
            v = (lam @ flat - xt[i:i + 256].flatten(1)) / (1 - tq)
            cs.append(torch.nn.functional.cosine_similarity(
                v, (p1 - p0)[i:i + 256].flatten(1), dim=1).cpu())
            ws.append(lam.gather(1, pick[i:i + 256].to(lam.device)[:, None])
                      [:, 0].cpu())
        cos.append(torch.cat(cs))
        lam_true.append(torch.cat(ws))
    return cos, lam_true


def approximation_error(velocity, data, t_list, n, generator=None) -> list:
    """Relative error E||v(x_t, t) - u*||^2 / E||u*||^2 on training paths, per time; :ref:`sec_empirical`.

    x_t = (1 - t) x0 + t x1 with x1 from ``data`` and x0 ~ N(0, I);
    ``velocity(x, t)`` receives t as a (n,) tensor. Returns one float per
    time in ``t_list``.
    """
    data = _check_data(data)
    n = check_int("n", n, minimum=1)
    out = []
    for tq in t_list:
        _check_time(tq, 1, "cpu")
        pick = torch.randint(0, data.shape[0], (n,), generator=generator)
        x1 = data[pick.to(data.device)].float()
        x0 = torch.randn(x1.shape, generator=generator).to(data.device)
        xt = (1 - tq) * x0 + tq * x1
        ref = optimal_velocity(xt, tq, data).to(_F64)
        with torch.no_grad():
            got = velocity(xt, torch.full((n,), float(tq),
                                          device=data.device)).to(_F64)
        out.append(float((got - ref).pow(2).flatten(1).sum(1).mean()
                         / ref.pow(2).flatten(1).sum(1).mean()))
    return out


def nearest_distances(query: torch.Tensor, ref: torch.Tensor, k: int = 2,
                      device="cpu", dtype=None,
                      batch: int = 1024) -> torch.Tensor:
    """Distances (n, k) from each flattened row of ``query`` to its k nearest rows of ``ref``, ascending; :ref:`sec_mnist`.

    Computed in ``dtype`` on ``device`` (default float64 on the CPU,
    float32 on a GPU); returned as float64 on the CPU.
    """
    dev = torch.device(device)
    if dtype is None:
        dtype = torch.float64 if dev.type == "cpu" else torch.float32
    q = query.detach().reshape(query.shape[0], -1).to(dev, dtype)
    r = ref.detach().reshape(ref.shape[0], -1).to(dev, dtype)
    return torch.cat([torch.cdist(q[i:i + batch], r).topk(
        k, dim=1, largest=False).values.cpu().double()
        for i in range(0, q.shape[0], batch)])
