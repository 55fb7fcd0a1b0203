"""Re-adoption: a new agent takes over the stack a dead one left, instead of restarting it.

Nomad's client re-attaches to its tasks from its state database; so does this, from
``state.db``. An instance whose recorded pid still runs with its recorded start time is
re-adopted and not restarted: its grants go back into the ledgers on the same cores and
ports, its exit is watched through a pidfd (it is not our child: the keeper, the subreaper
above it, reaps it and writes its status to the ``exits`` file), its probes resume, and the
registry and the fronts follow once its probe passes. An instance that died while no agent
ran goes to its restart policy; one never spawned is started. What the dead agent was doing
is finished: a ``down`` is completed, the instances of an apply that did not finish are
stopped (the last applied spec runs), an ``up`` goes on where it was. The event log says
what happened ("re-adopted 198 instances; 2 had exited: restarted").
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from corral._core import process_start_time, signal_group
from corral.engine.diff import effective
from corral.engine.instance import STARTED, UP, InstanceRuntime, Process, placement_text
from corral.exceptions import AgentAlreadyRunning, CorralError, DeploymentError, StateDirError
from corral.leftovers import live_agent, logged_spawns, marked_leaders
from corral.lifecycle import State
from corral.recovery import Exit
from corral.scheduler import Plan, phases
from corral.state import InstanceRow, StateStore

if TYPE_CHECKING:
    from corral.engine.fleet import Fleet
    from corral.engine.hooks import FrontsHook
    from corral.engine.journal import Journal
    from corral.engine.launch import Launcher
    from corral.engine.running import Running
    from corral.engine.stack import Stack
    from corral.engine.verdicts import Verdicts
    from corral.machine import Claims
    from corral.scheduler import Scheduler

__all__ = ["Adoption", "adoptable"]

_ALIVE_STATES = frozenset({"starting", "running", "healthy", "unhealthy", "stopping"})
"""Recorded states in which an instance had a process."""


class Adoption:
    """Re-adoption of a dead agent's stack (see the module docs), handed what it may touch:
    what runs (``running``), the collaborators that place, start and record instances, and
    the deployment's ``supervise`` (hooks, supervisor, event pump), ``down`` and
    ``roll_back``."""

    def __init__(self, running: Running, *, state_dir: Path, journal: Journal, stack: Stack, fleet: Fleet,
                 launcher: Launcher, verdicts: Verdicts, scheduler: Scheduler, claims: Claims, fronts: FrontsHook,
                 supervise: Callable[[], None], down: Callable[[], Awaitable[None]],
                 roll_back: Callable[[str], Awaitable[None]]) -> None:
        self.running = running
        self.state_dir = state_dir
        self.journal = journal
        self.stack = stack
        self.fleet = fleet
        self.launcher = launcher
        self.verdicts = verdicts
        self.scheduler = scheduler
        self.claims = claims
        self.fronts = fronts
        self.supervise = supervise
        self.down = down
        self.roll_back = roll_back

    async def adopt(self) -> str:
        """Takes over what the dead agent of this state directory left (see the module docs)
        and returns what the event log says of it. Raises
        :class:`~corral.exceptions.AgentAlreadyRunning` when that agent still runs."""
        journal, stack, run = self.journal, self.stack, self.running
        journal.open()
        db = journal.db
        other = live_agent(db)
        if other is not None and other.agent_pid != os.getpid():
            raise AgentAlreadyRunning(f"the agent of {self.state_dir} still runs (pid {other.agent_pid})",
                                      other.agent_pid)
        rows_by_name = [r for r in StateStore.read_deployments(db) if r.name == run.spec.name]
        if not rows_by_name:
            raise StateDirError(f"nothing to adopt: no deployment {run.spec.name!r} in {db}")
        row = rows_by_name[-1]
        was = row.status
        order = phases(run.spec)
        plan = run.plan = self.fleet.plan = Plan(order, {s: [] for p in order for s in p})
        journal.resume(row, order)
        recorded = StateStore.read_instances(db, run.spec.name)
        # Spawned after the store's last commit: the pid log has them, and the stack's
        # marker finds even one spawned just before the agent died, before its log line.
        found = {**marked_leaders(self.state_dir), **logged_spawns(self.state_dir)}
        for r in recorded:
            got = found.pop(r.id, None)
            if got is not None and not r.is_running() and process_start_time(got[0]) == got[1]:
                r.pid, r.pid_start, r.state = got[0], got[1], "running"
        strays = sum(1 for pid, start in found.values()
                     if process_start_time(pid) == start and signal_group(pid, signal.SIGKILL))
        running = journal.row.version
        base = run.base
        run.configs = {n: effective(s, base) for n, s in run.spec.services.items()}
        run.versions = {n: max((r.version for r in recorded if r.service == n and r.version <= running),
                                 default=running) for n in run.spec.services}
        run.first_version = min(run.versions.values(), default=running)
        # One reservation on the machine: what the dead agent claimed is claimed again, as
        # each instance is taken over, and nothing else.
        with self.claims.reserving():
            self.claims.reset()
            pairs, dropped = self._restore_all(recorded, running, plan)
        dropped += strays
        for sv in StateStore.read_specs(db, run.spec.name):
            if sv.state == "applying":
                # The agent died in the middle of this apply: what it had started is stopped
                # (above), the last applied version runs.
                journal.spec(sv.version, sv.digest, sv.text, "interrupted",
                             f"the agent died during this apply; v{running} runs (what v{sv.version} had started "
                             f"was stopped)")
        self.fronts.ports = dict(plan.fronts)
        self.supervise()

        adopted, exited, waiting = 0, 0, []
        for inst, r in pairs:
            # A log probe of a re-adopted process reads from the log's end, unless it had
            # passed already (its line is in the log, behind that end).
            inst.log_from = 0 if r.healthy else None
            if r.state in _ALIVE_STATES and r.pid and r.pid_start and r.is_running() \
                    and self.launcher.adopted(inst, r.pid, r.pid_start, vouched=r.healthy):
                adopted += 1
            elif r.state in _ALIVE_STATES and r.pid:
                exited += 1
                inst.life.resume(State.RUNNING, f"recorded running (pid {r.pid}), found gone")
                inst.proc = Process(r.pid, r.pid_start or 0, time.monotonic())
                inst.proc.exited.set()
                code = self.verdicts.recorded_exit(r.pid)
                self.verdicts.on_exit(inst, Exit(inst.id, inst.p.service, code if code is not None and code >= 0
                                                 else None, -code if code is not None and code < 0 else None,
                                                 "exit", 0.0, 0.0, "exited while unsupervised"))
            elif r.state in ("completed", "failed", "stopped"):
                inst.exit_code = r.exit_code
                inst.reason = r.reason
                inst.life.resume(State(r.state), f"re-adopted: {r.state} ({r.reason})" if r.reason else
                                 f"re-adopted: {r.state}")
            else:
                inst.life.resume(State.PLACED, placement_text(inst.p))
                waiting.append(inst)
        what = f"re-adopted {adopted} instances" + (f"; {exited} had exited: handed to their restart policy"
                                                    if exited else "") \
            + (f"; {dropped} of an unfinished change stopped" if dropped else "") \
            + (f"; {len(waiting)} not started yet: starting" if waiting else "")
        # Not "up" before every service meets its condition under this agent (below).
        journal.status("stopping" if was == "stopping" else "starting", event=(was, what))
        journal.flush()

        if was == "stopping":
            await self.down()  # it was killed in the middle of down: finish it
            return what
        # An up (or an apply) that did not finish: the spec's replicas, in dependency order.
        for name, svc in run.spec.services.items():
            have = len(stack.by_service.get(name, []))
            if have < svc.replicas:
                taken = {i.p.index for i in stack.by_service.get(name, [])}
                free = [i for i in range(svc.replicas + have) if i not in taken][:svc.replicas - have]
                for inst in self.fleet.place(name, svc, [(i, f"{name}-{i}") for i in free], run.versions[name]):
                    waiting.append(inst)
        if waiting:
            await self._start_in_order(waiting)
        unmet = await self._unmet()
        if unmet is not None and was == "starting":
            # The up the dead agent was doing fails as it would have: rolled back.
            await self.roll_back(unmet)
            raise DeploymentError(unmet)
        if unmet is not None:
            journal.status("degraded", unmet, event=("starting", unmet))
        else:
            journal.status("up", "", event=("starting", "every service meets its condition under this agent"))
        journal.flush()
        return what

    async def _unmet(self) -> str | None:
        """Waits (each service its start timeout) until every instance not stopped on
        purpose is up under this agent, its probes passed again; None, or why not."""
        async def one(name: str) -> str | None:
            insts = [i for i in self.stack.by_service.get(name, []) if i.state is not State.STOPPED]

            def settled() -> bool:
                return all(i.state in UP or i.state is State.FAILED for i in insts)

            timeout = self.running.spec.services[name].start_timeout
            await self.stack.wait(settled, timeout)
            bad = [i for i in insts if i.state not in UP]
            if not bad:
                return None
            return f"{name} not up within {timeout:g}s under this agent: " + ", ".join(
                f"{i.id} {i.state.value}" + (f" ({i.reason or i.probe_message})" if i.reason or i.probe_message
                                             else "") for i in bad)

        # A scheduled service's runs end as they may: its condition is its schedule's.
        names = [n for n, s in self.running.spec.services.items() if s.schedule is None]
        problems = [p for p in await asyncio.gather(*(one(n) for n in names)) if p]
        return "; ".join(problems) or None

    def _restore_all(self, recorded: list[InstanceRow], running: int,
                     plan: Plan) -> tuple[list[tuple[InstanceRuntime, InstanceRow]], int]:
        """The fronts' ports and each recorded instance back in the ledgers, as they were;
        the instances that cannot be (an apply that did not finish, a service no longer in
        the spec) are ended. Returns the pairs taken over and how many were ended."""
        journal, stack = self.journal, self.stack
        for name, svc in self.running.spec.services.items():
            if svc.expose is not None:
                plan.fronts[name] = self.scheduler.front_port(svc.expose, f"{name}.front", check=False)
        pairs: list[tuple[InstanceRuntime, InstanceRow]] = []
        dropped = 0
        for r in recorded:
            rsvc = self.running.spec.services.get(r.service)
            if rsvc is None or r.version > running:
                dropped += _end(r)
                journal.forget(r.id)
                continue
            try:
                p = self.scheduler.restore(r.id, r.service, r.idx, rsvc, self.running.volumes.get(r.service),
                                           cpus=r.cpus, exclusive=r.exclusive, numa_node=r.numa_node, ports=r.ports)
            except CorralError as e:
                stack.warn(f"{r.id} cannot be re-adopted ({e}); it is stopped")
                dropped += _end(r)
                journal.forget(r.id)
                continue
            inst = InstanceRuntime(p, rsvc, Path(r.log) if r.log else self.state_dir / "logs" / f"{r.id}.log",
                                   stack.on_transition, r.version)
            inst.restarts = r.restarts
            stack.add(inst)
            plan.placements.setdefault(r.service, []).append(p)
            pairs.append((inst, r))
        return pairs, dropped

    async def _start_in_order(self, todo: list[InstanceRuntime]) -> None:
        """Starts ``todo`` service by service once each one's dependencies are met."""
        names = {i.p.service for i in todo}

        async def one(name: str) -> None:
            svc = self.running.spec.services[name]
            for dep, want in svc.depends_on.items():
                need = STARTED if want.condition == "started" else UP
                deps = self.stack.by_service[dep]

                def met(deps: list[InstanceRuntime] = deps, need: frozenset[State] = need) -> bool:
                    return all(i.state in need for i in deps)

                await self.stack.wait(met, svc.start_timeout)
            self.launcher.start([i for i in todo if i.p.service == name and i.state is State.PLACED],
                                "started by this agent (the one that died had not started it)")
            await self.fleet.first_not_up([i for i in todo if i.p.service == name], svc.start_timeout)

        await asyncio.gather(*(one(n) for n in names))


def _end(r: InstanceRow) -> int:
    """Ends a recorded instance that is not taken over; 1 when it was still running."""
    if r.pid and r.is_running():
        signal_group(r.pid, signal.SIGKILL)
        return 1
    return 0


def adoptable(db: Path, name: str, digest: str) -> bool:
    """Whether a dead agent of deployment ``name`` left instances that still run, from the
    spec with that digest (``up -d`` again after the keeper gave up, say): those are
    re-adopted, not restarted. Another spec starts afresh (what is left is stopped)."""
    if not db.exists():
        return False
    try:
        rows = [r for r in StateStore.read_deployments(db) if r.name == name]
        if not rows or rows[-1].status in ("down", "failed") or live_agent(db) is not None:
            return False
        running = StateStore.running_spec(db, rows[-1])
        if running is None or running.digest != digest:
            return False
        return any(r.is_running() for r in StateStore.read_instances(db, name))
    except CorralError:
        return False
