"""Shipped models: flows and classifiers that passed their quality gates.

``available()`` lists the names, ``load(name)`` returns the models ready to
use, after checking each file's sha256 against ``weights/manifest.json``:

* ``"scm"`` — a FlowUNet on the 32x32 SCM images (flow space [-1, 1]) and
  the attribute classifier trained on *independent* attribute renders (so
  that no attribute can be read off another), 9 logits in SCM order;
* ``"mnist-fives"`` — a FlowUNet on MNIST fives (pixel space [0, 1]);
* ``"mnist-fives-torchcfm"`` — the same data trained with torchcfm's own
  ConditionalFlowMatcher and UNetModelWrapper, shipped in torchcfm's
  checkpoint format and loaded through ``adapters.load_torchcfm_checkpoint``
  (needs the ``interop`` extra);
* ``"mnist-digits"`` — a ten-class digit classifier on [0, 1] pixels;
* ``"scm-conditional"`` — a label-conditional FlowUNet on the SCM images,
  trained on independent attribute renders; its ``velocity`` is a
  ``LabelVelocity``: ``velocity(x, t, labels)`` with labels (B, 9) of 0/1 in
  SCM order, ``velocity.given(labels)`` an ordinary velocity (x, t); with
  the same attribute classifier.

Every file was made by ``train(part, ...)`` from the recipe in ``RECIPES``
(``tools/train_shipped.py`` runs it; the manifest records the settings, the
training steps and time, the hardware and the measured gates), so a
chapter's ``retrain=True`` reruns the recipe that produced the shipped file.
A part's ``kind`` picks its recipe class (``recipe(part)``), which builds,
loads, trains (``train``) and gates (``gates``) it; ``train_part`` and
``evaluate_part`` hand the part to its class.

Explained in :ref:`sec_attributes` and :ref:`sec_mnist`.

The recipes' settings, data and sampler live in ``recipe_settings``, the
recipe classes in ``recipe_kinds``; every name stays importable from here.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flowjac._checks import check_choice, check_int

__all__ = ["WEIGHTS_DIR", "RECIPES", "NAMES", "Pretrained", "available",
           "Recipe", "ClassifierRecipe", "AttributeClassifierRecipe", "FlowRecipe", "ConditionalFlowRecipe",
           "TorchcfmFlowRecipe", "recipe",
           "load", "manifest", "verified_file", "shippable_parts", "recipe_of", "sha256", "build", "train_part", "velocity_of",
           "value_range_of", "to_pixels",
           "load_weights",
           "training_data", "sample", "evaluate_part", "write_manifest",
           "training_history", "gates_along_training",
           "flow_config"]

from flowjac.models.recipe_kinds import (  # noqa: E402,F401  (re-exported)
    AttributeClassifierRecipe, ClassifierRecipe, ConditionalFlowRecipe, FlowRecipe, Recipe,
    TorchcfmFlowRecipe, _JUDGES, _RECIPE_CLASSES, _Run, recipe, value_range_of)
from flowjac.models.recipe_settings import (  # noqa: E402,F401  (re-exported)
    NAMES, RECIPES, WEIGHTS_DIR, _training_data, sample, sha256, to_pixels, training_data)


@dataclass
class Pretrained:
    """What ``load(name)`` returns; unused fields are None; :ref:`sec_attributes`.

    ``velocity(x, t)`` is the flow's drift (with an exact ``jvp``),
    ``latent_shape`` the shape of one latent, ``sampler`` the solver
    settings the gates were measured with (``method``, ``steps``),
    ``classifier`` maps flow-space images (B, C, H, W) to logits,
    ``attr_names`` names the logits, ``manifest`` holds each file's entry,
    ``value_range`` is the (lo, hi) of the flow's space that pixel values
    0 and 1 map to (``to_pixels``).
    """

    name: str
    velocity: object = None
    flow: torch.nn.Module | None = None
    latent_shape: tuple | None = None
    sampler: dict | None = None
    classifier: torch.nn.Module | None = None
    attr_names: tuple | None = None
    manifest: dict = field(default_factory=dict)
    value_range: tuple = (0.0, 1.0)
    _flow: object = field(default=None, repr=False)

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Flow-space images as pixels in [0, 1]: (x - lo) / (hi - lo); :ref:`sec_byom`."""
        return to_pixels(x, self.value_range)

    def as_flow(self):
        """The ``adapters.Flow`` this shipped flow was loaded as (what ``adapters.open_flow(name)`` returns); :ref:`sec_byom`."""
        if self._flow is None:
            raise ValueError(f"{self.name!r} holds no flow (only a classifier); "
                             f"give one of {sorted(n for n in NAMES if n != 'mnist-digits')}")
        return self._flow


def available() -> list:
    """Names that ``load`` accepts; :ref:`sec_attributes`."""
    return sorted(NAMES)


def manifest(weights_dir=None) -> dict:
    """The shipped manifest ``{part: entry}`` (empty if none); :ref:`sec_attributes`."""
    path = Path(weights_dir or WEIGHTS_DIR) / "manifest.json"
    if not path.is_file():
        return {}
    return json.loads(path.read_text())["parts"]


def build(part: str) -> torch.nn.Module:
    """The untrained network of a recipe part; :ref:`sec_attributes`."""
    return recipe(part).build()


def load(name: str, device="cpu", weights_dir=None) -> Pretrained:
    """Load a shipped model by name, verifying sha256, with ``weights_only=True``; :ref:`sec_attributes`.

    ``name`` is one of ``available()``. Raises ValueError for an unknown
    name or a file whose sha256 differs from the manifest (altered or
    truncated), FileNotFoundError for a missing file or manifest.
    """
    if not isinstance(name, str) or name not in NAMES:
        raise ValueError(f"name must be one of {available()}, got {name!r}")
    wdir = Path(weights_dir or WEIGHTS_DIR)
    out = Pretrained(name=name)
    for part in NAMES[name]:
        path, entry = verified_file(part, wdir)
        digest = entry["sha256"]
        out.manifest[part] = entry
        rec = recipe(part)
        if isinstance(rec, ClassifierRecipe):
            out.classifier = rec.load_file(path).to(device).eval().requires_grad_(False)
            out.attr_names = rec.attr_names
            continue
        flow = rec.open(path, device, entry)
        flow.source.update(kind="shipped", name=name, part=part, sha256=digest,
                           format=flow.source["kind"], step=entry.get("train_steps"))
        out._flow = flow
        out.flow, out.velocity, out.latent_shape = flow.model, flow.velocity, flow.latent_shape
        out.sampler, out.value_range = dict(flow.sampler), flow.value_range
    return out


def verified_file(part: str, weights_dir=None) -> tuple:
    """``(path, entry)`` of a shipped part whose file's sha256 matches its manifest entry; :ref:`sec_attributes`.

    Raises FileNotFoundError for a missing manifest, entry or file and
    ValueError for a file whose sha256 differs (altered or truncated).
    """
    wdir = Path(weights_dir or WEIGHTS_DIR)
    if not (wdir / "manifest.json").is_file():
        raise FileNotFoundError(f"no manifest.json in {wdir}: the shipped "
                                "models are missing; retrain them with "
                                "tools/train_shipped.py")
    entry = manifest(wdir).get(part)
    if entry is None:
        raise FileNotFoundError(f"manifest.json in {wdir} has no entry "
                                f"for {part!r}")
    path = wdir / entry["file"]
    if not path.is_file():
        raise FileNotFoundError(f"shipped model file {path} is missing; "
                                "restore it from the repository or "
                                "retrain it with tools/train_shipped.py")
    digest = sha256(path)
    if digest != entry["sha256"]:
        raise ValueError(f"shipped model file {path} has sha256 {digest}, "
                         f"but the manifest says {entry['sha256']}: the "
                         "file was altered or truncated; restore it or "
                         "retrain it")
    return path, entry


def shippable_parts() -> tuple:
    """Every part a manifest may hold: ``RECIPES`` and the Morpho-MNIST parts (``morpho_models.MORPHO_RECIPES``); :ref:`sec_attributes`."""
    from flowjac.models.morpho_models import MORPHO_RECIPES

    return tuple(RECIPES) + tuple(MORPHO_RECIPES)


def recipe_of(part: str) -> dict:
    """The recipe settings of any shippable part; :ref:`sec_attributes`."""
    from flowjac.models.morpho_models import MORPHO_RECIPES

    check_choice("part", part, shippable_parts())
    return RECIPES[part] if part in RECIPES else MORPHO_RECIPES[part]


# the recipe each ``flowjac train --data`` starts from, its native size, and
# the smallest side length of the UNet's coarsest level
_CLI_RECIPE = {"scm": "scm-flow", "mnist": "mnist-fives"}
_NATIVE_SIZE = {"scm": 32, "mnist": 28}
_COARSEST = 4


def flow_config(data: str, size=None, base_channels=None) -> dict:
    """The FlowUNet config for ``flowjac train --data`` scaled to ``size`` and ``base_channels``; :ref:`sec_running_at_scale`.

    Starts from the shipped recipe (``RECIPES["scm-flow"]`` or
    ``["mnist-fives"]``), sets ``image_size``, drops the coarsest levels
    until the coarsest is at least 4 pixels wide, and with other base
    channels sets the time embedding to 4 times them and the GroupNorm
    groups to at most 8 (a divisor of every width).
    """
    import math

    check_choice("data", data, tuple(_CLI_RECIPE))
    net = dict(RECIPES[_CLI_RECIPE[data]]["net"])
    size = _NATIVE_SIZE[data] if size is None else check_int("size", size, minimum=8)
    mult = list(net["channel_mult"])
    while len(mult) > 1 and math.ceil(size / 2 ** (len(mult) - 1)) < _COARSEST:
        mult.pop()
    net.update(image_size=size, channel_mult=mult)
    if base_channels is not None:
        base = check_int("base_channels", base_channels, minimum=1)
        net.update(base_channels=base, time_dim=4 * base,
                   norm_groups=math.gcd(8, base))
    return net


def train_part(part: str, out_dir, *, device="cpu", train_steps=None,
               time_budget: float | None = None, chunk: int = 2000,
               progress: bool = False, on_chunk=None, start_from=None,
               resume: bool = False) -> dict:
    """Train one recipe part and write its checkpoint to ``out_dir``; :ref:`sec_attributes`.

    ``train_steps`` overrides the recipe (for tests and smoke runs). Flows
    train in chunks of ``chunk`` steps through ``train_flow``'s exact resume,
    so a ``time_budget`` (seconds) can stop after the last chunk that fits;
    ``on_chunk(model, step)`` is called after each chunk with the EMA
    weights loaded (for measurements along training); a true return stops
    the run there. A recipe with a ``finetune`` stage continues from the
    first stage's EMA weights with the stage's own settings (fresh
    optimizer; steps counted on from the first stage's); ``start_from`` is
    a file of the first stage (its sha256 must be the recipe's
    ``finetune["start_sha256"]``), so only the second stage runs. With
    ``resume`` the training checkpoints in ``out_dir`` are kept and a later
    call continues from them exactly. Returns the record that goes into the
    manifest (without sha256).
    """
    check_choice("part", part, tuple(RECIPES))
    return recipe(part).train(out_dir, device=device, train_steps=train_steps,
                              time_budget=time_budget, chunk=chunk, progress=progress,
                              on_chunk=on_chunk, start_from=start_from, resume=resume)


def velocity_of(part: str, model):
    """The velocity (x, t) of a recipe part's trained flow network; :ref:`sec_byom`."""
    rec = recipe(part)
    if not isinstance(rec, FlowRecipe):
        raise ValueError(f"part {part!r} is a classifier, not a flow")
    return rec.velocity(model)


def load_weights(part: str, path, model=None):
    """Load a recipe part's file (flowjac or torchcfm format) into ``model`` (built if None); :ref:`sec_byom`."""
    return recipe(part).load_file(path, model)


def evaluate_part(part: str, model, *, device="cpu", n: int = 2000,
                  classifier=None, sampler: dict | None = None,
                  seed: int = 1) -> dict:
    """Measure a part's gates: held-out accuracy for classifiers, sample gates and memorization for flows; :ref:`sec_attributes`.

    Flows need the matching ``classifier`` (the attribute classifier for
    ``"scm-flow"``, the digit classifier for the flows of fives). Returns the
    gate dict (``passed`` says whether every gate holds) and, for flows,
    the samples under ``"samples"`` (SCM images in the flow's [-1, 1],
    fives as pixels in [0, 1] whatever the flow's ``value_range``).
    """
    check_choice("part", part, tuple(RECIPES))
    return recipe(part).gates(model, device=device, n=n, classifier=classifier,
                              sampler=sampler, seed=seed)


def write_manifest(records: dict, weights_dir=None) -> Path:
    """Write ``manifest.json`` for the given ``{part: record}``, adding each file's sha256; :ref:`sec_attributes`."""
    from flowjac.base import save_json

    wdir = Path(weights_dir or WEIGHTS_DIR)
    parts = {}
    for part, rec in records.items():
        check_choice("part", part, shippable_parts())
        rec = dict(rec)
        rec["sha256"] = sha256(wdir / rec["file"])
        parts[part] = rec
    return save_json(wdir / "manifest.json", {"format": "flowjac-manifest-1",
                                              "parts": parts})


def _where(hw: dict) -> str:
    return hw.get("gpu") or f"{hw.get('cpu', 'a CPU')} CPU ({hw.get('torch_threads', '?')} thread(s))"


def training_history(entry: dict) -> str:
    """How a shipped part was trained, stage by stage, read from its manifest ``entry``; :ref:`sec_attributes`.

    A fine-tuned part (``first_stage`` in its entry, written by
    ``tools/ship_part.py``) names both stages, their steps and hardware."""
    first = entry.get("first_stage")
    rec = entry.get("recipe") or {}
    if not first:
        return (f"It was trained for {entry['train_steps']:,} steps on "
                f"{_where(entry['hardware'])} ({entry['train_seconds'] / 60:.0f} min).")
    ft = rec.get("finetune") or {}
    cool = ft.get("lr_cooldown")
    how = ", ".join(x for x in (
        f"batch {ft['batch_size']}" if "batch_size" in ft else "",
        f"learning rate {ft['lr']:g}" if "lr" in ft else "",
        f"cooled linearly to 0 from step {cool[0]:,}" if cool else "") if x)
    return (f"It was trained for {first['train_steps']:,} steps on "
            f"{_where(first['hardware'])} ({first['train_seconds'] / 60:.0f} min), then "
            f"fine-tuned for {entry['train_steps'] - first['train_steps']:,} steps on "
            f"{_where(entry['hardware'])}" + (f" ({how})" if how else "")
            + f": {entry['train_steps']:,} steps in all.")


def gates_along_training(entry: dict) -> list:
    """The gates measured along training, the first stage's first for a fine-tuned part; :ref:`sec_attributes`."""
    first = (entry.get("first_stage") or {}).get("gates_along_training") or []
    return list(first) + list(entry.get("gates_along_training") or [])
