"""flowjac: how small latent perturbations propagate through flow-matching models.

The package holds the reusable code of the book; each public function's
docstring names the chapter that explains it. The map:

- closed forms: ``gaussian``, ``mixture``, ``empirical``, ``unified``,
  ``symbolic`` (SymPy derivations)
- engine: ``ode`` (fixed-grid solvers), ``jvp`` (exact and finite-difference
  JVPs of the flow map), ``train`` (CFM training, EMA, checkpoints)
- models: ``nets`` (MLPFlow, FlowUNet with exact fast tangents),
  ``classifiers`` (attribute and digit classifiers, CelebA ResNet50),
  ``pretrained`` (shipped, sha256-checked models: ``available()``, ``load()``)
- data: ``data`` (MNIST, CelebA), ``scm`` (the causal model, its image
  renderer, causal discovery)
- estimators: ``estimators`` (moments, correlations, bootstrap, attribute
  JVPs), ``covariance`` (exact covariances from JVPs: the interpolation
  identity and its bounds), ``quality`` (quality gates of learned models)
- runs: ``probing`` (JVPs, pair JVPs, gradient norms and the paper's rule at
  scale), ``stored`` (stored GPU runs: load, reproduce live, group spreads)
- utilities: ``utils`` (seeding, devices, chapter parameters, files)
"""
from .utils import Run, get_device, load_results, seed_everything, setup

__all__ = ["Run", "get_device", "load_results", "seed_everything", "setup"]
__version__ = "0.1.0"
