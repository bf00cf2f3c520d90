"""flowjac: how small latent perturbations propagate through flow-matching models.

The package holds the reusable code of the book; each public function's
docstring names the chapter that explains it. Submodules:

- closed forms: ``gaussian``, ``symbolic``
- utilities: ``utils`` (seeding, devices, chapter parameters, files)
"""
from .utils import Run, get_device, load_results, seed_everything, setup

__all__ = ["Run", "get_device", "load_results", "seed_everything", "setup"]
__version__ = "0.1.0"
