"""What the collaborators of one deployment share: its instances, its native handles, its
journal, and the one fan-out of transitions.

The deployment (ordering, waits, rollback), the launcher (spawns and signals), the verdicts
(exits and probe results) and the hooks (cgroups, mesh, fronts, volumes) each hold the
stack and nothing of each other, so none of them imports another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from corral._core import Cgroups, ResourceManager, ServiceRegistry, Supervisor
from corral.engine.instance import InstanceRuntime
from corral.engine.journal import Journal
from corral.engine.tracing import Tracing
from corral.lifecycle import Transition
from corral.spec import DeploymentSpec
from corral.statedir import stack_id
from corral.storageusage import StorageUsage

__all__ = ["Stack"]

log = logging.getLogger("corral")


class Stack:
    """One deployment's shared state; see the module docs."""

    def __init__(self, spec: DeploymentSpec, base: Path, state_dir: Path, host: str, resources: ResourceManager,
                 journal: Journal) -> None:
        self.spec = spec
        self.base = base
        """The spec's directory: relative paths and commands resolve from here."""
        self.state_dir = state_dir
        self.id = stack_id(state_dir)
        """The stack's id (``CORRAL_STACK``), from its state directory: computed once."""
        self.host = host
        self.resources = resources
        self.journal = journal
        self.registry = ServiceRegistry()
        self.instances: dict[str, InstanceRuntime] = {}
        self.by_service: dict[str, list[InstanceRuntime]] = {name: [] for name in spec.services}
        self.supervisor: Supervisor | None = None
        self.cgroups: Cgroups | None = None
        """The memory controller, when one was found (a stop ends an instance's cgroup)."""
        self.down = False
        """Set once the deployment stops (down or rollback): nothing restarts after it."""
        self.warnings: list[str] = []
        self.storage: dict[str, StorageUsage] = {}
        """Per service with storage: its volume as last measured (the storage watch's)."""
        self.schedules: dict[str, dict[str, Any]] = {}
        """Per scheduled service: its runs so far and the next (the schedules' part)."""
        self.tracing = Tracing(None, spec.name)
        """The deployment's spans (off until the deployment configures it)."""
        self.listeners: list[Callable[[Transition], None]] = []
        """Hear every transition, in order, synchronously (a front must drop a stopping
        instance before its signal goes out)."""
        self._subscribers: list[asyncio.Queue[Transition]] = []
        self._tick = asyncio.Event()

    @property
    def name(self) -> str:
        """The deployment's name."""
        return self.spec.name

    def add(self, inst: InstanceRuntime) -> None:
        """Registers an instance of the plan."""
        self.instances[inst.id] = inst
        self.by_service.setdefault(inst.p.service, []).append(inst)

    def remove(self, inst: InstanceRuntime) -> None:
        """Forgets an instance that left the deployment (a scale-down)."""
        self.instances.pop(inst.id, None)
        with contextlib.suppress(ValueError):
            self.by_service[inst.p.service].remove(inst)
        self.registry.deregister(inst.id)

    def on_transition(self, t: Transition) -> None:
        """Every instance's lifecycle reports here."""
        self.journal.transition(t)
        for listener in self.listeners:
            listener(t)
        self.tracing.on_transition(t)
        for q in self._subscribers:
            q.put_nowait(t)
        self._tick.set()
        self._tick = asyncio.Event()

    def subscribe(self) -> asyncio.Queue[Transition]:
        """A queue that gets every transition from now on (``unsubscribe`` it when done)."""
        q: asyncio.Queue[Transition] = asyncio.Queue()
        self._subscribers.append(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[Transition]) -> None:
        """Stops feeding ``q``."""
        with contextlib.suppress(ValueError):
            self._subscribers.remove(q)

    async def wait(self, pred: Callable[[], bool], timeout: float) -> bool:
        """Waits, without polling, until ``pred()`` holds after some transition; False after
        ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not pred():
            left = deadline - loop.time()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._tick.wait(), left)
        return True

    async def next_change(self, timeout: float) -> None:
        """Returns after the next transition (or :meth:`poke`), or after ``timeout`` seconds."""
        if timeout > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._tick.wait(), timeout)

    def poke(self) -> None:
        """Wakes every :meth:`wait` to look again (something other than a transition changed)."""
        self._tick.set()
        self._tick = asyncio.Event()

    def warn(self, text: str) -> None:
        """A warning: kept, logged and journalled."""
        self.warnings.append(text)
        log.warning("corral: %s", text)
        self.journal.note(f"warning: {text}")
