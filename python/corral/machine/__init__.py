"""The machine every stack shares: its settings and its ledger.

Every corral on the machine (``validate``, ``plan``, ``up``, an apply, ``scale``, the Python
API) reserves in one ledger before it places anything, so an exclusive core is exclusive on
the machine, not only inside one ``corral.yaml``, and memory, shared CPU, storage and ports
are never granted twice. The arithmetic of fitting stays in the core
(``corral._core.ResourceManager``); this package keeps the claims, the holders and their
liveness (:mod:`~corral.machine.claims`), the file (:mod:`~corral.machine.store`), the
settings (:mod:`~corral.machine.settings`) and the read view (:mod:`~corral.machine.view`).

::

    m = corral.Machine()                    # $CORRAL_MACHINE_DIR, /run/corral, ...
    view = m.view(corral.Topology.detect())
    for h in view.holders:
        print(h.name, h.directory, h.cpus, h.memory_mb)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from corral._core import PortAllocator, ResourceManager, Topology
from corral.machine.claims import Claims, Holder, LocalClaims, StackClaims
from corral.machine.rebuild import rebuild_claims, unreadable_stacks
from corral.machine.settings import Settings, ledger_dir, load_settings, settings_file
from corral.machine.store import LedgerStore, Rebuilder
from corral.machine.view import Claim, Free, HolderView, MachineView, read_view

__all__ = ["Claim", "Claims", "Free", "Holder", "HolderView", "LocalClaims", "Machine", "MachineView", "Settings",
           "StackClaims", "machine_view"]


class Machine:
    """This machine's settings and ledger (see the module docs); ``directory`` defaults to
    :func:`~corral.machine.settings.ledger_dir`, ``settings`` to its settings file's."""

    def __init__(self, directory: str | Path | None = None, *, settings: Settings | None = None) -> None:
        self.directory = Path(directory) if directory is not None else ledger_dir()
        self._settings = settings
        self._store: LedgerStore | None = None

    @property
    def settings(self) -> Settings:
        """The settings (read once)."""
        if self._settings is None:
            self._settings = load_settings(settings_file(self.directory))
        return self._settings

    @property
    def store(self) -> LedgerStore:
        """The ledger file (opened, and created when missing, on first use)."""
        if self._store is None:
            self._store = LedgerStore(self.directory, Rebuilder(unreadable_stacks, rebuild_claims))
        return self._store

    def resources(self, topology: Topology, volumes: Mapping[str, str] | None = None) -> ResourceManager:
        """A native ledger over ``topology`` with this machine's reserves and overcommit."""
        s = self.settings
        return ResourceManager(topology, reserved_cpus=list(s.reserved_cpus) if s.reserved_cpus is not None else None,
                               cpu_overcommit=s.cpu_overcommit, memory_overcommit=s.memory_overcommit,
                               volumes=dict(volumes or {}), memory_reserve_mb=s.memory_reserve_mb,
                               disk_reserve_mb=s.disk_reserve_mb)

    def port_range(self, named: tuple[int, int] | None) -> tuple[int, int]:
        """The auto-port range of a spec: the one it names, else the machine's."""
        return named if named is not None else self.settings.port_range

    def claims(self, holder: Holder, resources: ResourceManager, ports: PortAllocator,
               on_reclaim: Callable[[str], None] | None = None) -> StackClaims:
        """The claims of ``holder``'s stack, over its native ledgers."""
        return StackClaims(self.store, holder, resources, ports, on_reclaim)

    def view(self, topology: Topology | None = None) -> MachineView:
        """Every holder, every claim and (given the topology) what is left."""
        holders, claims = read_view(self.store, self.settings)
        free = None
        if topology is not None:
            rm = self.resources(topology)
            node: dict[int, int] = {}
            rm.set_elsewhere(cpus=[c for cl in claims for c in cl.cpus if c in set(rm.usage().cpus)],
                             millicores=sum(c.millicores for c in claims), memory_mb=sum(c.memory_mb for c in claims),
                             node_memory_mb=node, swap_mb=sum(c.swap_mb for c in claims))
            u = rm.usage()
            lo, hi = self.settings.port_range
            ports = PortAllocator(lo, hi)
            ports.set_claimed([p for c in claims for p in c.ports.values()])
            free = Free(sorted(set(u.cpus) - set(u.elsewhere_cpus)), u.cpus,
                        u.shared_capacity_millicores - u.elsewhere_millicores, u.shared_capacity_millicores,
                        max(0, u.memory_capacity_mb - u.elsewhere_memory_mb), u.memory_capacity_mb,
                        ports.available, (lo, hi))
        return MachineView(self.directory, self.settings, holders, claims, free)

    def forget(self, stack: str) -> None:
        """Drops everything ``stack`` holds (its agent is gone and its processes stopped)."""
        from corral.machine.claims import bump, drop_stack

        with self.store.transaction() as db:
            drop_stack(db, stack)
            bump(db)
        self.store.unindex(stack)

    def close(self) -> None:
        """Closes the ledger file."""
        if self._store is not None:
            self._store.close()
            self._store = None


def machine_view() -> MachineView:
    """This machine's ledger now (``$CORRAL_MACHINE_DIR`` or the default place): every
    stack with what it holds, every claim, and what is left."""
    return Machine().view(Topology.detect())
