"""Chapter pipelines: the heavy lifting of chapters, on stored or shipped runs.

- ``stored``: the stored GPU probe runs (load, reproduce live, group spreads)
- ``interventions``: labels, images and readings for seeing, doing and
  imagining with the label-conditional flow
- ``celeba``: the CelebA study (``run_celeba``), for users who have CelebA
"""
from . import celeba, interventions, stored

__all__ = ["celeba", "interventions", "stored"]
