"""Estimators: what JVPs and samples say about dependence, with intervals.

- ``moments``: second moments, correlations, gradient norms from probes and
  conditioning on them
- ``covariance``: exact covariances from JVPs (the interpolation identity)
- ``intervals``: bootstrap and heavy-tail-aware intervals and tail diagnostics
"""
from . import covariance, intervals, moments

__all__ = ["covariance", "intervals", "moments"]
