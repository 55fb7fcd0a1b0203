"""The engine: brings a deployment up, keeps it running, and takes it down.

Policy lives here; mechanisms are native. The native :class:`~corral._core.Supervisor`
spawns processes (own process group, CPU affinity and cgroup set before exec, rotated logs)
and runs their probes; exits and probe verdicts arrive on one queue that a single asyncio
task drains, so a quiet deployment costs the interpreter nothing. Each instance has a
:class:`~corral.lifecycle.Lifecycle`; restarts and rollbacks are decided by the strategies
in :mod:`corral.recovery`; state goes to SQLite (:mod:`corral.state`).

::

    async with corral.Deployment.from_file("corral.yaml") as d:
        await d.up()
        print(d.status())
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal as signals
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from corral._core import (
    Authority,
    Cgroups,
    Instance,
    IssuedCert,
    PortAllocator,
    ProbeSpec,
    ProcessEvent,
    ProcessSpec,
    Proxy,
    ResourceManager,
    RetryPolicy,
    ServiceRegistry,
    Supervisor,
    Topology,
    group_alive,
    process_start_time,
    signal_group,
)
from corral.exceptions import AgentError, CorralError, DeploymentError
from corral.lifecycle import Lifecycle, State, Transition
from corral.recovery import BackoffRestart, Decision, Exit, RestartStrategy, RollbackStrategy
from corral.scheduler import Placement, Plan, Scheduler, volume_paths
from corral.spec import DeploymentSpec, Probe, ServiceSpec, load_spec, read_env_file, substitute_ports
from corral.state import DeploymentRow, InstanceRow, StateStore, default_state_dir

__all__ = ["Deployment", "DeploymentStatus", "InstanceStatus", "default_state_dir"]

log = logging.getLogger("corral")

InstanceStatus = InstanceRow
"""The status of one instance (``id``, ``state``, ``healthy``, ``pid``, ``ports``, ``cpus``, ``restarts``...)."""

# Spawning threads: a spawn spends most of its time suspended while the child execs (vfork),
# so more threads than this machine's 2 CPUs still help (200 spawns: 0.18 s on 1, ~0.14 s on 4).
_SPAWN_THREADS = 4
_PERMANENT = (FileNotFoundError, PermissionError, NotADirectoryError)
_STARTED = frozenset({State.RUNNING, State.HEALTHY, State.UNHEALTHY, State.COMPLETED})
_UP = frozenset({State.HEALTHY, State.COMPLETED})


@dataclass
class DeploymentStatus:
    """A deployment and its instances, by service."""

    name: str
    status: str
    message: str
    agent_pid: int | None
    services: dict[str, list[InstanceStatus]] = field(default_factory=dict)
    fronts: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per exposed service: its proxy's address and counters (see ``Proxy.stats``)."""

    def to_dict(self) -> dict[str, Any]:
        """The ``corral status --json`` document."""
        return {
            "name": self.name, "status": self.status, "message": self.message, "agent_pid": self.agent_pid,
            "services": {s: [i.to_dict() for i in insts] for s, insts in self.services.items()},
            "fronts": self.fronts,
        }


class _Instance:
    """Runtime of one instance: its placement, state machine and process."""

    def __init__(self, p: Placement, svc: ServiceSpec, listener: Callable[[Transition], None]) -> None:
        self.p = p
        self.svc = svc
        self.life = Lifecycle(p.id, p.service, listener)
        self.pid: int | None = None
        self.pid_start: int | None = None
        self.started_at = 0.0
        self.healthy_since: float | None = None
        self.restarts = 0
        self.exit_code: int | None = None
        self.reason = ""
        self.kill_cause: str | None = None
        self.kill_detail = ""
        self.exited = asyncio.Event()
        self.exited.set()
        self.timer: asyncio.TimerHandle | None = None
        self.cgroup: Path | None = None
        self.log: Path | None = None
        self.affinity: list[int] = list(p.cpus)

    @property
    def id(self) -> str:
        return self.p.id

    @property
    def state(self) -> State:
        return self.life.state

    @property
    def main_port(self) -> int | None:
        """Its first declared port: the one fronts, discovery and dependents' addresses use."""
        return next(iter(self.p.ports.values()), None)

    def row(self, deployment: str) -> InstanceRow:
        return InstanceRow(
            id=self.id, deployment=deployment, service=self.p.service, idx=self.p.index, state=self.state.value,
            healthy=self.state is State.HEALTHY, pid=self.pid, pid_start=self.pid_start, ports=dict(self.p.ports),
            cpus=list(self.affinity), exclusive=bool(self.p.cpus), numa_node=self.p.numa_node,
            millicores=self.p.millicores,
            memory_mb=self.p.memory_mb, restarts=self.restarts, exit_code=self.exit_code, reason=self.reason,
            since=self.life.since, log=str(self.log) if self.log else None)


class Deployment:
    """One deployment of a spec on this machine; see the module docs.

    ``restart_strategy`` and ``rollback`` take subclasses of the strategies in
    :mod:`corral.recovery`; ``scheduler`` a :class:`~corral.scheduler.Scheduler` subclass.
    ``cgroup_root`` points memory limits at another cgroup mount (a test tree, say).
    """

    def __init__(self, spec: DeploymentSpec, *, file: str | Path = "corral.yaml", state_dir: str | Path | None = None,
                 restart_strategy: RestartStrategy | None = None, rollback: RollbackStrategy | None = None,
                 scheduler: type[Scheduler] = Scheduler, topology: Topology | None = None,
                 cgroup_root: str | Path | None = None, host: str = "127.0.0.1") -> None:
        self.spec = spec
        self.file = Path(file)
        self.base = self.file.resolve().parent
        self.state_dir = Path(state_dir) if state_dir else default_state_dir(self.file)
        self.host = host
        self.topology = topology or Topology.detect()
        volumes = volume_paths(spec, self.base)
        self._volumes = volumes
        self.resources = ResourceManager(self.topology,
                                         volumes={str(p): (str(p), _free_mb(p)) for p in volumes.values()})
        lo, hi = spec.port_range
        self.ports = PortAllocator(lo, hi, check_bind=host)
        self.scheduler = scheduler(self.topology, self.resources, self.ports, spec.scheduler, host)
        self.registry = ServiceRegistry()
        self.restart_strategy = restart_strategy or BackoffRestart({n: s.restart for n, s in spec.services.items()})
        self.rollback = rollback or RollbackStrategy()
        self._cgroup_root = Path(cgroup_root or os.environ.get("CORRAL_CGROUP_ROOT", "/sys/fs/cgroup"))
        self._cgroups: Cgroups | None = None
        self._log_max, self._log_keep = spec.logs.max_size, spec.logs.keep
        self.plan: Plan | None = None
        self._instances: dict[str, _Instance] = {}
        self._by_service: dict[str, list[_Instance]] = {}
        self._sup: Supervisor | None = None
        self._pump: asyncio.Task[None] | None = None
        self._tick = asyncio.Event()
        self._store: StateStore | None = None
        self._row = DeploymentRow(name=spec.name, spec=str(self.file.resolve()), status="new")
        self._flush_handle: asyncio.TimerHandle | None = None
        self._subscribers: list[asyncio.Queue[Transition]] = []
        self._history: list[Transition] = []
        self._down = False
        self._shared: dict[int | None, list[int]] = {}
        self._dirty: set[str] = set()
        self._to_start: list[_Instance] = []
        self._fronts: dict[str, Proxy] = {}
        self._ca: Authority | None = None
        self._certs: dict[str, IssuedCert] = {}
        self._rotation: asyncio.Task[None] | None = None
        self.warnings: list[str] = []

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
    def state_db(self) -> Path:
        """The SQLite file."""
        return self.state_dir / "state.db"

    async def __aenter__(self) -> Deployment:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.down()

    def make_plan(self) -> Plan:
        """Places every instance without starting anything (raises SpecError when it does not fit)."""
        if self.plan is None:
            self.plan = self.scheduler.plan(self.spec, self._volumes)
        return self.plan

    async def up(self) -> None:
        """Starts every service in dependency order and returns when each meets its condition
        (healthy, or completed for one-shot jobs). On failure, rolls back and raises
        :class:`~corral.exceptions.DeploymentError`. A deployment comes up once: after
        ``down``, make a new one."""
        if self._instances or self._down:
            raise CorralError(f"deployment {self.name!r} was already brought up; create a new Deployment")
        self._open_store()
        assert self._store is not None
        self._clean_stale()
        plan = self.make_plan()
        self._row.status = "starting"
        self._row.phases = plan.phases
        self._row.agent_pid = os.getpid()
        self._row.agent_start = process_start_time(os.getpid())
        self._store.clear_instances(self.name)
        for path in self._volumes.values():
            path.mkdir(parents=True, exist_ok=True)
        self._store.put_deployment(self._row)
        self._event(None, None, None, "starting", f"up {self.file.name}: {sum(1 for _ in plan.instances())} instances "
                    f"in {len(plan.phases)} phases")
        for p in plan.instances():
            inst = _Instance(p, self.spec.services[p.service], self._on_transition)
            inst.log = self.state_dir / "logs" / f"{p.id}.log"
            self._instances[p.id] = inst
            self._by_service.setdefault(p.service, []).append(inst)
            inst.life.to(State.PLACED, _placement_text(p))
        for name in self.spec.services:
            self._by_service.setdefault(name, [])
        self._setup_cgroups()
        self._setup_mesh()
        for name, port in plan.fronts.items():
            svc = self.spec.services[name]
            tls: dict[str, Any] = {}
            if svc.mtls:
                assert self._ca is not None
                cert = self._certs[name]
                tls = {"ca_pem": self._ca.ca_pem, "cert_pem": cert.cert_pem, "key_pem": cert.key_pem,
                       "allow": [self._ca.spiffe_id(s) for s in svc.allow]}
            try:
                self._fronts[name] = Proxy(self.host, port, strategy=svc.balance, **tls)
            except OSError as e:
                self._release()
                raise self.spec.error(("services", name, "expose"), f"cannot listen on {self.host}:{port}: "
                                      f"{e.strerror or e}") from None
        self._sup = Supervisor()
        self._pump = asyncio.get_running_loop().create_task(self._pump_events(), name="corral-events")
        if self._ca is not None:
            self._rotation = asyncio.get_running_loop().create_task(self._rotate_certs(), name="corral-certs")
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
            reason = str(e) if isinstance(e, CorralError) else f"{type(e).__name__}: {e}"
            await self._roll_back(reason)
            if isinstance(e, DeploymentError | asyncio.CancelledError):
                raise
            raise DeploymentError(reason) from e
        self._row.status = "up"
        self._row.message = ""
        self._store.put_deployment(self._row)
        self._event(None, None, "starting", "up", "every service meets its condition")
        self._flush()

    async def down(self) -> None:
        """Stops every service in reverse dependency order, each by its shutdown rule, and
        releases every grant and port. Safe to call twice."""
        if self._down or self.plan is None:
            self._close()
            return
        self._down = True
        if self._store is not None:
            self._row.status = "stopping"
            self._store.put_deployment(self._row)
            self._event(None, None, None, "stopping", "down")
        for front in self._fronts.values():
            front.close()
        for phase in reversed(self.plan.phases):
            await asyncio.gather(*(self._stop(i, "down") for s in phase for i in self._by_service.get(s, [])))
        self._release()
        if self._store is not None:
            self._row.status = "down"
            self._store.put_deployment(self._row)
            self._event(None, None, "stopping", "down", "every process stopped")
        self._close()

    async def restart(self, service: str) -> None:
        """Restarts the replicas of ``service`` one after the other, each waited for until it
        meets its condition again (a rolling restart)."""
        if service not in self.spec.services:
            raise CorralError(f"unknown service {service!r}")
        for inst in self._by_service[service]:
            self.restart_strategy.forget(inst.id)
            await self._stop(inst, "restart requested")
            inst.restarts += 1
            self._start(inst, "restart requested")
            await self._wait(partial(_settled, inst), inst.svc.start_timeout)
        self._flush()

    def status(self) -> DeploymentStatus:
        """The deployment now."""
        st = DeploymentStatus(self.name, self._row.status, self._row.message, self._row.agent_pid)
        for name in self.spec.services:
            st.services[name] = [i.row(self.name) for i in self._by_service.get(name, [])]
        st.fronts = {name: front.stats() for name, front in self._fronts.items()}
        return st

    def front(self, service: str) -> Proxy | None:
        """The proxy in front of an exposed service."""
        return self._fronts.get(service)

    def discovery(self, service: str) -> dict[str, Any]:
        """What discovery answers for a service: its registered instances (health, address,
        named ports), its front address, and the registry generation they come from."""
        front = self._fronts.get(service)
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
        await self._wait(lambda: self.registry.generation != generation, timeout)

    def events(self) -> list[Transition]:
        """Every transition so far, oldest first."""
        return list(self._history)

    async def watch(self) -> AsyncIterator[Transition]:
        """Transitions as they happen."""
        q: asyncio.Queue[Transition] = asyncio.Queue()
        self._subscribers.append(q)
        try:
            while True:
                yield await q.get()
        finally:
            self._subscribers.remove(q)

    # --- bring-up -------------------------------------------------------------------

    async def _bring_up(self, name: str) -> None:
        svc = self.spec.services[name]
        t0 = asyncio.get_running_loop().time()
        for dep, cond in svc.depends_on.items():
            # A dependency's own deadline fires first and names the real culprit; the
            # dependent's wait only bounds conditions that may never come ("completed").
            left = self._deadline(dep) + svc.start_timeout - (asyncio.get_running_loop().time() - t0)
            await self._wait_condition(dep, cond, waiter=name, timeout=left)
        self._start_many(self._by_service[name], "dependencies met" if svc.depends_on else "phase 0")
        await self._wait_condition(name, "up", waiter=None, timeout=svc.start_timeout)

    def _deadline(self, name: str) -> float:
        """Seconds after ``up`` began by which ``name`` must be up: its start timeout after
        the latest deadline of its dependencies."""
        svc = self.spec.services[name]
        return svc.start_timeout + max((self._deadline(d) for d in svc.depends_on), default=0.0)

    async def _wait_condition(self, name: str, cond: str, waiter: str | None, timeout: float) -> None:
        insts = self._by_service[name]
        want = {"started": _STARTED, "healthy": _UP, "completed": frozenset({State.COMPLETED}), "up": _UP}[cond]
        who = f"{waiter} needs {name} {cond}, but " if waiter else ""

        def met() -> bool:
            bad = next((i for i in insts if i.state is State.FAILED
                        or (cond == "completed" and i.state is State.COMPLETED and i.exit_code != 0)), None)
            if bad is not None:
                raise DeploymentError(f"{who}{bad.id} failed: {bad.reason}")
            return all(i.state in want for i in insts)

        if not await self._wait(met, timeout):
            states = ", ".join(f"{i.id} {i.state.value}" + (f" ({i.reason})" if i.reason else "") for i in insts)
            what = f"{name} not up within {timeout:g}s" if waiter is None else f"{who}it did not get there in time"
            raise DeploymentError(f"{what}: {states}")

    async def _wait(self, pred: Callable[[], bool], timeout: float) -> bool:
        deadline = asyncio.get_running_loop().time() + timeout
        while not pred():
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._tick.wait(), left)
        return True

    # --- one instance ---------------------------------------------------------------

    def _start(self, inst: _Instance, reason: str) -> None:
        self._start_many([inst], reason)

    def _start_many(self, insts: list[_Instance], reason: str) -> None:
        """Queues instances to start; everything queued in one turn of the event loop starts
        together (services of a phase become ready in the same turn), so their spawns share
        the native threads of one ``spawn_many``."""
        for inst in insts:
            inst.timer = None
            inst.reason = ""
            inst.life.to(State.STARTING, reason)
        self._to_start.extend(insts)
        if len(self._to_start) == len(insts):
            asyncio.get_running_loop().call_soon(self._spawn_queued)

    def _spawn_queued(self) -> None:
        assert self._sup is not None
        insts, self._to_start = self._to_start, []
        insts = [i for i in insts if i.state is State.STARTING]
        batch: list[tuple[_Instance, list[tuple[str, str]], ProcessSpec]] = []
        for inst in insts:
            inst.kill_cause, inst.kill_detail, inst.exit_code = None, "", None
            env = self._environment(inst)
            svc = inst.svc
            argv = [substitute_ports(a, inst.p.ports) for a in svc.argv()]
            cwd = (self.base / svc.working_dir) if svc.working_dir else self.base
            inst.affinity = inst.p.cpus or self._shared_cpus(inst.p.numa_node)
            spec = ProcessSpec(argv, env=env, cwd=cwd, cpus=inst.affinity, cgroup=inst.cgroup, log=inst.log,
                               log_max_bytes=self._log_max, log_keep=self._log_keep)
            batch.append((inst, env, spec))
        if not batch:
            return
        results = self._sup.spawn_many([(i.id, spec) for i, _, spec in batch], threads=_SPAWN_THREADS)
        for (inst, env, spec), res in zip(batch, results, strict=True):
            if isinstance(res, OSError) and inst.cgroup is not None:
                res = self._spawn_without_cgroup(inst, spec, res)
            if isinstance(res, OSError) and not isinstance(res, _PERMANENT):
                res = self._spawn_again(inst, spec)
            if isinstance(res, OSError):
                self._on_exit(inst, Exit(inst.id, inst.p.service, None, None, "spawn", 0.0, 0.0, str(res)))
            else:
                self._running(inst, res, env)

    def _running(self, inst: _Instance, spawned: tuple[int, int], env: list[tuple[str, str]]) -> None:
        assert self._sup is not None
        pid, start = spawned
        inst.pid, inst.pid_start = pid, start
        inst.started_at = time.monotonic()
        inst.healthy_since = None
        inst.exited = asyncio.Event()
        inst.life.to(State.RUNNING, f"pid {pid}" + (f", cpus {_cpulist(inst.affinity)}" if inst.p.cpus else ""))
        probes = self._probes(inst, env)
        if probes["startup"] is None and probes["readiness"] is None:
            self._healthy(inst, "running, no readiness probe")
        if any(probes.values()):
            self._sup.start_health(inst.id, **probes)

    def _spawn_without_cgroup(self, inst: _Instance, spec: ProcessSpec,
                              error: OSError) -> tuple[int, int] | OSError:
        """A spawn with a cgroup failed: if it works without, the cgroup was the problem (a
        container may let us create cgroups but not move processes into them), so the
        instance runs without its memory limit, with a warning, rather than not at all."""
        assert self._sup is not None
        bare = ProcessSpec(spec.argv, env=spec.env, cwd=spec.cwd, cpus=spec.cpus, log=inst.log,
                           log_max_bytes=self._log_max, log_keep=self._log_keep)
        (res,) = self._sup.spawn_many([(inst.id, bare)], threads=1)
        if isinstance(res, OSError):
            return error
        self._warn(f"memory limit of {inst.id} not enforced: cannot join {inst.cgroup}: {error}")
        inst.cgroup = None
        return res

    def _spawn_again(self, inst: _Instance, spec: ProcessSpec) -> tuple[int, int] | OSError:
        """Retries a spawn that failed for a transient reason (EAGAIN, ENOMEM) on the retry
        policy's schedule; a missing program or directory is not retried."""
        assert self._sup is not None
        last: OSError = OSError("spawn failed")
        for delay in RetryPolicy.exponential(0.05, max_attempts=3).delays():
            time.sleep(delay)
            (res,) = self._sup.spawn_many([(inst.id, spec)], threads=1)
            if not isinstance(res, OSError):
                return res
            last = res
            if isinstance(res, _PERMANENT):
                break
        return last

    def _environment(self, inst: _Instance) -> list[tuple[str, str]]:
        svc, ports = inst.svc, inst.p.ports
        env: dict[str, str] = {}
        if svc.env_file:
            env.update(read_env_file(self.base / svc.env_file))
        env.update({k: substitute_ports(v, ports) for k, v in svc.env.items()})
        if len(ports) == 1:
            env["PORT"] = str(next(iter(ports.values())))
        for name, port in ports.items():
            env[f"CORRAL_PORT_{_env_name(name)}"] = str(port)
        env["CORRAL_SERVICE"] = inst.p.service
        env["CORRAL_INSTANCE"] = inst.id
        env["CORRAL_REPLICA"] = str(inst.p.index)
        env["CORRAL_DEPLOYMENT"] = self.name
        env["CORRAL_AGENT_SOCKET"] = str(self.state_dir / "agent.sock")
        if inst.p.volume:
            env["CORRAL_VOLUME"] = inst.p.volume
        cert = self._certs.get(inst.p.service)
        if cert is not None and self._ca is not None:
            env["CORRAL_TLS_CERT"] = str(cert.cert_path)
            env["CORRAL_TLS_KEY"] = str(cert.key_path)
            env["CORRAL_TLS_CA"] = str(self._ca.ca_path)
            env["CORRAL_SPIFFE_ID"] = cert.spiffe_id
        for dep in svc.depends_on:
            addrs = [f"{self.host}:{d.main_port}" for d in self._by_service.get(dep, [])
                     if d.state is State.HEALTHY and d.main_port is not None]
            if addrs:
                env[f"CORRAL_{_env_name(dep)}_ADDR"] = addrs[0]
                env[f"CORRAL_{_env_name(dep)}_ADDRS"] = ",".join(addrs)
        return list(env.items())

    def _probes(self, inst: _Instance, env: list[tuple[str, str]]) -> dict[str, ProbeSpec | None]:
        out: dict[str, ProbeSpec | None] = {}
        for kind in ("startup", "readiness", "liveness"):
            p: Probe | None = getattr(inst.svc.health, kind)
            out[kind] = None if p is None else _probe_spec(p, inst.p.ports, env, self.host)
        return out

    def _healthy(self, inst: _Instance, reason: str) -> None:
        if inst.state is State.HEALTHY:
            return
        inst.life.to(State.HEALTHY, reason)
        inst.healthy_since = time.monotonic()
        port = inst.main_port or 0
        meta = {f"port.{k}": str(v) for k, v in inst.p.ports.items()}
        if not self.registry.set_health(inst.id, True):
            self.registry.register(Instance(service=inst.p.service, id=inst.id, host=self.host, port=port, meta=meta))

    def _unhealthy(self, inst: _Instance, reason: str) -> None:
        if inst.state in (State.RUNNING, State.HEALTHY):
            inst.life.to(State.UNHEALTHY, reason)
            inst.healthy_since = None
            self.registry.set_health(inst.id, False)

    def _terminate(self, inst: _Instance, cause: str, detail: str) -> None:
        """Ends a live process because a probe failed; its exit then goes to the strategy."""
        if inst.pid is None or inst.exited.is_set() or inst.kill_cause is not None:
            return
        inst.kill_cause, inst.kill_detail = cause, detail
        self._signal(inst)

    def _signal(self, inst: _Instance) -> None:
        assert inst.pid is not None
        sig = getattr(signals, inst.svc.shutdown.signal)
        signal_group(inst.pid, sig)
        pid = inst.pid
        loop = asyncio.get_running_loop()
        loop.call_later(inst.svc.shutdown.timeout, self._kill_if_alive, inst, pid)

    def _kill_if_alive(self, inst: _Instance, pid: int) -> None:
        if inst.pid == pid and not inst.exited.is_set():
            signal_group(pid, signals.SIGKILL)

    async def _stop(self, inst: _Instance, reason: str) -> None:
        if inst.timer is not None:
            inst.timer.cancel()
            inst.timer = None
        self.restart_strategy.forget(inst.id)
        if inst.state is State.STARTING and inst in self._to_start:
            # Queued, not spawned yet: it never runs.
            self._to_start.remove(inst)
            inst.life.to(State.STOPPING, reason)
            inst.life.to(State.STOPPED, "stopped before it was spawned")
        elif inst.state.alive and inst.pid is not None and not inst.exited.is_set():
            if inst.state is not State.STOPPING:
                inst.life.to(State.STOPPING, reason)  # out of its front from here on
                if inst.p.service in self._fronts and inst.svc.shutdown.drain > 0 and not self._down:
                    await asyncio.sleep(inst.svc.shutdown.drain)
                if not inst.exited.is_set():
                    self._signal(inst)
            await inst.exited.wait()
        elif inst.state in (State.RESTARTING, State.PENDING, State.PLACED, State.COMPLETED, State.FAILED):
            inst.life.to(State.STOPPED, reason)
        self.registry.deregister(inst.id)

    # --- events ---------------------------------------------------------------------

    async def _pump_events(self) -> None:
        assert self._sup is not None
        while True:
            ev = await self._sup.next_event()
            if ev is None:
                return
            for e in (ev, *self._sup.drain()):
                try:
                    self._handle(e)
                except Exception:
                    log.exception("corral: error handling %r", e)

    def _handle(self, ev: ProcessEvent) -> None:
        inst = self._instances.get(ev.id)
        if inst is None:
            return
        if ev.kind == "exited":
            if ev.pid != inst.pid:
                return
            assert self._sup is not None
            self._sup.stop_health(inst.id)
            inst.exited.set()
            inst.exit_code = ev.code if ev.code is not None else (-ev.signal if ev.signal else None)
            # Nothing of the instance may outlive its leader: its helpers would hold ports.
            if inst.pid is not None and group_alive(inst.pid):
                signal_group(inst.pid, signals.SIGKILL)
            if inst.state is State.STOPPING:
                inst.reason = "stopped"
                inst.life.to(State.STOPPED, _exit_text(ev))
                self.registry.deregister(inst.id)
                return
            cause = inst.kill_cause or "exit"
            now = time.monotonic()
            self._on_exit(inst, Exit(inst.id, inst.p.service, ev.code, ev.signal, cause,  # type: ignore[arg-type]
                                     now - inst.started_at,
                                     now - inst.healthy_since if inst.healthy_since else 0.0, inst.kill_detail))
            return
        if not inst.state.alive or inst.state is State.STOPPING or inst.kill_cause:
            return
        msg = ev.message or ""
        if ev.probe == "startup":
            if ev.ok:
                if inst.svc.health.readiness is None:
                    self._healthy(inst, f"startup probe passed: {msg}")
                else:
                    self._event(inst.id, inst.p.service, None, None, f"startup probe passed: {msg}")
            else:
                self._terminate(inst, "startup", msg)
        elif ev.probe == "readiness":
            if ev.ok:
                self._healthy(inst, f"readiness probe passed: {msg}")
            else:
                self._unhealthy(inst, f"readiness probe failed: {msg}")
        elif ev.probe == "liveness" and not ev.ok:
            self._terminate(inst, "liveness", msg)

    def _on_exit(self, inst: _Instance, exit: Exit) -> None:
        self.registry.deregister(inst.id)
        inst.healthy_since = None
        decision: Decision = Decision("fail", reason=exit.describe()) if self._down else \
            self.restart_strategy.on_exit(exit)
        inst.reason = decision.reason
        if decision.action == "restart":
            inst.life.to(State.RESTARTING, decision.reason)
            inst.restarts += 1
            inst.timer = asyncio.get_running_loop().call_later(decision.delay, self._restart_now, inst)
        elif decision.action == "complete":
            inst.life.to(State.COMPLETED, decision.reason)
        else:
            inst.life.to(State.FAILED, decision.reason)

    def _restart_now(self, inst: _Instance) -> None:
        if inst.state is State.RESTARTING and not self._down:
            self._start(inst, f"restart {inst.restarts}")

    def _on_transition(self, t: Transition) -> None:
        self._history.append(t)
        if len(self._history) > 10000:
            del self._history[:1000]
        if self._store is not None:
            self._store.add_event(self.name, t.instance, t.service, t.old.value, t.new.value, t.reason, t.at)
            self._dirty.add(t.instance)
        if t.service in self._fronts:
            # At once, not on the next loop turn: an instance that starts stopping must get
            # no new connection before its signal goes out (draining).
            self._sync_front(t.service)
        for q in self._subscribers:
            q.put_nowait(t)
        self._tick.set()
        self._tick = asyncio.Event()
        self._flush_soon()

    def _sync_front(self, service: str) -> None:
        """The front of ``service`` balances over its healthy instances, on their first port."""
        up = [(i.id, self.host, i.main_port) for i in self._by_service.get(service, [])
              if i.state is State.HEALTHY and i.main_port is not None]
        self._fronts[service].set_upstreams(up)

    def _event(self, instance: str | None, service: str | None, old: str | None, new: str | None,
               reason: str) -> None:
        if self._store is not None:
            self._store.add_event(self.name, instance, service, old, new, reason)
            self._flush_soon()

    def _flush_soon(self) -> None:
        if self._flush_handle is None and self._store is not None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self._flush()
                return
            self._flush_handle = loop.call_later(0.05, self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        if self._store is not None:
            for iid in self._dirty:
                self._store.put_instance(self._instances[iid].row(self.name))
            self._dirty.clear()
            self._store.flush()

    # --- resources ------------------------------------------------------------------

    def _shared_cpus(self, node: int | None) -> list[int]:
        """CPUs not given exclusively to anyone, on ``node`` when one was chosen and has any:
        where a shared-CPU instance may run. Placement happens once, before anything starts,
        so the answer per node is computed once."""
        cached = self._shared.get(node)
        if cached is None:
            cached = self._shared[node] = self._compute_shared(node)
        return cached

    def _compute_shared(self, node: int | None) -> list[int]:
        exclusive = set(self.resources.usage().get("exclusive_cpus", []))
        shared = [c for c in self.topology.online if c not in exclusive]
        if node is not None:
            on_node = [c for c in shared if self.topology.numa_node_of(c) == node]
            return on_node or shared
        return shared

    def _setup_mesh(self) -> None:
        """With any mTLS front, every service gets a certificate from the deployment's CA."""
        if not any(s.mtls for s in self.spec.services.values()):
            return
        self._ca = Authority(self.state_dir / "tls", f"{self.name}.corral")
        for name in self.spec.services:
            self._certs[name] = self._ca.issue(name, self.spec.mesh.cert_lifetime)
        self._event(None, None, None, None, f"mesh: {len(self._certs)} certificates from {self._ca.ca_path}")

    async def _rotate_certs(self) -> None:
        """Re-issues every certificate after two thirds of its life; fronts present the new
        one from their next handshake, open connections are left alone."""
        assert self._ca is not None
        life = self.spec.mesh.cert_lifetime
        while True:
            await asyncio.sleep(life * 2 / 3)
            for name in self.spec.services:
                cert = self._ca.issue(name, life)
                self._certs[name] = cert
                front = self._fronts.get(name)
                if front is not None and self.spec.services[name].mtls:
                    front.set_certificate(cert.cert_pem, cert.key_pem)
            self._event(None, None, None, None, f"mesh: {len(self._certs)} certificates renewed")

    def _setup_cgroups(self) -> None:
        """One memory cgroup per instance that asks for memory; a warning, once, when the
        machine offers no memory controller."""
        wants = [i for i in self._instances.values() if i.svc.resources.memory or i.svc.resources.memory_max]
        if not wants:
            return
        cg = Cgroups.detect(self._cgroup_root, f"corral/{self.name}")
        if cg.mode == "unavailable":
            names = sorted({i.p.service for i in wants})
            self._warn(f"memory limits not enforced ({cg.reason}); {', '.join(names)} run without them")
            return
        self._cgroups = cg
        for inst in wants:
            r = inst.svc.resources
            try:
                inst.cgroup = cg.create(inst.id, max=r.memory_max or r.memory,
                                        low=r.memory if r.memory_max else None, swap=r.swap)
            except (OSError, CorralError) as e:
                self._warn(f"memory limit of {inst.id} not enforced: {e}")

    def _remove_cgroup(self, inst: _Instance) -> None:
        if self._cgroups is not None and inst.cgroup is not None:
            self._cgroups.remove(inst.cgroup)

    def _warn(self, text: str) -> None:
        self.warnings.append(text)
        log.warning("corral: %s", text)
        self._event(None, None, None, None, f"warning: {text}")

    def _release(self) -> None:
        for front in self._fronts.values():
            front.close()
        self._fronts.clear()
        if self.plan is not None:
            self.scheduler.release(self.plan)
        for inst in self._instances.values():
            self._remove_cgroup(inst)
        if self._cgroups is not None:
            self._cgroups.remove(self._cgroups.base)

    async def _roll_back(self, reason: str) -> None:
        self._row.status = "failed"
        self._row.message = reason
        self._event(None, None, "starting", "rolling-back", reason)
        started = [s for s, insts in self._by_service.items()
                   if any(i.state is not State.PLACED and i.state is not State.PENDING for i in insts)]
        assert self.plan is not None
        order = self.rollback.to_stop(started, self.plan.phases, reason)
        self._down = True
        for name in order:
            await asyncio.gather(*(self._stop(i, f"rollback: {reason}") for i in self._by_service[name]))
        for inst in self._instances.values():
            if inst.state in (State.PLACED, State.PENDING):
                inst.life.to(State.STOPPED, "rollback")
        self._release()
        if self._store is not None:
            self._store.put_deployment(self._row)
            self._event(None, None, "rolling-back", "failed", reason)
        self._close()

    # --- state ----------------------------------------------------------------------

    def _open_store(self) -> None:
        if self._store is None:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self._store = StateStore(self.state_db)

    def _clean_stale(self) -> None:
        """Refuses to start over a live agent; kills what a dead agent left behind."""
        for row in StateStore.read_deployments(self.state_db):
            if row.name != self.name or row.status in ("down", "failed"):
                continue
            if row.agent_pid != os.getpid() and row.agent_running():
                raise AgentError(f"deployment {self.name!r} is already running (agent pid {row.agent_pid}); "
                                 f"run 'corral down' first")
            killed = 0
            for r in StateStore.read_instances(self.state_db, self.name):
                if r.is_running():
                    assert r.pid is not None
                    signal_group(r.pid, signals.SIGKILL)
                    killed += 1
            if killed:
                self._warn(f"killed {killed} process groups left by a previous agent that died")

    def _close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            self._pump = None
        if self._rotation is not None:
            self._rotation.cancel()
            self._rotation = None
        # Dropping the supervisor ends its thread once the processes are gone.
        if self._down:
            self._sup = None
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self._flush()


def _settled(inst: _Instance) -> bool:
    return inst.state in _UP or inst.state is State.FAILED


def _probe_spec(p: Probe, ports: dict[str, int], env: list[tuple[str, str]], host: str) -> ProbeSpec:
    timing = dict(initial_delay=p.initial_delay, period=p.period, timeout=p.timeout,
                  success_threshold=p.success_threshold, failure_threshold=p.failure_threshold)
    if p.exec is not None:
        return ProbeSpec("exec", argv=[substitute_ports(a, ports) for a in p.exec], env=env, **timing)  # type: ignore[arg-type]
    check = p.http or p.tcp
    assert check is not None
    port = ports[check.port] if isinstance(check.port, str) else check.port
    h = check.host or host
    if p.http is not None:
        return ProbeSpec("http", host=h, port=port, path=p.http.path, **timing)  # type: ignore[arg-type]
    return ProbeSpec("tcp", host=h, port=port, **timing)  # type: ignore[arg-type]


def _free_mb(path: Path) -> int:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    st = os.statvfs(p)
    return st.f_bavail * st.f_frsize // (1 << 20)


def _env_name(name: str) -> str:
    return name.upper().replace("-", "_")


def _cpulist(cpus: Iterable[int]) -> str:
    return ",".join(str(c) for c in cpus)


def _placement_text(p: Placement) -> str:
    parts = []
    if p.cpus:
        parts.append(f"cores {_cpulist(p.cpus)}" + (f" (node {p.numa_node})" if p.numa_node is not None else ""))
    elif p.millicores:
        parts.append(f"cpu {p.millicores / 1000:g}")
    if p.memory_mb:
        parts.append(f"memory {p.memory_mb}Mi")
    if p.ports:
        parts.append("ports " + ", ".join(f"{k}={v}" for k, v in p.ports.items()))
    return "; ".join(parts) or "no resources"


def _exit_text(ev: ProcessEvent) -> str:
    if ev.signal is not None:
        return f"pid {ev.pid} ended by signal {ev.signal}"
    return f"pid {ev.pid} exited with status {ev.code}"
