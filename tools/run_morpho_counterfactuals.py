"""The stored run of Morpho-MNIST counterfactuals by the published protocol (issue 33, item 4): every published test digit abducted, intervened on and read back.

    OMP_NUM_THREADS=1 python tools/run_morpho_counterfactuals.py --flow PATH \\
        --out results/morpho_counterfactuals_run.pt [--n 10000] [--batch 50] \\
        [--classifier PATH] [--root DIR] [--device cpu] [--force]

Everything that decides the chapter's table and verdict is fixed in
``flowjac.pipelines.morpho_counterfactuals.PROTOCOL`` before the run: the
cycles (1 and 10), the interventions do(t), do(i), do(digit) with their
targets drawn once for all 10,000 rows (seed 0), the sampler (the
conditional recipe's midpoint, 10 steps, guidance 1), clipping, intervals
and the rule. ``--flow`` is the conditional flow's checkpoint
(``tools/train_morpho.py``'s ``morpho-conditional.pt``); ``--classifier`` a
digit classifier checkpoint (default: the shipped ``mnist-digits``), which
reads the digits and gives the features of the realism distance. The run
goes in batches of ``--batch`` images; after each, every per-image row so
far is written atomically to ``OUT.partial``, and a restarted run with the
same settings and weights resumes from it (a partial file of other settings
is refused). The output is never overwritten without ``--force``. The file
keeps the per-image rows (``morpho_counterfactuals.evaluate_batch``), their
``summary`` (``summarize``) and ``meta``: the protocol, n, batch, seconds,
hardware, torch threads and the weights' sha256. Cost, measured with the
recipe's (untrained) FlowUNet before any training: 3.4 s an image on one
shared thread of the project's 2-core CPU (load 4), about 30 solves of 10
midpoint steps an image, so all 10,000 take about 9.5 hours there.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from flowjac.base import atomic_torch_save, hardware, resume_state  # noqa: E402
from flowjac.data import morpho  # noqa: E402
from flowjac.models.recipe_settings import sha256  # noqa: E402
from flowjac.pipelines import morpho_counterfactuals as mc  # noqa: E402


def load_flow(path, device="cpu"):
    """The conditional FlowUNet of a flowjac checkpoint, built from the architecture it stores."""
    from flowjac.engine.checkpoints import load_checkpoint, read_checkpoint
    from flowjac.models.nets import FlowUNet

    payload = read_checkpoint(path, "flow")
    arch = payload.get("arch", {}) if isinstance(payload, dict) else {}
    if arch.get("class") != "FlowUNet":
        raise SystemExit(f"--flow {path} holds no FlowUNet checkpoint")
    cfg = dict(arch["config"])
    cfg["channel_mult"] = tuple(cfg["channel_mult"])
    model = FlowUNet(**cfg)
    load_checkpoint(path, model, payload=payload)
    return model.to(device).eval()


def load_digit_classifier(path=None, device="cpu"):
    """(classifier, sha256): a checkpoint's AttributeNet, or the shipped ``mnist-digits``."""
    if path is None:
        from flowjac.models import pretrained

        flow = pretrained.load("mnist-digits", device=device)
        return flow.classifier.eval(), flow.manifest["mnist-digits"]["sha256"]
    from flowjac.models.classifiers import load_classifier

    net, _ = load_classifier(path, (1, 28, 28), device=device)
    return net.eval(), sha256(path)


def _settings(n, batch, flow_sha, classifier_sha) -> dict:
    return dict(protocol=repr(sorted(mc.PROTOCOL.items())), n=n, batch=batch,
                flow_sha256=flow_sha, classifier_sha256=classifier_sha)


def run(out, flow, *, n: int | None = None, batch: int = 50, classifier=None,
        root=None, device: str = "cpu", force: bool = False, stop_after: int | None = None,
        log=None) -> dict | None:
    """Run (or resume) the protocol into ``out``; ``stop_after`` batches then stop (tests). Returns the finished dict, or None when stopped."""
    log = log or (lambda msg: print(msg, flush=True))
    out = Path(out)
    if out.exists() and not force:      # refused before any weights are read
        raise SystemExit(f"{out} exists; pass --force to replace it")
    model = load_flow(flow, device)
    clf, clf_sha = load_digit_classifier(classifier, device)
    data = morpho.load_published(root)
    n = len(data) if n is None else min(int(n), len(data))
    if n < 2 or batch < 1:
        raise SystemExit("--n must be >= 2 and --batch >= 1")
    settings = _settings(n, batch, sha256(flow), clf_sha)
    partial, state = resume_state(out, settings, {"rows": {}, "done": 0, "meta": dict(
        settings=settings, seconds=0.0, batches=[], complete=False)}, force=force, log=log)
    stopped = 0
    for lo in range(state["done"], n, batch):
        hi = min(lo + batch, n)
        t0 = time.perf_counter()
        rows = mc.evaluate_batch(model, data.images[lo:hi], data.t[lo:hi], data.i[lo:hi],
                                 data.digits[lo:hi], mc.intervention_targets(range(lo, hi)),
                                 clf)
        secs = time.perf_counter() - t0
        for k, v in rows.items():
            state["rows"].setdefault(k, []).append(torch.from_numpy(np.asarray(v)))
        state["done"] = hi
        state["meta"]["seconds"] += secs
        state["meta"]["batches"].append(dict(lo=lo, hi=hi, seconds=secs))
        atomic_torch_save(partial, state)
        log(f"images {lo}-{hi - 1}: {secs:.0f} s (total {state['meta']['seconds'] / 60:.1f} "
            f"min, {hi} of {n})")
        stopped += 1
        if stop_after is not None and stopped >= stop_after and hi < n:
            return None
    rows = {k: torch.cat(v) for k, v in state["rows"].items()}
    summary = mc.summarize({k: v.numpy() for k, v in rows.items()})
    result = {"rows": rows, "summary": summary,
              "meta": dict(state["meta"], complete=True, n=n, batch=batch,
                           protocol=mc.PROTOCOL, data=data.source, hardware=hardware(),
                           torch_threads=torch.get_num_threads(),
                           weights_sha256={"flow": settings["flow_sha256"],
                                           "classifier": clf_sha})}
    atomic_torch_save(out, result)
    partial.unlink()
    log(f"wrote {out} ({state['meta']['seconds'] / 60:.1f} min): "
        f"{summary['verdict']['text']}")
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flow", type=Path, required=True,
                    help="the conditional flow's checkpoint (morpho-conditional.pt)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=mc.PROTOCOL["n_stored"])
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--classifier", type=Path, default=None,
                    help="a digit classifier checkpoint (default: the shipped mnist-digits)")
    ap.add_argument("--root", type=Path, default=None,
                    help="the published test set's folder (default ../shared/morpho-mnist-dscm)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--force", action="store_true", help="replace an existing --out")
    args = ap.parse_args(argv)
    run(args.out, args.flow, n=args.n, batch=args.batch, classifier=args.classifier,
        root=args.root, device=args.device, force=args.force)


if __name__ == "__main__":
    main()
