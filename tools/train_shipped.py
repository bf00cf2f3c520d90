"""Train the shipped models (flowjac.models.pretrained.RECIPES) and measure their gates.

    python tools/train_shipped.py scm-classifier mnist-digits --out DIR
    python tools/train_shipped.py scm-flow --device cuda --out DIR \
        --classifier-dir DIR --time-budget 300

Each part writes ``DIR/<file>`` and ``DIR/<part>.json`` (the manifest record
with the measured gates); flows also write ``DIR/<part>_samples.pt`` (the
gate samples as uint8 pixels) and their gates along training. After copying
the files into ``flowjac/weights/``, ``--manifest`` writes manifest.json from
the records there. See results/README.md for how the shipped files were made.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from flowjac.engine.checkpoints import load_checkpoint  # noqa: E402
from flowjac.models import pretrained  # noqa: E402
from flowjac.base import atomic_torch_save, save_json  # noqa: E402

CLASSIFIER_OF = {"scm-flow": "scm-classifier", "scm-conditional": "scm-classifier",
                 "mnist-fives": "mnist-digits", "mnist-fives-torchcfm": "mnist-digits"}


def to_uint8(samples, part):
    # evaluate_part gives fives as pixels already, SCM images in the flow's space
    x = samples if part.startswith("mnist") else pretrained.to_pixels(
        samples, pretrained.value_range_of(part))
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def override(recipe: dict, item: str) -> dict:
    """A copy of ``recipe`` with ``KEY=JSON`` applied (dotted keys reach into groups such as ``unet``)."""
    key, sep, text = item.partition("=")
    try:
        value = json.loads(text)
    except ValueError:
        sep = None
    if not sep or not key:
        raise ValueError(f"--set must be KEY=JSON (e.g. unet.dropout=0.1), got {item!r}")
    out = json.loads(json.dumps(recipe))
    *groups, last = key.split(".")
    node = out
    for k in groups:
        if not isinstance(node.get(k), dict):
            raise ValueError(f"--set {key}: the recipe has no setting group {k!r}")
        node = node[k]
    node[last] = value
    return out


def _classifier(part, cdir, device):
    cpart = CLASSIFIER_OF[part]
    clf = pretrained.build(cpart)
    load_checkpoint(cdir / pretrained.RECIPES[cpart]["file"], clf)
    return clf.to(device).eval().requires_grad_(False)


def _measure(part, model, clf, args, samplers):
    """Gates of ``model`` under each sampler on --n-gate samples of --gate-seed."""
    out = []
    for smp in samplers:
        t0 = time.perf_counter()
        g = pretrained.evaluate_part(part, model, device=args.device,
                                     n=args.n_gate, classifier=clf,
                                     sampler=smp, seed=args.gate_seed)
        g["eval_seconds"] = time.perf_counter() - t0
        out.append(g)
        print(part, json.dumps({k: v for k, v in g.items() if k in (
            "n", "seed", "sampler", "status", "intervals", "passed",
            "readable", "marginal_error", "corr_mae", "share", "in_range",
            "min_accuracy")}), flush=True)
    return out


def regate(args):
    """Re-measure the gates of shipped files on a fresh seed and update the manifest."""
    from flowjac.utils import hardware

    path = args.out / "manifest.json"
    for part in args.parts:
        rec = json.loads(path.read_text())["parts"][part]
        if pretrained.sha256(args.out / rec["file"]) != rec["sha256"]:
            raise SystemExit(f"{part}: {rec['file']} is not the file the manifest names")
        model = pretrained.load_weights(part, args.out / rec["file"])
        model.to(args.device).eval().requires_grad_(False)
        if part in CLASSIFIER_OF:
            clf = _classifier(part, args.classifier_dir or args.out, args.device)
            samplers = [dict(rec["sampler"])] + [
                s for s in _samplers(args.samplers) if s != rec["sampler"]]
            found = _measure(part, model, clf, args, samplers)
            for g in found:
                g.pop("samples")
                g.pop("labels", None)
            new = dict(gates=found[0], gates_by_sampler=found)
        else:               # a classifier: its held-out sets are fixed by the recipe
            new = dict(gates=pretrained.evaluate_part(part, model, device=args.device))
            print(part, json.dumps({k: v for k, v in new["gates"].items()
                                    if k in ("n", "intervals", "status", "passed")}), flush=True)
        manifest = json.loads(path.read_text())      # re-read: write only this part
        rec = manifest["parts"][part]
        rec.setdefault("gates_when_trained", rec["gates"])
        if "gates_by_sampler" in rec:
            rec.setdefault("gates_by_sampler_when_trained", rec["gates_by_sampler"])
        rec.update(new, gates_hardware=hardware())
        save_json(path, manifest)
        print(part, "gates written to", path, flush=True)


def _samplers(text):
    """``method:steps[:guidance]`` items, comma-separated (guidance: label-conditional flows)."""
    out = []
    for item in text.split(","):
        parts = item.split(":")
        if len(parts) not in (2, 3):
            raise SystemExit(f"--samplers: each item is method:steps[:guidance], got {item!r}")
        try:
            smp = dict(method=parts[0], steps=int(parts[1]))
            if len(parts) == 3:
                smp["guidance"] = float(parts[2])
        except ValueError:
            raise SystemExit(f"--samplers: steps must be an integer and guidance a "
                             f"number, got {item!r}") from None
        out.append(smp)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("parts", nargs="*", metavar="PART",
                    help=f"any of {sorted(pretrained.RECIPES)}")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--classifier-dir", type=Path, default=None,
                    help="where the flows' gate classifiers are (default: --out)")
    ap.add_argument("--train-steps", type=int, default=None)
    ap.add_argument("--time-budget", type=float, default=None)
    ap.add_argument("--chunk", type=int, default=2000)
    ap.add_argument("--n-gate", type=int, default=2000)
    ap.add_argument("--samplers", default="midpoint:10",
                    help="comma-separated method:steps[:guidance]; the first is the default")
    ap.add_argument("--no-along", action="store_true",
                    help="skip the gate measurements after each chunk")
    ap.add_argument("--along-from", type=int, default=0,
                    help="measure gates along training only from this step on")
    ap.add_argument("--stop-when-passed", action="store_true",
                    help="stop training at the first chunk whose gates pass "
                         "(torchcfm recipes; their schedule does not depend "
                         "on train_steps, so this equals a run of that length)")
    ap.add_argument("--stop-on-memorization", action="store_true",
                    help="stop training at the first chunk whose memorization "
                         "gates (nearest-neighbour ratio and copy share) both "
                         "fail: more passes do not undo copying (the size "
                         "study's rule, patch_study.SIZE_STUDY)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="override a recipe setting for this run, e.g. "
                         "lr_cooldown=[5000,5500] or unet.dropout=0.1 (recorded "
                         "in the record's recipe; ship such a run only after "
                         "writing the setting into RECIPES)")
    ap.add_argument("--start-from", type=Path, default=None,
                    help="a recipe with a finetune stage: this file is its first "
                         "stage (sha256 checked against the recipe), so only "
                         "the fine-tuning runs")
    ap.add_argument("--resume", action="store_true",
                    help="keep the training checkpoints in --out and continue "
                         "from them exactly (an interrupted run)")
    ap.add_argument("--gate-seed", type=int, default=2,
                    help="seed of the final gate samples; the gates along "
                         "training (any stopping rule) use seed 1, so keep it "
                         "different")
    ap.add_argument("--regate", action="store_true",
                    help="train nothing: measure the gates of the files in "
                         "--out (e.g. flowjac/weights) with --n-gate samples of "
                         "--gate-seed and write them into OUT/manifest.json, "
                         "the earlier gates kept as gates_when_trained")
    ap.add_argument("--manifest", action="store_true",
                    help="write OUT/manifest.json from OUT/<part>.json records")
    args = ap.parse_args(argv)
    if args.gate_seed == 1:
        ap.error("--gate-seed 1 is the seed of the gates along training; "
                 "the final gates need samples no stopping rule has seen")
    bad = [p for p in args.parts if p not in pretrained.RECIPES]
    if bad:
        ap.error(f"unknown part(s) {bad}; choose from {sorted(pretrained.RECIPES)}")
    for item in args.set:
        for part in args.parts:
            try:
                pretrained.RECIPES[part] = override(pretrained.RECIPES[part], item)
            except ValueError as err:
                ap.error(f"{part}: {err}")
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.regate:
        regate(args)
        return
    for part in args.parts:
        rec_path = args.out / f"{part}.json"
        clf = (_classifier(part, args.classifier_dir or args.out, args.device)
               if part in CLASSIFIER_OF else None)
        # the gates along training, kept beside the checkpoint after every chunk
        # so that a resumed run continues the list instead of losing it
        along_path = args.out / f".{part}-along.json"
        along = (json.loads(along_path.read_text())
                 if args.resume and along_path.exists() else [])

        def on_chunk(model, step, part=part, clf=clf, along_path=along_path):
            if clf is None or args.no_along or step < args.along_from:
                return None
            t0 = time.perf_counter()
            g = pretrained.evaluate_part(part, model, device=args.device,
                                         n=min(args.n_gate, 1000), classifier=clf,
                                         seed=1)
            g.pop("samples")
            g.pop("labels", None)
            g["step"] = step
            g["eval_seconds"] = time.perf_counter() - t0
            along[:] = [a for a in along if a["step"] < step] + [g]
            save_json(along_path, along)
            print(json.dumps({k: v for k, v in g.items()
                              if k in ("step", "readable", "marginal_error",
                                       "corr_mae", "share", "in_range",
                                       "memorization", "eval_seconds",
                                       "min_accuracy", "all_attributes",
                                       "status")}),
                  flush=True)
            copying = all(g.get("status", {}).get(k) == "fail"
                          for k in ("nn_ratio", "copy_share"))
            if args.stop_on_memorization and copying:
                print(f"{part}: both memorization gates fail at step {step}: stopped",
                      flush=True)
                return True
            return bool(args.stop_when_passed and g.get("passed"))

        try:
            rec = pretrained.train_part(part, args.out, device=args.device,
                                        train_steps=args.train_steps,
                                        time_budget=args.time_budget,
                                        chunk=args.chunk, on_chunk=on_chunk,
                                        start_from=args.start_from, resume=args.resume)
        except FileExistsError as err:      # an interrupted run's checkpoint: never lost
            raise SystemExit(f"train_shipped: {part}: {err.args[0]}") from None
        print(part, "trained", rec["train_steps"], "steps in",
              round(rec["train_seconds"], 1), "s", flush=True)
        model = pretrained.load_weights(part, args.out / rec["file"])
        model.to(args.device).eval().requires_grad_(False)
        if clf is None:
            rec["gates"] = pretrained.evaluate_part(part, model, device=args.device)
        else:
            rec["gates_by_sampler"] = _measure(part, model, clf, args,
                                               _samplers(args.samplers))
            samples = rec["gates_by_sampler"][0]["samples"]
            atomic_torch_save(args.out / f"{part}_samples.pt", to_uint8(samples, part))
            for g in rec["gates_by_sampler"]:
                g.pop("samples")
                g.pop("labels", None)
            rec["gates"] = rec["gates_by_sampler"][0]
            rec["sampler"] = rec["gates"]["sampler"]
            rec["gates_along_training"] = along
            along_path.unlink(missing_ok=True)
        print(part, json.dumps({k: v for k, v in rec["gates"].items()
                                if not isinstance(v, (list, dict))}), flush=True)
        save_json(rec_path, rec)
    if args.manifest:
        records = {json.loads(p.read_text())["part"]: json.loads(p.read_text())
                   for p in sorted(args.out.glob("*.json"))
                   if p.name != "manifest.json"}
        print("manifest:", pretrained.write_manifest(records, args.out))


if __name__ == "__main__":
    main()
