"""Closed forms: exact objects, no training.

- ``gaussian``: Gaussian drift, flow map, Jacobians, push-forward covariance
- ``mixture``: Gaussian-mixture drift and its Jacobian (eq. 4), quantile map
- ``empirical``: the optimal velocity on a finite data set, EFM, hybrid sampler
- ``unified``: diffusion and flow-matching targets in one linear form
- ``symbolic``: SymPy derivations; **the one place SymPy lives** (the other
  modules are torch only)
"""
import importlib

# Submodules load on first use (PEP 562), so that importing one closed form
# does not import SymPy through the others.
_MODULES = ("empirical", "gaussian", "mixture", "symbolic", "unified")


def __getattr__(name):
    if name in _MODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["empirical", "gaussian", "mixture", "symbolic", "unified"]
