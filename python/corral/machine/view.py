"""The machine ledger read: every holder with what it claims, and what is left, as
``corral ls``, ``corral machine`` and ``status --map`` show it, and as
:func:`corral.machine_view` returns it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from corral.machine.claims import HolderRow, holder_alive, read_holders, same_process
from corral.machine.settings import Settings
from corral.machine.store import LedgerStore

__all__ = ["Claim", "Free", "HolderView", "MachineView", "read_view"]


@dataclass(frozen=True)
class Claim:
    """What one instance (or one front) of a stack holds."""

    stack: str
    instance: str
    service: str
    cpus: list[int]
    millicores: int
    memory_mb: int
    numa_node: int | None
    swap_mb: int
    storage_mb: int
    filesystem: str | None
    volume: str | None
    ports: dict[str, int]
    """Port name (``http``; ``front`` for a front) -> port."""


@dataclass(frozen=True)
class HolderView:
    """One stack on the machine and the totals of what it holds."""

    stack: str
    name: str
    directory: str
    state_dir: str
    uid: int
    user: str
    agent_pid: int | None
    keeper_pid: int | None
    alive: bool
    """Its agent, its keeper or one of its instances runs."""
    agent_alive: bool
    """Its agent runs (pid and start time)."""
    cpus: list[int] = field(default_factory=list)
    millicores: int = 0
    memory_mb: int = 0
    storage_mb: int = 0
    ports: list[int] = field(default_factory=list)
    instances: int = 0


@dataclass(frozen=True)
class Free:
    """What is left for a new claim, MiB and millicores (after overcommit)."""

    cpus: list[int]
    """CPUs nobody holds exclusively, that may be handed out."""
    usable_cpus: list[int]
    shared_millicores: int
    shared_capacity_millicores: int
    memory_mb: int
    memory_capacity_mb: int
    ports: int
    """Ports of the auto range nobody holds."""
    port_range: tuple[int, int]


@dataclass(frozen=True)
class MachineView:
    """The machine ledger at one moment (see the module docs)."""

    directory: Path
    settings: Settings
    holders: list[HolderView]
    claims: list[Claim]
    free: Free | None
    """None when no topology was given to measure against."""

    def holder(self, stack: str) -> HolderView | None:
        """The holder of that stack id."""
        return next((h for h in self.holders if h.stack == stack), None)

    def cpu_holders(self) -> dict[int, tuple[HolderView, str]]:
        """CPU -> (its holder, the instance) for every exclusive CPU held."""
        by = {h.stack: h for h in self.holders}
        return {cpu: (by[c.stack], c.instance) for c in self.claims if c.stack in by for cpu in c.cpus}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"directory": str(self.directory), "settings": self.settings.to_dict(),
                "holders": [asdict(h) for h in self.holders], "claims": [asdict(c) for c in self.claims],
                "free": asdict(self.free) if self.free is not None else None}


def read_view(store: LedgerStore, settings: Settings) -> tuple[list[HolderView], list[Claim]]:
    """Every holder and claim, in one read transaction."""
    with store.transaction() as db:
        rows: list[HolderRow] = read_holders(db)
        claims = db.execute("SELECT stack, instance, service, millicores, memory_mb, node, swap_mb, storage_mb, "
                            "filesystem, volume FROM claims ORDER BY stack, instance").fetchall()
        cpus = db.execute("SELECT cpu, stack, instance FROM cpus ORDER BY cpu").fetchall()
        ports = db.execute("SELECT port, stack, owner FROM ports ORDER BY port").fetchall()
    cpus_of: dict[tuple[str, str], list[int]] = {}
    for cpu, stack, inst in cpus:
        cpus_of.setdefault((stack, inst), []).append(cpu)
    ports_of: dict[tuple[str, str], dict[str, int]] = {}
    for port, stack, owner in ports:
        inst, _, name = owner.rpartition(".")
        ports_of.setdefault((stack, inst or owner), {})[name or "port"] = port
    out_claims = []
    seen = set()
    for stack, inst, service, mc, mem, node, swap, storage, fs, vol in claims:
        seen.add((stack, inst))
        out_claims.append(Claim(stack, inst, service, cpus_of.get((stack, inst), []), mc, mem, node, swap, storage,
                                fs, vol, ports_of.get((stack, inst), {})))
    for (stack, owner), named in ports_of.items():  # fronts and ports reserved ahead of an instance
        if (stack, owner) not in seen:
            out_claims.append(Claim(stack, owner, owner.split("-")[0], [], 0, 0, None, 0, 0, None, None, named))
    holders = []
    for h in rows:
        mine = [c for c in out_claims if c.stack == h.stack]
        holders.append(HolderView(
            h.stack, h.name, h.directory, h.state_dir, h.uid, h.user, h.pid, h.keeper_pid, holder_alive(h),
            same_process(h.pid, h.pid_start),
            sorted(cpu for c in mine for cpu in c.cpus), sum(c.millicores for c in mine),
            sum(c.memory_mb for c in mine), sum(c.storage_mb for c in mine),
            sorted(p for c in mine for p in c.ports.values()), sum(1 for c in mine if (c.stack, c.instance) in seen)))
    return holders, out_claims
