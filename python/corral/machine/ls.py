"""``corral ls``: every stack on the machine, as ``docker compose ls`` lists projects, with
what each holds in the machine ledger and, from its own state directory, how it is doing."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from corral.exceptions import CorralError
from corral.machine.view import HolderView, MachineView
from corral.state import DeploymentStatus, StateStore
from corral.statedir import STATE_DB
from corral.storageusage import StorageUsage

__all__ = ["Ask", "StackRow", "port_ranges", "stack_rows"]


@dataclass(frozen=True)
class StackRow:
    """One line of ``corral ls``."""

    name: str
    directory: str
    state: str
    healthy: int | None
    """Healthy (or completed) instances; None when its state cannot be read here."""
    total: int | None
    cpus: list[int]
    millicores: int
    memory_mb: int
    storage_mb: int
    storage_used: int | None
    """Bytes its volumes hold, as its agent last measured them (None: not measured)."""
    ports: list[int]
    agent_pid: int | None
    user: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


def port_ranges(ports: list[int]) -> str:
    """``20000-20099,8080``: consecutive ports as ranges."""
    out: list[str] = []
    for p in sorted(ports):
        if out and "-" in out[-1] and int(out[-1].split("-")[1]) == p - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{p}"
        elif out and "-" not in out[-1] and int(out[-1]) == p - 1:
            out[-1] = f"{out[-1]}-{p}"
        else:
            out.append(str(p))
    return ",".join(out)


def _row(h: HolderView, seen: DeploymentStatus | None = None) -> StackRow:
    state, healthy, total = ("running" if h.alive else "gone"), None, None
    used: int | None = None
    db = Path(h.state_dir) / STATE_DB
    if seen is not None:
        state = seen.status
        used = _used(seen.storage.values())
        instances = [i for insts in seen.services.values() for i in insts]
        total = len(instances)
        healthy = sum(1 for i in instances if i.state in ("healthy", "completed"))
    elif os.access(db, os.R_OK):
        try:
            rows = [r for r in StateStore.read_deployments(db) if r.name == h.name]
            if rows:
                state = rows[-1].status
                used = _used(rows[-1].storage.values())
                instances = StateStore.read_instances(db, h.name)
                total = len(instances)
                healthy = sum(1 for i in instances if i.state in ("healthy", "completed"))
        except CorralError:
            state = "unreadable"
    if not h.alive:
        state = "gone (its claims go at the next reservation)"
    elif not h.agent_alive:
        state = f"{state}, agent not running"
    return StackRow(h.name, h.directory, state, healthy, total, h.cpus, h.millicores, h.memory_mb, h.storage_mb,
                    used, h.ports, h.agent_pid, h.user)


def _used(volumes: Iterable[StorageUsage]) -> int | None:
    seen = [u.used for u in volumes if u.used is not None]
    return sum(seen) if seen else None


Ask = Callable[[Path], "DeploymentStatus | None"]
"""Puts the question to a stack's agent as the caller (its state directory): its status, or
None when the agent refuses the caller (or does not answer)."""


def stack_rows(view: MachineView, uid: int | None = None, ask: Ask | None = None) -> list[StackRow]:
    """The rows of ``corral ls``, by name: only the stacks the caller (``uid``, this process's
    by default) may view. Root sees every stack and the owner its own; anyone else sees a
    stack only when its agent answers them ``status`` (``access.viewer`` or more in its spec),
    which ``ask`` finds out; without ``ask``, only their own."""
    uid = os.geteuid() if uid is None else uid
    rows: list[StackRow] = []
    for h in view.holders:
        if uid == 0 or h.uid == uid:
            rows.append(_row(h))
            continue
        seen = ask(Path(h.state_dir)) if ask is not None and h.agent_alive else None
        if seen is not None:
            rows.append(_row(h, seen))
    return sorted(rows, key=lambda r: (r.name, r.directory))
