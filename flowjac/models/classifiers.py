"""Attribute classifiers: a small ResNet-style network trained from scratch on
the generated SCM images, and the paper's ResNet50 for CelebA's 40 attributes.

Both output one logit per attribute and are trained with BCE-with-logits.
Neither uses BatchNorm in a way that breaks forward-mode AD: the small
network has no normalization layers at all, and the ResNet50 is used in
``eval()`` mode, where BatchNorm is an affine map.

Explained in :ref:`sec_attributes`
(``book/attributes.md``).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from flowjac._checks import check_int

__all__ = [
    "ResBlock", "AttributeNet", "celeba_resnet50", "train_classifier",
    "predict_logits", "per_attribute_accuracy", "load_or_train_classifier",
    "CELEBA_BATCH_SIZE", "CELEBA_LR", "random_shift", "class_accuracy",
    "load_classifier",
]

CELEBA_BATCH_SIZE = 128     # the paper's CelebA classifier settings
CELEBA_LR = 2e-4


class ResBlock(nn.Module):
    """Pre-activation residual block without normalization; :ref:`sec_attributes`."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        nn.init.zeros_(self.conv2.weight)      # starts as the identity path
        nn.init.zeros_(self.conv2.bias)
        self.skip = (nn.Identity() if c_in == c_out and stride == 1
                     else nn.Conv2d(c_in, c_out, 1, stride))

    def forward(self, x):
        h = self.conv1(F.silu(x))
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class AttributeNet(nn.Module):
    """Small ResNet-style multi-label classifier, one logit per attribute; :ref:`sec_attributes`.

    ``width`` channels at full resolution, doubled at each of the stages
    after the first, each of which halves the resolution (the stem itself
    downsamples by ``stem_stride``); global average pooling and a linear
    head. No BatchNorm, so forward-mode AD and vmap
    are exact and cheap.
    """

    def __init__(self, n_attr: int = 9, in_channels: int = 3, width: int = 16,
                 stages: int = 3, blocks_per_stage: int = 1,
                 stem_stride: int = 1):
        super().__init__()
        check_int("n_attr", n_attr, minimum=1)
        check_int("in_channels", in_channels, minimum=1)
        check_int("width", width, minimum=1)
        check_int("stages", stages, minimum=1)
        check_int("blocks_per_stage", blocks_per_stage, minimum=1)
        check_int("stem_stride", stem_stride, minimum=1)
        self.config = dict(n_attr=n_attr, in_channels=in_channels, width=width,
                           stages=stages, blocks_per_stage=blocks_per_stage,
                           stem_stride=stem_stride)
        self.stem = nn.Conv2d(in_channels, width, 3, stem_stride, 1)
        layers, c = [], width
        for s in range(stages):
            c_out = width * 2 ** s
            for b in range(blocks_per_stage):
                stride = 2 if (s > 0 and b == 0) else 1
                layers.append(ResBlock(c, c_out, stride))
                c = c_out
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Linear(c, n_attr)

    def forward(self, x):
        h = self.blocks(self.stem(x))
        return self.head(F.silu(h).mean(dim=(2, 3)))


class _ImageNetNormalize(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def celeba_resnet50(weights_path=None, n_attr: int = 40) -> nn.Module:
    """The paper's CelebA classifier: ResNet50 (ImageNet weights from a user file) with a 40-logit head; :ref:`sec_attributes`.

    ``weights_path`` is a torchvision ``resnet50`` ImageNet ``state_dict``
    saved with ``torch.save`` (nothing is downloaded); ``None`` starts from
    random weights. Inputs are images in [0, 1]; ImageNet normalization is
    the model's first layer. Train with ``train_classifier(...,
    batch_size=CELEBA_BATCH_SIZE, lr=CELEBA_LR)``.
    """
    from torchvision.models import resnet50

    check_int("n_attr", n_attr, minimum=1)
    net = resnet50(weights=None)
    if weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"weights_path {path} does not exist; save torchvision's "
                "ResNet50_Weights.IMAGENET1K_V2 state_dict there with "
                "torch.save(model.state_dict(), path) on a machine with internet")
        from flowjac.engine.checkpoints import read_checkpoint

        state = read_checkpoint(path, "weights_path")
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"weights_path {path} is not a torchvision resnet50 state_dict: "
                f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    net.fc = nn.Linear(net.fc.in_features, n_attr)
    return nn.Sequential(_ImageNetNormalize(), net)


def _check_data(images, labels):
    if not torch.is_tensor(images) or images.ndim != 4:
        raise ValueError(f"images must be a (N, C, H, W) tensor, got "
                         f"{getattr(images, 'shape', type(images))}")
    if not torch.is_tensor(labels) or labels.ndim != 2 or \
            labels.shape[0] != images.shape[0]:
        raise ValueError(f"labels must be a (N, n_attr) tensor with N = "
                         f"{images.shape[0]}, got {getattr(labels, 'shape', type(labels))}")


def train_classifier(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                     *, steps: int, batch_size: int = CELEBA_BATCH_SIZE,
                     lr: float = CELEBA_LR, weight_decay: float = 0.0,
                     seed: int = 0, device="cpu", progress: bool = False,
                     loss: str = "bce", shift: int = 0, checkpoint_path=None,
                     checkpoint_every: int = 1000) -> dict:
    """Train a classifier with Adam: multi-label BCE or multi-class cross-entropy (or a regressor, MSE); :ref:`sec_attributes`.

    Minibatches are drawn with replacement from ``images`` (N, C, H, W) and
    ``labels``: 0/1 (N, n_attr) for ``loss="bce"`` (one logit per
    attribute), class indices (N,) for ``loss="ce"`` (one logit per class),
    real targets (N, n_attr) for ``loss="mse"`` (one linear output per
    target: a regressor, e.g. the Morpho-MNIST attributes).
    ``shift`` > 0 translates each training image by a random whole number
    of pixels in [-shift, shift] along each axis (zero fill), the usual
    augmentation for digits. Returns ``{"loss": [...]}`` per step and
    ``resumed_from`` (the step a checkpoint gave, else 0).

    ``checkpoint_path``: every ``checkpoint_every`` steps and at the end the
    model, the optimizer, the minibatch generator, torch's global RNG and the
    losses are written there (``save_checkpoint``); a call that finds the file resumes
    from it and ends with the weights of an uninterrupted run. A checkpoint
    of other settings (batch size, lr, weight decay, seed, loss, shift) or of
    more steps than asked is refused.
    """
    if loss not in ("bce", "ce", "mse"):
        raise ValueError(f"loss must be 'bce', 'ce' or 'mse', got {loss!r}")
    shift = check_int("shift", shift, minimum=0)
    if loss == "ce":
        if not torch.is_tensor(labels) or labels.ndim != 1:
            raise ValueError("labels must be a (N,) tensor of class indices "
                             f"for loss='ce', got {getattr(labels, 'shape', type(labels))}")
        _check_data(images, labels[:, None])
    else:
        _check_data(images, labels)
        if loss == "mse" and not bool(torch.isfinite(labels).all()):
            raise ValueError("labels must be finite for loss='mse'")
    steps = check_int("steps", steps, minimum=1)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    checkpoint_every = check_int("checkpoint_every", checkpoint_every, minimum=1)
    from flowjac.engine.checkpoints import load_checkpoint, save_checkpoint

    device = torch.device(device)
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    losses, start = [], 0
    settings = dict(batch_size=batch_size, lr=float(lr), weight_decay=float(weight_decay),
                    seed=int(seed), loss=loss, shift=shift)
    if checkpoint_path is not None and Path(checkpoint_path).exists():
        ck = load_checkpoint(checkpoint_path, model, opt)     # model and optimizer
        if ck["config"] != settings:
            raise ValueError(f"checkpoint {str(checkpoint_path)!r} was made with other "
                             f"settings: {ck['config']} there, {settings} now")
        if ck["step"] > steps:
            raise ValueError(f"checkpoint {str(checkpoint_path)!r} is at step {ck['step']}, "
                             f"past the {steps} steps asked")
        g.set_state(ck["extra"]["generator"])
        torch.set_rng_state(ck["extra"]["rng"])
        losses, start = list(ck["extra"]["loss"]), int(ck["step"])

    def save(step):
        save_checkpoint(checkpoint_path, model, opt, step, settings,
                        generator=g.get_state(), rng=torch.get_rng_state(),
                        loss=list(losses))

    it = range(start, steps)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, mininterval=5, disable=None, desc="classifier", initial=start,
                  total=steps)
    for step in it:
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=g)
        x = images[idx]
        if shift:
            x = random_shift(x, shift, g)
        x = x.to(device)
        if loss == "ce":
            value = F.cross_entropy(model(x), labels[idx].to(device).long())
        elif loss == "mse":
            value = F.mse_loss(model(x), labels[idx].to(device).float())
        else:
            value = F.binary_cross_entropy_with_logits(
                model(x), labels[idx].to(device).float())
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        losses.append(value.item())
        if checkpoint_path is not None and ((step + 1) % checkpoint_every == 0
                                            or step + 1 == steps):
            save(step + 1)
    model.eval()
    return {"loss": losses, "resumed_from": start}


def random_shift(images: torch.Tensor, shift: int,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Translate each image by random whole pixels in [-shift, shift] per axis, zero fill; :ref:`sec_mnist`."""
    shift = check_int("shift", shift, minimum=0)
    if shift == 0:
        return images
    n, _, h, w = images.shape
    padded = F.pad(images, (shift, shift, shift, shift))
    off = torch.randint(0, 2 * shift + 1, (n, 2), generator=generator)
    rows = (off[:, 0, None] + torch.arange(h))[:, None, :, None]
    cols = (off[:, 1, None] + torch.arange(w))[:, None, None, :]
    idx_n = torch.arange(n)[:, None, None, None]
    idx_c = torch.arange(images.shape[1])[None, :, None, None]
    return padded[idx_n, idx_c, rows, cols]


def class_accuracy(model: nn.Module, images: torch.Tensor,
                   labels: torch.Tensor, batch_size: int = 256) -> float:
    """Fraction of images whose arg-max logit is the label (multi-class); :ref:`sec_mnist`."""
    if not torch.is_tensor(labels) or labels.ndim != 1 or \
            labels.shape[0] != images.shape[0]:
        raise ValueError(f"labels must be a (N,) tensor with N = "
                         f"{images.shape[0]}, got {getattr(labels, 'shape', labels)}")
    pred = predict_logits(model, images, batch_size).argmax(1)
    return float((pred == labels.long().cpu()).float().mean())


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor,
                   batch_size: int = 256) -> torch.Tensor:
    """Logits of ``model`` on ``images``, in batches, on the model's device; :ref:`sec_attributes`."""
    if not torch.is_tensor(images) or images.ndim != 4:
        raise ValueError(f"images must be a (N, C, H, W) tensor, got "
                         f"{getattr(images, 'shape', type(images))}")
    batch_size = check_int("batch_size", batch_size, minimum=1)
    model.eval()
    dev = next(model.parameters()).device
    return torch.cat([model(images[i:i + batch_size].to(dev)).cpu()
                      for i in range(0, images.shape[0], batch_size)])


def per_attribute_accuracy(model: nn.Module, images: torch.Tensor,
                           labels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Fraction of correct 0/1 predictions (logit > 0) per attribute; :ref:`sec_attributes`."""
    _check_data(images, labels)
    pred = (predict_logits(model, images, batch_size) > 0).long()
    return (pred == labels.long().cpu()).float().mean(0)


def load_or_train_classifier(path, model: nn.Module, images, labels, **train_kwargs):
    """Load ``model`` from ``path`` if it exists, else train it and save it atomically; :ref:`sec_attributes`.

    Returns ``(model, trained)`` where ``trained`` says whether it was
    trained now. ``train_kwargs`` go to ``train_classifier``.
    """
    from flowjac.engine.checkpoints import load_or_train

    model, trained = load_or_train(
        path, model, lambda m: train_classifier(m, images, labels, **train_kwargs),
        config=getattr(model, "config", None))
    model.eval()
    return model, trained


def load_classifier(path, latent_shape, device="cpu", dtype=None):
    """(AttributeNet, output names) of a classifier checkpoint that reads images of ``latent_shape``, by the one safe read; :ref:`sec_running_at_scale`.

    Raises FileNotFoundError for a missing file and one ValueError for a
    file that is not a flowjac AttributeNet checkpoint, a config that does
    not build one, images of other channels than the flow's, or NaN/inf
    weights.
    """
    from flowjac.engine.checkpoints import check_finite_weights, load_checkpoint
    from flowjac.models.adapters import _a, build_from_config, read_flowjac_payload

    payload = read_flowjac_payload(path, "classifier")
    arch = payload.get("arch") or {}
    if arch.get("class") != "AttributeNet":
        raise ValueError(f"classifier {str(path)!r} holds "
                         f"{_a(arch.get('class'))}, not an AttributeNet; give "
                         "a classifier checkpoint, e.g. "
                         "flowjac/weights/scm_classifier.pt")
    cfg = arch.get("config")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("in_channels"), int) \
            or not isinstance(cfg.get("n_attr"), int):
        raise ValueError(f"classifier {str(path)!r} stores no AttributeNet "
                         "config (in_channels, n_attr)")
    if len(latent_shape) != 3 or cfg["in_channels"] != latent_shape[0]:
        raise ValueError(f"classifier {str(path)!r} reads images with "
                         f"{cfg['in_channels']} channels, but the flow makes "
                         f"samples of shape {tuple(latent_shape)}")
    model = build_from_config(AttributeNet, cfg, "classifier", path)
    load_checkpoint(path, model, payload=payload)
    check_finite_weights(model.state_dict(), f"classifier {str(path)!r}")
    model.to(device, dtype or torch.float32).eval().requires_grad_(False)
    kind = (payload.get("config") or {}).get("kind")
    if kind == "attribute-classifier" and cfg["n_attr"] == 9:
        from flowjac.causal.scm import ATTRIBUTES
        names = list(ATTRIBUTES)
    else:
        names = [f"logit{i}" for i in range(cfg["n_attr"])]
    return model, names
