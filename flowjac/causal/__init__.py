"""Causal models: the binary SCM, interventions and causal discovery.

- ``scm``: ``BinarySCM`` (exact joint by enumeration), ``default_scm``, ``dag``
- ``interventions``: do() (the mutilated SCM), the exogenous noise, its
  posterior (abduction) and exact counterfactuals
- ``discovery``: the PC algorithm on labels, CPDAGs and the structural
  Hamming distance
"""
from . import discovery, interventions, scm

__all__ = ["discovery", "interventions", "scm"]
