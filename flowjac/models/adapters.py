"""Bring your own model: torchcfm, flow_matching and plain callables as flowjac velocities.

``from_torchcfm(net, y=...)``, ``from_flow_matching(wrapper, **extras)`` and
``from_callable(fn, order=...)`` return an ``AdaptedVelocity``: a callable
``velocity(x, t)`` (``t`` a Python number, a 0-dim tensor or a (B,) tensor)
with an exact ``jvp(x, t, tangents)``, so every solver, JVP, spectrum and
log-likelihood routine of flowjac accepts the third-party network as it is.
``load_torchcfm_checkpoint`` reads torchcfm's training checkpoints and
``load_flow_matching_checkpoint`` loads weights into a flow_matching
``ModelWrapper`` (or its wrapped network).

The one door. ``open_flow(source, ...)`` turns any source into one
``Flow`` (velocity with exact tangents, latent shape, value range, sampler
settings, provenance): a shipped name, a checkpoint of ``flowjac train``, a
torchcfm checkpoint, a flow_matching state dict of the user's class, a
network or a plain callable; the command line and the chapters use the
same door.

The rooms, every name re-exported here (import from this module):
``adapters_velocity`` (``AdaptedVelocity`` and the ``from_*``
constructors: the fast exact tangents by ``joint_jvp`` of
``flowjac.engine.tangents``, checked once per input signature against
``torch.func.jvp``), ``adapters_checkpoints`` (the peers' files),
``adapters_user_class`` (``parse_arch``, ``import_class``: the user's
network named on the command line) and ``adapters_door`` (``Flow``,
``open_flow``). Each depends only on the ones before it.

torchcfm, flow_matching and torchdiffeq are optional (the ``interop``
extra); these modules import them only inside the functions that need them.
Explained in :ref:`sec_byom`.
"""
from flowjac.engine.tangents import joint_jvp
from flowjac.models.adapters_checkpoints import (
    INSTALL_HINT,
    _read,  # noqa: F401  (pretrained's torchcfm recipe reads through it)
    _state,  # noqa: F401
    load_flow_matching_checkpoint,
    load_torchcfm_checkpoint,
)
from flowjac.models.adapters_door import (
    FORMATS,
    Flow,
    _a,  # noqa: F401  (the classifiers' loader names a class with it)
    build_from_config,
    open_flow,
    read_flowjac_payload,
)
from flowjac.models.adapters_user_class import import_class, parse_arch
from flowjac.models.adapters_velocity import (
    AdaptedVelocity,
    from_callable,
    from_flow_matching,
    from_torchcfm,
)

__all__ = ["AdaptedVelocity", "joint_jvp", "from_torchcfm",
           "from_flow_matching", "from_callable", "load_torchcfm_checkpoint",
           "load_flow_matching_checkpoint", "INSTALL_HINT", "Flow", "open_flow",
           "FORMATS", "parse_arch", "import_class", "read_flowjac_payload",
           "build_from_config"]
