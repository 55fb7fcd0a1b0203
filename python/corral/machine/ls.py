"""``corral ls``: every stack on the machine, as ``docker compose ls`` lists projects, with
what each holds in the machine ledger and, from its own state directory, how it is doing."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from corral.exceptions import CorralError
from corral.machine.view import HolderView, MachineView
from corral.state import StateStore
from corral.statedir import STATE_DB

__all__ = ["StackRow", "port_ranges", "stack_rows"]


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


def _row(h: HolderView) -> StackRow:
    state, healthy, total = ("running" if h.alive else "gone"), None, None
    db = Path(h.state_dir) / STATE_DB
    if os.access(db, os.R_OK):
        try:
            rows = [r for r in StateStore.read_deployments(db) if r.name == h.name]
            if rows:
                state = rows[-1].status
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
                    h.ports, h.agent_pid, h.user)


def stack_rows(view: MachineView) -> list[StackRow]:
    """The rows of ``corral ls``, by name."""
    return sorted((_row(h) for h in view.holders), key=lambda r: (r.name, r.directory))
