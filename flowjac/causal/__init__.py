"""Causal models: the binary SCM, interventions and causal discovery.

- ``scm``: ``BinarySCM`` (exact joint by enumeration), ``default_scm``, ``dag``
- ``label_interventions``: do() (the mutilated SCM), the exogenous noise, its
  posterior (abduction) and exact counterfactuals, on labels only
- ``discovery``: the PC algorithm on labels, CPDAGs and the structural
  Hamming distance
"""
from . import discovery, label_interventions, scm

__all__ = ["discovery", "label_interventions", "scm"]
