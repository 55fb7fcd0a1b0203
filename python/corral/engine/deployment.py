"""What a deployment does: bring its services up in dependency order, wait for their
conditions, roll back on failure, restart rolling, take everything down in reverse order.

How each piece works lives beside this file: :mod:`~corral.engine.launch` spawns and signals,
:mod:`~corral.engine.verdicts` turns exits and probe results into transitions,
:mod:`~corral.engine.hooks` sets up cgroups, the mesh, fronts and volumes,
:mod:`~corral.engine.journal` writes the store. Mechanisms are native; restarts and
rollbacks are decided by the strategies in :mod:`corral.recovery`.

::

    async with corral.Deployment.from_file("corral.yaml") as d:
        await d.up()
        print(d.status())
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from corral._core import Authority, IssuedCert, PortAllocator, Supervisor, Topology
from corral.audit import AuditTrail
from corral.engine.adopt import Adoption, adoptable
from corral.engine.apply import Applier
from corral.engine.auditing import Auditor
from corral.engine.bringup import BringUp
from corral.engine.diff import SpecDiff, spec_hash
from corral.engine.fleet import Fleet
from corral.engine.frontlink import Front
from corral.engine.hooks import CgroupsHook, FrontsHook, Hook, MeshHook, VolumesHook
from corral.engine.instance import InstanceRuntime
from corral.engine.journal import Journal
from corral.engine.keeperwatch import KeeperWatch
from corral.engine.launch import Launcher
from corral.engine.metrics import exposition
from corral.engine.operate import ServiceOps
from corral.engine.running import Running
from corral.engine.schedules import Schedules
from corral.engine.stack import Stack
from corral.engine.storage import StorageWatch
from corral.engine.templates import Templates
from corral.engine.tracing import Tracing, endpoint_from
from corral.engine.verdicts import Verdicts
from corral.exceptions import (
    AgentAlreadyRunning,
    CorralError,
    UnknownService,
)
from corral.leftovers import PID_LOG, live_agent, stop_leftovers, sweep_stack
from corral.lifecycle import State, Transition
from corral.machine import Holder, Machine
from corral.recovery import BackoffRestart, Exit, RestartStrategy, RollbackStrategy
from corral.scheduler import Plan, Scheduler, measured_at, port_range, volume_paths
from corral.spec import DeploymentSpec, load_spec
from corral.state import DeploymentStatus, EventRow, InstanceRow, default_state_dir
from corral.statedir import FRONTS_SOCKET, stack_id

__all__ = ["Deployment", "DeploymentStatus", "InstanceStatus"]

InstanceStatus = InstanceRow
"""The status of one instance (``id``, ``state``, ``healthy``, ``pid``, ``ports``, ``cpus``, ``restarts``...)."""


class Deployment:
    """One deployment of a spec on this machine; see the module docs.

    It is composed of parts, each handed what it may touch: :class:`~corral.engine.running.Running`
    (what runs now), the fleet (placing and retiring instances), the launcher and the verdicts
    (processes and what becomes of them), the journal (the store), the hooks, and the two
    parts for what is not a bring-up: :class:`~corral.engine.apply.Applier` (a changed spec)
    and :class:`~corral.engine.adopt.Adoption` (a dead agent's stack).

    ``restart_strategy`` and ``rollback`` take subclasses of the strategies in
    :mod:`corral.recovery`; ``scheduler`` a :class:`~corral.scheduler.Scheduler` subclass.
    ``cgroup_root`` points memory limits at another cgroup mount (a test tree, say);
    ``keeper`` is a :class:`~corral._core.LogKeeper`'s socket that takes the instances' output;
    ``machine`` is the :class:`~corral.machine.Machine` whose ledger every placement is
    reserved in (default: this machine's, see :mod:`corral.machine.settings`).
    """

    def __init__(self, spec: DeploymentSpec, *, file: str | Path = "corral.yaml", state_dir: str | Path | None = None,
                 restart_strategy: RestartStrategy | None = None, rollback: RollbackStrategy | None = None,
                 scheduler: type[Scheduler] = Scheduler, topology: Topology | None = None,
                 cgroup_root: str | Path | None = None, host: str = "127.0.0.1",
                 keeper: str | Path | None = None, machine: Machine | None = None) -> None:
        file = Path(file)
        self.state_dir = Path(state_dir) if state_dir else default_state_dir(file)
        self.host = host
        self.keeper = Path(keeper) if keeper is not None else None
        """The log keeper's socket (``up -d``): instances' output goes there, not through us."""
        self.topology = topology or Topology.detect()
        self.machine = machine or Machine()
        """The machine's settings and ledger, shared with every other stack."""
        base = file.resolve().parent
        self.running = Running(spec, file, volume_paths(spec, base))
        """What runs now: the spec, its file, the placement, each service's configuration."""
        volumes = self.running.volumes
        # A volume's capacity is its filesystem's free space, measured by the core (at the
        # nearest existing ancestor: the directory is created at up).
        self.resources = self.machine.resources(self.topology, measured_at(spec, volumes, self.state_dir))
        lo, hi = port_range(spec, self.machine)
        self.ports = PortAllocator(lo, hi, check_bind=host)
        self.journal = Journal(self.state_dir, spec.name, file,
                               self._row_of,
                               max_rows=spec.events.max_rows, max_age=spec.events.max_age)
        self._keeper_pid = os.getppid() if self.keeper is not None else None
        """up -d: the keeper is this agent's parent (read once, before it could have died)."""
        holder = Holder.of(stack_id(self.state_dir), spec.name, base, self.state_dir, keeper_pid=self._keeper_pid)
        self.claims = self.machine.claims(holder, self.resources, self.ports, on_reclaim=self.journal.note)
        """What this stack holds in the machine ledger."""
        self.scheduler = scheduler(self.topology, self.resources, self.ports, spec.scheduler, host,
                                   claims=self.claims)
        self.rollback = rollback or RollbackStrategy()
        self._stack = Stack(spec, base, self.state_dir, host, self.resources, self.journal)
        self._stack.tracing = Tracing(endpoint_from(spec.tracing.otlp if spec.tracing else None), spec.name)
        self._mesh = MeshHook()
        self._fronts = FrontsHook({}, self._mesh, self.keeper and self.state_dir / FRONTS_SOCKET)
        self._cgroups = CgroupsHook(Path(cgroup_root or os.environ.get("CORRAL_CGROUP_ROOT", "/sys/fs/cgroup")))
        self._vols = VolumesHook(volumes)
        self._templates = Templates(self.running, self._stack)
        self.launcher = Launcher(self._stack, on_spawn_error=self._spawn_failed, on_healthy=self._healthy,
                                 mesh=self._identity, log_max=spec.logs.max_size, log_keep=spec.logs.keep,
                                 prepare=self._templates.prepare)
        self.verdicts = Verdicts(self._stack, self.launcher,
                                 restart_strategy or BackoffRestart({n: s.restart for n, s in spec.services.items()}))
        self.fleet = Fleet(self._stack, self.launcher, self.verdicts, self.scheduler, self._cgroups, self._fronts,
                           volumes)
        self._pump: asyncio.Task[None] | None = None
        self._ran = False
        self._changing = asyncio.Lock()
        """One change at a time: apply, scale, restart, stop, start."""
        self._applier = Applier(self.running, state_dir=self.state_dir, topology=self.topology, machine=self.machine,
                                stack=self._stack, fleet=self.fleet, scheduler=self.scheduler, claims=self.claims,
                                journal=self.journal, verdicts=self.verdicts, launcher=self.launcher,
                                volumes=self._vols, mesh=self._mesh, fronts=self._fronts, changing=self._changing)
        self._bringup = BringUp(self.running, state_dir=self.state_dir, journal=self.journal, stack=self._stack,
                                fleet=self.fleet, launcher=self.launcher, fronts=self._fronts,
                                supervise=self._supervise, roll_back=self._roll_back)
        self._ops = ServiceOps(self.running, stack=self._stack, fleet=self.fleet, journal=self.journal,
                               changing=self._changing)
        self._templates.wire(self.launcher.environment, self._ops)
        # In order: volumes exist (mounted) before they are measured, and are measured before
        # anything starts; postrun goes the other way.
        self._schedules = Schedules(self.running, self._stack, self.fleet)
        self._hooks: list[Hook] = [self._vols, StorageWatch(self.running, self._ops), self._cgroups, self._mesh,
                                   self._fronts, self._templates, self._schedules]
        self._keeper_watch = KeeperWatch(self._stack, self.journal, self._ops.restart, self._fronts.rehome)
        self.auditor = Auditor(AuditTrail(self.state_dir, max_size=spec.audit.max_size, keep=spec.audit.keep,
                                          syslog=spec.audit.syslog), self.verdicts.counters)
        """Every operation, with who asked and how it ended (see :mod:`corral.audit`)."""
        self._adoption = Adoption(self.running, state_dir=self.state_dir, journal=self.journal, stack=self._stack,
                                  fleet=self.fleet, launcher=self.launcher, verdicts=self.verdicts,
                                  scheduler=self.scheduler, claims=self.claims, fronts=self._fronts,
                                  supervise=self._supervise, down=self.down, roll_back=self._roll_back)

    @classmethod
    def from_file(cls, path: str | Path, **kwargs: Any) -> Deployment:
        """Loads and validates ``path`` (raises :class:`~corral.exceptions.SpecError`)."""
        return cls(load_spec(path), file=path, **kwargs)

    # --- public API -----------------------------------------------------------------

    @property
    def name(self) -> str:
        """The deployment's name."""
        return self.spec.name

    @property
    def spec(self) -> DeploymentSpec:
        """The spec it runs (an apply changes it)."""
        return self.running.spec

    @property
    def file(self) -> Path:
        """The spec's file."""
        return self.running.file


    @property
    def plan(self) -> Plan | None:
        """Where every instance went (None before placement)."""
        return self.running.plan

    def plan_changes(self, spec: DeploymentSpec) -> SpecDiff:
        """What :meth:`apply` would do with ``spec``, nothing changed (see ``Applier.plan_changes``)."""
        return self._applier.plan_changes(spec)

    async def apply(self, spec: DeploymentSpec, file: str | Path | None = None) -> SpecDiff:
        """Makes the running stack what ``spec`` says, changing only what changed; raises
        :class:`~corral.exceptions.RolloutError` after a revert (see
        :meth:`corral.engine.apply.Applier.apply`). Returns the diff applied."""
        before = spec_hash(self.spec)
        args = {"file": str(file or self.file), "before": before, "after": spec_hash(spec)}
        async with self.auditor.op("apply", args) as more:
            with contextlib.suppress(CorralError):
                more["changed"] = sorted(c.name for c in self.plan_changes(spec).changed)
            diff = await self._applier.apply(spec, file)
            self._schedules.changed()
            self.auditor.follow(self.spec.audit)
            return diff

    async def adopt(self) -> str:
        """Takes over what the dead agent of this state directory left and returns what the
        event log says of it (see :mod:`corral.engine.adopt`). Raises
        :class:`~corral.exceptions.AgentAlreadyRunning` when that agent still runs."""
        if self._ran:
            raise CorralError("this deployment has run already; create a new Deployment to adopt")
        self._ran = True
        return await self._adoption.adopt()

    @property
    def tracing(self) -> Tracing:
        """Its OpenTelemetry spans (see :mod:`corral.engine.tracing`)."""
        return self._stack.tracing

    @property
    def state_db(self) -> Path:
        """The SQLite file."""
        return self.journal.db

    @property
    def registry(self) -> Any:
        """The service registry its healthy instances are in (a ``ServiceRegistry``)."""
        return self._stack.registry

    @property
    def restart_strategy(self) -> RestartStrategy:
        """What decides restarts."""
        return self.verdicts.restart_strategy

    @property
    def warnings(self) -> list[str]:
        """Warnings so far (also in the event log)."""
        return self._stack.warnings

    async def __aenter__(self) -> Deployment:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.down()

    def make_plan(self, *, dry: bool = False) -> Plan:
        """Places every instance without starting anything (raises SpecError when it does not
        fit), claimed in the machine ledger for this stack (in place of whatever it claimed
        before); ``dry`` claims nothing (the placement is only shown)."""
        if self.running.plan is None:
            with self.claims.reserving(dry=dry):
                if not dry:
                    self.claims.reset()
                self.running.plan = self.scheduler.plan(self.spec, self.running.volumes)
        return self.running.plan

    async def up(self) -> None:
        """Starts every service in dependency order and returns when each meets its condition
        (healthy, or completed for one-shot jobs). On failure, rolls back and raises
        :class:`~corral.exceptions.DeploymentError`. A deployment comes up once: after
        ``down``, make a new one."""
        async with self.auditor.op("up", {"file": str(self.file), "digest": spec_hash(self.spec)}):
            await self._up()

    async def _up(self) -> None:
        if self._ran:
            raise CorralError(f"deployment {self.name!r} was already brought up; create a new Deployment")
        if adoptable(self.state_db, self.name, spec_hash(self.spec)):
            # Its agent died and what it ran runs on, from this very spec: take it over.
            await self.adopt()
            return
        self._ran = True
        self.journal.open()
        self._clean_stale()
        if self.tracing.problem:
            self._stack.warn(self.tracing.problem)
        try:
            plan = self.make_plan()
        except BaseException:
            self.claims.forget()  # refused: the stack holds nothing, and is no holder
            raise
        try:
            with self.tracing.operation("up", deployment=self.name, instances=sum(1 for _ in plan.instances()),
                                        phases=len(plan.phases)):
                await self._bringup.up(plan)
        finally:
            if self._stack.down:  # rolled back: nothing more to trace
                self.tracing.close()

    async def down(self) -> None:
        """Stops every service in reverse dependency order, each by its shutdown rule, and
        releases every grant and port. Safe to call twice."""
        stack = self._stack
        if stack.down or self.plan is None:
            self.tracing.close()
            self._close()
            return
        async with self.auditor.op("down", {}):
            await self._down_all()

    async def _down_all(self) -> None:
        stack = self._stack
        assert self.plan is not None
        stack.down = True
        try:
            with self.tracing.operation("down", deployment=self.name):
                await self._down(self.plan)
        finally:
            self.tracing.close()
        self._close()

    async def _down(self, plan: Plan) -> None:
        stack = self._stack
        self.journal.status("stopping", event=(None, "down"))
        for hook in self._hooks:
            hook.stopping(stack)
        for k, phase in reversed(list(enumerate(plan.phases))):
            with self.tracing.span(f"stop phase {k}", phase=k, services=sorted(phase)):
                await asyncio.gather(*(self._stop(i, "down") for s in phase for i in stack.by_service.get(s, [])))
        # What a change in flight added outside the phases (an apply interrupted by down).
        await asyncio.gather(*(self._stop(i, "down") for i in list(stack.instances.values()) if i.state.alive))
        for inst in stack.instances.values():
            if inst.cgroup is not None and stack.cgroups is not None:
                with contextlib.suppress(OSError, CorralError):
                    stack.cgroups.kill(inst.cgroup)  # what shed its group and its marker too
        escaped = sweep_stack(self.state_dir)
        if escaped:
            self.journal.note(f"down: killed {escaped} processes that had left their instance's process group")
        self._release()
        self.journal.status("down", event=("stopping", "every process stopped"))

    async def restart(self, service: str) -> None:
        """A rolling restart of ``service`` (see :meth:`corral.engine.operate.ServiceOps.restart`)."""
        async with self.auditor.op("restart", {"service": service}):
            await self._ops.restart(service)

    async def scale(self, service: str, replicas: int) -> None:
        """Runs ``replicas`` instances of ``service`` (see :meth:`corral.engine.operate.ServiceOps.scale`)."""
        async with self.auditor.op("scale", {"service": service, "replicas": replicas}):
            await self._ops.scale(service, replicas)

    async def stop_service(self, service: str) -> list[str]:
        """Stops ``service``, keeping it ``stopped`` in the stack; returns its dependents (see
        :meth:`corral.engine.operate.ServiceOps.stop_service`)."""
        async with self.auditor.op("stop", {"service": service}):
            return await self._ops.stop_service(service)

    async def run(self, service: str) -> str:
        """Runs a scheduled service now, or a one-shot one again; returns the id of the
        instance that runs (see :meth:`corral.engine.schedules.Schedules.run`)."""
        async with self.auditor.op("run", {"service": service}):
            return await self._schedules.run(service, self._ops.start_service)

    async def signal(self, service: str, name: str | None = None) -> list[str]:
        """Sends ``name`` (None: ``reload_signal``) to each live instance's main process; their ids."""
        async with self.auditor.op("kill" if name else "reload", {"service": service, "signal": name or ""}):
            return self._ops.signal(service, name)

    async def start_service(self, service: str) -> None:
        """Starts ``service`` again (see :meth:`corral.engine.operate.ServiceOps.start_service`)."""
        async with self.auditor.op("start", {"service": service}):
            await self._ops.start_service(service)

    def status(self) -> DeploymentStatus:
        """The deployment now."""
        row = self.journal.row
        self.journal.flush_soon()  # and so look at the file (a removed state.db shows here)
        message = "; ".join(m for m in (row.message, self.journal.problem) if m)
        st = DeploymentStatus(self.name, row.status, message, row.agent_pid,
                              agent_running=self._pump is not None, version=row.version)
        for name in [*self.spec.services, *(n for n in self._stack.by_service if n not in self.spec.services)]:
            st.services[name] = sorted((i.row(self.name) for i in self._stack.by_service.get(name, [])),
                                       key=lambda r: (r.idx, r.version))
        st.fronts = {name: front.stats().to_dict() for name, front in self._fronts.fronts.items()}
        st.storage, st.schedules = dict(self._stack.storage), dict(self._stack.schedules)
        return st

    def metrics(self) -> str:
        """The Prometheus exposition of this deployment now (see :mod:`corral.engine.metrics`)."""
        return exposition(self._stack, self._fronts.fronts, self.verdicts.counters)

    def front(self, service: str) -> Front | None:
        """The proxy in front of an exposed service."""
        return self._fronts.fronts.get(service)

    def discovery(self, service: str) -> dict[str, Any]:
        """What discovery answers for a service: its registered instances (health, address,
        named ports), its front address, and the registry generation they come from."""
        if service not in self.spec.services:
            raise UnknownService(f"unknown service {service!r}", service)
        return self._fronts.discovery(service, self.registry)

    async def wait_registry_change(self, generation: int, timeout: float) -> None:
        """Returns once the registry's generation differs from ``generation`` (or after ``timeout`` s)."""
        await self._stack.wait(lambda: self.registry.generation != generation, timeout)

    def events(self) -> list[Transition]:
        """Every transition of this run so far, oldest first (read from the event log)."""
        return self.journal.transitions()

    def event_log(self, after: int = 0, limit: int = 1000) -> list[EventRow]:
        """Entries of the event log with a sequence number above ``after``, oldest first."""
        return self.journal.events(after, limit)

    async def watch(self) -> AsyncIterator[Transition]:
        """Transitions as they happen."""
        q = self._stack.subscribe()
        try:
            while True:
                yield await q.get()
        finally:
            self._stack.unsubscribe(q)

    def _supervise(self) -> None:
        """The hooks' prerun (everything given back if one fails), then the supervisor and
        the event pump: what ``up`` and ``adopt`` do once every instance is placed."""
        stack = self._stack
        try:
            for hook in self._hooks:
                for w in hook.prerun(stack):
                    stack.warn(w)
        except BaseException:
            self._release()
            raise
        stack.supervisor = Supervisor(pid_log=self.state_dir / PID_LOG, keeper=self.keeper)
        if self._keeper_pid is not None:
            self._keeper_watch.start(self._keeper_pid)
        self._pump = asyncio.get_running_loop().create_task(self.verdicts.pump(stack.supervisor),
                                                            name="corral-events")

    # --- wiring of the collaborators ---------------------------------------------------

    def _row_of(self, iid: str) -> InstanceRow | None:
        inst = self._stack.instances.get(iid)
        return inst.row(self.name) if inst is not None else None

    def _spawn_failed(self, inst: InstanceRuntime, exit: Exit) -> None:
        self.verdicts.on_exit(inst, exit)

    def _healthy(self, inst: InstanceRuntime, reason: str) -> None:
        self.verdicts.healthy(inst, reason)

    def _identity(self, service: str) -> tuple[IssuedCert | None, Authority | None]:
        return self._mesh.certs.get(service), self._mesh.ca

    async def _stop(self, inst: InstanceRuntime, reason: str) -> None:
        await self.fleet.stop(inst, reason)

    # --- the end --------------------------------------------------------------------

    def _release(self) -> None:
        """Undoes every hook and returns every grant and port of the plan; the stack holds
        nothing on the machine any more."""
        for hook in reversed(self._hooks):
            hook.postrun(self._stack)
        if self.plan is not None:
            self.scheduler.release(self.plan)
        self.claims.forget()

    async def _roll_back(self, reason: str) -> None:
        stack = self._stack
        self.journal.status("failed", reason)
        self.journal.note(reason, old="starting", new="rolling-back")
        started = [s for s, insts in stack.by_service.items()
                   if any(i.state is not State.PLACED and i.state is not State.PENDING for i in insts)]
        assert self.plan is not None
        order = self.rollback.to_stop(started, self.plan.phases, reason)
        stack.down = True
        for hook in self._hooks:
            hook.stopping(stack)
        for name in order:
            await asyncio.gather(*(self._stop(i, f"rollback: {reason}") for i in stack.by_service[name]))
        for inst in stack.instances.values():
            if inst.state in (State.PLACED, State.PENDING):
                inst.life.to(State.STOPPED, "rollback")
        self._release()
        self.journal.status("failed", reason, event=("rolling-back", reason))
        self._close()

    def _clean_stale(self) -> None:
        """Refuses to start over a live agent; kills what a dead agent left behind, whatever
        name its deployment had (one state directory has one agent)."""
        agent = live_agent(self.state_db)
        if agent is not None and agent.agent_pid != os.getpid():
            raise AgentAlreadyRunning(f"deployment {agent.name!r} is already running in {self.state_dir} (agent pid "
                                      f"{agent.agent_pid}); run 'corral down' first", agent.agent_pid)
        killed = stop_leftovers(self.state_db)
        if killed:
            self._stack.warn(f"killed {killed} process groups left by a previous agent that died")

    def _close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            self._pump = None
        # Dropping the supervisor ends its thread once the processes are gone.
        if self._stack.down:
            self._stack.supervisor = None
        self.journal.close()

