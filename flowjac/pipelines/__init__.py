"""Chapter pipelines: the heavy lifting of chapters, on stored or shipped runs.

- ``stored``: the stored GPU probe runs (load, reproduce live, group spreads)
- ``image_interventions``: labels drawn, rendered by the label-conditional
  flow and read back, for seeing, doing and imagining on images
- ``interventions_study``: that chapter's three studies as functions, shared
  by the chapter and its stored run (``tools/run_interventions.py``)
- ``interventions_tables``: that chapter's tables and verdict sentences,
  read from the studies' tensors
- ``patch_study``: the 6x6 patch of the MNIST flows (readout, the paper's
  forward differences, one flow's summary for the training-set-size study)
- ``covariance_study``: the exact-covariance chapter's studies (rho rules,
  the mixture table, equal compute, tails, interval coverage)
- ``celeba``: the CelebA study (``run_celeba``), for users who have CelebA
- ``hybrid``: the hybrid sampler's study (u* on [0, tau], then a network or
  a null) on a grid of tau, shared by the empirical chapter and its stored
  run (``tools/run_hybrid.py``): its design, bootstrap bands and rule
- ``likelihood_study``: bits per dimension of held-out digits under the
  flow of fives on a sequence of grids, their Richardson limit and the
  AUROCs against an ink baseline, shared by the spectra chapter and its
  stored run (``tools/run_likelihood.py``)
- ``morpho_counterfactuals``: Morpho-MNIST counterfactuals by the published
  protocol (abduction by the conditional flow's backward ODE, the SCM's
  action and prediction; composition, reversibility, effectiveness, realism
  with floors and null baselines), shared by the chapter and its stored run
  (``tools/run_morpho_counterfactuals.py``)
- ``morpho_published``: three readouts of (t, i) on the published
  Morpho-MNIST test set (the measurement, the shipped readout, the regressor
  alone) against its labels, stored by ``tools/run_morpho_published.py``
- ``morpho_soft``: corr(t, i) of the unconditional Morpho-MNIST flow read by
  the regressor: the paper's normalised E[JJ^T], the covariance identity and
  plain samples at equal compute, against the flow's own and the SCM's exact
  value, with the rule of its verdict
- ``morpho_coupling``: counterfactuals of conditional flows of one law that
  couple noise and image differently (another seed, optimal-transport pairs):
  the gaps between them against the intervention's effect, and their rule
"""
from . import (celeba, covariance_study, hybrid, image_interventions, interventions_study,
               interventions_tables, likelihood_study, patch_study, stored)

__all__ = ["celeba", "covariance_study", "hybrid", "image_interventions", "interventions_study",
           "interventions_tables", "likelihood_study", "patch_study", "stored"]

from . import morpho_counterfactuals, morpho_coupling, morpho_soft

__all__ += ["morpho_counterfactuals", "morpho_coupling", "morpho_soft"]
