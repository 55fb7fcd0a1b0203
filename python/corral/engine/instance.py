"""One instance at run time: its placement, its state machine, its process, its counters."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from corral.lifecycle import Lifecycle, State, Transition
from corral.scheduler import Placement
from corral.spec import ServiceSpec
from corral.state import InstanceRow

__all__ = ["STARTED", "UP", "InstanceRuntime", "Process"]

STARTED = frozenset({State.RUNNING, State.HEALTHY, State.UNHEALTHY, State.COMPLETED})
"""States that meet a ``started`` dependency."""
UP = frozenset({State.HEALTHY, State.COMPLETED})
"""States that meet a ``healthy`` dependency (and ``up``)."""


@dataclass
class Process:
    """The process an instance runs now (or ran last)."""

    pid: int
    start: int
    """Its start time in clock ticks since boot: tells a recycled pid apart."""
    started_at: float
    """``time.monotonic()`` at spawn."""
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    adopted: bool = False
    """Started by an agent that died: not our child, its exit status comes from the keeper."""
    kill_cause: Literal["startup", "liveness"] | None = None
    """Why corral ended it (``startup``, ``liveness``), when it did."""
    kill_detail: str = ""


class InstanceRuntime:
    """One instance of a service: where it was placed, where it is in its life, its process."""

    __slots__ = ("affinity", "cgroup", "exit_code", "exit_text", "healthy_since", "life", "log", "log_from", "p",
                 "probe_message", "proc", "reason", "restarts", "svc", "timer", "version", "vouched")

    def __init__(self, p: Placement, svc: ServiceSpec, log: Path, listener: Callable[[Transition], None],
                 version: int = 1) -> None:
        self.p = p
        self.svc = svc
        self.version = version
        """The spec version whose configuration of its service it runs."""
        self.probe_message = ""
        """What its startup or readiness probe said last when it failed."""
        self.exit_text = ""
        """How its last process ended (``exit status 3``), once one has."""
        self.log = log
        self.log_from: int | None = None
        """Where a log probe starts reading its log: the log's size before its spawn (None:
        its end when the probe starts, for a re-adopted process)."""
        self.life = Lifecycle(p.id, p.service, listener)
        self.proc: Process | None = None
        self.healthy_since: float | None = None
        self.restarts = 0
        self.exit_code: int | None = None
        self.reason = ""
        self.timer: asyncio.TimerHandle | None = None
        """A pending restart or spawn retry."""
        self.cgroup: Path | None = None
        self.affinity: list[int] = list(p.cpus)
        self.vouched = False
        """Re-adopted healthy: its front routes to it while its probes run again under this
        agent (until a new process of it spawns)."""

    @property
    def id(self) -> str:
        """``<service>-<index>``."""
        return self.p.id

    @property
    def state(self) -> State:
        """Its lifecycle state."""
        return self.life.state

    @property
    def pid(self) -> int | None:
        """The pid of its last process."""
        return self.proc.pid if self.proc is not None else None

    @property
    def live_process(self) -> Process | None:
        """Its process, while that has not exited."""
        return self.proc if self.proc is not None and not self.proc.exited.is_set() else None

    @property
    def main_port(self) -> int | None:
        """Its first declared port: the one fronts, discovery and dependents' addresses use."""
        return next(iter(self.p.ports.values()), None)

    def cancel_timer(self) -> None:
        """Drops a pending restart or spawn retry."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    async def wait_exited(self) -> None:
        """Returns once its process (if any) has exited."""
        if self.proc is not None:
            await self.proc.exited.wait()

    def row(self, deployment: str) -> InstanceRow:
        """What the store and ``status`` show of it."""
        p = self.p
        return InstanceRow(
            id=self.id, deployment=deployment, service=p.service, idx=p.index, state=self.state.value,
            healthy=self.state is State.HEALTHY, pid=self.pid, pid_start=self.proc.start if self.proc else None,
            ports=dict(p.ports), cpus=list(self.affinity), exclusive=bool(p.cpus), numa_node=p.numa_node,
            millicores=p.millicores, memory_mb=p.memory_mb, restarts=self.restarts, exit_code=self.exit_code,
            reason=self.reason, since=self.life.since, log=str(self.log), version=self.version)


def settled(inst: InstanceRuntime) -> bool:
    """Up, or failed for good: a rolling step waits for one of these."""
    return inst.state in UP or inst.state is State.FAILED


def cpulist(cpus: list[int]) -> str:
    """``0,2,3``."""
    return ",".join(str(c) for c in cpus)


def placement_text(p: Placement) -> str:
    """What the ``placed`` transition says."""
    parts = []
    if p.cpus:
        parts.append(f"cores {cpulist(p.cpus)}" + (f" (node {p.numa_node})" if p.numa_node is not None else ""))
    elif p.millicores:
        parts.append(f"cpu {p.millicores / 1000:g}")
    if p.memory_mb:
        parts.append(f"memory {p.memory_mb}Mi")
    if p.ports:
        parts.append("ports " + ", ".join(f"{k}={v}" for k, v in p.ports.items()))
    return "; ".join(parts) or "no resources"
