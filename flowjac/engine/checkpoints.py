"""Checkpoints: atomic saves, ``weights_only=True`` loads, and the errors a user can act on.

A checkpoint holds the model's state and config as plain JSON-able values,
and optionally the optimizer, the EMA weights and training extras (the
generator state and losses for exact resume). Every checkpoint is read
by ``read_checkpoint``: a load failure keeps torch's reason, names an
unsafe pickle as such (never suggesting to load it unsafely), and gives one
clear error for a missing, empty or directory path. Explained in :ref:`sec_neural_gaussian`.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path

import torch
from torch import nn

from flowjac._checks import check_int
from flowjac.base import atomic_torch_save

__all__ = ["read_checkpoint", "save_checkpoint", "load_checkpoint", "load_or_train",
           "check_finite_weights"]


def _plain(value, where: str):
    """``value`` as plain Python (numpy/torch scalars to numbers, paths to
    strings, tuples to lists), or ValueError naming ``where``."""
    import numbers
    import os

    import numpy as np

    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if torch.is_tensor(value) and value.numel() == 1 and value.ndim == 0:
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise ValueError(f"{where} must hold plain values (numbers, strings, "
                     f"lists, dicts, paths), got {type(value).__name__}")


def _model_config(model):
    return {"class": type(model).__name__,
            "config": copy.deepcopy(getattr(model, "config", None))}


def save_checkpoint(path, model: nn.Module, optimizer=None, step: int = 0,
                    config: dict | None = None, ema=None, **extra) -> Path:
    """Write model/optimizer/EMA/step atomically with torch.save; :ref:`sec_neural_gaussian`.

    ``ema`` is an ``EMA``, a state dict or None; ``config`` a dict of plain
    Python values; ``extra`` further tensors or plain values (the trainer
    stores its RNG state and loss history). Load with ``load_checkpoint``.
    """
    step = check_int("step", step, minimum=0)
    if ema is not None and not isinstance(ema, dict):
        ema = ema.state_dict()
    payload = {"format": "flowjac-checkpoint-1", "model": model.state_dict(),
               "arch": _model_config(model), "step": step,
               "config": _plain(dict(config or {}), "config"),
               "optimizer": optimizer.state_dict() if optimizer else None,
               "ema": ema, "extra": extra}
    return atomic_torch_save(path, payload)


def _reason(text: str) -> str:
    """torch's reason for refusing a file, without its advice to load it unsafely."""
    text = " ".join(text.split())
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    text = text.split("Check the documentation", 1)[0]
    keep = [sentence for sentence in re.split(r"(?<=\.)\s+", text)
            if not any(s in sentence.lower() for s in (
                "weights_only", "weights only load failed", "trusted source",
                "please file an issue", "in pytorch 2.6"))]
    return " ".join(keep).strip()


def read_checkpoint(path, what: str = "checkpoint", allow=()) -> object:
    """The one safe read of a checkpoint file: ``torch.load(..., weights_only=True)`` with errors a user can act on; :ref:`sec_neural_gaussian`.

    ``what`` names the file in messages (``"checkpoint"``, ``"classifier"``);
    ``allow`` lists further classes the weights-only unpickler may build
    (e.g. ``argparse.Namespace`` for flow_matching's checkpoints). Raises
    FileNotFoundError for a missing file and ValueError for a directory, an
    empty file, a Git LFS pointer, a file that names Python objects beyond
    tensors and plain containers ("unsafe", never loaded, and never with
    advice to load it unsafely) and a corrupted file (with torch's reason).
    """
    import pickle
    import warnings

    path = Path(path)
    name = f"{what} {str(path)!r}"
    if path.is_dir():
        raise ValueError(f"{name} is a directory, not a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"{name} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"{name} is empty (0 bytes): an interrupted write or "
                         "a truncated copy")
    with open(path, "rb") as fh:
        head = fh.read(64)
    if head.startswith(b"version https://git-lfs"):
        raise ValueError(f"{name} is a Git LFS pointer, not the file itself; "
                         "fetch it with `git lfs pull`")
    try:
        with warnings.catch_warnings():      # torch warns about old pickles
            warnings.simplefilter("ignore")
            with torch.serialization.safe_globals(list(allow)):
                return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling/zip errors of many kinds
        reason = _reason(str(err))
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found:
            raise ValueError(
                f"{name} is unsafe: it holds pickled Python objects beyond "
                f"tensors and plain containers (it names {found.group(1)}), and "
                "unpickling them can execute arbitrary code, so flowjac refuses "
                "to load it; flowjac never writes such files") from None
        if isinstance(err, pickle.UnpicklingError):
            raise ValueError(
                f"{name} is corrupted or not a torch checkpoint: flowjac's "
                f"safe loader refuses its pickle ({reason[:300]})") from None
        raise ValueError(f"{name} is corrupted or not a torch checkpoint "
                         f"({type(err).__name__}: {reason[:300]})") from None


def check_finite_weights(tensors, source: str) -> None:
    """Raise ValueError naming ``source`` unless every floating tensor of ``tensors`` (a state dict or an iterable) is finite; :ref:`sec_neural_gaussian`."""
    items = tensors.items() if isinstance(tensors, dict) else enumerate(tensors)
    bad = [str(k) for k, v in items if torch.is_tensor(v)
           and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{source} holds NaN or inf weights ({len(bad)} "
                         f"tensors, e.g. {bad[:3]}); it cannot give finite "
                         "samples: retrain it, or take an earlier checkpoint")


def load_checkpoint(path, model: nn.Module, optimizer=None, payload=None,
                    ema: bool = False) -> dict:
    """Load a checkpoint into ``model`` (and ``optimizer``), weights_only; :ref:`sec_neural_gaussian`.

    Returns the payload dict (``step``, ``config``, ``ema``, ``extra``);
    ``payload``, when given, is that dict already read from ``path``.
    With ``ema=True`` the stored EMA weights, where there are any, are
    loaded instead of the raw ones (both checked against the model first;
    the raw ones are never loaded and then overwritten). Reads the file
    with ``read_checkpoint``: FileNotFoundError for a missing file,
    ValueError for a directory, an empty file, a corrupted file (with
    torch's reason), an unsafe one (pickled objects, named as such), one
    saved from a different architecture or EMA weights of other shapes.
    """
    path = Path(path)
    if payload is None:
        payload = read_checkpoint(path)
    if not isinstance(payload, dict) or payload.get("format") != \
            "flowjac-checkpoint-1":
        raise ValueError(f"checkpoint {str(path)!r} is not a flowjac "
                         "checkpoint (no 'flowjac-checkpoint-1' format tag)")
    want, have = _model_config(model), payload["arch"]
    if want != have:
        raise ValueError(f"checkpoint {str(path)!r} holds a {have['class']} "
                         f"with config {have['config']}, but the model is a "
                         f"{want['class']} with config {want['config']}")
    state = payload["model"]
    own = model.state_dict()
    bad = sorted(set(own) ^ set(state)) + sorted(
        k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if bad:
        raise ValueError(f"checkpoint {str(path)!r} does not match the model "
                         f"architecture; mismatched entries: {bad[:10]}")
    averaged = payload.get("ema") if ema else None
    if averaged is not None:
        bad = sorted(set(own) ^ set(averaged)) + sorted(
            k for k in set(own) & set(averaged)
            if not torch.is_tensor(averaged[k]) or own[k].shape != averaged[k].shape)
        if bad:
            raise ValueError(f"checkpoint {str(path)!r}: its EMA weights do not "
                             f"match its {type(model).__name__}; mismatched "
                             f"entries: {bad[:5]}")
        state = averaged
    model.load_state_dict(state)
    if optimizer is not None and payload.get("optimizer") is not None:
        optimizer.load_state_dict(payload["optimizer"])
    return payload


def _check_writable(path) -> None:
    """Fail before training, not after it, when ``path`` cannot be written."""
    import os

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint_path {str(path)!r} is a directory; give "
                         "a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"checkpoint_path {str(path)!r}: its folder cannot be "
                         f"created ({err})") from None
    if not os.access(path.parent, os.W_OK):
        raise ValueError(f"checkpoint_path {str(path)!r}: its folder "
                         f"{str(path.parent)!r} is not writable")


def load_or_train(path, model: nn.Module, train, *, step: int = 0,
                  config: dict | None = None) -> tuple:
    """The one load-or-train cache: load ``model`` from ``path`` if it exists, else ``train(model)`` and save it atomically; :ref:`sec_neural_gaussian`.

    Returns ``(model, trained_now)``. ``step`` and ``config`` are stored
    with a fresh checkpoint (config as plain JSON-able values).
    """
    path = Path(path)
    if path.exists():
        load_checkpoint(path, model)
        return model, False
    _check_writable(path)
    train(model)
    save_checkpoint(path, model, step=step, config=config)
    return model, True
