"""What a deployment runs now, as one record its parts share: the spec and its file, the
placement, and per service the configuration and spec version its instances run. The
deployment owns it; :class:`~corral.engine.apply.Applier` (a changed spec) and
:class:`~corral.engine.adopt.Adoption` (a dead agent's stack) are handed it, and nothing
else of the deployment's state."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.engine.rollout import new_id

if TYPE_CHECKING:
    from corral.scheduler import Plan
    from corral.spec import DeploymentSpec

__all__ = ["Running"]


@dataclass
class Running:
    """See the module docs."""

    spec: DeploymentSpec
    file: Path
    volumes: dict[str, Path]
    """Each service's volume directory (one dict, shared with the volumes hook and the fleet)."""
    plan: Plan | None = None
    """Where every instance went (None before placement)."""
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Each service's effective configuration as its instances run it (env_file contents then)."""
    versions: dict[str, int] = field(default_factory=dict)
    """The spec version whose configuration of each service its instances run."""
    first_version: int = 1
    """The version the stack came up with."""

    @property
    def base(self) -> Path:
        """The spec's directory (relative paths of the spec are relative to it)."""
        return self.file.resolve().parent

    def slots(self, service: str, indices: list[int]) -> list[tuple[int, str]]:
        """Ids for new instances of ``service``: ``<service>-<i>`` while it runs the version
        it came up with, ``<service>-<i>-v<version>`` after an apply replaced it."""
        version = self.versions[service]
        if version == self.first_version:
            return [(i, f"{service}-{i}") for i in indices]
        return [(i, new_id(service, i, version)) for i in indices]
