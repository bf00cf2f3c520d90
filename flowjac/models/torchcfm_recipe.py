"""A flow trained with torchcfm's own parts, in torchcfm's checkpoint format.

The shipped ``"mnist-fives-torchcfm"`` model is the "bring your own model"
case made concrete: a flow of MNIST fives trained the way torchcfm's image
example scripts train (its ``ConditionalFlowMatcher`` draws t, x_t and the
target u_t; its ``UNetModelWrapper`` is the network; Adam with a linear
warm-up, gradient clipping, an EMA of the weights updated after every step)
and saved as the dict those scripts save (``net_model``, ``ema_model``,
``sched``, ``optim``, ``step``), so that flowjac reads it only through the
public loader ``adapters.load_torchcfm_checkpoint``, exactly as it would
read a user's checkpoint.

``train_torchcfm(images, out_path, **recipe)`` trains with exact resume
(the work file also holds the RNG states), ``shipped_payload`` keeps the
EMA weights and the step only (the optimizer state is twice the weights and
serves only resuming). torchcfm is imported inside the functions (the
``interop`` extra).

One departure from torchcfm's scripts: their EMA starts at the initial
weights, whose share after t steps is decay**t (13% at 2,000 steps with
decay 0.999), and torchcfm's UNet starts with a zero output layer, so that
share shrinks the velocity and leaves a fraction of the noise in every
sample. With ``ema_debias=True`` the EMA is corrected as Adam corrects its
moments, (ema - decay**t w0) / (1 - decay**t): the average of the weights
visited, without the initial ones (``debiased_ema``).

Explained in :ref:`sec_byom`.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from flowjac._checks import check_int, check_number
from flowjac.base import atomic_torch_save
from flowjac.engine.checkpoints import read_checkpoint
from flowjac.engine.train import check_cooldown, cooldown_factor

__all__ = ["build_unet", "debiased_ema", "train_torchcfm", "shipped_payload"]


def build_unet(**unet_kwargs):
    """``torchcfm.models.unet.unet.UNetModelWrapper(**unet_kwargs)``; :ref:`sec_byom`."""
    try:
        from torchcfm.models.unet.unet import UNetModelWrapper
    except ImportError as err:  # pragma: no cover - the extra is installed in tests
        from flowjac.models.adapters import INSTALL_HINT
        raise ImportError(f"training with torchcfm needs torchcfm ({err}); "
                          f"install the interop extra: {INSTALL_HINT}") from None
    kw = dict(unet_kwargs)
    kw["dim"] = tuple(kw["dim"])
    return UNetModelWrapper(**kw)


@torch.no_grad()
def _ema(source, target, decay: float) -> None:
    """target <- decay * target + (1 - decay) * source, as torchcfm's scripts do."""
    src = source.state_dict()
    for key, value in target.state_dict().items():
        value.copy_(value * decay + src[key] * (1 - decay))


def debiased_ema(ema: dict, initial: dict, decay: float, step: int) -> dict:
    """(ema - decay**step initial) / (1 - decay**step) for floating tensors; :ref:`sec_byom`."""
    step = check_int("step", step, minimum=1)
    share = float(decay) ** step
    return {k: ((v - share * initial[k]) / (1 - share) if v.is_floating_point() else v)
            for k, v in ema.items()}


def train_torchcfm(images: torch.Tensor, out_path, *, unet: dict, train_steps: int,
                   batch_size: int, lr: float, warmup: int, ema_decay: float,
                   grad_clip: float, sigma: float = 0.0, seed: int = 0,
                   ema_debias: bool = False, lr_cooldown=None,
                   chunk: int = 500, on_chunk=None, time_budget: float | None = None,
                   progress: bool = False, **_ignored) -> dict:
    """Train a torchcfm UNet with torchcfm's ConditionalFlowMatcher; :ref:`sec_byom`.

    ``images`` (N, C, H, W) are the data x1 (noise x0 ~ N(0, I)); ``out_path``
    is the torchcfm-format training checkpoint, written atomically every
    ``chunk`` steps and resumed from when it exists (with the same RNG
    states, so an interrupted run ends where an uninterrupted one would).
    ``on_chunk(ema_model, step)`` runs after each chunk (gates along
    training) with the EMA weights, debiased when ``ema_debias``, and stops
    the run when it returns ``True`` (the schedule does not depend on
    ``train_steps``, so a run stopped at step k equals a k-step run);
    ``lr_cooldown`` ``(start, end)`` lowers the learning rate linearly from
    its full value at step ``start`` to 0 at step ``end`` (a warm-up,
    constant, cool-down schedule; still fixed in absolute steps);
    ``time_budget`` (seconds) stops after the last chunk that fits. The
    checkpoint keeps the plain EMA (as torchcfm's scripts) and, with
    ``ema_debias``, the debiased one as ``ema_debiased``. Returns
    ``dict(train_steps, loss_tail, seconds_per_step, train_seconds)``.
    """
    from torchcfm.conditional_flow_matching import ConditionalFlowMatcher

    train_steps = check_int("train_steps", train_steps, minimum=1)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    check_number("lr", lr, minimum=0)
    check_number("ema_decay", ema_decay, minimum=0)
    if not torch.is_tensor(images) or images.ndim != 4 or not images.is_floating_point():
        raise ValueError("images must be a float tensor (N, C, H, W), got "
                         f"{getattr(images, 'shape', type(images))}")
    out_path = Path(out_path)
    torch.manual_seed(check_int("seed", seed, minimum=0))
    net, ema_net = build_unet(**unet), build_unet(**unet)
    initial = {k: v.detach().clone() for k, v in net.state_dict().items()}
    ema_net.load_state_dict(net.state_dict())
    ema_net.requires_grad_(False)
    optim = torch.optim.Adam(net.parameters(), lr=float(lr))
    cooldown = check_cooldown(lr_cooldown)

    def lr_factor(step):
        f = min(step, warmup) / warmup if warmup else 1.0
        return f * cooldown_factor(step, cooldown)

    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_factor)
    matcher = ConditionalFlowMatcher(sigma=float(sigma))
    gen = torch.Generator().manual_seed(int(seed) + 1)
    step, losses, spent = 0, [], 0.0
    if out_path.is_file():
        state = read_checkpoint(out_path)
        net.load_state_dict(state["net_model"])
        ema_net.load_state_dict(state["ema_model"])
        optim.load_state_dict(state["optim"])
        sched.load_state_dict(state["sched"])
        step, losses = int(state["step"]), list(state["losses"].tolist())
        spent = float(state["seconds"])
        torch.set_rng_state(state["rng"])
        gen.set_state(state["gen"])
    start, chunk_times = time.perf_counter(), []
    net.train()
    while step < train_steps:
        target = min(train_steps, (step // chunk + 1) * chunk)
        t0, first = time.perf_counter(), step
        for _ in range(target - step):
            idx = torch.randint(0, len(images), (batch_size,), generator=gen)
            x1 = images[idx]
            x0 = torch.randn_like(x1)
            t, xt, ut = matcher.sample_location_and_conditional_flow(x0, x1)
            loss = ((net(t, xt) - ut) ** 2).mean()
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
            optim.step()
            sched.step()
            _ema(net, ema_net, ema_decay)
            losses.append(loss.item())
            step += 1
            if progress and step % 100 == 0:
                print(f"step {step} loss {sum(losses[-100:]) / 100:.4f}", flush=True)
        secs = time.perf_counter() - t0
        chunk_times.append(secs / (step - first))
        payload = dict(net_model=net.state_dict(), ema_model=ema_net.state_dict(),
                       optim=optim.state_dict(), sched=sched.state_dict(), step=step,
                       losses=torch.tensor(losses), rng=torch.get_rng_state(),
                       gen=gen.get_state(), seconds=spent + time.perf_counter() - start)
        if ema_debias:
            payload["ema_debiased"] = debiased_ema(ema_net.state_dict(), initial,
                                                   ema_decay, step)
        atomic_torch_save(out_path, payload)
        if on_chunk is not None:
            view = build_unet(**unet)
            view.load_state_dict(payload.get("ema_debiased", payload["ema_model"]))
            if on_chunk(view.eval().requires_grad_(False), step) is True:
                break       # the caller's stopping rule (e.g. the gates passed)
        if (time_budget is not None and step < train_steps and
                time.perf_counter() - start + secs > time_budget):
            break
    tail = losses[-50:]
    return dict(train_steps=step, loss_tail=sum(tail) / len(tail),
                seconds_per_step=(sum(chunk_times) / len(chunk_times)
                                  if chunk_times else None),
                train_seconds=spent + time.perf_counter() - start)


def shipped_payload(training_checkpoint) -> dict:
    """The file that ships: torchcfm's dict with the EMA weights (debiased if trained so) and the step only; :ref:`sec_byom`."""
    state = read_checkpoint(training_checkpoint)
    return {"ema_model": state.get("ema_debiased", state["ema_model"]),
            "step": int(state["step"])}
