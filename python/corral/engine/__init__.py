"""The engine: brings a deployment up, keeps it running, and takes it down.

:class:`Deployment` (in :mod:`~corral.engine.deployment`) composes small collaborators, one
idea each: ``instance`` (one instance at run time), ``stack`` (what they share), ``launch``
(spawns, signals), ``verdicts`` (exits and probe results become transitions),
``environment`` (the ``CORRAL_*`` contract), ``hooks`` (cgroups, mesh, fronts, volumes) and
``journal`` (the one writer of the store). Submodules load on first use, so discovery can
read :mod:`~corral.engine.environment` without loading the rest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from corral.engine.deployment import Deployment, DeploymentStatus, InstanceStatus

__all__ = ["Deployment", "DeploymentStatus", "InstanceStatus"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from corral.engine import deployment

        return getattr(deployment, name)
    raise AttributeError(f"module 'corral.engine' has no attribute {name!r}")
