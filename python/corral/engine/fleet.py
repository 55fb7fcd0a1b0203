"""A running stack's instances one at a time: placed, started, waited for, stopped and
forgotten, for what changes a stack after ``up`` (scale, apply, rolling restarts).

Placement goes through the ledgers (all or none for a group), stopping through the
service's shutdown rule with its front drained first, and forgetting gives back every grant,
port and cgroup, so a stack that changed a hundred times holds what it runs, no more.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from corral.engine.hooks import CgroupsHook, FrontsHook
from corral.engine.instance import UP, InstanceRuntime, placement_text, settled
from corral.engine.launch import Launcher
from corral.engine.stack import Stack
from corral.engine.verdicts import Verdicts
from corral.exceptions import ConfigError, CorralError
from corral.lifecycle import State
from corral.scheduler import Plan, Scheduler
from corral.spec import ServiceSpec

__all__ = ["Fleet"]

_GONE = frozenset({State.RESTARTING, State.FAILED, State.COMPLETED, State.STOPPING, State.STOPPED})
"""States in which a new instance has left the road to counting: it exited, or was stopped."""


class Fleet:
    """The instances of one running stack, changed one by one; see the module docs."""

    def __init__(self, stack: Stack, launcher: Launcher, verdicts: Verdicts, scheduler: Scheduler,
                 cgroups: CgroupsHook, fronts: FrontsHook, volumes: dict[str, Path]) -> None:
        self.stack = stack
        self.launcher = launcher
        self.verdicts = verdicts
        self.scheduler = scheduler
        self.cgroups = cgroups
        self.fronts = fronts
        self.volumes = volumes
        self.plan: Plan | None = None

    # --- placing and forgetting ------------------------------------------------------

    def place(self, service: str, svc: ServiceSpec, slots: list[tuple[int, str]],
              version: int) -> list[InstanceRuntime]:
        """New instances of ``service`` at ``(index, id)`` slots, all or none: raises
        :class:`ConfigError` naming what is short, with nothing held."""
        assert self.plan is not None
        placed = []
        with self.scheduler.claims.reserving():  # one reservation on the machine for them all
            try:
                for index, iid in slots:
                    placed.append(self.scheduler.place_one(service, index, svc, self.volumes.get(service), iid=iid))
            except CorralError as e:
                for p in placed:
                    self.scheduler.release_one(p)
                raise ConfigError(f"{service}: {e}") from None
        stack = self.stack
        out = []
        for p in placed:
            inst = InstanceRuntime(p, svc, stack.state_dir / "logs" / f"{p.id}.log", stack.on_transition, version)
            stack.add(inst)
            self.plan.placements.setdefault(service, []).append(p)
            inst.life.to(State.PLACED, placement_text(p))
            out.append(inst)
        for w in self.cgroups.add(out):
            stack.warn(w)
        return out

    def forget(self, inst: InstanceRuntime) -> None:
        """An instance that has stopped leaves the stack: its cgroup, grant, ports, row."""
        assert self.plan is not None
        self.cgroups.forget(inst)
        self.scheduler.release_one(inst.p)
        self.stack.remove(inst)
        self.stack.journal.forget(inst.id)
        svc = inst.p.service
        self.plan.placements[svc] = [p for p in self.plan.placements.get(svc, []) if p.id != inst.id]

    # --- starting and stopping -------------------------------------------------------

    def start(self, insts: list[InstanceRuntime], reason: str) -> None:
        """Starts them (spawned together in this turn of the loop)."""
        for inst in insts:
            self.verdicts.restart_strategy.forget(inst.id)
        if insts:
            self.launcher.start(insts, reason)

    async def stop(self, inst: InstanceRuntime, reason: str) -> None:
        """Stops one by its shutdown rule; out of its front first, drained while the stack
        runs."""
        self.verdicts.restart_strategy.forget(inst.id)
        front = self.fronts.fronts.get(inst.p.service)
        drain = None if front is None or self.stack.down else lambda: self.fronts.active(inst.p.service, inst.id)
        await self.launcher.stop(inst, reason, drain=drain)

    async def retire(self, insts: list[InstanceRuntime], reason: str) -> None:
        """Stops these together and forgets them."""
        await asyncio.gather(*(self.stop(i, reason) for i in insts))
        for inst in insts:
            self.forget(inst)

    async def shrink(self, service: str, keep: int, reason: str) -> None:
        """Stops and forgets the instances of ``service`` past the first ``keep`` (by index),
        the highest-numbered first."""
        insts = sorted(self.stack.by_service.get(service, []), key=lambda i: i.p.index)
        for inst in reversed(insts[keep:]):
            await self.stop(inst, reason)
            self.forget(inst)

    # --- waiting ----------------------------------------------------------------------

    async def first_not_up(self, insts: list[InstanceRuntime], timeout: float) -> tuple[InstanceRuntime, str] | None:
        """Waits (at most ``timeout``) until each of ``insts`` is up or failed; returns the
        first that is not up and why, or None when all are."""
        in_time = await self.stack.wait(lambda: all(settled(i) for i in insts), timeout)
        bad = next((i for i in insts if i.state not in UP), None)
        if bad is None:
            return None
        if in_time and bad.reason:
            return bad, bad.reason
        return bad, f"not up within {timeout:g}s" + (f": {bad.reason}" if bad.reason else "")

    async def counted(self, insts: list[InstanceRuntime], min_healthy: float,
                      deadline: float) -> tuple[InstanceRuntime, str] | None:
        """Waits until each new instance has been ready for ``min_healthy`` seconds without a
        break; returns the first that fails and why instead: it exited (or crash-looped)
        before it counted, or ``deadline`` seconds passed (with its last probe message)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        restarts = {i.id: i.restarts for i in insts}
        while True:
            for i in insts:
                if self.stack.down:
                    return i, "the stack is going down"
                if i.state is State.COMPLETED and i.exit_code == 0 and i.restarts == restarts[i.id]:
                    continue  # a one-shot job that did its work
                if i.restarts != restarts[i.id] or i.state in _GONE:
                    how = i.exit_text or i.reason or f"it is {i.state.value}"
                    return i, f"{how}, before it was ready" + (f" for {min_healthy:g}s" if min_healthy else "")
            now = time.monotonic()
            waiting = [i for i in insts if i.state is not State.COMPLETED and (
                i.state is not State.HEALTHY or i.healthy_since is None or now - i.healthy_since < min_healthy)]
            if not waiting:
                return None
            left = end - loop.time()
            if left <= 0:
                i = waiting[0]
                said = i.probe_message or (f"it is {i.state.value}" if i.state is not State.HEALTHY else
                                           "ready, but not for min_healthy_time")
                return i, f"not ready within healthy_deadline {deadline:g}s ({said})"
            due = [i.healthy_since + min_healthy - now for i in waiting
                   if i.state is State.HEALTHY and i.healthy_since is not None]
            await self.stack.next_change(min([left, *due]))
