"""The paper's own estimator on the stored attribute latents (issue 32.6): float32 forward differences, its eps, Euler 99 steps.

    OMP_NUM_THREADS=1 python tools/run_paper_fd.py --out results/attributes_paper_fd.pt [--force]

Everything is fixed in ``flowjac.pipelines.stored.PAPER_FD_ATTRIBUTES``
before the run: the first ``n`` latents of ``results/attributes_probes.pt``
and their first probe v (redrawn from the stored run's seed,
``probing.redraw``), the step eps, the solver and the precision. For each
latent it stores (c(phi(z + eps v)) - c(phi(z))) / eps, the nine logits of
the shipped attribute classifier c on the shipped SCM flow phi, computed
with ``patch_study.paper_fd``. The attribute chapter sets them beside the
exact JVPs of the same latents. After every ``batch`` latents everything so
far is written atomically to ``OUT.partial``; a restarted run with the same
design and weights resumes from it (another design's partial file is
refused). The output is never replaced without ``--force``. ``meta`` keeps
the design, the weights' sha256, hardware, torch threads and seconds.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from flowjac.base import atomic_torch_save, hardware, repo_root  # noqa: E402
from flowjac.engine import probing  # noqa: E402
from flowjac.models import pretrained  # noqa: E402
from flowjac.pipelines import patch_study  # noqa: E402
from flowjac.pipelines.stored import PAPER_FD_ATTRIBUTES  # noqa: E402

DESIGN = PAPER_FD_ATTRIBUTES


def run(out, design: dict = DESIGN, force: bool = False, probes_path=None,
        stop_after: int | None = None, log=None) -> dict | None:
    """Run (or resume) into ``out``; ``stop_after`` batches then stop (tests). Returns the finished dict, or None when stopped."""
    log = log or (lambda msg: print(msg, flush=True))
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    if out.exists() and not force:
        raise SystemExit(f"{out} exists; pass --force to replace it")
    probes_path = Path(probes_path or repo_root() / "results" / "attributes_probes.pt")
    meta = torch.load(probes_path, map_location="cpu", weights_only=True)["meta"]
    if design["n"] > meta["n"] or design["probe"] >= meta["k"]:
        raise SystemExit(f"the design asks for {design['n']} latents and probe "
                         f"{design['probe']}; {probes_path} has {meta['n']} and k = {meta['k']}")
    scm = pretrained.load("scm")
    sha = scm.manifest["scm-flow"]["sha256"]
    dtype = getattr(torch, design["dtype"])
    velocity = scm.velocity
    scm.flow.to(dtype)
    readout = scm.classifier.to(dtype)
    z, v, _ = probing.redraw(meta, scm.latent_shape, range(design["n"]))
    v = v[:, design["probe"]]
    state = dict(design=dict(design), sha256=sha, probes_n=meta["n"], fd=[], seconds=0.0)
    if partial.exists():
        old = torch.load(partial, map_location="cpu", weights_only=True)
        if (repr(sorted(old["design"].items())) != repr(sorted(state["design"].items()))
                or old["sha256"] != sha):
            raise SystemExit(f"{partial} belongs to another design or other weights; "
                             "remove it to start over")
        state = old
        log(f"resuming from {partial}: {sum(len(f) for f in state['fd'])} of "
            f"{design['n']} latents done")
    done = sum(len(f) for f in state["fd"])
    batches = 0
    for i in range(done, design["n"], design["batch"]):
        t0 = time.perf_counter()
        fd = patch_study.paper_fd(velocity, readout, z[i:i + design["batch"]],
                                  v[i:i + design["batch"]], batch_size=design["batch"],
                                  eps=design["eps"], steps=design["steps"],
                                  method=design["method"], dtype=dtype)
        state["fd"].append(fd.float())
        state["seconds"] += time.perf_counter() - t0
        atomic_torch_save(partial, state)
        done = min(design["n"], i + design["batch"])
        log(f"latents {i}-{done - 1}: {time.perf_counter() - t0:.0f} s "
            f"(total {state['seconds'] / 60:.1f} min, {done} of {design['n']})")
        batches += 1
        if stop_after is not None and batches >= stop_after and done < design["n"]:
            return None
    res = dict(fd=torch.cat(state["fd"]),
               meta=dict(design=state["design"], weights_sha256=sha,
                         probes=str(probes_path.name), probes_seed=meta["seed"],
                         seconds=state["seconds"], hardware=hardware(),
                         torch_threads=torch.get_num_threads()))
    atomic_torch_save(out, res)
    partial.unlink()
    log(f"wrote {out}")
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    run(args.out, force=args.force)


if __name__ == "__main__":
    main()
