"""Models: networks, classifiers, gates and the shipped, sha256-checked weights.

- ``nets``: ``MLPFlow`` and ``FlowUNet`` with exact hand-written tangents
- ``conditional``: label-conditional velocities u(x, t, y), guidance
- ``classifiers``: attribute and digit classifiers, the CelebA ResNet50
- ``quality``: the quality gates a learned model must pass
- ``pretrained``: ``available()`` and ``load(name)`` for the shipped models
"""
from . import classifiers, conditional, nets, pretrained, quality

__all__ = ["classifiers", "conditional", "nets", "pretrained", "quality"]
