"""The peers' checkpoints as flowjac velocities: torchcfm's training files and flow_matching state dicts.

``load_torchcfm_checkpoint`` reads torchcfm's training checkpoints (its
image scripts' dict, or a bare state dict of its README ``MLP``) and
``load_flow_matching_checkpoint`` loads weights into a flow_matching
``ModelWrapper`` (or its wrapped network); both read the file by flowjac's
one safe read (``checkpoints.read_checkpoint``, weights only), name the
mismatched keys of another architecture, and return an ``AdaptedVelocity``
(``flowjac.models.adapters_velocity``). torchcfm, flow_matching and
torchdiffeq are optional (the ``interop`` extra, ``INSTALL_HINT``); they are
imported only inside the functions that need them. The loading room of
``flowjac.models.adapters``, which re-exports every name.
Explained in :ref:`sec_byom`.
"""
from __future__ import annotations

import numbers

import torch
from torch import nn

from flowjac.models.adapters_velocity import AdaptedVelocity, from_flow_matching, from_torchcfm

__all__ = ["load_torchcfm_checkpoint", "load_flow_matching_checkpoint", "INSTALL_HINT"]

#: How to install the optional peers (the ``interop`` extra).
INSTALL_HINT = ("pip install --no-deps torchcfm==1.0.7 flow-matching==1.0.10 "
                "torchdiffeq==0.2.5 pot==0.9.6.post1 (or pip install "
                "'flowjac[interop]', which also pulls torchcfm's training stack)")


def _read(path):
    """The checkpoint's contents by flowjac's one safe read (weights only;
    an ``args`` Namespace, as flow_matching's example scripts save, allowed)."""
    import argparse

    from flowjac.engine.checkpoints import read_checkpoint

    return read_checkpoint(path, "checkpoint", allow=[argparse.Namespace])


def _strip(state: dict) -> dict:
    """Drop the DDP ('module.') and torch.compile ('_orig_mod.') prefixes."""
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _mismatch(model: nn.Module, state: dict) -> list:
    own = model.state_dict()
    missing = [f"missing {k}" for k in own if k not in state]
    extra = [f"unexpected {k}" for k in state if k not in own]
    shape = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state and torch.is_tensor(state[k])
             and state[k].shape != own[k].shape]
    return missing + extra + shape


def _state(payload, key: str, path) -> dict:
    if not isinstance(payload, dict):
        raise ValueError(f"checkpoint {str(path)!r} holds a {type(payload).__name__}, "
                         "not a dict")
    if key is None or all(torch.is_tensor(v) for v in payload.values()):
        state = payload
    elif key in payload and isinstance(payload[key], dict):
        state = payload[key]
    else:
        raise ValueError(f"checkpoint {str(path)!r} has no {key!r} entry; its "
                         f"entries are {sorted(payload)}")
    return _strip(dict(state))


def load_torchcfm_checkpoint(path, *, ema: bool = True, y=None,
                             **unet_kwargs) -> AdaptedVelocity:
    """The velocity of a torchcfm checkpoint (``UNetModelWrapper(**unet_kwargs)``, or the README's ``MLP``); :ref:`sec_byom`.

    Reads the dict torchcfm's image scripts save (``net_model``,
    ``ema_model``, ``sched``, ``optim``, ``step``) with ``weights_only=True``,
    takes the EMA weights (``ema=True``) or the raw ones, strips the
    ``module.`` prefix of DistributedDataParallel, builds
    ``UNetModelWrapper(**unet_kwargs)`` (the training script's arguments,
    e.g. ``dim=(3, 32, 32), num_channels=128, num_res_blocks=2,
    channel_mult=[1, 2, 2, 2], num_heads=4, num_head_channels=64,
    attention_resolutions="16", dropout=0.1``), loads the weights in eval
    mode and returns ``from_torchcfm(net, y=y)``; ``velocity.step`` is the
    checkpoint's training step. A checkpoint of another architecture is one
    ValueError naming the mismatched keys. An integer ``dim`` builds
    torchcfm's README model instead, ``MLP(dim, out_dim=None, w=64,
    time_varying=False)`` (the README trains it with ``time_varying=True``);
    its file may also be a bare state dict (``torch.save(model.state_dict(),
    path)``, of the MLP or of its ``torch_wrapper``).
    """
    if not isinstance(ema, bool):
        raise ValueError(f"ema must be True or False, got {ema!r}")
    mlp = isinstance(unet_kwargs.get("dim"), numbers.Integral)
    name = "MLP" if mlp else "UNetModelWrapper"
    try:
        if mlp:
            from torchcfm.models.models import MLP as build
        else:
            from torchcfm.models.unet.unet import UNetModelWrapper as build
    except ImportError as err:
        raise ImportError(f"load_torchcfm_checkpoint needs torchcfm ({err}); "
                          f"install the interop extra: {INSTALL_HINT}") from None
    payload = _read(path)
    state = _state(payload, "ema_model" if ema else "net_model", path)
    try:
        net = build(**unet_kwargs)
    except (TypeError, ValueError, AssertionError) as err:
        what = ("MLP (dim, out_dim, w, time_varying)" if mlp else
                "UNetModelWrapper (dim a list [C, H, W] for its images, an "
                "integer for torchcfm's MLP)")
        raise ValueError(f"unet_kwargs (--arch) do not describe a torchcfm "
                         f"{what}: {err}") from None
    if mlp and state and all(k.startswith("model.") for k in state) and \
            _mismatch(net, state):      # saved from torch_wrapper(model)
        state = {k[len("model."):]: v for k, v in state.items()}
    bad = _mismatch(net, state)
    if bad:
        raise ValueError(f"checkpoint {str(path)!r} does not match "
                         f"{name}({', '.join(f'{k}={v!r}' for k, v in unet_kwargs.items())}); "
                         f"mismatched keys ({len(bad)}): {bad[:8]}")
    net.load_state_dict(state)
    net.eval()
    velocity = from_torchcfm(net, y=y)
    velocity.step = payload.get("step") if isinstance(payload, dict) and \
        not torch.is_tensor(payload.get("step")) else None
    return velocity


def load_flow_matching_checkpoint(model: nn.Module, path, *, key: str | None = "model",
                                  **extras) -> AdaptedVelocity:
    """Load weights into a flow_matching ``ModelWrapper`` (or its network) and wrap it; :ref:`sec_byom`.

    ``model`` is a freshly built instance of the user's own class (a
    ``ModelWrapper`` subclass, or any module called ``model(x=x, t=t,
    **extras)``). The checkpoint is read with ``weights_only=True`` (an
    ``args`` Namespace, as flow_matching's example scripts save, is
    allowed); its ``key`` entry (``"model"``; ``None`` for a bare state
    dict) is loaded, after stripping ``module.``/``_orig_mod.`` prefixes,
    into ``model`` itself or, when the keys are those of the wrapped
    network, into ``model.model``. The model is put in eval mode and
    returned as ``from_flow_matching(model, **extras)``; a checkpoint of
    another architecture is one ValueError naming the mismatched keys.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    state = _state(_read(path), key, path)
    targets = [model] + ([model.model] if isinstance(getattr(model, "model", None),
                                                     nn.Module) else [])
    reports = [(_mismatch(m, state), m) for m in targets]
    bad, target = min(reports, key=lambda r: len(r[0]))
    if bad:
        raise ValueError(f"checkpoint {str(path)!r} does not match "
                         f"{type(target).__name__}; mismatched keys ({len(bad)}): "
                         f"{bad[:8]}")
    target.load_state_dict(state)
    model.eval()
    return from_flow_matching(model, **extras)
