"""Probe a flow composed with a readout: outputs, JVPs, exact gradient norms, the paper's rule, and latent pairs.

A *readout* maps flow outputs (B, C, H, W) to a few numbers (B, p): an
attribute classifier's logits, or the pixels of a patch. For n latents
z ~ N(0, I) (seeded, drawn batch by batch on the CPU) ``probe`` records

* ``out``       (n, p)    the readout r(φ(z));
* ``jvp``       (n, k, p) J_{r∘φ}(z) v for k probes v ~ N(0, I);
* ``rho``, ``jvp_pair``, ``out_pair``: for a second latent z' and
  ρ ∈ [0, 1], the JVPs at z_ρ = ρ z + sqrt(1 - ρ²) z' along the *same*
  probes, the ingredients of the covariance identity of :ref:`sec_exact_covariances` (ρ is stratified over [0, 1]: ρ_i = (π_i + U_i) / n for a
  random permutation π);
* ``grad_norm`` (n, m)    the true ‖∇_z r_a(φ(z))‖ of the m outputs listed in
  ``grad_outputs``, by reverse mode (the quantity the paper's rule stands
  in for);
* ``paper_change`` (n, p) the authors' rule as they ran it:
  ``|r(φ(z + ε u)) - r(φ(z))|`` along one *unit-norm* direction u (the first
  probe normalized), ε = 1e-2 by default; they kept ``|Δ| < 1e-4``.

``plain_outputs`` draws r(φ(z)) for fresh latents: the plain-sample
estimate to compare at equal compute. Both take ``partial_path``: the
results so far are written there (atomically) after every batch, and a
later call with the same settings continues after the last batch written,
so an interrupted run ends with the tensors an uninterrupted one gives
(the latents are drawn in the same order; finished batches are skipped). ``evaluations`` counts velocity
evaluations in units of one primal evaluation per latent (a JVP stage with
k probes counts 1 + k). ``PixelReadout`` is the readout of a patch of
pixels, with its outputs' names (``flowjac probe`` without a classifier).
Explained in :ref:`sec_attributes` and :ref:`sec_mnist`.

Longer than 400 lines because the probe, its resumable and sharded loops
and the pixel readout it is run with are one module's contract.
"""
from __future__ import annotations

import time

import torch
from tqdm import tqdm

from flowjac._checks import check_choice, check_int

__all__ = ["probe", "plain_outputs", "stage_count", "redraw", "PixelReadout"]

_STAGES = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}


class _Partial:
    """Batches of results written after each batch, and read back by a later
    call with the same settings (``partial_path`` of probe and plain_outputs)."""

    def __init__(self, path, settings: dict):
        from pathlib import Path

        self.path = None if path is None else Path(path)
        self.settings = settings
        self.done, self.res, self.secs = 0, None, None
        if self.path is not None and self.path.exists():
            from flowjac.engine.checkpoints import read_checkpoint

            state = read_checkpoint(self.path, "partial_path")
            if not isinstance(state, dict) or not {"settings", "done", "res", "secs"} <= set(state):
                raise ValueError(f"partial_path {str(self.path)!r} is not a partial "
                                 "run of flowjac's probing; remove it or name another file")
            if state.get("settings") != settings:
                diff = {k: (state.get("settings", {}).get(k), v) for k, v in settings.items()
                        if state.get("settings", {}).get(k) != v}
                raise ValueError(f"partial_path {str(self.path)!r} holds a run with other "
                                 f"settings ({', '.join(f'{k}: {a!r} there, {b!r} now' for k, (a, b) in diff.items())}); "
                                 "remove it or name another file")
            self.done, self.res, self.secs = state["done"], state["res"], state["secs"]

    def save(self, done: int, res: dict, secs: dict) -> None:
        if self.path is None:
            return
        from flowjac.base import atomic_torch_save

        atomic_torch_save(self.path, dict(
            settings=self.settings, done=done, secs=dict(secs),
            res={k: [t.detach().cpu() for t in v] for k, v in res.items()}))


class PixelReadout:
    """A readout of the flow's pixels: the flattened patch (or whole output), with the outputs' names; :ref:`sec_running_at_scale`.

    ``patch`` is None (every value of the output) or ``(row, col, size)``,
    a square of ``size`` pixels from ``(row, col)`` in every channel of
    (C, H, W) outputs. ``names()`` lists the outputs as ``x{i}`` (vector
    outputs) or ``c{channel}_r{row}_c{col}``, in the readout's order.
    """

    def __init__(self, shape, patch=None):
        self.shape = tuple(shape)
        if patch is not None:
            r, c, s = (check_int(nm, v, m) for nm, v, m in
                       zip(("patch row", "patch col", "patch size"),
                           patch, (0, 0, 1)))
            if len(self.shape) != 3 or r + s > self.shape[1] or c + s > self.shape[2]:
                raise ValueError(f"patch ({r}, {c}, {s}) does not fit in "
                                 f"samples of shape {self.shape}")
            patch = (r, c, s)
        self.patch = patch

    def __call__(self, x):
        """The outputs (B, p) of flow outputs x (B, *shape)."""
        if self.patch is None:
            return x.flatten(1)
        r, c, s = self.patch
        return x[:, :, r:r + s, c:c + s].flatten(1)

    def names(self) -> list:
        """The p outputs' names, in order."""
        if self.patch is None:
            if len(self.shape) == 1:
                return [f"x{i}" for i in range(self.shape[0])]
            ch, h, w = self.shape
            return [f"c{a}_r{b}_c{d}" for a in range(ch) for b in range(h)
                    for d in range(w)]
        r, c, s = self.patch
        return [f"c{a}_r{b}_c{d}" for a in range(self.shape[0])
                for b in range(r, r + s) for d in range(c, c + s)]


def _refuse_nonfinite(velocity, readout, z, steps, method, start, values, what):
    """One clear ValueError, naming the source, when a batch's readout or
    JVPs hold NaN or inf: the flow's own samples are checked to tell a
    non-finite velocity from a readout that is not finite on finite samples."""
    from flowjac.engine.ode import integrate

    if all(bool(torch.isfinite(v).all()) for v in values):
        return
    rows = f"latents {start}-{start + z.shape[0] - 1}"
    with torch.no_grad():
        x = integrate(velocity, z, steps, method=method)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what}: the velocity {type(velocity).__name__} gives NaN "
                         f"or inf samples at {rows}; its weights or its inputs "
                         "are not finite (nothing further was computed)")
    raise ValueError(f"{what}: the readout {type(readout).__name__} gives NaN or "
                     f"inf (or NaN or inf derivatives) on finite samples at "
                     f"{rows}; fix the readout (nothing further was computed)")


def _latent_batches(n, k, latent_shape, seed, batch_size):
    """The stratified rho of every pair, and the batches (start, z, v, z') in
    the order ``probe`` draws them (float64, on the CPU)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g).double()
    rho = (perm + torch.rand(n, generator=g, dtype=torch.float64)) / n

    def batches():
        for i in range(0, n, batch_size):
            b = min(batch_size, n - i)
            z = torch.randn(b, *latent_shape, generator=g, dtype=torch.float64)
            v = torch.randn(b, k, *latent_shape, generator=g,
                            dtype=torch.float64)
            zp = torch.randn(b, *latent_shape, generator=g, dtype=torch.float64)
            yield i, z, v, zp
    return rho, batches()


def redraw(meta: dict, latent_shape, rows) -> tuple:
    """The latents z, probes v and partners z_rho of the given rows of a probe run, redrawn from its ``meta``; :ref:`sec_attributes`.

    ``meta`` is the run's ``meta`` dict (``n``, ``k``, ``seed``,
    ``batch_size``); returns float64 CPU tensors ``(m, *shape)``, ``(m, k, *shape)``
    and ``(m, *shape)`` for the m rows, in the order given.
    """
    rows = [check_int("rows entry", r, minimum=0) for r in rows]
    n, k = meta["n"], meta["k"]
    if not rows or max(rows) >= n:
        raise ValueError(f"rows must be a non-empty list of rows < {n}, got "
                         f"{rows[:5]}")
    rho, draws = _latent_batches(n, k, tuple(latent_shape), meta["seed"],
                                 meta["batch_size"])
    found = {}
    for i, z, v, zp in draws:
        for r in rows:
            if i <= r < i + z.shape[0]:
                found[r] = (z[r - i], v[r - i], zp[r - i])
        if len(found) == len(set(rows)):
            break
    z, v, zp = (torch.stack(t) for t in zip(*(found[r] for r in rows)))
    shape = (len(rows),) + (1,) * len(tuple(latent_shape))
    rr = rho[rows].view(shape)
    return z, v, rr * z + (1 - rr ** 2).sqrt() * zp


def stage_count(method: str, steps: int) -> int:
    """Velocity evaluations of one solve; :ref:`sec_attributes`."""
    check_choice("method", method, tuple(_STAGES))
    return _STAGES[method] * check_int("steps", steps, minimum=1)


def _grad_norms(velocity, readout, z, steps, method, outputs, chunk):
    from flowjac.engine.ode import integrate

    rows = []
    for i in range(0, z.shape[0], chunk):
        with torch.enable_grad():
            zz = z[i:i + chunk].detach().clone().requires_grad_(True)
            out = readout(integrate(velocity, zz, steps, method=method))
            norms = []
            for j, a in enumerate(outputs):
                (g,) = torch.autograd.grad(out[:, a].sum(), zz,
                                           retain_graph=j + 1 < len(outputs))
                norms.append(g.flatten(1).norm(dim=1))
        rows.append(torch.stack(norms, 1).detach())
    return torch.cat(rows)


def probe(velocity, readout, latent_shape, n: int, *, k: int = 4,
          steps: int = 10, method: str = "midpoint", seed: int = 0,
          device="cpu", dtype=torch.float64, batch_size: int = 256,
          pairs: bool = True, grad_outputs=(), grad_batch: int = 32,
          eps: float = 1e-2, progress: bool = False,
          partial_path=None, paper: bool = True, ctx=None,
          result_dtype=torch.float32) -> dict:
    """Outputs, JVPs, pair JVPs, true gradient norms and the paper's change for n latents; :ref:`sec_attributes`.

    ``velocity`` and ``readout`` must already be on ``device`` in
    ``dtype``. ``grad_outputs`` lists the readout columns whose true
    gradient norms are computed by reverse mode (``grad_norm`` is then
    (n, len(grad_outputs))), ``grad_batch`` latents at a time (reverse mode
    stores every solver stage). Results come back as float32 CPU tensors,
    with ``meta`` (settings, seconds and evaluation counts of each part).
    ``partial_path``: write the results after every batch and continue a
    run with the same settings from there (module docstring). ``paper``:
    compute ``paper_change`` (one more solve per latent). ``ctx`` (a
    ``distributed.init`` Context): each rank probes its own batches of the
    one seeded draw (``distributed.shard_batches``) and every rank returns
    all n rows, equal to the single-process ones. ``result_dtype``: the
    dtype of the returned tensors (None: the computing ``dtype``); ``rho``
    is the float64 draw rounded once. A batch whose readout or JVPs hold
    NaN or inf stops the run with one ValueError naming the velocity or
    the readout.
    """
    from flowjac.engine.composite import attribute_jvp
    from flowjac.engine.ode import integrate

    n = check_int("n", n, minimum=2)
    k = check_int("k", k, minimum=1)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    stages = stage_count(method, steps)
    grad_outputs = [check_int("grad_outputs entry", a, minimum=0)
                    for a in grad_outputs]
    grad_batch = check_int("grad_batch", grad_batch, minimum=1)
    grad_norms = bool(grad_outputs)
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    latent_shape = tuple(latent_shape)
    rho_all, draws = _latent_batches(n, k, latent_shape,
                                     check_int("seed", seed, minimum=0),
                                     batch_size)
    world = 1 if ctx is None else ctx.world_size
    if world > 1 and partial_path is not None:
        raise ValueError("partial_path is for one process; under torchrun give "
                         "partial_path=None")
    own = None
    if ctx is not None:
        from flowjac.engine.distributed import shard_batches

        own = set(shard_batches(n, batch_size, ctx.rank, ctx.world_size))
    keys = ["out", "jvp"] + (["rho", "out_pair", "jvp_pair"] if pairs else []) \
        + (["grad_norm"] if grad_norms else []) + (["paper_change"] if paper else [])
    res = {key: [] for key in keys}
    secs = {"jvp": 0.0, "pair": 0.0, "grad_norm": 0.0, "paper": 0.0}
    dev = torch.device(device)
    partial = _Partial(partial_path, dict(
        what="probe", n=n, k=k, steps=steps, method=method, seed=seed,
        batch_size=batch_size, dtype=str(dtype), pairs=bool(pairs),
        grad_outputs=grad_outputs, eps=float(eps), latent_shape=list(latent_shape),
        **({} if paper else {"paper": False})))
    if partial.res is not None:
        res, secs = partial.res, partial.secs

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    index = []
    bar = tqdm(draws, total=-(-n // batch_size) if own is None else len(own),
               disable=not progress or None, desc="probing", mininterval=2.0)
    for j, (i, z, v, zp) in enumerate(bar):
        b = z.shape[0]
        if i < partial.done or (own is not None and j not in own):
            continue                # written by an earlier call, or another rank's
        z, v, zp = (t.to(dev, dtype) for t in (z, v, zp))

        def timed_jvp(x, part, v=v):
            t0 = time.perf_counter()
            with torch.no_grad():
                fx, dx = attribute_jvp(velocity, readout, x, tangents=v,
                                       steps=steps, method=method)
            sync()
            secs[part] += time.perf_counter() - t0
            return fx, dx

        out, d = timed_jvp(z, "jvp")
        _refuse_nonfinite(velocity, readout, z, steps, method, i, (out, d), "probe")
        index.extend(range(i, i + b))
        res["out"].append(out)
        res["jvp"].append(d)
        if pairs:
            rho = rho_all[i:i + b].to(dev, dtype)
            shape = (b,) + (1,) * len(latent_shape)
            zr = rho.view(shape) * z + (1 - rho.view(shape) ** 2).sqrt() * zp
            outp, dp = timed_jvp(zr, "pair")
            _refuse_nonfinite(velocity, readout, zr, steps, method, i, (outp, dp),
                              "probe (the partner latents z_rho)")
            res["rho"].append(rho_all[i:i + b])
            res["out_pair"].append(outp)
            res["jvp_pair"].append(dp)
        if grad_norms:
            t0 = time.perf_counter()
            res["grad_norm"].append(_grad_norms(velocity, readout, z, steps,
                                                method, grad_outputs,
                                                grad_batch))
            sync()
            secs["grad_norm"] += time.perf_counter() - t0
        if paper:
            u = v[:, 0] / v[:, 0].flatten(1).norm(dim=1).view(
                (b,) + (1,) * len(latent_shape))
            t0 = time.perf_counter()
            with torch.no_grad():
                moved = readout(integrate(velocity, z + eps * u, steps,
                                          method=method))
            sync()
            secs["paper"] += time.perf_counter() - t0
            res["paper_change"].append((moved - out).abs())
        partial.save(i + b, res, secs)
    if ctx is None:
        out = {key: torch.cat([t.to("cpu", result_dtype or t.dtype) for t in val])
               for key, val in res.items()}
    else:
        out = _gathered(res, index, n, k, len(grad_outputs), ctx, result_dtype or dtype,
                        lambda: readout(torch.zeros(1, *latent_shape, device=dev,
                                                    dtype=dtype)).shape[1])
        from flowjac.engine.distributed import all_reduce_max

        secs = {key: all_reduce_max(val, ctx) for key, val in secs.items()}
    out["meta"] = dict(n=n, k=k, steps=steps, method=method, seed=seed,
                       grad_outputs=grad_outputs, world_size=world,
                       eps=eps, batch_size=batch_size, dtype=str(dtype),
                       device=str(dev), seconds=secs,
                       evaluations=dict(
                           jvp=n * stages * (1 + k),
                           pair=n * stages * (1 + k) if pairs else 0,
                           plain_sample=n * stages))
    return out


def _gathered(res, index, n, k, m, ctx, dtype, width) -> dict:
    """Every rank's rows of a sharded probe assembled on every rank
    (exactly: one non-zero contribution per entry); ``width()`` gives the
    readout's width on a rank that probed no batch."""
    from flowjac.engine.distributed import gather_rows

    p = None
    shapes = {"out": lambda: (p,), "jvp": lambda: (k, p), "rho": lambda: (),
              "out_pair": lambda: (p,), "jvp_pair": lambda: (k, p),
              "grad_norm": lambda: (m,), "paper_change": lambda: (p,)}
    if not res["out"]:
        p = width()
    out = {}
    for key, val in res.items():
        local = (torch.cat([t.to("cpu", torch.float64) for t in val]) if val
                 else torch.zeros(0, *shapes[key](), dtype=torch.float64))
        out[key] = gather_rows(local, index, n, ctx).to(dtype)
    return out


def plain_outputs(velocity, readout, latent_shape, n: int, *,
                  steps: int = 10, method: str = "midpoint", seed: int = 1,
                  device="cpu", dtype=torch.float64,
                  batch_size: int = 1024, partial_path=None) -> tuple:
    """r(φ(z)) for n fresh latents (the plain-sample estimate) and the seconds it took; :ref:`sec_attributes`.

    ``partial_path``: write the outputs after every batch and continue a
    run with the same settings from there.
    """
    from flowjac.engine.ode import integrate

    n = check_int("n", n, minimum=1)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    seed = check_int("seed", seed, minimum=0)
    g = torch.Generator().manual_seed(seed)
    dev = torch.device(device)
    partial = _Partial(partial_path, dict(
        what="plain", n=n, steps=steps, method=method, seed=seed,
        batch_size=batch_size, dtype=str(dtype), latent_shape=list(latent_shape)))
    outs = partial.res["out"] if partial.res is not None else []
    spent = partial.secs["plain"] if partial.secs is not None else 0.0
    with torch.no_grad():
        for i in range(0, n, batch_size):
            b = min(batch_size, n - i)
            z = torch.randn(b, *tuple(latent_shape), generator=g,
                            dtype=torch.float64).to(dev, dtype)
            if i < partial.done:
                continue
            t0 = time.perf_counter()
            outs.append(readout(integrate(velocity, z, steps, method=method)).float().cpu())
            _refuse_nonfinite(velocity, readout, z, steps, method, i, (outs[-1],),
                              "plain_outputs")
            if dev.type == "cuda":
                torch.cuda.synchronize()
            spent += time.perf_counter() - t0
            partial.save(i + b, {"out": outs}, {"plain": spent})
    return torch.cat(outs).float().cpu(), spent
