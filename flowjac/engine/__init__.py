"""The engine: how a flow is run, differentiated and trained.

- ``velocity``: the velocity protocol (``__call__(x, t)``, optional exact
  ``jvp(x, t, tangents)``) and ``velocity_fn`` for trained networks
- ``ode``: fixed-grid Runge-Kutta solvers; one stage loop (``rk_solve``)
  from which the JVP engine is derived
- ``jvp``: exact and finite-difference JVPs of the flow map
- ``composite``: JVPs and gradient norms of a classifier composed with the flow
- ``probing``: JVPs, pair JVPs, gradient norms and the paper's rule at scale
- ``train``: the CFM loss, EMA and a trainer with exact resume
- ``distributed``: one process or many (torchrun): per-rank seeds,
  sharding, exact float64 reductions, rank-0 writes, DDP training
- ``tangents``: exact forward-mode tangents by a tangent-carrying value and
  a table of rules (``joint_jvp``), for any network's own forward code;
  the value and its algebra in ``tangents_value``, the derivatives of
  pointwise functions in ``tangents_pointwise``
- ``checkpoints``: atomic saves, ``weights_only=True`` loads, resume rules
- ``small_flows``: small flows trained with the CFM or the EFM target on the
  same minibatches, the memorisation rule that compares them, and networks
  regressed on the closed form u* itself (``fit_optimal``)
- ``empirical_flow``: the closed form u* integrated to t = 1, alone or
  before a network (the hybrid sampler)
"""
from . import (checkpoints, composite, distributed, empirical_flow, jvp, ode, probing,
               small_flows, tangents, tangents_pointwise, tangents_value, train, velocity)

__all__ = ["checkpoints", "composite", "distributed", "empirical_flow", "jvp", "ode", "probing",
           "small_flows", "tangents", "tangents_pointwise", "tangents_value", "train", "velocity"]
