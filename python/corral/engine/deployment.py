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

from corral._core import Authority, IssuedCert, PortAllocator, Proxy, Supervisor, Topology
from corral.engine.adopt import AdoptMixin
from corral.engine.apply import ApplyMixin
from corral.engine.diff import effective, spec_hash
from corral.engine.fleet import Fleet
from corral.engine.hooks import CgroupsHook, FrontsHook, Hook, MeshHook, VolumesHook
from corral.engine.instance import STARTED, UP, InstanceRuntime, placement_text
from corral.engine.journal import Journal
from corral.engine.launch import Launcher
from corral.engine.metrics import exposition
from corral.engine.stack import Stack
from corral.engine.tracing import Tracing, endpoint_from
from corral.engine.verdicts import Verdicts
from corral.exceptions import (
    AgentAlreadyRunning,
    ConfigError,
    CorralError,
    DeploymentError,
    UnknownService,
)
from corral.leftovers import PID_LOG, live_agent, stop_leftovers, sweep_stack
from corral.lifecycle import State, Transition
from corral.machine import Holder, Machine
from corral.recovery import BackoffRestart, Exit, RestartStrategy, RollbackStrategy
from corral.scheduler import Plan, Scheduler, port_range, volume_paths
from corral.spec import DeploymentSpec, load_spec
from corral.state import DeploymentStatus, EventRow, InstanceRow, StateStore, default_state_dir
from corral.statedir import stack_id

__all__ = ["Deployment", "DeploymentStatus", "InstanceStatus"]

InstanceStatus = InstanceRow
"""The status of one instance (``id``, ``state``, ``healthy``, ``pid``, ``ports``, ``cpus``, ``restarts``...)."""


class Deployment(ApplyMixin, AdoptMixin):
    """One deployment of a spec on this machine; see the module docs.

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
        self.spec = spec
        self.file = Path(file)
        self.state_dir = Path(state_dir) if state_dir else default_state_dir(self.file)
        self.host = host
        self.keeper = Path(keeper) if keeper is not None else None
        """The log keeper's socket (``up -d``): instances' output goes there, not through us."""
        self.topology = topology or Topology.detect()
        self.machine = machine or Machine()
        """The machine's settings and ledger, shared with every other stack."""
        base = self.file.resolve().parent
        self._volumes = volume_paths(spec, base)
        # A volume's capacity is its filesystem's free space, measured by the core (at the
        # nearest existing ancestor: the directory is created at up).
        self.resources = self.machine.resources(self.topology, {str(p): str(p) for p in self._volumes.values()})
        lo, hi = port_range(spec, self.machine)
        self.ports = PortAllocator(lo, hi, check_bind=host)
        self.journal = Journal(self.state_dir, spec.name, self.file,
                               self._row_of,
                               max_rows=spec.events.max_rows, max_age=spec.events.max_age)
        holder = Holder.of(stack_id(self.state_dir), spec.name, base, self.state_dir,
                           keeper_pid=os.getppid() if self.keeper is not None else None)
        self.claims = self.machine.claims(holder, self.resources, self.ports, on_reclaim=self.journal.note)
        """What this stack holds in the machine ledger."""
        self.scheduler = scheduler(self.topology, self.resources, self.ports, spec.scheduler, host,
                                   claims=self.claims)
        self.rollback = rollback or RollbackStrategy()
        self.plan: Plan | None = None
        self._stack = Stack(spec, self.file.resolve().parent, self.state_dir, host, self.resources, self.journal)
        self._stack.tracing = Tracing(endpoint_from(spec.tracing.otlp if spec.tracing else None), spec.name)
        self._mesh = MeshHook()
        self._fronts = FrontsHook({}, self._mesh)
        self._cgroups = CgroupsHook(Path(cgroup_root or os.environ.get("CORRAL_CGROUP_ROOT", "/sys/fs/cgroup")))
        self._vols = VolumesHook(self._volumes)
        self._hooks: list[Hook] = [self._vols, self._cgroups, self._mesh, self._fronts]
        self.launcher = Launcher(self._stack, on_spawn_error=self._spawn_failed, on_healthy=self._healthy,
                                 mesh=self._identity, log_max=spec.logs.max_size, log_keep=spec.logs.keep)
        self.verdicts = Verdicts(self._stack, self.launcher,
                                 restart_strategy or BackoffRestart({n: s.restart for n, s in spec.services.items()}))
        self.fleet = Fleet(self._stack, self.launcher, self.verdicts, self.scheduler, self._cgroups, self._fronts,
                           self._volumes)
        self._pump: asyncio.Task[None] | None = None
        self._ran = False
        self._changing = asyncio.Lock()
        """One change at a time: apply, scale, restart, stop, start."""
        self._configs: dict[str, dict[str, Any]] = {}
        """Each service's effective configuration as its instances run it (env_file contents then)."""
        self._versions: dict[str, int] = {}
        """The spec version whose configuration of each service its instances run."""
        self._first_version = 1

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
        if self.plan is None:
            with self.claims.reserving(dry=dry):
                if not dry:
                    self.claims.reset()
                self.plan = self.scheduler.plan(self.spec, self._volumes)
        return self.plan

    async def up(self) -> None:
        """Starts every service in dependency order and returns when each meets its condition
        (healthy, or completed for one-shot jobs). On failure, rolls back and raises
        :class:`~corral.exceptions.DeploymentError`. A deployment comes up once: after
        ``down``, make a new one."""
        if self._ran:
            raise CorralError(f"deployment {self.name!r} was already brought up; create a new Deployment")
        if self._adoptable():
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
                await self._up(plan)
        finally:
            if self._stack.down:  # rolled back: nothing more to trace
                self.tracing.close()

    async def _up(self, plan: Plan) -> None:
        stack, journal = self._stack, self.journal
        self.fleet.plan = plan
        journal.begin(plan.phases)
        self._first_version = version = journal.next_version()
        journal.spec(version, spec_hash(self.spec), self.spec.text, "applied", f"up {self.file.name}")
        base = self.file.resolve().parent
        self._configs = {n: effective(s, base) for n, s in self.spec.services.items()}
        self._versions = dict.fromkeys(self.spec.services, version)
        journal.status("starting", event=(None, f"up {self.file.name}: {sum(1 for _ in plan.instances())} "
                                                f"instances in {len(plan.phases)} phases"))
        for p in plan.instances():
            inst = InstanceRuntime(p, self.spec.services[p.service], self.state_dir / "logs" / f"{p.id}.log",
                                   stack.on_transition, version)
            stack.add(inst)
            inst.life.to(State.PLACED, placement_text(p))
        self._fronts.ports = dict(plan.fronts)
        self._supervise()
        self.tracing.phases(plan.phases)
        tasks = {name: asyncio.create_task(self._bring_up(name), name=f"up-{name}") for name in self.spec.services}
        try:
            done, pending = await asyncio.wait(tasks.values(), return_when=asyncio.FIRST_EXCEPTION)
            failed = next((t for t in done if t.exception() is not None), None)
            if failed is not None:
                for t in pending:
                    t.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                exc = failed.exception()
                assert exc is not None
                raise exc
        except BaseException as e:
            for t in tasks.values():
                t.cancel()
            reason = ("up was interrupted" if isinstance(e, asyncio.CancelledError) else
                      str(e) if isinstance(e, CorralError) else f"{type(e).__name__}: {e}")
            await self._roll_back(reason)
            if isinstance(e, DeploymentError | asyncio.CancelledError):
                raise
            raise DeploymentError(reason) from e
        journal.status("up", "", event=("starting", "every service meets its condition"))
        journal.flush()

    async def down(self) -> None:
        """Stops every service in reverse dependency order, each by its shutdown rule, and
        releases every grant and port. Safe to call twice."""
        stack = self._stack
        if stack.down or self.plan is None:
            self.tracing.close()
            self._close()
            return
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
        """Restarts the replicas of ``service`` one after the other, each waited for until it
        meets its condition again (a rolling restart). A replica that does not come back
        (failed, or not up within its ``start_timeout``) stops the rollout: raises
        :class:`~corral.exceptions.DeploymentError` naming it and why; the replicas after it
        are not touched."""
        async with self._changing:
            with self.tracing.operation("restart", service=service):
                replicas = list(self._service(service))
                for done, inst in enumerate(replicas):
                    await self._stop(inst, "restart requested")
                    inst.restarts += 1
                    self.fleet.start([inst], "restart requested")
                    failed = await self.fleet.first_not_up([inst], inst.svc.start_timeout)
                    if failed is not None:
                        # The rest keep running the old way: a rollout that fails stops where it failed.
                        self.journal.flush()
                        raise DeploymentError(f"restart of {service} stopped at {inst.id}: it is {inst.state.value} "
                                              f"({failed[1]}); {done} of {len(replicas)} replicas restarted, the "
                                              f"others left as they were")
                self.journal.flush()

    # --- one service at a time -------------------------------------------------------

    def _service(self, name: str) -> list[InstanceRuntime]:
        if name not in self.spec.services:
            raise UnknownService(f"unknown service {name!r} (services: {', '.join(self.spec.services)})", name)
        if self.plan is None or self._stack.down:
            raise CorralError(f"deployment {self.name!r} is not running")
        return self._stack.by_service[name]

    async def scale(self, service: str, replicas: int) -> None:
        """Runs ``replicas`` instances of ``service``. New ones are placed through the ledgers
        (all or none: :class:`~corral.exceptions.ConfigError` naming what is short, and
        nothing changes), started, probed, registered and put behind the front; the call
        returns once they meet their condition (:class:`DeploymentError`, with the new ones
        stopped again, when they do not). Scaling down drains and stops the highest-numbered
        instances first, and returns their resources and ports. The count holds until the
        next apply, where the spec's wins."""
        async with self._changing:
            with self.tracing.operation("scale", service=service, replicas=replicas):
                insts = self._service(service)
                if not 0 <= replicas <= 10000:
                    raise ConfigError(f"replicas: {replicas} is not from 0 to 10000")
                svc = self.spec.services[service]
                have = len(insts)
                if replicas > have:
                    if replicas > 1 and any(p != "auto" for p in svc.ports.values()):
                        raise ConfigError(f"{service} has a fixed port: it cannot run {replicas} replicas")
                    taken = {i.p.index for i in insts}
                    free = [i for i in range(replicas + have) if i not in taken][:replicas - have]
                    try:
                        new = self.fleet.place(service, svc, self._slots(service, free), self._versions[service])
                    except ConfigError as e:
                        raise ConfigError(f"cannot scale {service} to {replicas}: {e}") from None
                    self.journal.note(f"scale {service}: {have} -> {replicas}")
                    self.fleet.start(new, f"scaled to {replicas}")
                    failed = await self.fleet.first_not_up(new, svc.start_timeout)
                    if failed is not None:
                        bad, why = failed
                        await self.fleet.retire(new, f"scale-up failed: {why}")
                        raise DeploymentError(f"scale {service} to {replicas}: {bad.id} is {bad.state.value} ({why}); "
                                              f"the new instances were stopped again")
                elif replicas < have:
                    self.journal.note(f"scale {service}: {have} -> {replicas}")
                    await self.fleet.shrink(service, replicas, f"scaled to {replicas}")
                self.journal.flush()

    async def stop_service(self, service: str) -> list[str]:
        """Stops every instance of ``service`` by its shutdown rule; it stays in the stack,
        ``stopped``, keeping its placement, until :meth:`start_service`. Dependents keep
        running: their names come back (as compose warns about them)."""
        async with self._changing:
            insts = self._service(service)
            await asyncio.gather(*(self._stop(i, "stopped by request") for i in insts))
            dependents = [n for n, s in self.spec.services.items() if service in s.depends_on]
            if dependents:
                self._stack.warn(f"{service} stopped; {', '.join(dependents)} depend on it and keep running")
            self.journal.flush()
            return dependents

    async def start_service(self, service: str) -> None:
        """Starts the stopped (or failed, or completed) instances of ``service`` and returns
        once they meet their condition (:class:`DeploymentError` naming the first that
        does not)."""
        async with self._changing:
            insts = self._service(service)
            todo = [i for i in insts if i.state.terminal]
            self.fleet.start(todo, "started by request")
            failed = await self.fleet.first_not_up(todo, self.spec.services[service].start_timeout)
            self.journal.flush()
            if failed is not None:
                bad, why = failed
                raise DeploymentError(f"start {service}: {bad.id} is {bad.state.value} ({why})")

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
        return st

    def metrics(self) -> str:
        """The Prometheus exposition of this deployment now (see :mod:`corral.engine.metrics`)."""
        return exposition(self._stack, self._fronts.fronts, self.verdicts.counters)

    def front(self, service: str) -> Proxy | None:
        """The proxy in front of an exposed service."""
        return self._fronts.fronts.get(service)

    def discovery(self, service: str) -> dict[str, Any]:
        """What discovery answers for a service: its registered instances (health, address,
        named ports), its front address, and the registry generation they come from."""
        if service not in self.spec.services:
            raise UnknownService(f"unknown service {service!r}", service)
        front = self._fronts.fronts.get(service)
        instances = []
        for i in self.registry.instances(service):
            ports = {k.removeprefix("port."): int(v) for k, v in i.meta.items() if k.startswith("port.")}
            instances.append({"id": i.id, "host": i.host, "port": i.port, "address": i.address,
                              "healthy": i.healthy, "ports": ports})
        return {"name": service, "front": front.address if front is not None else None,
                "instances": sorted(instances, key=lambda x: str(x["id"])),
                "generation": self.registry.generation}

    async def wait_registry_change(self, generation: int, timeout: float) -> None:
        """Returns once the registry's generation differs from ``generation`` (or after
        ``timeout`` seconds)."""
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
        self._pump = asyncio.get_running_loop().create_task(self.verdicts.pump(stack.supervisor),
                                                            name="corral-events")

    # --- bring-up -------------------------------------------------------------------

    async def _bring_up(self, name: str) -> None:
        svc = self.spec.services[name]
        t0 = asyncio.get_running_loop().time()
        for dep, want in svc.depends_on.items():
            # A dependency's own deadline fires first and names the real culprit; the
            # dependent's wait only bounds conditions that may never come ("completed").
            left = self._deadline(dep) + svc.start_timeout - (asyncio.get_running_loop().time() - t0)
            await self._wait_condition(dep, want.condition, waiter=name, timeout=left)
        with self.tracing.phase_of(name):
            self.launcher.start(self._stack.by_service[name], "dependencies met" if svc.depends_on else "phase 0")
            await self._wait_condition(name, "up", waiter=None, timeout=svc.start_timeout)

    def _deadline(self, name: str) -> float:
        """Seconds after ``up`` began by which ``name`` must be up: its start timeout after
        the latest deadline of its dependencies."""
        svc = self.spec.services[name]
        return svc.start_timeout + max((self._deadline(d) for d in svc.depends_on), default=0.0)

    async def _wait_condition(self, name: str, cond: str, waiter: str | None, timeout: float) -> None:
        insts = self._stack.by_service[name]
        want = {"started": STARTED, "healthy": UP, "completed": frozenset({State.COMPLETED}), "up": UP}[cond]
        who = f"{waiter} needs {name} {cond}, but " if waiter else ""

        def met() -> bool:
            bad = next((i for i in insts if i.state is State.FAILED
                        or (cond == "completed" and i.state is State.COMPLETED and i.exit_code != 0)), None)
            if bad is not None:
                raise DeploymentError(f"{who}{bad.id} failed: {bad.reason}")
            return all(i.state in want for i in insts)

        if not await self._stack.wait(met, timeout):
            states = ", ".join(f"{i.id} {i.state.value}" + (f" ({i.reason or i.probe_message})"
                                                             if i.reason or i.probe_message else "") for i in insts)
            what = f"{name} not up within {timeout:g}s" if waiter is None else f"{who}it did not get there in time"
            raise DeploymentError(f"{what}: {states}")

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

    def _adoptable(self) -> bool:
        """Whether a dead agent of this deployment left instances that still run, from the
        same spec as this one (``up -d`` again after the keeper gave up, say): those are
        re-adopted, not restarted. Another spec starts afresh (what is left is stopped)."""
        db = self.state_db
        if not db.exists():
            return False
        try:
            rows = [r for r in StateStore.read_deployments(db) if r.name == self.name]
            if not rows or rows[-1].status in ("down", "failed") or live_agent(db) is not None:
                return False
            running = StateStore.running_spec(db, rows[-1])
            if running is None or running.digest != spec_hash(self.spec):
                return False
            return any(r.is_running() for r in StateStore.read_instances(db, self.name))
        except CorralError:
            return False

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
