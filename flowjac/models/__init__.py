"""Models: networks, classifiers, gates and the shipped, sha256-checked weights.

- ``nets``: ``MLPFlow`` and ``FlowUNet``, their exact tangents by the engine's rules
- ``conditional``: label-conditional velocities u(x, t, y), guidance
- ``classifiers``: attribute and digit classifiers, the CelebA ResNet50
- ``quality``: the quality gates a learned model must pass
- ``adapters``: torchcfm, flow_matching and plain callables as velocities
  with fast exact tangents (``engine.tangents``); their checkpoints
  (``adapters_velocity``, ``adapters_checkpoints``), the user's class
  (``adapters_user_class``) and ``open_flow``, the one door
  (``adapters_door``); every name importable from ``adapters``
- ``pretrained``: ``available()`` and ``load(name)`` for the shipped models;
  their recipes as settings with the data and sampler they use
  (``recipe_settings``) and a recipe class per kind (``recipe_kinds``),
  every name importable from ``pretrained``
- ``morpho_models``: the Morpho-MNIST flows and regressor (recipes,
  conditioning, training), their gates in ``morpho_gates``
- ``torchcfm_recipe``: training with torchcfm's own parts, in its
  checkpoint format (the shipped ``mnist-fives-torchcfm``)
"""
from . import (adapters, adapters_checkpoints, adapters_door, adapters_user_class,
               adapters_velocity, classifiers, conditional, morpho_gates, morpho_models, nets,
               pretrained, quality, recipe_kinds, recipe_settings, torchcfm_recipe)

__all__ = ["adapters", "adapters_checkpoints", "adapters_door", "adapters_user_class",
           "adapters_velocity", "classifiers", "conditional", "morpho_gates", "morpho_models",
           "nets", "pretrained", "quality", "recipe_kinds", "recipe_settings", "torchcfm_recipe"]
