"""The hybrid sampler's study: u* on [0, tau], then a network or a null, on a grid of tau, with its bands and its rule.

``HYBRID_STUDY`` is the design fixed before the stored run
(``tools/run_hybrid.py``, ``results/hybrid_run.pt``); ``hybrid_study``
runs the sampler (``flowjac.engine.empirical_flow.hybrid_sample``) for
several continuations from the same states x_tau and keeps, per sample,
the distances that ``hybrid_bands`` turns into bootstrap bands;
``share_crossing`` gives u*'s collapse time with its interval, and
``hybrid_verdict`` reads both by the rule. Explained in
:ref:`sec_empirical_hybrid`.
"""
from __future__ import annotations

import math

import torch

from flowjac._checks import check_int
from flowjac.closedform.empirical import (_check_data, _check_x, optimal_velocity,
                                          posterior_weights)
from flowjac.engine.empirical_flow import _switch_plan
from flowjac.engine.ode import integrate

__all__ = ["HYBRID_STUDY", "hybrid_study", "crossing_time", "hybrid_bands",
           "share_crossing", "hybrid_verdict"]

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


def _two_nearest(x: torch.Tensor, data: torch.Tensor, batch: int = 1024):
    """Distances (n, 2) to the two nearest rows of data (as ``empirical.nearest_distances``) and the nearest's index."""
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
    segment runs once, exactly as
    ``flowjac.engine.empirical_flow.hybrid_sample`` runs it, and every
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
