"""Closed forms: exact objects, no training.

- ``gaussian``: Gaussian drift, flow map, Jacobians, push-forward covariance
- ``mixture``: Gaussian-mixture drift and its Jacobian (eq. 4)
- ``quantile``: the quantile map onto a 1D mixture (the 1D flow), exactly
- ``chaos``: Hermite chaos spectra by Gauss-Hermite quadrature, and when the
  normalised JVP second moment is the correlation
- ``empirical``: the optimal velocity u* on a finite data set, its posterior
  weights and the measures of a sample against a training set (memorisation,
  energy distance, distance to u*); integrating or training on u* is the
  engine's (``engine.empirical_flow``, ``engine.small_flows``)
- ``unified``: diffusion and flow-matching targets in one linear form
- ``symbolic``: SymPy derivations; **the one place SymPy lives** (the other
  modules are torch only)
"""
import importlib

# Submodules load on first use (PEP 562), so that importing one closed form
# does not import SymPy through the others.
_MODULES = ("chaos", "empirical", "gaussian", "mixture", "quantile", "symbolic", "unified")


def __getattr__(name):
    if name in _MODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["chaos", "empirical", "gaussian", "mixture", "quantile", "symbolic", "unified"]
