"""Starting and stopping instances: spawns (batched, retried on the event loop), affinity,
cgroups, probes, signals.

Everything queued to start in one turn of the event loop is spawned together, so the
instances of a phase share the native threads of one ``spawn_many``. A spawn that fails for
a transient reason (EAGAIN, ENOMEM) is retried by a :class:`~corral._core.RetryAttempts` on
the event loop's timer, never by sleeping in a callback; a missing program or directory is
not retried.
"""

from __future__ import annotations

import asyncio
import signal as signals
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from corral._core import (
    Authority,
    IssuedCert,
    ProbeSpec,
    ProcessSpec,
    RetryAttempts,
    RetryPolicy,
    find_by_env,
    kill_pid,
    signal_group,
)
from corral.engine import environment as contract
from corral.engine.instance import InstanceRuntime, Process, cpulist
from corral.engine.stack import Stack
from corral.exceptions import CorralError
from corral.identity import Credentials, credentials
from corral.leftovers import reset_pid_log
from corral.lifecycle import State
from corral.recovery import Exit
from corral.spec import Probe, read_env_file, substitute_ports
from corral.statedir import INSTANCE_DIR, instance_dir

__all__ = ["Launcher"]

# Spawning threads: a spawn spends most of its time suspended while the child execs (vfork),
# so more threads than this machine's 2 CPUs still help (200 spawns: 0.18 s on 1, ~0.14 s on 4).
_SPAWN_THREADS = 4
_PERMANENT = (FileNotFoundError, PermissionError, NotADirectoryError)
_SPAWN_RETRY = RetryPolicy.exponential(0.05, max_attempts=3)


class Launcher:
    """Starts, signals and stops the instances of a stack. Readiness and exits are not its
    business: ``on_spawn_error`` hears a spawn that failed for good, ``on_healthy`` an
    instance that is healthy without probes."""

    def __init__(self, stack: Stack, *, on_spawn_error: Callable[[InstanceRuntime, Exit], None],
                 on_healthy: Callable[[InstanceRuntime, str], None],
                 mesh: Callable[[str], tuple[IssuedCert | None, Authority | None]],
                 log_max: int, log_keep: int,
                 prepare: Callable[[InstanceRuntime, list[tuple[str, str]]], None] | None = None) -> None:
        self.stack = stack
        self._prepare = prepare
        """Before each spawn: the instance's directory and its rendered templates."""
        self._on_spawn_error = on_spawn_error
        self._on_healthy = on_healthy
        self._mesh = mesh
        self._log_max, self._log_keep = log_max, log_keep
        self._queued: list[InstanceRuntime] = []

    def set_logs(self, max_bytes: int, keep: int) -> None:
        """Log rotation for processes spawned from now on (an apply changed ``logs``)."""
        self._log_max, self._log_keep = max_bytes, keep

    # --- start ----------------------------------------------------------------------

    def start(self, insts: list[InstanceRuntime], reason: str) -> None:
        """Queues instances to start in this turn of the event loop."""
        for inst in insts:
            inst.timer = None
            inst.reason = ""
            inst.life.to(State.STARTING, reason)
        self._queued.extend(insts)
        if len(self._queued) == len(insts):
            asyncio.get_running_loop().call_soon(self._spawn_queued)

    def _spawn_queued(self) -> None:
        insts, self._queued = [i for i in self._queued if i.state is State.STARTING], []
        batch: list[tuple[InstanceRuntime, list[tuple[str, str]], ProcessSpec]] = []
        for inst in insts:
            if self._skipped(inst):
                continue
            try:
                creds = credentials(inst.svc.user, inst.svc.group)
                env = self._environment(inst, creds)
                if self._prepare is not None:
                    self._prepare(inst, env)
                spec = self._process_spec(inst, env, creds)
            except (OSError, ValueError) as e:
                self._on_spawn_error(inst, Exit(inst.id, inst.p.service, None, None, "spawn", 0.0, 0.0, str(e)))
                continue
            batch.append((inst, env, spec))
        if not batch:
            return
        sup = self.stack.supervisor
        assert sup is not None
        results = sup.spawn_many([(i.id, spec) for i, _, spec in batch], threads=_SPAWN_THREADS)
        for (inst, env, spec), res in zip(batch, results, strict=True):
            self._spawned(inst, env, spec, res, None)
        self._record()

    def _record(self) -> None:
        """The pids just spawned go to the store before anything else happens: instances
        outlive the agent (their own process groups), so a kill -9 of the agent must not
        leave processes no later down can find. Until this commit, the supervisor's pid log
        (``pids``, one line written as each spawn returns) covers them; once the store has
        them, the log is emptied. Spawns happen on this thread only, so none is lost."""
        if self.stack.journal.flush():
            reset_pid_log(self.stack.state_dir)

    def _spawned(self, inst: InstanceRuntime, env: list[tuple[str, str]], spec: ProcessSpec,
                 res: tuple[int, int] | OSError, attempts: RetryAttempts | None) -> None:
        if isinstance(res, OSError) and inst.cgroup is not None:
            res = self._spawn_without_cgroup(inst, spec, res)
        if not isinstance(res, OSError):
            self._running(inst, res, env, (spec.uid, spec.gid, spec.cwd or self._cwd(inst)))
            return
        if not isinstance(res, _PERMANENT):
            attempts = attempts or _SPAWN_RETRY.attempts()
            delay = attempts.after_failure()
            if delay is not None:
                inst.timer = asyncio.get_running_loop().call_later(delay, self._spawn_again, inst, env, spec, attempts)
                return
        self._on_spawn_error(inst, Exit(inst.id, inst.p.service, None, None, "spawn", 0.0, 0.0, str(res)))

    def _spawn_again(self, inst: InstanceRuntime, env: list[tuple[str, str]], spec: ProcessSpec,
                     attempts: RetryAttempts) -> None:
        inst.timer = None
        sup = self.stack.supervisor
        if inst.state is not State.STARTING or sup is None:
            return
        (res,) = sup.spawn_many([(inst.id, spec)], threads=1)
        self._spawned(inst, env, spec, res, attempts)
        self._record()

    def _cwd(self, inst: InstanceRuntime) -> Path:
        """Where the instance's process (and its exec probes) runs."""
        wd = inst.svc.working_dir
        return (self.stack.base / wd) if wd else self.stack.base

    def _skipped(self, inst: InstanceRuntime) -> bool:
        """A run whose ``skip_if_exists`` path exists completes at once, exit 0, unstarted."""
        mark = inst.svc.skip_if_exists
        if mark is None or not (self.stack.base / mark).exists():
            return False
        inst.exit_code, inst.proc = 0, None
        inst.reason = inst.exit_text = f"skipped: {mark} exists"
        inst.life.to(State.COMPLETED, inst.reason)
        self._record()
        return True

    def _spawn_without_cgroup(self, inst: InstanceRuntime, spec: ProcessSpec,
                              error: OSError) -> tuple[int, int] | OSError:
        """A spawn with a cgroup failed: if it works without, the cgroup was the problem (a
        container may let us create cgroups but not move processes into them), so the
        instance runs without its memory limit, with a warning, rather than not at all."""
        sup = self.stack.supervisor
        assert sup is not None
        bare = ProcessSpec(spec.argv, env=spec.env, cwd=spec.cwd, cpus=spec.cpus, log=inst.log,
                           log_max_bytes=self._log_max, log_keep=self._log_keep, uid=spec.uid, gid=spec.gid)
        (res,) = sup.spawn_many([(inst.id, bare)], threads=1)
        if isinstance(res, OSError):
            return error
        self.stack.warn(f"memory limit of {inst.id} not enforced: cannot join {inst.cgroup}: {error}")
        inst.cgroup = None
        return res

    def _process_spec(self, inst: InstanceRuntime, env: list[tuple[str, str]], creds: Credentials) -> ProcessSpec:
        svc = inst.svc
        argv = [self._fill(a, inst) for a in svc.argv()]
        cwd = self._cwd(inst)
        inst.affinity = inst.p.cpus or self.stack.resources.shared_cpus(inst.p.numa_node)
        inst.vouched = False
        uid, gid, _, _ = creds
        # A log probe reads what this run prints: from the log's end before the spawn.
        try:
            inst.log_from = inst.log.stat().st_size
        except OSError:
            inst.log_from = 0
        return ProcessSpec(argv, env=env, cwd=cwd, cpus=inst.affinity, cgroup=inst.cgroup, log=inst.log,
                           log_max_bytes=self._log_max, log_keep=self._log_keep, uid=uid, gid=gid)

    def _environment(self, inst: InstanceRuntime, creds: Credentials) -> list[tuple[str, str]]:
        svc, ports, stack = inst.svc, inst.p.ports, self.stack
        base: dict[str, str] = {}
        _, _, user, home = creds
        if user is not None and home is not None:
            # As systemd does for User=: the environment names the user it runs as.
            base.update({"USER": user, "LOGNAME": user, "HOME": home})
        if svc.env_file:
            base.update(read_env_file(stack.base / svc.env_file))
        base.update({k: self._fill(v, inst) for k, v in svc.env.items()})
        cert, ca = self._mesh(inst.p.service)
        deps = [(dep, [f"{stack.host}:{d.main_port}" for d in stack.by_service.get(dep, [])
                       if d.state is State.HEALTHY and d.main_port is not None]) for dep in svc.depends_on]
        return contract.environment(
            service=inst.p.service, instance=inst.id, replica=inst.p.index, deployment=stack.name, stack=stack.id,
            ports=ports,
            agent_socket=stack.state_dir / "agent.sock", volume=inst.p.volume, base=base,
            cert=cert, ca=ca, dependencies=deps)

    def environment(self, inst: InstanceRuntime) -> list[tuple[str, str]]:
        """The environment the instance would start with now (its dependencies' healthy
        addresses as they are now)."""
        return self._environment(inst, credentials(inst.svc.user, inst.svc.group))

    def _fill(self, text: str, inst: InstanceRuntime) -> str:
        """``${ports.x}`` and ``${instance.dir}`` in a command, env value or exec probe."""
        text = substitute_ports(text, inst.p.ports)
        if INSTANCE_DIR in text:
            text = text.replace(INSTANCE_DIR, str(instance_dir(self.stack.state_dir, inst.id)))
        return text

    def _running(self, inst: InstanceRuntime, spawned: tuple[int, int], env: list[tuple[str, str]],
                 run_as: tuple[int | None, int | None, Path]) -> None:
        """``run_as``: the process's uid, gid and directory, which its exec probes take too."""
        sup = self.stack.supervisor
        assert sup is not None
        pid, start = spawned
        inst.proc = Process(pid, start, time.monotonic())
        inst.healthy_since = None
        inst.exit_code = None
        inst.life.to(State.RUNNING, f"pid {pid}" + (f", cpus {cpulist(inst.affinity)}" if inst.p.cpus else ""))
        probes = {kind: _probe_spec(p, inst.p.ports, env, self.stack.host, inst.log, inst.log_from,
                                    lambda a: self._fill(a, inst), run_as)
                  if p is not None else None
                  for kind, p in (("startup", inst.svc.health.startup), ("readiness", inst.svc.health.readiness),
                                  ("liveness", inst.svc.health.liveness))}
        if probes["startup"] is None and probes["readiness"] is None:
            self._on_healthy(inst, "running, no readiness probe")
        if any(probes.values()):
            sup.start_health(inst.id, **probes)

    def adopted(self, inst: InstanceRuntime, pid: int, start: int, *, vouched: bool = False) -> bool:
        """Takes over a process a dead agent started: watched through a pidfd, probed again
        from now on (False when it is gone already); ``vouched``: it was healthy, and its
        front routes to it meanwhile."""
        sup = self.stack.supervisor
        assert sup is not None
        if not sup.adopt(inst.id, pid):
            return False
        creds = credentials(inst.svc.user, inst.svc.group)
        env = self._environment(inst, creds)
        inst.affinity = inst.p.cpus or self.stack.resources.shared_cpus(inst.p.numa_node)
        inst.vouched = vouched
        inst.life.resume(State.STARTING, f"re-adopting pid {pid}")
        self._running(inst, (pid, start), env, (creds[0], creds[1], self._cwd(inst)))
        assert inst.proc is not None
        inst.proc.adopted = True
        return True

    # --- signals and stop -------------------------------------------------------------

    def terminate(self, inst: InstanceRuntime, cause: Literal["startup", "liveness"], detail: str) -> None:
        """Ends a live process because a probe failed; its exit then goes to the strategy."""
        proc = inst.live_process
        if proc is None or proc.kill_cause is not None:
            return
        proc.kill_cause, proc.kill_detail = cause, detail
        self.signal(inst)

    def signal(self, inst: InstanceRuntime) -> None:
        """The service's shutdown signal to the process group (``kill_mode: main``: to the
        main process), SIGKILL to the group after its timeout."""
        proc = inst.live_process
        if proc is None:
            return
        sig = getattr(signals, inst.svc.shutdown.signal)
        if inst.svc.shutdown.kill_mode == "main":
            kill_pid(proc.pid, sig)
        else:
            signal_group(proc.pid, sig)
        asyncio.get_running_loop().call_later(inst.svc.shutdown.timeout, self._kill_if_alive, proc)

    @staticmethod
    def _kill_if_alive(proc: Process) -> None:
        if not proc.exited.is_set():
            signal_group(proc.pid, signals.SIGKILL)

    @staticmethod
    async def _drained(inst: InstanceRuntime, active: Callable[[], int]) -> None:
        """Out of its front: a moment (up to 200 ms) for what the front handed it just before
        to reach it, then until its connections through the front have closed, at most
        ``shutdown.drain`` in all (HAProxy's and Envoy's drain: the open ones may finish)."""
        sd = inst.svc.shutdown
        loop = asyncio.get_running_loop()
        end = loop.time() + sd.drain
        await asyncio.sleep(min(sd.drain, 0.2))
        while loop.time() < end and active() > 0:
            await asyncio.sleep(min(0.02, max(0.0, end - loop.time())))

    def sweep(self, inst: InstanceRuntime) -> int:
        """Ends what is left of an instance whose leader has exited: its cgroup's processes
        (``cgroup.kill``), and every process that inherited its marker (``CORRAL_UNIT``),
        wherever it went (a ``setsid`` daemon). Returns how many were found by marker."""
        cgroups = self.stack.cgroups
        if inst.cgroup is not None and cgroups is not None:
            try:
                cgroups.kill(inst.cgroup)
            except (OSError, CorralError):
                pass  # the marker sweep below still runs
        unit = f"{contract.UNIT}={self.stack.id}/{inst.id}"
        found = find_by_env(unit)
        for pid in found:
            kill_pid(pid, signals.SIGKILL)
        return len(found)

    async def stop(self, inst: InstanceRuntime, reason: str, *, drain: Callable[[], int] | None) -> None:
        """Stops one instance by its shutdown rule and waits for its process to exit;
        ``drain`` (its open connections through its front) first lets the front finish
        what it was handed: see :meth:`_drained`."""
        inst.cancel_timer()
        if inst.state is State.STARTING and inst in self._queued:
            # Queued, not spawned yet: it never runs.
            self._queued.remove(inst)
            inst.life.to(State.STOPPING, reason)
            inst.life.to(State.STOPPED, "stopped before it was spawned")
        elif inst.state.alive and inst.live_process is not None:
            if inst.state is not State.STOPPING:
                inst.reason = reason  # what status says once it has stopped
                inst.life.to(State.STOPPING, reason)  # out of its front from here on
                if drain is not None and inst.svc.shutdown.drain > 0:
                    await self._drained(inst, drain)
                self.signal(inst)
            await inst.wait_exited()
        elif inst.state is State.STARTING:
            # Between spawn retries: no process to stop.
            inst.life.to(State.STOPPING, reason)
            inst.life.to(State.STOPPED, "stopped before it was spawned")
        elif inst.state in (State.RESTARTING, State.PENDING, State.PLACED, State.COMPLETED, State.FAILED):
            inst.life.to(State.STOPPED, reason)
        self.stack.registry.deregister(inst.id)


def _probe_spec(p: Probe, ports: dict[str, int], env: list[tuple[str, str]], host: str, log: Path,
                log_from: int | None, fill: Callable[[str], str],
                run_as: tuple[int | None, int | None, Path]) -> ProbeSpec:
    if p.log is not None:
        return ProbeSpec("log", path=str(log), pattern=p.log, offset=log_from, initial_delay=p.initial_delay,
                         period=p.period, timeout=p.timeout, success_threshold=p.success_threshold,
                         failure_threshold=p.failure_threshold)
    check = p.http or p.tcp
    port = 0
    if check is not None:
        port = ports[check.port] if isinstance(check.port, str) else check.port
    return ProbeSpec(
        "exec" if p.exec is not None else "http" if p.http is not None else "tcp",
        host=(check.host if check is not None and check.host else host), port=port,
        path=p.http.path if p.http is not None else "/",
        argv=[fill(a) for a in p.exec] if p.exec is not None else [],
        env=env if p.exec is not None else [],
        uid=run_as[0], gid=run_as[1], cwd=run_as[2] if p.exec is not None else None,
        initial_delay=p.initial_delay, period=p.period, timeout=p.timeout,
        success_threshold=p.success_threshold, failure_threshold=p.failure_threshold)
