"""Planning: dependency phases, then placement of every instance on the machine.

Placement goes in priority order (higher first, then by phase), each instance through the
native ledgers: exclusive cores NUMA-, L3- and SMT-aware, shared CPU, memory, swap and storage,
and ports from the allocator. It is all or nothing: if one instance does not fit, everything
placed so far is released and the error names the instance and what was short.

The machine is shared: every placement is made inside a reservation of the stack's
:class:`~corral.machine.Claims` (one transaction of the machine ledger), which hands the
native ledgers what the other stacks hold before they place, records each grant and port,
and names the other stack when one holds what was asked for.

``binpack`` and ``spread`` choose the NUMA node of shared-CPU instances with memory on
machines with several nodes: binpack fills the fullest node that still fits, spread the
emptiest. Subclass :class:`Scheduler` and override :meth:`Scheduler.choose_node` to change it.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral._core import Grant, PortAllocator, ResourceManager, ResourceRequest, Topology
from corral.exceptions import CorralError, InsufficientResources, PortError, PortInUse
from corral.machine import Claims, Holder, LocalClaims, Machine
from corral.spec import DeploymentSpec, ServiceSpec
from corral.statedir import stack_id
from corral.volumes import space_of

__all__ = ["Placement", "Plan", "Scheduler", "check_fit", "measured_at", "phases", "port_range", "volume_paths"]

MiB = 1 << 20


def phases(spec: DeploymentSpec) -> list[list[str]]:
    """Services by dependency level: level 0 depends on nothing, level n on levels below n."""
    level: dict[str, int] = {}

    def depth(name: str) -> int:
        if name not in level:
            deps = spec.services[name].depends_on
            level[name] = 1 + max((depth(d) for d in deps), default=-1)
        return level[name]

    for name in spec.services:
        depth(name)
    out: list[list[str]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
    for name in spec.services:
        out[level[name]].append(name)
    for p in out:
        p.sort(key=lambda n: (-spec.services[n].priority, n))
    return out


def port_range(spec: DeploymentSpec, machine: Machine) -> tuple[int, int]:
    """A spec's auto-port range: the one it names, else the machine's."""
    return machine.port_range(spec.port_range if "port_range" in spec.model_fields_set else None)


def volume_paths(spec: DeploymentSpec, base: Path) -> dict[str, Path]:
    """Each service's storage directory, resolved against the spec's directory."""
    out = {}
    for name, svc in spec.services.items():
        st = svc.resources.storage
        if st is not None:
            out[name] = (base / st.path).resolve()
    return out


def measured_at(spec: DeploymentSpec, volumes: dict[str, Path], state_dir: Path) -> dict[str, str]:
    """Per volume (by its path), where the ledger measures its filesystem's space: the
    image's directory for ``enforce: volume`` (see :func:`corral.volumes.space_of`)."""
    out = {}
    for name, path in volumes.items():
        st = spec.services[name].resources.storage
        out[str(path)] = str(space_of(st.enforce if st is not None else "none", path, state_dir))
    return out


@dataclass
class Placement:
    """Where one instance goes and what it holds."""

    id: str
    service: str
    index: int
    ports: dict[str, int] = field(default_factory=dict)
    cpus: list[int] = field(default_factory=list)
    numa_node: int | None = None
    millicores: int = 0
    memory_mb: int = 0
    swap_mb: int = 0
    storage_mb: int = 0
    volume: str | None = None
    grant: Grant | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "id": self.id, "service": self.service, "index": self.index, "ports": self.ports,
            "cpus": self.cpus, "numa_node": self.numa_node, "cpu": self.millicores / 1000,
            "memory_mb": self.memory_mb, "swap_mb": self.swap_mb, "storage_mb": self.storage_mb,
            "volume": self.volume,
        }


@dataclass
class Plan:
    """Phases and placements of one deployment."""

    phases: list[list[str]]
    placements: dict[str, list[Placement]]
    fronts: dict[str, int] = field(default_factory=dict)
    """The front port of each exposed service."""
    fixed: dict[tuple[str, str], int] = field(default_factory=dict)
    """Fixed ports reserved before any ``auto`` one, not yet handed to their instance."""

    def instances(self) -> Iterator[Placement]:
        """Every placement, phase by phase."""
        for phase in self.phases:
            for svc in phase:
                yield from self.placements.get(svc, [])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "phases": self.phases,
            "services": {s: [p.to_dict() for p in ps] for s, ps in self.placements.items()},
            "fronts": self.fronts,
        }


class Scheduler:
    """Places instances through the ledgers and the port allocator (see the module docs)."""

    def __init__(self, topology: Topology, resources: ResourceManager, ports: PortAllocator,
                 policy: str = "binpack", host: str = "127.0.0.1", *, bind_check: bool = True,
                 claims: Claims | None = None) -> None:
        self.topology = topology
        self.resources = resources
        self.ports = ports
        self.policy = policy
        self.host = host
        self.bind_check = bind_check
        """Whether a fixed port outside the allocator's ranges is tried with a bind."""
        self.claims: Claims = claims or LocalClaims()
        """The machine's ledger, as this stack reserves in it (none: nothing is shared)."""
        self._outside: set[int] = set()

    def plan(self, spec: DeploymentSpec, volumes: dict[str, Path] | None = None) -> Plan:
        """Places every instance, or releases everything and raises :class:`SpecError`
        pointing at the service that does not fit."""
        with self.claims.reserving():
            return self._plan(spec, volumes)

    def _plan(self, spec: DeploymentSpec, volumes: dict[str, Path] | None) -> Plan:
        order = phases(spec)
        rank = {s: i for i, p in enumerate(order) for s in p}
        services = sorted(spec.services, key=lambda s: (-spec.services[s].priority, rank[s], s))
        plan = Plan(order, {s: [] for p in order for s in p})
        # Every port asked for by number first: an `auto` port of a higher-priority service
        # must not take a number that another service (or a front) names.
        for name in services:
            svc = spec.services[name]
            if svc.expose is not None:
                try:
                    plan.fronts[name] = self._port(svc.expose, f"{name}.front")
                except CorralError as e:
                    self.release(plan)
                    raise spec.error(("services", name, "expose"), f"front of {name}: {e}") from None
            for pname, want in svc.ports.items():
                if want == "auto" or svc.replicas == 0:
                    continue
                try:
                    plan.fixed[(name, pname)] = self._port(want, f"{name}-0.{pname}")
                except CorralError as e:
                    self.release(plan)
                    raise spec.error(("services", name, "ports", pname), f"{name}-0 does not fit: {e}") from None
        for name in services:
            svc = spec.services[name]
            for i in range(svc.replicas):
                try:
                    plan.placements[name].append(self.place_one(name, i, svc, (volumes or {}).get(name), plan.fixed))
                except CorralError as e:
                    self.release(plan)
                    where = "ports" if isinstance(e, PortError) else "resources"
                    raise spec.error(("services", name, where), f"{name}-{i} does not fit: {e}") from None
        return plan

    def place_one(self, name: str, index: int, svc: ServiceSpec, volume: Path | None,
                  fixed: dict[tuple[str, str], int] | None = None, *, iid: str | None = None) -> Placement:
        """One instance: resources, then ports (all released again if the ports fail); a
        fixed port reserved already in ``fixed`` is taken from there. Its id is
        ``<name>-<index>`` unless ``iid`` names it (a replacement beside its predecessor)."""
        with self.claims.reserving():
            return self._place_one(name, index, svc, volume, fixed, iid)

    def _place_one(self, name: str, index: int, svc: ServiceSpec, volume: Path | None,
                   fixed: dict[tuple[str, str], int] | None, iid: str | None) -> Placement:
        r = svc.resources
        req_memory = math.ceil((r.memory or 0) / MiB)
        node = self.choose_node(req_memory) if not r.cores and req_memory else None
        # A chosen node is a preference the ledger accounts the memory on (and the engine
        # keeps the instance's threads on that node's shared CPUs).
        numa = "prefer" if node is not None and r.numa == "none" else r.numa
        request = ResourceRequest(
            cpu=r.cpu or 0.0, cores=r.cores or 0, numa=numa, cache=r.cache, memory_mb=req_memory,
            swap_mb=math.ceil((r.swap or 0) / MiB), storage_mb=math.ceil((r.storage.size if r.storage else 0) / MiB),
            volume=str(volume) if volume is not None else None, numa_node=node,
        )
        p = self._granted(iid or f"{name}-{index}", name, index, request)
        try:
            for pname, want in svc.ports.items():
                reserved = fixed.pop((name, pname), None) if fixed is not None else None
                p.ports[pname] = reserved if reserved is not None else self._port(want, f"{p.id}.{pname}")
        except CorralError:
            self.release_one(p)
            raise
        return p

    def restore(self, iid: str, name: str, index: int, svc: ServiceSpec, volume: Path | None, *, cpus: list[int],
                exclusive: bool, numa_node: int | None, ports: dict[str, int]) -> Placement:
        """An instance that runs already (re-adopted from a dead agent) back in the ledgers,
        on exactly the cores and ports it holds; the ports are not tried with a bind, as its
        own process holds them. Raises what the ledger says when that is not possible."""
        with self.claims.reserving():
            return self._restore(iid, name, index, svc, volume, cpus=cpus, exclusive=exclusive, numa_node=numa_node,
                                 ports=ports)

    def _restore(self, iid: str, name: str, index: int, svc: ServiceSpec, volume: Path | None, *, cpus: list[int],
                 exclusive: bool, numa_node: int | None, ports: dict[str, int]) -> Placement:
        r = svc.resources
        request = ResourceRequest(
            cpu=r.cpu or 0.0, cores=len(cpus) if exclusive else 0, exact_cpus=cpus if exclusive else [],
            numa=r.numa, cache=r.cache, memory_mb=math.ceil((r.memory or 0) / MiB),
            swap_mb=math.ceil((r.swap or 0) / MiB), storage_mb=math.ceil((r.storage.size if r.storage else 0) / MiB),
            volume=str(volume) if volume is not None else None, numa_node=numa_node,
        )
        p = self._granted(iid, name, index, request)
        try:
            for pname, port in ports.items():
                owner = f"{iid}.{pname}"
                holder = self.claims.port_holder(port)
                if holder is not None:
                    raise PortInUse(f"port {port} is held by {holder}", port, None)
                if any(lo <= port <= hi for lo, hi in self.ports.ranges):
                    p.ports[pname] = self.ports.allocate(port, name=owner, check=False)
                else:
                    self._outside.add(port)
                    p.ports[pname] = port
                self.claims.port(port, owner)
        except CorralError:
            self.release_one(p)
            raise
        return p

    def _granted(self, iid: str, service: str, index: int, request: ResourceRequest) -> Placement:
        """The grant of one instance, claimed on the machine; a shortage names the other
        stacks that hold what was short."""
        try:
            grant = self.resources.allocate(request)
        except InsufficientResources as e:
            raise InsufficientResources(self.claims.explain(str(e))) from None
        p = Placement(id=iid, service=service, index=index, cpus=grant.cpus, numa_node=grant.numa_node,
                      millicores=grant.millicores, memory_mb=grant.memory_mb, swap_mb=grant.swap_mb,
                      storage_mb=grant.storage_mb, volume=grant.volume, grant=grant)
        try:
            self.claims.grant(iid, service, grant)
        except CorralError:
            self.release_one(p)
            raise
        return p

    def choose_node(self, memory_mb: int) -> int | None:
        """NUMA node for a shared-CPU instance with memory (None: let the ledger decide)."""
        nodes = self.resources.usage().memory_by_node
        if len(nodes) < 2:
            return None
        fits = [(n.capacity_mb - n.used_mb, nid) for nid, n in nodes.items() if n.capacity_mb - n.used_mb >= memory_mb]
        if not fits:
            return None
        best: int = (min(fits) if self.policy == "binpack" else max(fits))[1]
        return best

    def front_port(self, want: int, name: str, *, check: bool = True) -> int:
        """Reserves a front's port (an apply that adds or moves ``expose``); ``check=False``
        takes it while it is listening (re-adoption: the keeper holds the front)."""
        with self.claims.reserving():
            return self._port(want, name, check=check)

    def release_port(self, port: int) -> None:
        """Gives back a port reserved with :meth:`front_port`."""
        self._release_port(port)

    def _port(self, want: str | int, name: str, *, check: bool = True) -> int:
        """One port for ``name``, claimed on the machine (inside a reservation)."""
        port = self._take_port(want, name, check=check)
        try:
            self.claims.port(port, name)
        except CorralError:
            self._release_port(port)
            raise
        return port

    def _take_port(self, want: str | int, name: str, *, check: bool = True) -> int:
        if want == "auto":
            return self.ports.allocate(name=name)
        port = int(want)
        holder = self.claims.port_holder(port)
        if holder is not None:
            # Held from placement on, listening or not (its holder may be stopped).
            raise PortInUse(f"port {port} is held by {holder}", port, None)
        if any(lo <= port <= hi for lo, hi in self.ports.ranges):
            return self.ports.allocate(port, name=name, check=check)
        # Outside the allocator's ranges: only a bind tells whether it is free.
        if port in self._outside:
            raise PortInUse(f"port {port} is in use by another instance", port, None)
        if not self.bind_check or not check:
            self._outside.add(port)
            return port
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((self.host, port))
            except OSError as e:
                raise PortInUse(f"port {port} is in use ({os.strerror(e.errno or 0)})", port, None) from None
        self._outside.add(port)
        return port

    def release_one(self, p: Placement) -> None:
        """Returns an instance's grant and ports (each exactly once)."""
        if p.grant is not None:
            self.resources.release(p.grant)
            p.grant = None
            self.claims.release_instance(p.id)
        for port in p.ports.values():
            self._release_port(port)
        p.ports = {}

    def _release_port(self, port: int) -> None:
        if port in self._outside:
            self._outside.discard(port)
        elif self.ports.is_allocated(port):
            self.ports.release(port)
        else:
            return
        self.claims.release_port(port)

    def release(self, plan: Plan) -> None:
        """Returns everything a plan holds."""
        with self.claims.reserving():
            for ps in plan.placements.values():
                for p in ps:
                    self.release_one(p)
            for port in [*plan.fronts.values(), *plan.fixed.values()]:
                self._release_port(port)
        plan.fronts = {}
        plan.fixed = {}


def check_fit(spec: DeploymentSpec, base: Path, topology: Topology | None = None, *,
              machine: Machine | None = None, state_dir: Path | None = None) -> None:
    """Places the whole spec on this machine, beside what the other stacks hold in its
    ledger, and gives everything back (a dry reservation: nothing is claimed): raises the
    :class:`SpecError` of the first instance that does not fit, naming the stack that holds
    what was short. The stack of ``state_dir`` (default: ``.corral`` beside the spec) does
    not count against itself. Ports are not tried with a bind (the stack itself may hold
    them): whether a process outside corral holds one is known only when ``up`` places it."""
    from corral.state import default_state_dir

    topo = topology or Topology.detect()
    m = machine or Machine()
    volumes = volume_paths(spec, base)
    resources = m.resources(topo, {str(p): str(p) for p in volumes.values()})
    lo, hi = port_range(spec, m)
    ports = PortAllocator(lo, hi)
    sd = state_dir or default_state_dir(base / "corral.yaml")
    claims = m.claims(Holder.of(stack_id(sd), spec.name, base, sd), resources, ports)
    s = Scheduler(topo, resources, ports, spec.scheduler, bind_check=False, claims=claims)
    with claims.reserving(dry=True):
        s.release(s.plan(spec, volumes))
