"""The closed-form velocity of flow matching on an empirical data law.

With X_0 ~ N(0, I), X_1 drawn uniformly from n training points x^(i) and
X_t = (1 - t) X_0 + t X_1, the minimiser of the flow-matching loss is

    u*(x, t) = sum_i lam_i(x, t) (x^(i) - x) / (1 - t),
    lam = softmax_i(-||x - t x^(i)||^2 / (2 (1 - t)^2)).

Everything here is computed in float64 (whatever the input dtype) and
chunked over the data, so that n = 60,000 images of 784 pixels fit in a
few hundred MiB. Derived in the chapter :ref:`sec_empirical`
(``book/empirical.md``).

Longer than 400 lines because the optimal velocity, its samplers and the
measurements of how a learned flow departs from it (memorisation,
approximation error, the hybrid sampler's study with its bootstrap bands
and the rule fixed before its run, :ref:`sec_empirical_hybrid`) read one
data set in one chunked way.
"""
from __future__ import annotations

import math

import torch

from flowjac._checks import check_finite, check_int

__all__ = [
    "optimal_velocity", "posterior_weights", "nearest_neighbours",
    "nearest_distances",
    "energy_distance", "hybrid_sample", "efm_loss", "empirical_sample",
    "gaussian_velocity", "memorisation", "target_cosines", "fit_optimal",
    "approximation_error", "hybrid_study", "crossing_time", "hybrid_bands",
    "share_crossing", "hybrid_verdict", "HYBRID_STUDY",
]

_F64 = torch.float64
# The hybrid sampler's study (book/empirical.md, tools/run_hybrid.py), fixed
# before the run that decides its verdict: a grid of spacing 0.05 on [0, 1],
# 500 latents per tau (the same at every tau), 1,000 training pairs per t for
# u*'s collapse, and the rule read by hybrid_verdict with its bootstrap.
HYBRID_STUDY = dict(
    taus=tuple(k / 20 for k in range(21)), n=500, n_pairs=1000, keep=4, seed=0,
    exact_tau=True,
    rule=dict(copy_at_least=0.5, null_below=0.2, weight_above=0.9,
              collapse_share=0.95, n_boot=1000, alpha=0.05))
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


def efm_loss(model, x0, x1, t) -> torch.Tensor:
    """Empirical flow matching: regress model(x_t, t) on u* of the minibatch; :ref:`sec_empirical`.

    ``x0`` and ``x1`` are (B, ...) noise and data, ``t`` is (B,) in [0, 1).
    The target is ``optimal_velocity(x_t, t, x1)``: the closed form for the
    empirical law of the minibatch, which contains the x1 that made x_t.
    Returns the mean squared error over all entries, the scale of
    ``flowjac.engine.train.cfm_loss``.
    """
    x1 = _check_data(x1)
    x0 = _check_x(x0, x1, "x0")
    if x0.shape[0] != x1.shape[0]:
        raise ValueError(f"x0 and x1 must have the same batch size, got "
                         f"{x0.shape[0]} and {x1.shape[0]}")
    tt = _check_time(t, x1.shape[0], x1.device)
    tb = tt.to(x1.dtype).reshape(-1, *([1] * (x1.ndim - 1)))
    xt = (1 - tb) * x0 + tb * x1
    with torch.no_grad():
        target = optimal_velocity(xt, tt, x1)
    pred = model(xt, tt.to(x1.dtype))
    return (pred - target).pow(2).mean()


def empirical_sample(x0, data, steps=20, decades=3, method="midpoint",
                     chunk_size=None) -> torch.Tensor:
    """Integrate u* from x0 to t = 1 on a grid refined geometrically towards 1; :ref:`sec_empirical`.

    The segments [0, 0.9], [0.9, 0.99], ..., [1 - 10^-decades, 1] get
    ``steps`` steps each, so that the stiff end of the path, where the
    weights collapse at the scale of the data's spacing, is resolved.
    ``method`` must never evaluate at t = 1: "euler" or "midpoint".
    """
    steps = check_int("steps", steps, minimum=1)
    decades = check_int("decades", decades, minimum=0)
    if method not in ("euler", "midpoint"):
        raise ValueError(f"method must be 'euler' or 'midpoint' (u* is "
                         f"singular at t = 1), got {method!r}")
    data = _check_data(data)
    x = _check_x(x0, data, "x0")
    from flowjac.engine.ode import integrate

    def u_star(z, t):
        return optimal_velocity(z, t, data, chunk_size)

    knots = [0.0] + [1.0 - 10.0 ** -k for k in range(1, decades + 1)] + [1.0]
    for lo, hi in zip(knots[:-1], knots[1:]):
        x = integrate(u_star, x, steps, method=method, t0=lo, t1=hi)
    return x


def _switch_plan(tau, steps, exact_tau):
    """(steps of u*, steps of the continuation, switch time) for one tau."""
    steps = check_int("steps", steps, minimum=1)
    try:
        tau = float(tau)
    except (TypeError, ValueError):
        raise ValueError(f"tau must be a number in [0, 1], got {tau!r}") from None
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must lie in [0, 1], got {tau}")
    if not exact_tau:
        n_emp = int(round(tau * steps))
        return n_emp, steps - n_emp, n_emp / steps
    # ceil, robust to tau * steps = 3.0000000000000004
    n_emp = math.ceil(round(tau * steps, 9))
    n_model = math.ceil(round((1.0 - tau) * steps, 9))
    return n_emp, n_model, tau


def hybrid_sample(velocity, x0, data, tau, steps, method="midpoint",
                  chunk_size=None, exact_tau=False) -> torch.Tensor:
    """Follow u* on [0, tau], then ``velocity`` on [tau, 1]; :ref:`sec_empirical`.

    ``steps`` is the number of grid steps on [0, 1]; round(tau * steps) of
    them follow u*. With ``exact_tau`` the switch is at tau itself:
    ceil(tau * steps) equal steps of u* on [0, tau] and
    ceil((1 - tau) * steps) of ``velocity`` on [tau, 1], none longer than
    1 / steps (so tau = 0 is the flow's own sampler). ``velocity(x, t)``
    may be None when no model segment is left. As u* is undefined at
    t = 1, a segment of u* that ends at 1 needs a method that never
    evaluates there: "euler" or "midpoint".
    """
    n_emp, n_model, t_switch = _switch_plan(tau, steps, exact_tau)
    if velocity is None and n_model > 0:
        raise ValueError("velocity must be a callable velocity(x, t) unless "
                         "tau rounds to 1 (no model segment)")
    if n_model == 0 and method not in ("euler", "midpoint"):
        raise ValueError(f"method must be 'euler' or 'midpoint' when u* is "
                         f"followed up to t = 1 (u* is singular there), "
                         f"got {method!r}")
    data = _check_data(data)
    x = _check_x(x0, data, "x0")
    from flowjac.engine.ode import integrate

    if n_emp > 0:
        def u_star(z, t):
            return optimal_velocity(z, t, data, chunk_size)
        x = integrate(u_star, x, n_emp, method=method, t0=0.0, t1=t_switch)
    if n_model > 0:
        x = integrate(velocity, x, n_model, method=method,
                      t0=t_switch, t1=1.0)
    return x


def gaussian_velocity(data):
    """The exact velocity of the Gaussian with ``data``'s mean and covariance, as a callable (x, t); :ref:`sec_empirical`.

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


def fit_optimal(model, data, steps, batch_size=256, lr=2e-3, seed=0):
    """Train ``model(x, t)`` by regression on u* of the whole data set (the capacity study); :ref:`sec_empirical`.

    Each step draws x1 from ``data``, x0 ~ N(0, I), t ~ U(0, 1) and
    minimises the mean squared error to ``optimal_velocity(x_t, t, data)``.
    Returns the list of losses.
    """
    data = _check_data(data)
    steps = check_int("steps", steps, minimum=1)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    g = torch.Generator().manual_seed(check_int("seed", seed, minimum=0))
    dev = data.device
    x1s = data.float()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        x1 = x1s[torch.randint(0, data.shape[0], (batch_size,),
                               generator=g).to(dev)]
        x0 = torch.randn(x1.shape, generator=g).to(dev)
        t = torch.rand(batch_size, generator=g).to(dev)
        tb = t.reshape(-1, *([1] * (x1.ndim - 1)))
        xt = (1 - tb) * x0 + tb * x1
        with torch.no_grad():
            target = optimal_velocity(xt, t.double(), data)
        loss = (model(xt, t) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


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


def _two_nearest(x: torch.Tensor, data: torch.Tensor, batch: int = 1024):
    """Distances (n, 2) to the two nearest rows of data (as nearest_distances) and the nearest's index."""
    q = x.detach().reshape(x.shape[0], -1).to(_F64)
    r = data.detach().reshape(data.shape[0], -1).to(device=q.device, dtype=_F64)
    dist, idx = [], []
    for i in range(0, q.shape[0], batch):
        top = torch.cdist(q[i:i + batch], r).topk(2, dim=1, largest=False)
        dist.append(top.values.cpu())
        idx.append(top.indices[:, 0].cpu())
    return torch.cat(dist), torch.cat(idx)


def hybrid_study(continuations: dict, x0, data, heldout, taus, steps,
                 method="midpoint", exact_tau=True, keep=4,
                 chunk_size=None) -> dict:
    """The hybrid sampler on a grid of tau for several continuations, kept per sample; :ref:`sec_empirical_hybrid`.

    ``continuations`` maps names to ``velocity(x, t)``. At each tau the u*
    segment runs once, exactly as ``hybrid_sample`` runs it, and every
    continuation finishes from that state x_tau. Returns ``names``,
    ``taus``; ``d1``, ``d2`` (C, T, n): each end's distance to its nearest
    and second-nearest training point (float64, as ``memorisation``
    measures them) and ``idx`` the nearest's index; ``heldout_d1``,
    ``heldout_d2`` (m,); ``named_weight`` and ``named_idx`` (T, n): the
    largest posterior weight lam_i(x_tau, tau) and its index (at tau = 1,
    1 and the nearest training point); ``ends`` (C, T, keep, ...): the ends
    of the first ``keep`` latents in float32. Call it under
    ``torch.no_grad()`` for networks.
    """
    if not isinstance(continuations, dict) or not continuations:
        raise ValueError("continuations must be a non-empty dict {name: "
                         "velocity(x, t)}")
    for name, vel in continuations.items():
        if not callable(vel):
            raise ValueError(f"continuations[{name!r}] must be callable "
                             f"velocity(x, t), got {type(vel).__name__}")
    data = _check_data(data)
    x = _check_x(x0, data, "x0")
    held = _check_x(heldout, data, "heldout")
    keep = check_int("keep", keep, minimum=0)
    taus = [float(tq) for tq in taus]
    if not taus:
        raise ValueError("taus must hold at least one time in [0, 1]")
    plans = [_switch_plan(tq, steps, exact_tau) for tq in taus]
    if any(nm == 0 for _, nm, _ in plans) and method not in ("euler", "midpoint"):
        raise ValueError(f"method must be 'euler' or 'midpoint' when u* is "
                         f"followed up to t = 1 (u* is singular there), "
                         f"got {method!r}")
    from flowjac.engine.ode import integrate

    def u_star(z, t):
        return optimal_velocity(z, t, data, chunk_size)

    names = list(continuations)
    n_c, n_t, n = len(names), len(taus), x.shape[0]
    d1 = torch.zeros(n_c, n_t, n, dtype=_F64)
    d2 = torch.zeros(n_c, n_t, n, dtype=_F64)
    idx = torch.zeros(n_c, n_t, n, dtype=torch.long)
    named_w = torch.zeros(n_t, n, dtype=_F64)
    named_i = torch.zeros(n_t, n, dtype=torch.long)
    ends = torch.zeros(n_c, n_t, min(keep, n), *x.shape[1:])
    for k, (n_emp, n_model, t_switch) in enumerate(plans):
        xt = (integrate(u_star, x, n_emp, method=method, t0=0.0, t1=t_switch)
              if n_emp > 0 else x)
        if n_model > 0:
            for i in range(0, n, 256):
                lam = posterior_weights(xt[i:i + 256], t_switch, data)
                w, j = lam.max(1)
                named_w[k, i:i + 256], named_i[k, i:i + 256] = w.cpu(), j.cpu()
        else:
            named_w[k] = 1.0
            named_i[k] = _two_nearest(xt, data)[1]
        for c, name in enumerate(names):
            end = (integrate(continuations[name], xt, n_model, method=method,
                             t0=t_switch, t1=1.0) if n_model > 0 else xt)
            dd, ii = _two_nearest(end, data)
            d1[c, k], d2[c, k], idx[c, k] = dd[:, 0], dd[:, 1], ii
            ends[c, k] = end[:keep].detach().float().cpu()
    dh, _ = _two_nearest(held, data)
    return {"names": names, "taus": taus, "d1": d1, "d2": d2, "idx": idx,
            "heldout_d1": dh[:, 0], "heldout_d2": dh[:, 1],
            "named_weight": named_w, "named_idx": named_i, "ends": ends}


def crossing_time(grid, values, level=0.5) -> torch.Tensor:
    """The first upward crossing of ``level`` by a curve on ``grid``, by linear interpolation; :ref:`sec_empirical_hybrid`.

    ``values`` has shape (..., T) for the T points of ``grid``
    (increasing). Returns, per curve, the grid's first time if the curve
    starts at or above ``level``, NaN if it never reaches it, else the
    interpolated time between the last point below and the first at or
    above it.
    """
    g = torch.as_tensor(grid, dtype=_F64)
    v = torch.as_tensor(values, dtype=_F64)
    if g.ndim != 1 or v.ndim < 1 or v.shape[-1] != g.shape[0] or g.numel() < 1:
        raise ValueError(f"values must have shape (..., {g.numel()}) to match "
                         f"grid, got {tuple(v.shape)}")
    if g.numel() > 1 and not bool((g[1:] > g[:-1]).all()):
        raise ValueError("grid must be strictly increasing")
    level = float(level)
    above = v >= level
    if g.numel() == 1:
        return torch.where(above[..., 0], g[0], torch.tensor(math.nan, dtype=_F64))
    first = torch.where(above.any(-1), above.double().argmax(-1),
                        torch.full(v.shape[:-1], -1))
    out = torch.full(v.shape[:-1], math.nan, dtype=_F64)
    out = torch.where(first == 0, g[0], out)
    k = first.clamp_min(1)
    lo_v = v.gather(-1, (k - 1)[..., None])[..., 0]
    hi_v = v.gather(-1, k[..., None])[..., 0]
    frac = (level - lo_v) / (hi_v - lo_v)
    interp = g[k - 1] + frac * (g[k] - g[k - 1])
    return torch.where(first > 0, interp, out)


def _quantiles(reps: torch.Tensor, alpha: float):
    q = torch.tensor([alpha / 2, 1 - alpha / 2], dtype=_F64)
    out = torch.nanquantile(reps, q, dim=0)
    return out[0], out[1]


def hybrid_bands(study: dict, n_boot=1000, alpha=0.05, seed=0,
                 network="network", level=0.5) -> dict:
    """Bootstrap bands of a ``hybrid_study``: copy share and NN ratio per continuation and tau, and tau_50; :ref:`sec_empirical_hybrid`.

    Latents are resampled with replacement, the same indices for every
    tau and continuation (so each resample is a whole curve), and the
    held-out points independently. The copy share is the share of ends
    whose nearest training point is under a third of the second nearest,
    the NN ratio the median nearest distance over the held-out median (as
    ``memorisation``). tau_50 is where ``network``'s copy share first
    crosses ``level`` (``crossing_time``) on each resample. Returns
    estimates (C, T), percentile bounds ``*_lo``, ``*_hi`` at 1 - alpha
    and ``tau50`` as (estimate, low, high).
    """
    n_boot = check_int("n_boot", n_boot, minimum=2)
    if not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")
    if network not in study["names"]:
        raise ValueError(f"network must be one of {study['names']}, "
                         f"got {network!r}")
    d1, d2, dh = study["d1"].double(), study["d2"].double(), study["heldout_d1"].double()
    copies = (d1 < d2 / 3).double()
    n, m = d1.shape[-1], dh.shape[0]
    g = torch.Generator().manual_seed(check_int("seed", seed, minimum=0))
    copy_reps, nn_reps = [], []
    for _ in range(n_boot):
        i = torch.randint(0, n, (n,), generator=g)
        j = torch.randint(0, m, (m,), generator=g)
        copy_reps.append(copies[..., i].mean(-1))
        nn_reps.append(d1[..., i].median(-1).values / dh[j].median())
    copy_reps, nn_reps = torch.stack(copy_reps), torch.stack(nn_reps)
    c = study["names"].index(network)
    copy = copies.mean(-1)
    out = {"names": list(study["names"]), "taus": list(study["taus"]),
           "copy": copy, "nn": d1.median(-1).values / dh.median(),
           "n": n, "n_heldout": m, "n_boot": n_boot, "alpha": float(alpha)}
    out["copy_lo"], out["copy_hi"] = _quantiles(copy_reps, alpha)
    out["nn_lo"], out["nn_hi"] = _quantiles(nn_reps, alpha)
    t50 = crossing_time(study["taus"], copy_reps[:, c], level)
    lo, hi = _quantiles(t50[:, None], alpha)
    out["tau50"] = (float(crossing_time(study["taus"], copy[c], level)),
                    float(lo[0]), float(hi[0]))
    return out


def share_crossing(flags, grid, level, n_boot=1000, alpha=0.05, seed=0) -> dict:
    """Share of true flags per time and where it first crosses ``level``, with bootstrap intervals; :ref:`sec_empirical_hybrid`.

    ``flags`` (T, n) holds n independent draws per time of ``grid`` (each
    row resampled on its own), e.g. the posterior weight on the true x1
    above 0.9 (``target_cosines``). Returns ``share`` (T,) with ``lo``,
    ``hi`` and ``crossing`` = (estimate, low, high) of ``crossing_time``.
    """
    f = torch.as_tensor(flags).double()
    if f.ndim != 2 or f.shape[0] != len(grid) or f.shape[1] < 2:
        raise ValueError(f"flags must have shape ({len(grid)}, n) with n >= 2, "
                         f"got {tuple(f.shape)}")
    n_boot = check_int("n_boot", n_boot, minimum=2)
    g = torch.Generator().manual_seed(check_int("seed", seed, minimum=0))
    n_t, n = f.shape
    reps = torch.stack([f.gather(1, torch.randint(0, n, (n_t, n), generator=g))
                        .mean(1) for _ in range(n_boot)])
    share = f.mean(1)
    lo, hi = _quantiles(reps, alpha)
    c_lo, c_hi = _quantiles(crossing_time(grid, reps, level)[:, None], alpha)
    return {"share": share, "lo": lo, "hi": hi,
            "crossing": (float(crossing_time(grid, share, level)),
                         float(c_lo[0]), float(c_hi[0]))}


def hybrid_verdict(bands: dict, collapse, copy_at_least=0.5, null_below=0.2,
                   network="network") -> dict:
    """The hybrid sampler's rule, fixed before the run that decides it; :ref:`sec_empirical_hybrid`.

    ``bands`` from ``hybrid_bands``; ``collapse`` = (estimate, low, high) of
    the time from which u* names the true training point on 95% of paths.
    A tau < 1 is in the *window* when the network's copy-share interval
    lies wholly at or above ``copy_at_least`` and every other
    continuation's wholly below ``null_below`` (the network finishes paths
    that a continuation knowing nothing of the training set does not);
    *outside* when the network's lies wholly below or a null's wholly at or
    above; else *undecided*. Timing: *early* when tau_50's interval ends at
    or before the collapse interval begins (the network copies as soon as
    u* has named the training point, so only its departure before that
    keeps it from copying), *late* when it begins after the collapse
    interval ends, else undecided. The claim fails if it is late or every
    tau is outside the window, holds if the window is not empty and it is
    early, and is inconclusive otherwise.
    """
    names, taus = bands["names"], bands["taus"]
    if network not in names:
        raise ValueError(f"network must be one of {names}, got {network!r}")
    c = names.index(network)
    nulls = [k for k in range(len(names)) if k != c]
    lo, hi = bands["copy_lo"], bands["copy_hi"]
    window, outside, undecided = [], [], []
    for k, tq in enumerate(taus):
        if tq >= 1.0:
            continue
        if lo[c, k] >= copy_at_least and all(hi[j, k] < null_below for j in nulls):
            window.append(tq)
        elif hi[c, k] < copy_at_least or any(lo[j, k] >= null_below for j in nulls):
            outside.append(tq)
        else:
            undecided.append(tq)
    _, t_lo, t_hi = bands["tau50"]
    _, c_lo, c_hi = (float(v) for v in collapse)
    timing = ("early" if t_hi <= c_lo else "late" if t_lo > c_hi
              else "undecided")
    if timing == "late" or not (window or undecided):
        verdict = "fails"
    elif window and timing == "early":
        verdict = "holds"
    else:
        verdict = "inconclusive"
    return {"window": window, "outside": outside, "undecided": undecided,
            "timing": timing, "verdict": verdict}


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
