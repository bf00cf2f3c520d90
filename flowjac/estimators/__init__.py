"""Estimators: what JVPs and samples say about dependence, with intervals.

- ``moments``: second moments, correlations, gradient norms from probes and
  conditioning on them
- ``covariance``: exact covariances from JVPs (the interpolation identity);
  its design in ``covariance_pairs``, its reduction in
  ``covariance_reduction``
- ``spectra``: spectra, divergences and log-likelihoods of flow maps from
  JVPs and VJPs (randomized subspace iteration, Hutchinson, Hutch++)
- ``intervals``: bootstrap and heavy-tail-aware intervals and tail diagnostics
"""
from . import covariance, covariance_pairs, covariance_reduction, intervals, moments, spectra

__all__ = ["covariance", "covariance_pairs", "covariance_reduction", "intervals", "moments",
           "spectra"]
