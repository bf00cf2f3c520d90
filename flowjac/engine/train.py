"""Conditional flow matching (CFM): loss, EMA, and a trainer with exact resume.

Interpolation x_t = (1 - t) x0 + t x1 with x0 ~ N(0, I) and x1 from the data,
paired independently or, with ``coupling="ot"``, by the exact optimal-transport
assignment within each minibatch (``ot_pairing``).

* ``parameterization="velocity"``: the network regresses x1 - x0, and its
  output is the drift E[X1 - X0 | X_t = x].
* ``parameterization="x1"``: the network regresses x1, i.e. predicts
  g(x, t) = E[X1 | X_t = x] (the authors' 2D experiment); the drift is then
  (g - x) / (1 - t), because E[X0 | X_t = x] = (x - t g) / (1 - t).

Explained in :ref:`sec_neural_gaussian` (``book/neural_gaussian.md``); the
image model is trained in :ref:`sec_mnist`. Longer than 400 lines because the
trainer's contract (the draws of sources, targets, times and pairings from one
generator, the settings a checkpoint must share to resume, the finite-value
watch) is one loop, whose parts are kept beside it.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from flowjac._checks import check_choice, check_finite, check_int
from flowjac.base import get_device
from flowjac.engine.checkpoints import _check_writable, _plain, load_checkpoint, save_checkpoint
from flowjac.engine.velocity import PARAMETERIZATIONS, _bcast_t

__all__ = ["cfm_loss", "EMA", "train_flow", "check_cooldown", "cooldown_factor",
           "ot_pairing", "COUPLINGS"]

#: how a minibatch's sources x0 are paired with its targets x1
COUPLINGS = ("independent", "ot")


def ot_pairing(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """The permutation p that pairs ``x0[p[j]]`` with ``x1[j]`` at the least total squared distance; :ref:`sec_interventions`.

    The exact optimal-transport plan between two equal-size empirical
    measures is a permutation (Birkhoff); it is found by the Hungarian
    method (``scipy.optimize.linear_sum_assignment``) on the (B, B) matrix
    of squared Euclidean distances of the flattened rows, in float64. The
    minibatch OT coupling of OT-CFM (Tong et al. 2024; Pooladian et al.
    2023) trains on these pairs instead of independent ones: the learned
    flow has the same marginals but straighter paths, and a different
    coupling of noise and image.
    """
    from scipy.optimize import linear_sum_assignment

    if not (torch.is_tensor(x0) and torch.is_tensor(x1)) or x0.shape != x1.shape \
            or x0.ndim < 2:
        raise ValueError("x0 and x1 must be tensors of the same shape (B, ...), got "
                         f"{getattr(x0, 'shape', x0)} and {getattr(x1, 'shape', x1)}")
    a = x0.detach().flatten(1).double().cpu()
    b = x1.detach().flatten(1).double().cpu()
    cost = torch.cdist(b, a) ** 2                     # rows: targets, columns: sources
    rows, cols = linear_sum_assignment(cost.numpy())
    perm = torch.empty(len(rows), dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return perm.to(x0.device)



def cfm_loss(model: nn.Module, x0: torch.Tensor, x1: torch.Tensor, t,
             parameterization: str = "velocity") -> torch.Tensor:
    """Mean squared CFM error at x_t = (1 - t) x0 + t x1; :ref:`sec_neural_gaussian`.

    Target x1 - x0 for ``"velocity"``, x1 for ``"x1"``. ``t`` is a scalar
    or a (B,) tensor.
    """
    check_choice("parameterization", parameterization, PARAMETERIZATIONS)
    if not (torch.is_tensor(x0) and torch.is_tensor(x1)) or x0.shape != x1.shape:
        raise ValueError("x0 and x1 must be tensors of the same shape, got "
                         f"{getattr(x0, 'shape', x0)} and "
                         f"{getattr(x1, 'shape', x1)}")
    tb = _bcast_t(t, x0)
    xt = (1 - tb) * x0 + tb * x1
    target = x1 - x0 if parameterization == "velocity" else x1
    tt = torch.as_tensor(t, dtype=x0.dtype, device=x0.device)
    return ((model(xt, tt) - target) ** 2).mean()


class EMA:
    """Exponential moving average of a model's floating parameters and buffers; :ref:`sec_neural_gaussian`."""

    def __init__(self, model: nn.Module, decay: float):
        if not (isinstance(decay, (int, float)) and 0 < decay < 1):
            raise ValueError(f"ema_decay must be a number in (0, 1), got "
                             f"{decay!r}")
        self.decay = float(decay)
        self.shadow = {k: v.detach().clone()
                       for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """shadow <- decay * shadow + (1 - decay) * current."""
        floats, targets = [], []
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                floats.append(self.shadow[k])
                targets.append(v)
            else:
                self.shadow[k].copy_(v)
        if floats:      # one fused call instead of one kernel per tensor
            torch._foreach_lerp_(floats, targets, 1 - self.decay)

    def state_dict(self) -> dict:
        """The averaged weights, loadable into the model."""
        return self.shadow


def check_cooldown(lr_cooldown):
    """``None`` or ``(start, end)`` integers with 0 <= start < end, checked; :ref:`sec_neural_gaussian`."""
    if lr_cooldown is None:
        return None
    if not isinstance(lr_cooldown, (list, tuple)) or len(lr_cooldown) != 2:
        raise ValueError("lr_cooldown must be None or (start, end) integers with "
                         f"0 <= start < end, got {lr_cooldown!r}")
    c0 = check_int("lr_cooldown start", lr_cooldown[0], minimum=0)
    c1 = check_int("lr_cooldown end", lr_cooldown[1], minimum=c0 + 1)
    return c0, c1


def cooldown_factor(step: int, cooldown) -> float:
    """The learning-rate factor at ``step``: 1 before ``start``, linear to 0 at ``end``; :ref:`sec_neural_gaussian`.

    Fixed in absolute steps, so a resumed run follows the same schedule.
    """
    if cooldown is None:
        return 1.0
    c0, c1 = cooldown
    return min(1.0, max(0.0, (c1 - step) / (c1 - c0)))


def _sampler(sample_x1, device):
    if torch.is_tensor(sample_x1):
        data = check_finite("sample_x1", sample_x1)
        if data.ndim < 2 or len(data) == 0:
            raise ValueError("sample_x1 as a tensor must have shape (N, ...) "
                             f"with N >= 1, got {tuple(data.shape)}")

        def draw(n, generator):
            idx = torch.randint(len(data), (n,), generator=generator)
            return data[idx.to(data.device)]
        return draw
    if not callable(sample_x1):
        raise ValueError("sample_x1 must be a callable sample_x1(n, generator) "
                         f"or a tensor of rows, got {type(sample_x1).__name__}")
    return sample_x1


def _check_settings(*, steps_name: str = "steps", steps, batch_size,
                    checkpoint_every, log_every, seed, parameterization, lr,
                    weight_decay, ema_decay, grad_clip) -> tuple:
    """The training loops' shared argument checks, returning plain values.

    Plain floats: numpy scalars would be pickled into the optimizer state.
    """
    steps = check_int(steps_name, steps, minimum=1)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    checkpoint_every = check_int("checkpoint_every", checkpoint_every, minimum=1)
    log_every = check_int("log_every", log_every, minimum=1)
    seed = check_int("seed", seed, minimum=0)
    check_choice("parameterization", parameterization, PARAMETERIZATIONS)
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    lr, weight_decay = float(lr), float(weight_decay)
    if ema_decay is not None and isinstance(ema_decay, (int, float)):
        ema_decay = float(ema_decay)
    if grad_clip is not None and isinstance(grad_clip, (int, float)):
        grad_clip = float(grad_clip)
    if grad_clip is not None and not (isinstance(grad_clip, (int, float))
                                      and grad_clip > 0):
        raise ValueError(f"grad_clip must be None or a positive number, got "
                         f"{grad_clip!r}")
    return (steps, batch_size, checkpoint_every, log_every, seed, lr,
            weight_decay, ema_decay, grad_clip)


def _cfm_step(net, model, opt, x0, x1, t, parameterization, grad_clip, ema):
    """One optimizer step of the CFM loss of ``net`` (``model``, or its DDP
    wrapper or a label-binding closure), clipping ``model``'s gradients and
    updating its EMA; returns the loss (a tensor, not synchronised)."""
    loss = cfm_loss(net, x0, x1, t, parameterization)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    if ema is not None:
        ema.update(model)
    return loss


class _FiniteWatch:
    """The first step whose CFM loss was not finite, kept on the device
    (no synchronisation per step) and checked, with the weights, before
    every checkpoint and at the end: training stops with one ValueError
    that names the step, and the last checkpoint written stays the last
    good one (NaN weights are never saved)."""

    _NONE = 2 ** 62

    def __init__(self, device, checkpoint_path, lr):
        self.first = torch.full((), self._NONE, dtype=torch.int64, device=device)
        self.value = torch.zeros((), device=device)
        self.path, self.lr, self.saved = checkpoint_path, lr, None

    def update(self, loss, step: int) -> None:
        """Record ``loss`` of optimiser step ``step`` (1-based)."""
        new = (~torch.isfinite(loss.detach())) & (self.first == self._NONE)
        self.first = torch.where(new, torch.full_like(self.first, step), self.first)
        self.value = torch.where(new, loss.detach().float(), self.value)

    def check(self, model, ema, step: int, reduce_min=None) -> None:
        """Raise unless every loss so far and the weights (and EMA) are finite."""
        tensors = [p for p in model.parameters()] + (
            [v for v in ema.shadow.values() if v.is_floating_point()] if ema else [])
        finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all() \
            if tensors else torch.tensor(True)
        first = int(self.first)
        bad_weights = 0 if bool(finite) else step
        if reduce_min is not None:      # every rank decides alike
            first = int(reduce_min(first))
            bad_weights = -int(reduce_min(-bad_weights))
        if first == self._NONE and not bad_weights:
            return
        kept = (f"the checkpoint {str(self.path)!r} keeps step {self.saved}"
                if self.saved is not None else
                "no checkpoint of this run was written" if self.path is not None
                else "nothing was saved")
        if first != self._NONE:
            what = f"the CFM loss was {float(self.value)} at step {first}"
        else:
            what = f"the weights were not finite (NaN or inf) at step {bad_weights}"
        raise ValueError(f"training stopped: {what}; {kept}; lower lr (now "
                         f"{self.lr}) or check the data")


def train_flow(model: nn.Module, sample_x1, *, steps: int, batch_size: int,
               lr: float, weight_decay: float = 0.0,
               parameterization: str = "velocity", ema_decay=None,
               grad_clip=1.0, checkpoint_path=None,
               checkpoint_every: int = 1000, resume: bool = True,
               seed: int = 0, device="cpu", progress: bool = True,
               log_every: int = 1, allow_config_change: bool = False,
               labels=None, label_dropout: float = 0.0,
               lr_cooldown=None, coupling: str = "independent") -> dict:
    """Train ``model`` with the CFM loss, AdamW, clipping, optional EMA; :ref:`sec_neural_gaussian`.

    ``sample_x1(n, generator)`` returns n targets (or pass a tensor whose
    rows are sampled uniformly). Sources x0 ~ N(0, I) and times
    t ~ U(0, 1) come from a CPU ``torch.Generator`` seeded with ``seed``, so
    a seeded CPU run is reproducible bit for bit (the initial weights are the
    caller's: seed before building the model). With ``checkpoint_path`` a
    checkpoint (model, optimizer, EMA, generator state, losses) is written
    atomically every ``checkpoint_every`` steps and at the end; if it exists
    and ``resume`` is true, training continues from it and the result equals
    an uninterrupted run. With ``ema_decay`` the model ends holding the EMA
    weights. Returns ``{"loss": [...], "step": [...], "lr": lr, ...}``
    with the loss every ``log_every`` steps and ``resumed_from`` (the
    checkpoint's step, 0 for a fresh run).

    Resuming refuses a checkpoint whose ``batch_size``, ``lr``,
    ``weight_decay``, ``ema_decay``, ``grad_clip``, ``seed`` or
    ``parameterization`` differ from the call's (pass
    ``allow_config_change=True`` to continue with the new values; the
    random stream then continues from the checkpoint's), and a ``steps``
    smaller than the checkpoint's step. The checkpoint's folder is created
    and checked for writing before the first step.

    With ``labels`` (N, m) of 0/1 beside a tensor ``sample_x1`` of N rows,
    the model is label-conditional (``model(x, t, cond)``, e.g. a
    ``FlowUNet(num_labels=m)``): each drawn row comes with its code
    cond = 2 labels - 1, replaced by zeros ("unknown") with probability
    ``label_dropout`` so that the same network also learns the unconditional
    velocity (:ref:`sec_interventions`).

    ``lr_cooldown`` ``(start, end)`` lowers the learning rate linearly from
    ``lr`` at step ``start`` to 0 at step ``end`` (absolute steps, so a
    resumed run follows the same schedule; it is part of the resume check).

    ``coupling="ot"`` pairs each minibatch's sources with its targets (and
    their labels) by ``ot_pairing`` instead of independently: the same
    marginals, another coupling (part of the resume check).
    """
    steps, batch_size, checkpoint_every, log_every, seed, lr, weight_decay, \
        ema_decay, grad_clip = _check_settings(
            steps=steps, batch_size=batch_size, checkpoint_every=checkpoint_every,
            log_every=log_every, seed=seed, parameterization=parameterization,
            lr=lr, weight_decay=weight_decay, ema_decay=ema_decay,
            grad_clip=grad_clip)
    cooldown = check_cooldown(lr_cooldown)
    check_choice("coupling", coupling, COUPLINGS)
    dev = get_device(device) if isinstance(device, str) else device
    draw = _sampler(sample_x1, dev)
    if labels is not None:
        if not torch.is_tensor(sample_x1):
            raise ValueError("labels need sample_x1 as a tensor of rows")
        labels = torch.as_tensor(labels)
        if labels.ndim != 2 or len(labels) != len(sample_x1) or not bool(
                ((labels == 0) | (labels == 1)).all()):
            raise ValueError(f"labels must be a (N, m) tensor of 0/1 with N = "
                             f"{len(sample_x1)}, got shape "
                             f"{tuple(labels.shape)}")
        if not (isinstance(label_dropout, (int, float))
                and 0 <= label_dropout < 1):
            raise ValueError(f"label_dropout must be a number in [0, 1), got "
                             f"{label_dropout!r}")
        label_dropout = float(label_dropout)
        codes = (2 * labels.to(sample_x1.dtype) - 1).to(sample_x1.device)
    if checkpoint_path is not None:
        _check_writable(checkpoint_path)
    model.to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr,
                            weight_decay=weight_decay)
    ema = EMA(model, ema_decay) if ema_decay is not None else None
    gen = torch.Generator().manual_seed(seed)
    hist = {"loss": [], "step": []}
    start = 0
    config = dict(steps=steps, batch_size=batch_size, lr=lr,
                  weight_decay=weight_decay, ema_decay=ema_decay,
                  grad_clip=grad_clip, seed=seed,
                  parameterization=parameterization)
    if cooldown is not None:
        config["lr_cooldown"] = list(cooldown)
    if coupling != "independent":       # absent from earlier checkpoints: independent
        config["coupling"] = coupling
    if labels is not None:
        config.update(label_dropout=label_dropout, num_labels=labels.shape[1])
    if checkpoint_path is not None and resume and Path(checkpoint_path).exists():
        payload = load_checkpoint(checkpoint_path, model, opt)
        start = payload["step"]
        if start > steps:
            raise ValueError(f"steps ({steps}) is smaller than the step of the "
                             f"checkpoint {str(checkpoint_path)!r} ({start}); "
                             "ask for at least that many steps, or pass "
                             "resume=False to start afresh")
        old = payload["config"]
        changed = {k: (old.get(k), _plain(config.get(k), k)) for k in _RESUME_KEYS
                   if (k in old or k in config)
                   and old.get(k) != _plain(config.get(k), k)}
        if changed and not allow_config_change:
            raise ValueError(
                f"checkpoint {str(checkpoint_path)!r} was trained with other "
                "settings: " + ", ".join(f"{k} {a!r} there, {b!r} now"
                                         for k, (a, b) in changed.items())
                + "; pass allow_config_change=True to continue with the new "
                "values, or resume=False to start afresh")
        if changed:
            for group in opt.param_groups:
                group["lr"], group["weight_decay"] = lr, weight_decay
        extra = payload["extra"]
        gen.set_state(extra["rng"])
        hist = {"loss": list(extra["loss"]), "step": list(extra["loss_step"])}
        if ema is not None and payload["ema"] is not None:
            ema.shadow = {k: v.to(dev) for k, v in payload["ema"].items()}
        model.to(dev)

    watch = _FiniteWatch(dev, checkpoint_path, lr)
    if start:
        watch.saved = start

    def save(step):
        watch.check(model, ema, step)
        save_checkpoint(checkpoint_path, model, opt, step, config, ema,
                        rng=gen.get_state(), loss=hist["loss"],
                        loss_step=hist["step"])
        watch.saved = step

    bar = tqdm(range(start, steps), disable=not progress or None,
               desc="CFM training", mininterval=1.0, initial=start,
               total=steps)
    for step in bar:
        if labels is None:
            x1 = draw(batch_size, gen).to(dev)
            net = model
        else:
            idx = torch.randint(len(sample_x1), (batch_size,), generator=gen)
            x1 = sample_x1[idx.to(sample_x1.device)].to(dev)
            keep = torch.rand(batch_size, generator=gen) >= label_dropout
            cond = (codes[idx.to(codes.device)] * keep.to(codes)[:, None]).to(dev)

            def net(x, t, cond=cond):
                return model(x, t, cond)
        x0 = torch.randn(x1.shape, generator=gen, dtype=x1.dtype).to(dev)
        if coupling == "ot":
            x0 = x0[ot_pairing(x0, x1)]
        t = torch.rand(batch_size, generator=gen, dtype=x1.dtype).to(dev)
        if cooldown is not None:
            for group in opt.param_groups:
                group["lr"] = lr * cooldown_factor(step, cooldown)
        loss = _cfm_step(net, model, opt, x0, x1, t, parameterization,
                         grad_clip, ema)
        watch.update(loss, step + 1)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            watch.check(model, ema, step + 1)
            hist["loss"].append(float(loss.detach()))
            hist["step"].append(step + 1)
            bar.set_postfix(loss=f"{hist['loss'][-1]:.4f}", refresh=False)
        if checkpoint_path is not None and (
                (step + 1) % checkpoint_every == 0 or step + 1 == steps):
            save(step + 1)
    watch.check(model, ema, steps)
    if ema is not None:
        model.load_state_dict(ema.state_dict())
    model.eval()
    hist.update(config)
    hist["ema"] = ema is not None
    hist["resumed_from"] = start
    return hist


_RESUME_KEYS = ("batch_size", "lr", "weight_decay", "ema_decay", "grad_clip",
                "label_dropout", "lr_cooldown", "coupling",
                "seed", "parameterization")


