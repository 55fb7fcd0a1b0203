"""Bring-up: every placed instance started phase by phase, each service once its
dependencies meet their conditions, each waited for within its start timeout; a failure
rolls everything back. A part of :class:`~corral.engine.deployment.Deployment`, handed what
runs, the collaborators that start and record instances, and the deployment's
``supervise`` and ``roll_back``."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from corral.engine.diff import effective, spec_hash
from corral.engine.instance import STARTED, UP, InstanceRuntime, placement_text
from corral.exceptions import CorralError, DeploymentError
from corral.lifecycle import State

if TYPE_CHECKING:
    from corral.engine.fleet import Fleet
    from corral.engine.hooks import FrontsHook
    from corral.engine.journal import Journal
    from corral.engine.launch import Launcher
    from corral.engine.running import Running
    from corral.engine.stack import Stack
    from corral.scheduler import Plan

__all__ = ["BringUp"]


class BringUp:
    """See the module docs."""

    def __init__(self, running: Running, *, state_dir: Path, journal: Journal, stack: Stack, fleet: Fleet,
                 launcher: Launcher, fronts: FrontsHook, supervise: Callable[[], None],
                 roll_back: Callable[[str], Awaitable[None]]) -> None:
        self.running = running
        self.state_dir = state_dir
        self.journal = journal
        self.stack = stack
        self.fleet = fleet
        self.launcher = launcher
        self.fronts = fronts
        self.supervise = supervise
        self.roll_back = roll_back

    async def up(self, plan: Plan) -> None:
        """Starts every instance of ``plan`` in dependency order and returns once every
        service meets its condition; rolls back and raises
        :class:`~corral.exceptions.DeploymentError` otherwise (or when interrupted)."""
        stack, journal = self.stack, self.journal
        self.fleet.plan = plan
        journal.begin(plan.phases)
        run = self.running
        run.first_version = version = journal.next_version()
        spec = run.spec
        journal.spec(version, spec_hash(spec), spec.text, "applied", f"up {run.file.name}")
        run.configs = {n: effective(s, run.base) for n, s in spec.services.items()}
        run.versions = dict.fromkeys(spec.services, version)
        journal.status("starting", event=(None, f"up {self.running.file.name}: {sum(1 for _ in plan.instances())} "
                                                f"instances in {len(plan.phases)} phases"))
        for p in plan.instances():
            inst = InstanceRuntime(p, self.running.spec.services[p.service], self.state_dir / "logs" / f"{p.id}.log",
                                   stack.on_transition, version)
            stack.add(inst)
            inst.life.to(State.PLACED, placement_text(p))
        self.fronts.ports = dict(plan.fronts)
        try:
            self.supervise()  # gives everything back itself when a hook fails
        except (CorralError, OSError) as e:
            # A volume that would not mount, say: nothing started; failed as a start fails.
            reason = f"setting up the stack failed: {e}"
            stack.down = True
            for inst in stack.instances.values():
                inst.life.to(State.STOPPED, f"rollback: {reason}")
            journal.status("failed", reason, event=("starting", reason))
            journal.flush()
            raise DeploymentError(reason) from None
        self.stack.tracing.phases(plan.phases)
        tasks = {name: asyncio.create_task(self._bring_up(name), name=f"up-{name}") for name in spec.services}
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
            await self.roll_back(reason)
            if isinstance(e, DeploymentError | asyncio.CancelledError):
                raise
            raise DeploymentError(reason) from e
        journal.status("up", "", event=("starting", "every service meets its condition"))
        journal.flush()

    async def _bring_up(self, name: str) -> None:
        svc = self.running.spec.services[name]
        t0 = asyncio.get_running_loop().time()
        for dep, want in svc.depends_on.items():
            # A dependency's own deadline fires first and names the real culprit; the
            # dependent's wait only bounds conditions that may never come ("completed").
            left = self._deadline(dep) + svc.start_timeout - (asyncio.get_running_loop().time() - t0)
            await self._wait_condition(dep, want.condition, waiter=name, timeout=left)
        with self.stack.tracing.phase_of(name):
            self.launcher.start(self.stack.by_service[name], "dependencies met" if svc.depends_on else "phase 0")
            await self._wait_condition(name, "up", waiter=None, timeout=svc.start_timeout)

    def _deadline(self, name: str) -> float:
        """Seconds after ``up`` began by which ``name`` must be up: its start timeout after
        the latest deadline of its dependencies."""
        svc = self.running.spec.services[name]
        return svc.start_timeout + max((self._deadline(d) for d in svc.depends_on), default=0.0)

    async def _wait_condition(self, name: str, cond: str, waiter: str | None, timeout: float) -> None:
        insts = self.stack.by_service[name]
        want = {"started": STARTED, "healthy": UP, "completed": frozenset({State.COMPLETED}), "up": UP}[cond]
        who = f"{waiter} needs {name} {cond}, but " if waiter else ""

        def met() -> bool:
            bad = next((i for i in insts if i.state is State.FAILED
                        or (cond == "completed" and i.state is State.COMPLETED and i.exit_code != 0)), None)
            if bad is not None:
                raise DeploymentError(f"{who}{bad.id} failed: {bad.reason}")
            return all(i.state in want for i in insts)

        if not await self.stack.wait(met, timeout):
            states = ", ".join(f"{i.id} {i.state.value}" + (f" ({i.reason or i.probe_message})"
                                                             if i.reason or i.probe_message else "") for i in insts)
            what = f"{name} not up within {timeout:g}s" if waiter is None else f"{who}it did not get there in time"
            raise DeploymentError(f"{what}: {states}")
