"""flowjac: how small latent perturbations propagate through flow-matching models.

The package holds the reusable code of the book; each public function's
docstring names the chapter that explains it. The map (imports run downward
only: pipelines -> models -> estimators -> engine -> closedform -> base ->
_checks, data -> causal -> base; the engine never imports an estimator,
closed forms never import the engine or training code, nothing imports a
chapter; tests/test_layers.py checks it):

- ``closedform``: exact objects, no training (``gaussian``, ``mixture``,
  ``quantile`` (the 1D monotone map), ``chaos`` (Hermite chaos spectra),
  ``empirical``, ``unified``; ``symbolic`` is the one place SymPy lives)
- ``engine``: ``velocity`` (the velocity protocol), ``ode`` (one
  Runge-Kutta stage loop), ``jvp`` (exact and finite-difference JVPs of the
  flow map, derived from that loop), ``composite`` (classifier-flow JVPs),
  ``probing`` (JVPs at scale), ``tangents`` (exact forward-mode rules for
  any network's own code; the value in ``tangents_value``, the pointwise
  derivatives in ``tangents_pointwise``), ``train`` (CFM, EMA),
  ``checkpoints``, ``distributed`` (torchrun), ``small_flows`` (small
  flows trained with the CFM or the EFM target, the memorisation rule),
  ``empirical_flow`` (u* integrated: its samples and the hybrid sampler)
- ``models``: ``nets`` (MLPFlow, FlowUNet; exact tangents by the engine's rules),
  ``conditional`` (label-conditional velocities), ``classifiers``,
  ``adapters`` (torchcfm and flow_matching models as velocities; its rooms
  ``adapters_velocity``, ``adapters_checkpoints``, ``adapters_user_class``
  and ``adapters_door``, the one door ``open_flow``),
  ``torchcfm_recipe`` (a flow trained with torchcfm's own parts),
  ``quality`` (the gates), ``pretrained`` (shipped, sha256-checked models:
  ``available()``, ``load()``; its rooms ``recipe_settings`` and ``recipe_kinds``),
  ``morpho_models`` and ``morpho_gates`` (Morpho-MNIST recipes and gates)
- ``data``: ``images`` (MNIST, CelebA), ``scm_images`` (the SCM renderer),
  ``morpho`` (Morpho-MNIST: measurements, its SCM, dataset, published test set)
- ``causal``: ``scm`` (the binary SCM, exact by enumeration),
  ``label_interventions`` (do(), abduction and counterfactuals on its labels,
  exact), ``discovery`` (PC, CPDAG, SHD)
- ``estimators``: ``moments``, ``covariance`` (covariances from JVPs, unbiased;
  the design in ``covariance_pairs``, the reduction in ``covariance_reduction``),
  ``intervals`` (bootstrap and heavy-tail-aware intervals), ``spectra``
  (local spectra of the flow map, divergence, log-likelihood, Hutch++)
- ``pipelines``: ``stored`` (stored GPU runs), ``image_interventions``
  (SCM images generated and read under observation, do() and
  counterfactuals), ``interventions_study`` and ``interventions_tables``
  (that chapter's studies, and its tables and verdicts),
  ``patch_study`` (the MNIST patch), ``covariance_study`` (the
  exact-covariance studies), ``hybrid`` (the hybrid-sampler study),
  ``likelihood_study`` (bits per dimension with their grid error),
  ``morpho_published``, ``morpho_counterfactuals``, ``morpho_coupling``
  and ``morpho_soft`` (Morpho-MNIST readouts of the published test set;
  counterfactuals by the published protocol; their gaps under another seed
  and another coupling; soft attributes),
  ``celeba`` (the CelebA study)
- ``cli``: the ``flowjac`` command line (``train``, ``sample``, ``probe``;
  the parser in ``cli_parser``, the commands in ``cli_commands``),
  on one process or many under torchrun (``python -m flowjac``)
- ``plotting``: figures shared by chapters
- ``base``: the ground floor (seeding, devices, atomic files, JSON,
  hardware), what the package itself uses; ``chapter``: the chapter kit
  (``setup``, ``Run``, glue, tables, claims, heap control), for chapters
  only; ``utils``: both under their old names; ``_checks``: the argument
  checks behind every error message

Chapters import subpackages under readable names, e.g.
``from flowjac.closedform import gaussian``; see CONTRIBUTING.md for the
vocabulary (one name per concept).
"""
import importlib

__all__ = ["Run", "get_device", "load_results", "seed_everything", "setup"]
__version__ = "0.1.0"


def __getattr__(name):
    """The names of ``__all__`` (from ``utils``) and the subpackages, imported
    on first use (PEP 562), so that ``import flowjac`` (and ``flowjac
    --help``) does not import torch."""
    if name in __all__:
        return getattr(importlib.import_module(".utils", __name__), name)
    if not name.startswith("_"):
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
