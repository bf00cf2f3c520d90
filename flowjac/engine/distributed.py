"""One process or many: torchrun's environment, per-rank seeds, sharding, exact sums, DDP training.

Under ``torchrun`` every process reads ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` from its environment; ``init`` turns them into a
``Context`` (gloo on the CPU, nccl on GPUs, one GPU per local rank) and
without them returns the single-process context, so the same code runs
both ways.

* Probing shards the *batches* of the seeded latent draw of
  ``flowjac.engine.probing`` round-robin over the ranks
  (``sharded_latents``): every rank replays the one generator and keeps its
  own batches, so the union of the shards is exactly the single-process
  draw, and each batch is computed exactly as a single process computes it.
* Sums are reduced in float64 (``all_reduce_sum``); rows are assembled by
  ``gather_rows``, an all-reduce in which every entry has one non-zero
  contribution, hence exact in any reduction order.
* ``on_main`` runs a write on rank 0 only and tells every rank whether it
  worked, so a failed write stops all ranks instead of hanging them.
* ``train_flow_distributed`` is ``flowjac.engine.train.train_flow``'s CFM
  loop under DistributedDataParallel: each rank draws its share of the
  global batch from its own generator (``rank_seed``), gradients are
  averaged, rank 0 writes atomic checkpoints holding every rank's generator
  state, and a resume with the same world size equals the uninterrupted run.
  With one process it is bit-identical to ``train_flow``.

Explained in :ref:`sec_running_at_scale` (``book/running_at_scale.md``).

Slightly over 400 lines because the DDP loop and the helpers its exactness
rests on (per-rank seeds, exact gathers, checked rank-0 writes) are one
contract, tested together.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from flowjac._checks import check_int
from flowjac.base import get_device
from flowjac.engine.checkpoints import _check_writable, _plain, load_checkpoint, save_checkpoint
from flowjac.engine.train import EMA, _cfm_step, _check_settings, _FiniteWatch, _sampler

__all__ = ["Context", "launched_by_torchrun", "init", "shutdown", "rank_seed", "shard_batches",
           "sharded_latents", "all_reduce_sum", "all_reduce_max",
           "gather_rows", "on_main", "train_flow_distributed"]

# keys whose change refuses a resume (as in train_flow), besides extra_config
_RESUME_KEYS = ("batch_size", "lr", "weight_decay", "ema_decay", "grad_clip",
                "seed", "parameterization")


@dataclass
class Context:
    """Where this process stands: rank, world size, device and backend; :ref:`sec_running_at_scale`.

    ``backend`` is None for a single process without a process group;
    ``owns_group`` says whether ``init`` created the group (and
    ``shutdown`` should destroy it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        """Whether a process group is in use."""
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the one that writes files."""
        return self.rank == 0


def _env_int(name: str, minimum: int) -> int:
    raw = os.environ.get(name)
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise ValueError(f"environment variable {name} must be an integer "
                         f"(torchrun sets it), got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"environment variable {name} must be >= {minimum}, "
                         f"got {value}")
    return value


def launched_by_torchrun() -> bool:
    """Whether torchrun's variables (``WORLD_SIZE``, ``RANK``) are set; :ref:`sec_running_at_scale`."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init(device="auto") -> Context:
    """The process's ``Context``: from torchrun's environment, else a single process; :ref:`sec_running_at_scale`.

    ``device`` is "auto", "cpu" or "cuda" (``flowjac.base.get_device``).
    Under torchrun a process group is created (reused when one exists): gloo
    on the CPU, nccl with one GPU per local rank (``cuda:LOCAL_RANK``).
    Raises ValueError for ``cuda`` without a GPU, or a local rank without
    its own GPU.
    """
    dev = get_device(device)
    if not dist.is_available() or not (dist.is_initialized()
                                       or launched_by_torchrun()):
        return Context(device=dev)
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        backend, owns = dist.get_backend(), False
    else:
        rank = _env_int("RANK", 0)
        world = _env_int("WORLD_SIZE", 1)
        local = _env_int("LOCAL_RANK", 0) if "LOCAL_RANK" in os.environ else rank
        backend, owns = ("nccl" if dev.type == "cuda" else "gloo"), True
    if dev.type == "cuda":
        count = torch.cuda.device_count()
        if local >= count:
            raise ValueError(f"local rank {local} has no GPU of its own: this "
                             f"node has {count}; start at most {count} "
                             "processes per node (--nproc_per_node)")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if owns:
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend, rank=rank, world_size=world, **kwargs)
    return Context(rank, world, local, dev, backend, owns)


def shutdown(ctx: Context) -> None:
    """Destroy the process group if ``init`` created it; :ref:`sec_running_at_scale`."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def rank_seed(seed: int, rank: int, offset: int = 0) -> int:
    """The seed of rank ``rank``'s data stream: ``seed`` itself for rank 0, offset 0; :ref:`sec_running_at_scale`.

    Other ranks (and other ``offset``s, used when a resume cannot restore
    the streams) get NumPy ``SeedSequence([seed, rank, offset])`` seeds,
    independent streams that depend only on these three numbers.
    """
    seed = check_int("seed", seed, minimum=0)
    rank = check_int("rank", rank, minimum=0)
    offset = check_int("offset", offset, minimum=0)
    if rank == 0 and offset == 0:
        return seed
    words = np.random.SeedSequence([seed, rank, offset]).generate_state(
        2, np.uint32)
    return (int(words[0]) << 31 | int(words[1]) >> 1) % 2 ** 63


def shard_batches(n: int, batch_size: int, rank: int, world_size: int) -> list:
    """The batch indices (of ceil(n / batch_size)) that rank ``rank`` computes, round-robin; :ref:`sec_running_at_scale`."""
    n = check_int("n", n, minimum=1)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    world_size = check_int("world_size", world_size, minimum=1)
    rank = check_int("rank", rank, minimum=0)
    if rank >= world_size:
        raise ValueError(f"rank must be < world_size ({world_size}), got {rank}")
    return list(range(rank, -(-n // batch_size), world_size))


def sharded_latents(n: int, k: int, latent_shape, seed: int, batch_size: int,
                    rank: int = 0, world_size: int = 1) -> tuple:
    """(rho of all n pairs, this rank's batches (start, z, v, z')) of ``probing.probe``'s draw; :ref:`sec_running_at_scale`.

    The generator of ``flowjac.engine.probing`` is replayed batch by batch
    and the batches of ``shard_batches`` are kept, so the shards of all
    ranks together are exactly the single-process draw (and ``redraw``
    finds any row again). Replaying costs (k + 2) normals per latent and
    dimension, far less than one solve.
    """
    from flowjac.engine.probing import _latent_batches

    own = set(shard_batches(n, batch_size, rank, world_size))
    rho, draws = _latent_batches(n, check_int("k", k, minimum=1),
                                 tuple(latent_shape),
                                 check_int("seed", seed, minimum=0), batch_size)

    def mine():
        for j, batch in enumerate(draws):
            if j in own:
                yield batch
    return rho, mine()


def _comm_device(ctx: Context) -> torch.device:
    return ctx.device if ctx.backend == "nccl" else torch.device("cpu")


def all_reduce_sum(x: torch.Tensor, ctx: Context) -> torch.Tensor:
    """The float64 sum of ``x`` over all ranks (a float64 copy of ``x`` for one process); :ref:`sec_running_at_scale`."""
    out = x.detach().to(torch.float64).clone()
    if not ctx.distributed:
        return out
    buf = out.to(_comm_device(ctx))
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(x.device)


def all_reduce_max(value: float, ctx: Context) -> float:
    """The largest ``value`` over all ranks; :ref:`sec_running_at_scale`."""
    if not ctx.distributed:
        return float(value)
    buf = torch.tensor([float(value)], dtype=torch.float64,
                       device=_comm_device(ctx))
    dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    return float(buf)


def gather_rows(rows: torch.Tensor, index, n: int, ctx: Context) -> torch.Tensor:
    """Assemble (n, ...) float64 on every rank from each rank's ``rows`` at ``index``; :ref:`sec_running_at_scale`.

    The ranks' indices must be disjoint and cover what is wanted (uncovered
    rows stay 0). Every entry has exactly one non-zero contribution, so the
    result equals the rows themselves bit for bit.
    """
    index = torch.as_tensor(index, dtype=torch.long).reshape(-1)
    if rows.shape[0] != index.numel():
        raise ValueError(f"rows and index must have the same length, got "
                         f"{rows.shape[0]} and {index.numel()}")
    full = torch.zeros((n, *rows.shape[1:]), dtype=torch.float64)
    full[index] = rows.detach().to("cpu", torch.float64)
    return all_reduce_sum(full, ctx)


def on_main(ctx: Context, fn, *args, **kwargs):
    """Run ``fn`` on rank 0 only and return its result there (None elsewhere); :ref:`sec_running_at_scale`.

    Every rank learns whether it succeeded: rank 0 re-raises its error, the
    others raise a ValueError saying that rank 0 failed, so that no rank
    waits forever for a writer that died.
    """
    result, error = None, None
    if ctx.is_main:
        try:
            result = fn(*args, **kwargs)
        except Exception as err:  # reported to every rank below
            error = err
    if ctx.distributed:
        flag = torch.tensor([0 if error is None else 1], dtype=torch.int64,
                            device=_comm_device(ctx))
        dist.broadcast(flag, src=0)
        if int(flag) and error is None:
            raise ValueError("rank 0 failed to write its output (its error "
                             "names the reason)")
    if error is not None:
        raise error
    return result


def _same_everywhere(flag: bool, ctx: Context) -> bool:
    """Whether every rank has the same ``flag``."""
    if not ctx.distributed:
        return True
    total = all_reduce_sum(torch.tensor([float(flag)]), ctx)
    return float(total) in (0.0, float(ctx.world_size))


def train_flow_distributed(model: nn.Module, sample_x1, *, train_steps: int,
                           batch_size: int, lr: float,
                           weight_decay: float = 0.0,
                           parameterization: str = "velocity",
                           ema_decay=None, grad_clip=1.0,
                           checkpoint_path=None, checkpoint_every: int = 1000,
                           resume: bool = True, seed: int = 0,
                           ctx: Context | None = None, progress: bool = True,
                           log_every: int = 1,
                           extra_config: dict | None = None) -> dict:
    """CFM training on one process or many (DDP), atomic checkpoints by rank 0, exact resume; :ref:`sec_running_at_scale`.

    ``train_flow``'s loop (AdamW, clipping, optional EMA; ``cfm_loss``)
    with ``batch_size`` the *global* batch: each of the W ranks of ``ctx``
    draws batch_size / W targets, sources and times per step from its own
    CPU generator seeded with ``rank_seed(seed, rank)``, and DDP averages
    the gradients, so the update is that of one batch of ``batch_size``.
    The caller builds the same initial weights on every rank (seed before
    building the model). Rank 0 writes the checkpoint (model, optimizer,
    EMA, every rank's generator state, losses, world size) atomically every
    ``checkpoint_every`` steps and at the end; with ``resume`` an existing
    checkpoint is continued. With the same world size the result equals the
    uninterrupted run bit for bit; with another world size the weights,
    optimizer and EMA continue but the streams are re-seeded with
    ``rank_seed(seed, rank, step)`` (``hist["streams_reseeded"]`` is True).
    A resume refuses changed settings (those of ``train_flow`` and every key
    of ``extra_config``, plain values stored in the checkpoint's config) and
    a ``train_steps`` below the checkpoint's step. With one process and no
    process group the run is bit-identical to ``train_flow(..., steps=
    train_steps)``. Returns the history (``loss``, ``step``, the settings,
    ``resumed_from``, ``world_size``).
    """
    ctx = ctx or Context()
    train_steps, batch_size, checkpoint_every, log_every, seed, lr, \
        weight_decay, ema_decay, grad_clip = _check_settings(
            steps_name="train_steps", steps=train_steps, batch_size=batch_size,
            checkpoint_every=checkpoint_every, log_every=log_every, seed=seed,
            parameterization=parameterization, lr=lr,
            weight_decay=weight_decay, ema_decay=ema_decay, grad_clip=grad_clip)
    world, rank = ctx.world_size, ctx.rank
    if batch_size % world:
        raise ValueError(f"batch_size ({batch_size}, the global batch) must be "
                         f"divisible by the number of processes ({world})")
    local_batch = batch_size // world
    dev = ctx.device
    draw = _sampler(sample_x1, dev)
    extra_config = _plain(dict(extra_config or {}), "extra_config")
    if checkpoint_path is not None:
        _check_writable(checkpoint_path)
    model.to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    ema = EMA(model, ema_decay) if ema_decay is not None else None
    gen = torch.Generator().manual_seed(rank_seed(seed, rank))
    hist = {"loss": [], "step": []}
    start, reseeded = 0, False
    config = dict(train_steps=train_steps, batch_size=batch_size, lr=lr,
                  weight_decay=weight_decay, ema_decay=ema_decay,
                  grad_clip=grad_clip, seed=seed,
                  parameterization=parameterization, **extra_config)
    exists = checkpoint_path is not None and resume and \
        Path(checkpoint_path).exists()
    if not _same_everywhere(exists, ctx):
        raise ValueError(f"checkpoint {str(checkpoint_path)!r} exists on some "
                         "ranks only: put it on a file system that every node "
                         "sees")
    if exists:
        payload = load_checkpoint(checkpoint_path, model, opt)
        start = payload["step"]
        if start > train_steps:
            raise ValueError(f"train_steps ({train_steps}) is smaller than the "
                             f"step of the checkpoint {str(checkpoint_path)!r} "
                             f"({start}); ask for at least that many")
        old = payload["config"]
        keys = _RESUME_KEYS + tuple(extra_config)
        changed = {k: (old.get(k), config[k]) for k in keys
                   if old.get(k) != _plain(config[k], k)}
        if changed:
            raise ValueError(
                f"checkpoint {str(checkpoint_path)!r} was trained with other "
                "settings: " + ", ".join(f"{k} {a!r} there, {b!r} now"
                                         for k, (a, b) in changed.items())
                + "; use the same settings, or start afresh elsewhere")
        extra = payload["extra"]
        states = extra.get("rng_ranks")
        if states is not None and int(extra.get("world_size", 0)) == world:
            gen.set_state(states[rank].clone())
        elif states is None and world == 1 and "rng" in extra:
            gen.set_state(extra["rng"])          # a train_flow checkpoint
        else:
            gen = torch.Generator().manual_seed(rank_seed(seed, rank, start))
            reseeded = True
        hist = {"loss": list(extra["loss"]), "step": list(extra["loss_step"])}
        if ema is not None and payload["ema"] is not None:
            ema.shadow = {k: v.to(dev) for k, v in payload["ema"].items()}
        model.to(dev)
    net = model
    if ctx.distributed:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None)

    watch = _FiniteWatch(dev, checkpoint_path, lr)
    if start:
        watch.saved = start

    def reduce_min(value):
        return -all_reduce_max(-value, ctx)

    def save(step):
        watch.check(model, ema, step, reduce_min)
        state = gen.get_state()
        states = gather_rows(state[None].double(), [rank], world, ctx)
        states = states.to(torch.uint8)
        on_main(ctx, save_checkpoint, checkpoint_path, model, opt, step,
                config, ema, rng=states[0].clone(), rng_ranks=states,
                loss=hist["loss"], loss_step=hist["step"], world_size=world)
        watch.saved = step

    bar = tqdm(range(start, train_steps),
               disable=None if (progress and ctx.is_main) else True,
               desc="CFM training", mininterval=1.0, initial=start,
               total=train_steps)
    for step in bar:
        x1 = draw(local_batch, gen).to(dev)
        x0 = torch.randn(x1.shape, generator=gen, dtype=x1.dtype).to(dev)
        t = torch.rand(local_batch, generator=gen, dtype=x1.dtype).to(dev)
        loss = _cfm_step(net, model, opt, x0, x1, t, parameterization,
                         grad_clip, ema)
        watch.update(loss, step + 1)
        if (step + 1) % log_every == 0 or step + 1 == train_steps:
            watch.check(model, ema, step + 1, reduce_min)
            value = loss.detach()
            if ctx.distributed:
                value = all_reduce_sum(value, ctx) / world
            hist["loss"].append(float(value))
            hist["step"].append(step + 1)
            bar.set_postfix(loss=f"{hist['loss'][-1]:.4f}", refresh=False)
        if checkpoint_path is not None and (
                (step + 1) % checkpoint_every == 0 or step + 1 == train_steps):
            save(step + 1)
    bar.close()
    watch.check(model, ema, train_steps, reduce_min)
    if ema is not None:
        model.load_state_dict(ema.state_dict())
    model.eval()
    hist.update(config)
    hist.update(ema=ema is not None, resumed_from=start, world_size=world,
                streams_reseeded=reseeded)
    return hist
