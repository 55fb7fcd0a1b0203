"""What the mixins of :class:`~corral.engine.deployment.Deployment` (``apply``, ``adopt``)
use of it, declared once for the type checker; the deployment sets (and documents) every
one of them in its ``__init__``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio
    from pathlib import Path

    from corral._core import Topology
    from corral.engine.fleet import Fleet
    from corral.engine.hooks import FrontsHook, MeshHook, VolumesHook
    from corral.engine.journal import Journal
    from corral.engine.launch import Launcher
    from corral.engine.stack import Stack
    from corral.engine.verdicts import Verdicts
    from corral.machine import Machine, StackClaims
    from corral.scheduler import Plan, Scheduler
    from corral.spec import DeploymentSpec

__all__ = ["DeploymentParts"]


class DeploymentParts:
    """The deployment's collaborators and state, as its mixins see them."""

    spec: DeploymentSpec
    file: Path
    state_dir: Path
    topology: Topology
    machine: Machine
    claims: StackClaims
    journal: Journal
    fleet: Fleet
    scheduler: Scheduler
    launcher: Launcher
    verdicts: Verdicts
    plan: Plan | None
    _stack: Stack
    _fronts: FrontsHook
    _mesh: MeshHook
    _vols: VolumesHook
    _volumes: dict[str, Path]
    _configs: dict[str, dict[str, Any]]
    _versions: dict[str, int]
    _first_version: int
    _changing: asyncio.Lock
    _ran: bool
