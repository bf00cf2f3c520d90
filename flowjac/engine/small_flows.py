"""Small flows trained with CFM or EFM, networks trained on u* itself, and the memorisation rule.

The empirical chapter asks whether regressing on the closed form u*
(empirical flow matching, EFM: ``efm_loss``) makes a network copy its
training points where regressing on x1 - x0 (CFM) does not. ``fit_flow``
trains a given network with either target on the same minibatches,
``train_and_sample`` adds its samples, ``two_moons`` is the chapter's 2D
law, ``memorises`` is the chapter's criterion for one flow and
``copy_verdict`` reads a study of several capacities and seeds by the rule
fixed before it ran. ``fit_optimal`` regresses a network on u* of the
whole training set (the capacity study). Explained in
:ref:`sec_empirical_efm` and :ref:`sec_empirical_capacity`.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from flowjac._checks import check_choice, check_int, check_number
from flowjac.closedform.empirical import _check_data, _check_time, _check_x, optimal_velocity
from flowjac.engine.ode import integrate
from flowjac.engine.train import cfm_loss
from flowjac.engine.velocity import velocity_fn

__all__ = ["TARGETS", "COPY_STUDY", "two_moons", "study_data", "efm_loss", "fit_flow",
           "train_and_sample", "memorises", "copy_verdict", "fit_optimal"]

TARGETS = ("CFM", "EFM")
# The CFM-against-EFM study where a network can copy (book/empirical.md,
# tools/run_memorisation.py), fixed before the run that decides its verdict:
# training sets of 20 and 50 two-moons points (the set of n is
# two_moons(n, n)), MLPs of three widths, five seeds (initialisation and
# minibatches, shared by both targets), the training length (twice a pilot's
# on seed 100, whose networks came near the criterion), the samples and
# references, and the memorisation criterion read by copy_verdict.
COPY_STUDY = dict(
    sizes=(20, 50), widths=(32, 128, 512), depth=3, seeds=(0, 1, 2, 3, 4),
    train_steps=8000, fit=dict(batch_size=256, lr=2e-3),
    n_samples=1000, n_heldout=2000, n_fresh=1000,
    states=dict(heldout=11, fresh=12, latents=13),
    sampler=dict(steps=50, method="rk4"),
    rule=dict(ratio=0.5, margin=0.05, radius=0.1))


def two_moons(n: int, random_state: int) -> torch.Tensor:
    """n points of scikit-learn's two moons (noise 0.05), centred and scaled to about unit spread, float32; :ref:`sec_empirical`."""
    from sklearn.datasets import make_moons

    n = check_int("n", n, minimum=1)
    pts, _ = make_moons(n, noise=0.05,
                        random_state=check_int("random_state", random_state, minimum=0))
    pts = torch.tensor(pts, dtype=torch.float32)
    return (pts - torch.tensor([0.5, 0.25])) / torch.tensor([0.87, 0.5])


def study_data(design: dict = COPY_STUDY) -> tuple:
    """The study's training sets ({n: two_moons(n, n)}), held-out and fresh points, and latents; :ref:`sec_empirical_efm`."""
    st = design["states"]
    train = {n: two_moons(n, n) for n in design["sizes"]}
    held = two_moons(design["n_heldout"], st["heldout"])
    fresh = two_moons(design["n_fresh"], st["fresh"])
    z = torch.randn(design["n_samples"], 2,
                    generator=torch.Generator().manual_seed(st["latents"]))
    return train, held, fresh, z


def efm_loss(model, x0, x1, t) -> torch.Tensor:
    """Empirical flow matching: regress model(x_t, t) on u* of the minibatch; :ref:`sec_empirical_efm`.

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


def fit_flow(model: nn.Module, data: torch.Tensor, target: str, train_steps: int,
             batch_size: int = 256, lr: float = 2e-3, seed: int = 0) -> list:
    """Train ``model(x, t)`` on ``data`` with the CFM or the EFM target, Adam, in place; :ref:`sec_empirical_efm`.

    Each step draws, from a generator seeded with ``seed`` and in this
    order, the minibatch indices, x0 ~ N(0, I) and t ~ U(0, 1), so the two
    targets see the same minibatches. CFM regresses on x1 - x0
    (``flowjac.engine.train.cfm_loss``), EFM on u* of the minibatch
    (``efm_loss``). Returns the losses.
    """
    check_choice("target", target, TARGETS)
    if not torch.is_tensor(data) or data.ndim != 2 or data.shape[0] < 1:
        raise ValueError(f"data must be a tensor of shape (n, dim) with n >= 1, "
                         f"got {getattr(data, 'shape', type(data).__name__)}")
    train_steps = check_int("train_steps", train_steps, minimum=1)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    lr = check_number("lr", lr, minimum=0, strict_min=True)
    g = torch.Generator().manual_seed(check_int("seed", seed, minimum=0))
    dev, n, dim = data.device, data.shape[0], data.shape[1]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(train_steps):
        x1 = data[torch.randint(0, n, (batch_size,), generator=g)]
        x0 = torch.randn(batch_size, dim, generator=g).to(dev)
        t = torch.rand(batch_size, generator=g).to(dev)
        if target == "CFM":
            loss = cfm_loss(model, x0, x1, t)
        else:
            loss = efm_loss(model, x0, x1, t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def train_and_sample(make_model: Callable[[], nn.Module], data: torch.Tensor,
                     target: str, z: torch.Tensor, train_steps: int, seed: int,
                     steps: int = 50, method: str = "rk4", **fit) -> tuple:
    """Seed torch with ``seed``, build ``make_model()``, train it (``fit_flow``) and push ``z`` through it; :ref:`sec_empirical_efm`.

    The same seed gives CFM and EFM the same initial network and the same
    minibatches. Returns ``(samples, losses, model)``; the samples come
    from ``steps`` steps of ``method`` on [0, 1], on the CPU.
    """
    torch.manual_seed(check_int("seed", seed, minimum=0))
    model = make_model().to(data.device)
    losses = fit_flow(model, data, target, train_steps, seed=seed, **fit)
    with torch.no_grad():
        samples = integrate(velocity_fn(model), z.to(data.device), steps,
                            method=method).cpu()
    return samples, losses, model


def memorises(memo: dict, fresh: dict, ratio: float = 0.5,
              margin: float = 0.05) -> bool:
    """The chapter's criterion: NN ratio below ``ratio`` times fresh points', or near share above theirs by ``margin``; :ref:`sec_empirical_efm`.

    ``memo`` and ``fresh`` are ``flowjac.closedform.empirical.memorisation``
    results of a flow's samples and of fresh points of the data's law,
    against the same training and held-out sets.
    """
    for name, m in (("memo", memo), ("fresh", fresh)):
        if not isinstance(m, dict) or not {"nn_ratio", "near_share"} <= set(m):
            raise ValueError(f"{name} must be a memorisation() dict with "
                             f"'nn_ratio' and 'near_share'")
    return bool(memo["nn_ratio"] < ratio * fresh["nn_ratio"]
                or memo["near_share"] > fresh["near_share"] + margin)


def copy_verdict(flags: dict) -> dict:
    """Read a CFM-against-EFM study by its rule, fixed before it ran; :ref:`sec_empirical_efm`.

    ``flags[config][target]`` is the list over seeds of ``memorises`` for
    that configuration (training set, width) and target ("CFM", "EFM").
    A target *copies* at a configuration when it memorises on every seed,
    *does not* when on none, and is *mixed* otherwise (with k seeds, every
    seed on one side has probability 2 / 2^k under a coin flip: 1/16 for
    5 seeds). A configuration has power when either target copies there
    (a network of that capacity can copy). The claim "EFM memorises no
    more than CFM" fails if at some configuration EFM copies while CFM
    does not; it holds if some configuration has power and at none does
    EFM copy where CFM does not or is mixed; otherwise it is inconclusive.
    Returns per configuration its reading and the verdict with its reason.
    """
    if not isinstance(flags, dict) or not flags:
        raise ValueError("flags must be a non-empty dict {config: {target: "
                         "[bool per seed]}}")
    status, per_config = {}, {}
    for cfg, by_target in flags.items():
        if set(by_target) != set(TARGETS):
            raise ValueError(f"flags[{cfg!r}] must have the targets {TARGETS}, "
                             f"got {sorted(by_target)}")
        st = {}
        for tg in TARGETS:
            seeds = [bool(f) for f in by_target[tg]]
            if not seeds:
                raise ValueError(f"flags[{cfg!r}][{tg!r}] must list one flag "
                                 f"per seed, got none")
            st[tg] = ("copies" if all(seeds) else "does not" if not any(seeds)
                      else "mixed")
        status[cfg] = st
        if st["EFM"] == "copies" and st["CFM"] == "does not":
            per_config[cfg] = "EFM copies, CFM does not"
        elif "copies" in st.values():
            per_config[cfg] = "power: " + ("both copy" if st["EFM"] == st["CFM"]
                                           else f"EFM {st['EFM']}, CFM {st['CFM']}")
        else:
            per_config[cfg] = "no power: neither copies on every seed"
    def named(cfgs):
        return "; ".join(f"{c[0]} points, width {c[1]}"
                         if isinstance(c, tuple) and len(c) == 2 else str(c)
                         for c in cfgs)

    failing = [c for c, r in per_config.items() if r.startswith("EFM copies")]
    powered = [c for c, r in per_config.items() if r.startswith("power")]
    open_ = [c for c in powered if status[c]["EFM"] == "copies"
             and status[c]["CFM"] == "mixed"]
    if failing:
        verdict, reason = "fails", f"EFM copies where CFM does not at {named(failing)}"
    elif powered and not open_:
        verdict, reason = "holds", (f"{len(powered)} configuration(s) with power, "
                                    "at none does EFM copy where CFM does not")
    else:
        verdict = "inconclusive"
        reason = ("no configuration where a network copies on every seed"
                  if not powered else
                  f"EFM copies where CFM is mixed at {named(open_)}")
    return {"status": status, "per_config": per_config, "verdict": verdict,
            "reason": reason}


def fit_optimal(model, data, steps, batch_size=256, lr=2e-3, seed=0):
    """Train ``model(x, t)`` by regression on u* of the whole data set (the capacity study); :ref:`sec_empirical_capacity`.

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
