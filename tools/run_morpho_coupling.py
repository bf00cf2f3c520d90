"""The stored run of the coupling study (issue 33, item 5): the same published test digits' counterfactuals under three conditional flows of one law.

    OMP_NUM_THREADS=1 python tools/run_morpho_coupling.py \\
        --flow morpho-conditional=PATH --flow morpho-conditional-seed1=PATH \\
        --flow morpho-conditional-ot=PATH --out results/morpho_coupling_run.pt \\
        [--n 1000] [--batch 50] [--root DIR] [--device cpu] [--force]

The design is ``flowjac.pipelines.morpho_coupling.COUPLING_STUDY``, fixed
before any of the flows was trained: the reference flow (the shipped
conditional recipe), the same recipe with seed 1 (training noise) and with
optimal-transport pairs (another coupling); the first ``n_stored`` rows of
the published test set; do(t), do(i) and do(digit) with the counterfactual
protocol's targets (``morpho_counterfactuals.intervention_targets``, drawn
once for all 10,000 rows) and its sampler. Each ``--flow NAME=PATH`` is a
``tools/train_morpho.py`` checkpoint; the names are the study's. The run
goes in batches of ``--batch`` images; after each, every per-image row so
far is written atomically to ``OUT.partial``, and a restarted run with the
same settings and weights resumes from it (a partial file of other settings
is refused). The output is never overwritten without ``--force``. The file
keeps the per-image ``rows`` (``morpho_coupling.gap_rows``), their
``summary`` and ``verdict`` and ``meta``: the design, n, batch, seconds,
hardware, torch threads and the weights' sha256.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from flowjac.base import atomic_torch_save, hardware, resume_state  # noqa: E402
from flowjac.data import morpho  # noqa: E402
from flowjac.models.recipe_settings import sha256  # noqa: E402
from flowjac.pipelines import morpho_counterfactuals as mc  # noqa: E402
from flowjac.pipelines import morpho_coupling as cs  # noqa: E402
from run_morpho_counterfactuals import load_flow  # noqa: E402


def _flows(items) -> dict:
    """``NAME=PATH`` items as {name: path}, every name of the study once."""
    flows = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or name not in cs.COUPLING_STUDY["flows"] or name in flows:
            raise SystemExit(f"--flow must be NAME=PATH with NAME one of "
                             f"{list(cs.COUPLING_STUDY['flows'])}, each once; got {item!r}")
        if not Path(path).is_file():
            raise SystemExit(f"--flow {name}: no file {path!r}")
        flows[name] = Path(path)
    missing = [n for n in cs.COUPLING_STUDY["flows"] if n not in flows]
    if missing:
        raise SystemExit(f"--flow: missing {missing}")
    return flows


def run(out, flows: dict, *, n: int | None = None, batch: int = 50, root=None,
        device: str = "cpu", force: bool = False, stop_after: int | None = None,
        log=None) -> dict | None:
    """Run (or resume) the study into ``out``; ``stop_after`` batches then stop (tests). Returns the finished dict, or None when stopped."""
    log = log or (lambda msg: print(msg, flush=True))
    out = Path(out)
    if out.exists() and not force:      # refused before any weights are read
        raise SystemExit(f"{out} exists; pass --force to replace it")
    models = {name: load_flow(path, device) for name, path in flows.items()}
    data = morpho.load_published(root)
    n = min(cs.COUPLING_STUDY["n_stored"] if n is None else int(n), len(data))
    if n < 2 or batch < 1:
        raise SystemExit("--n must be >= 2 and --batch >= 1")
    settings = dict(design=repr(sorted(cs.COUPLING_STUDY.items())), n=n, batch=batch,
                    weights_sha256={name: sha256(p) for name, p in sorted(flows.items())})
    partial, state = resume_state(out, settings, {"rows": {}, "done": 0, "meta": dict(
        settings=settings, seconds=0.0)}, force=force, log=log)
    solver = cs.COUPLING_STUDY["sampler"]
    for k, lo in enumerate(range(state["done"], n, batch)):
        if stop_after is not None and k >= stop_after:
            return None
        hi = min(lo + batch, n)
        t0 = time.perf_counter()
        targets = mc.intervention_targets(range(lo, hi))
        rows = cs.gap_rows(models, data.images[lo:hi], data.t[lo:hi], data.i[lo:hi],
                           data.digits[lo:hi],
                           {name: targets[name] for name in cs.COUPLING_STUDY["interventions"]},
                           **solver)
        for name, r in rows.items():
            keep = state["rows"].setdefault(name, {"effect": [], "gap": {}})
            keep["effect"].append(torch.from_numpy(r["effect"]))
            for m, g in r["gap"].items():
                keep["gap"].setdefault(m, []).append(torch.from_numpy(g))
        state["done"] = hi
        state["meta"]["seconds"] += time.perf_counter() - t0
        atomic_torch_save(partial, state)
        log(f"images {lo}-{hi - 1}: total {state['meta']['seconds'] / 60:.1f} min, "
            f"{hi} of {n}")
    rows = {name: {"effect": torch.cat(r["effect"]),
                   "gap": {m: torch.cat(g) for m, g in r["gap"].items()}}
            for name, r in state["rows"].items()}
    summary = cs.gap_summary({name: {"effect": r["effect"].numpy(),
                                     "gap": {m: g.numpy() for m, g in r["gap"].items()}}
                              for name, r in rows.items()})
    result = {"rows": rows, "summary": summary, "verdict": cs.gap_verdict(summary),
              "meta": dict(state["meta"], n=n, batch=batch, design=cs.COUPLING_STUDY,
                           data=data.source, hardware=hardware(),
                           torch_threads=torch.get_num_threads())}
    atomic_torch_save(out, result)
    partial.unlink(missing_ok=True)
    log(f"wrote {out} ({state['meta']['seconds'] / 60:.1f} min): "
        + "; ".join(v["text"] for v in result["verdict"].values()))
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flow", action="append", default=[], metavar="NAME=PATH",
                    help="a conditional flow of the study (all three are needed)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=cs.COUPLING_STUDY["n_stored"])
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--root", type=Path, default=None,
                    help="the published test set's folder (default ../shared/morpho-mnist-dscm)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--force", action="store_true", help="replace an existing --out")
    args = ap.parse_args(argv)
    run(args.out, _flows(args.flow), n=args.n, batch=args.batch, root=args.root,
        device=args.device, force=args.force)


if __name__ == "__main__":
    main()
