"""Ship one trained part: copy its file into the weights folder and rewrite its manifest entry.

    python tools/ship_part.py RECORD.json --weights FILE [--sampler rk4:10] \
        [--out flowjac/weights] [--replace] [--note TEXT]

``RECORD.json`` is the record ``tools/train_shipped.py`` (or
``tools/train_morpho.py``) wrote beside the trained ``FILE`` (its recipe,
steps, hardware and the gates measured under each sampler it was given).
The entry shipped uses the gates of the one
sampler named by ``--sampler``; the part is refused unless those gates were
measured on at least ``quality.GATE_MIN_N`` samples of a seed other than
the gates-along-training seed (1) and pass every limit (no failure, no
borderline), and unless the record's recipe is the package's
``RECIPES[part]`` (or, for a Morpho-MNIST part from ``tools/train_morpho.py``,
``morpho_models.MORPHO_RECIPES[part]``). A Morpho part's record must name
the sha256 of ``FILE`` and hold the recipe's whole training; the Morpho
readout, which has no sampler, ships its one set of gates, which must pass
on at least ``quality.GATE_MIN_N`` items of held-out data it names. A
record whose flow was fine-tuned from a file (its
``started_from``) keeps the first stage's history when the manifest's
current entry is that file: its gates along training, hardware, seconds
and sha256 go under ``first_stage``.

Nothing is replaced silently: an existing file of that name in ``--out``
with other contents is replaced only with ``--replace`` (the old sha256 is
printed; the shipped weights live in git, so the old file can be restored
from there). Both the weights and the manifest are written atomically.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from flowjac.base import atomic_write_bytes  # noqa: E402
from flowjac.models import pretrained, quality  # noqa: E402

ALONG_SEED = 1          # the seed of the gates measured along training


def _sampler(text: str) -> dict:
    method, sep, steps = text.partition(":")
    if not sep or not steps.isdigit() or int(steps) < 1 or not method:
        raise SystemExit(f"--sampler must be METHOD:STEPS (e.g. rk4:10), got {text!r}")
    return {"method": method, "steps": int(steps)}


def chosen_gates(record: dict, sampler: dict | None) -> dict:
    """The record's gates measured under ``sampler`` (None for a part without one), checked to be shippable."""
    part = record.get("part")
    # only a Morpho readout ships without a sampler; every other part names one
    has_sampler = part in pretrained.RECIPES or "sampler" in pretrained.recipe_of(part)
    if (sampler is None) == has_sampler:
        raise SystemExit(f"--sampler: {part} " + (
            "needs one: name the sampler whose gates ship (METHOD:STEPS)"
            if has_sampler else "has no sampler; omit it"))
    if sampler is None:         # a Morpho readout, judged on held-out data no training saw
        gates = record.get("gates") or {}
        if gates.get("n", 0) < quality.GATE_MIN_N or not gates.get("heldout"):
            raise SystemExit(f"{part}: its gates were measured on n={gates.get('n', 0)} "
                             f"(held out: {gates.get('heldout')}); shipping needs n >= "
                             f"{quality.GATE_MIN_N} on named held-out data")
        return _all_pass(part, gates, "its gates")
    found = [g for g in record.get("gates_by_sampler") or [record.get("gates") or {}]
             if g.get("sampler") == sampler]
    if not found:
        have = [g.get("sampler") for g in record.get("gates_by_sampler") or []]
        raise SystemExit(f"--sampler: {part}'s record has no gates measured with "
                         f"{sampler} (it has {have})")
    gates = found[-1]
    n, seed = gates.get("n", 0), gates.get("seed")
    if n < quality.GATE_MIN_N or seed in (None, ALONG_SEED):
        raise SystemExit(f"{part}: the gates with {sampler} were measured on n={n} "
                         f"samples of seed {seed}; shipping needs n >= "
                         f"{quality.GATE_MIN_N} on a seed other than {ALONG_SEED}")
    return _all_pass(part, gates, f"the gates with {sampler}")


def _all_pass(part: str, gates: dict, which: str) -> dict:
    bad = {k: v for k, v in (gates.get("status") or {}).items() if v != "pass"}
    if not gates.get("passed") or bad:
        raise SystemExit(f"{part}: {which} do not all pass ({bad or 'passed is false'})")
    return gates


def entry_for(record: dict, sampler: dict | None, current: dict | None, note: str | None) -> dict:
    """The manifest entry: the record, its chosen gates and sampler, the first stage's history."""
    part = record["part"]
    recipe = json.loads(json.dumps(pretrained.recipe_of(part)))
    if record.get("recipe") != recipe:
        raise SystemExit(f"{part}: the record's recipe is not the package's recipe of "
                         f"{part!r}; update its settings first (or retrain)")
    if part not in pretrained.RECIPES:      # a Morpho part: its whole recipe, finished
        steps = recipe["train_steps"] + (recipe.get("finetune") or {}).get("steps", 0)
        if record.get("train_steps") != steps or record.get("finished") is False:
            raise SystemExit(f"{part}: the record trained {record.get('train_steps')} steps "
                             f"(finished: {record.get('finished')}); the recipe's are {steps}")
    entry = {k: v for k, v in record.items() if k not in ("sha256",)}
    entry["gates"] = chosen_gates(record, sampler)
    if sampler is not None:
        entry["sampler"] = sampler
    entry.setdefault("gates_hardware", record.get("hardware"))
    start = record.get("started_from")
    if start and current and current.get("sha256") == start.get("sha256"):
        entry["first_stage"] = {k: current.get(k) for k in (
            "sha256", "train_steps", "train_seconds", "hardware", "gates_along_training",
            "sampler") if k in current}
    if note:
        entry["notes"] = note
    return entry


def ship(record_path, weights, sampler: dict, out, replace=False, note=None) -> dict:
    """Copy ``weights`` into ``out`` and rewrite ``out/manifest.json``'s entry; returns the entry."""
    record = json.loads(Path(record_path).read_text())
    part = record.get("part")
    if part not in pretrained.shippable_parts():
        raise SystemExit(f"RECORD: part {part!r} is not one of {sorted(pretrained.shippable_parts())}")
    weights, out = Path(weights), Path(out)
    if not weights.is_file():
        raise SystemExit(f"--weights: no file {weights}")
    new_sha = pretrained.sha256(weights)
    if part not in pretrained.RECIPES and record.get("sha256") is None:
        raise SystemExit(f"RECORD: {part}'s record names no sha256 of its weights (written "
                         "by tools/train_morpho.py); its gates cannot be tied to --weights")
    if record.get("sha256") not in (None, new_sha):
        raise SystemExit(f"--weights: {weights} has sha256 {new_sha[:12]}..., the record "
                         f"says {record['sha256'][:12]}...")
    manifest_path = out / "manifest.json"
    parts = json.loads(manifest_path.read_text())["parts"] if manifest_path.is_file() else {}
    entry = entry_for(record, sampler, parts.get(part), note)
    target = out / record["file"]
    if target.is_file() and pretrained.sha256(target) != new_sha:
        if not replace:
            raise SystemExit(f"--replace: {target} exists with other contents (sha256 "
                             f"{pretrained.sha256(target)[:12]}...); pass --replace to "
                             "replace it")
        print(f"replacing {target} (was sha256 {pretrained.sha256(target)})")
    if not target.is_file() or pretrained.sha256(target) != new_sha:
        atomic_write_bytes(target, weights.read_bytes())
    records = {p: {k: v for k, v in e.items() if k != "sha256"} for p, e in parts.items()}
    records[part] = entry
    pretrained.write_manifest(records, out)
    return pretrained.manifest(out)[part]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("record", type=Path, help="the part's record (PART.json) from train_shipped.py "
                                              "or train_morpho.py")
    ap.add_argument("--weights", type=Path, required=True, help="the trained file to ship")
    ap.add_argument("--sampler", type=_sampler, default=None,
                    help="METHOD:STEPS, the sampler whose gates ship (and the chapters use); "
                         "flows only")
    ap.add_argument("--out", type=Path, default=pretrained.WEIGHTS_DIR,
                    help="the weights folder (default: the package's)")
    ap.add_argument("--replace", action="store_true",
                    help="replace a file of the same name with other contents")
    ap.add_argument("--note", help="a note for the manifest entry (why this sampler, ...)")
    args = ap.parse_args(argv)
    entry = ship(args.record, args.weights, args.sampler, args.out, args.replace, args.note)
    g = entry["gates"]
    where = f"of seed {g['seed']}" if "sampler" in entry else f"of {g['heldout']}"
    print(f"shipped {entry['part']} ({entry['file']}, sha256 {entry['sha256'][:12]}...), "
          f"sampler {entry.get('sampler')}, gates on n={g['n']} {where}: "
          + ", ".join(f"{k} {v}" for k, v in g["status"].items()))


if __name__ == "__main__":
    main()
