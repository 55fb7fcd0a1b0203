"""Scheduled services (``schedule: {cron: "0 3 * * *", timezone: UTC}`` or ``{every: 30s}``),
as Nomad's ``periodic``, Kubernetes' CronJob and systemd timers run them.

Each run is a new instance of the service (``backup-7``: its own log, exit status, events
and metrics), placed through the ledgers when it is due and started; ``concurrency`` says
what a run due while the last still runs does (``forbid`` skips it, ``allow`` starts it
beside, ``replace`` stops the last first). The last ``history`` finished runs stay in
``status``; older ones are forgotten (their grants returned; logs and events stay).

What each schedule has done (runs, skipped, missed, the last time it was due) is saved with
the deployment's row. An agent that takes over a stack whose agent died counts the runs
that fell due meanwhile as missed, says so, and does not replay them (Kubernetes runs at
most one late; here a backup due at 03:00 found at 09:00 waits for the next 03:00, or
``corral run``). ``every`` counts from the stack's first start.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from corral.cron import Cron, zone
from corral.engine.fleet import Fleet
from corral.engine.hooks import Hook
from corral.engine.instance import InstanceRuntime
from corral.engine.running import Running
from corral.engine.stack import Stack
from corral.exceptions import CorralError, UnknownService
from corral.spec.service import ScheduleSpec

__all__ = ["Schedules"]

log = logging.getLogger("corral")

_NAP = 30.0
"""The longest sleep between looks (an apply may have changed a schedule)."""


class Schedules(Hook):
    """See the module docs."""

    name = "schedules"

    def __init__(self, running: Running, stack: Stack, fleet: Fleet) -> None:
        self.running = running
        self.stack = stack
        self.fleet = fleet
        self.state: dict[str, dict[str, Any]] = {}
        """Per scheduled service: ``runs``, ``skipped``, ``missed``, ``anchor`` (when ``every``
        counts from), ``last_due`` and ``next`` (Unix times)."""
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def _scheduled(self) -> dict[str, ScheduleSpec]:
        return {n: s.schedule for n, s in self.running.spec.services.items() if s.schedule is not None}

    def next_due(self, sched: ScheduleSpec, after: float, anchor: float) -> float:
        """When ``sched`` is next due strictly after ``after``."""
        if sched.every is not None:
            k = max(0, int((after - anchor) // sched.every) + 1)
            return anchor + k * sched.every
        assert sched.cron is not None and sched.timezone is not None
        tz = zone(sched.timezone)
        when = dt.datetime.fromtimestamp(after, dt.UTC)
        return Cron.parse(sched.cron).next_after(when, tz).timestamp()

    def _missed(self, sched: ScheduleSpec, last: float, now: float, anchor: float) -> int:
        if sched.every is not None:
            return max(0, int((now - anchor) // sched.every) - int((last - anchor) // sched.every))
        assert sched.cron is not None and sched.timezone is not None
        return Cron.parse(sched.cron).count_between(dt.datetime.fromtimestamp(last, dt.UTC),
                                                    dt.datetime.fromtimestamp(now, dt.UTC),
                                                    zone(sched.timezone), cap=1_000_000)

    # --- the hook ----------------------------------------------------------------------

    def prerun(self, stack: Stack) -> list[str]:
        """Takes up what the store says (a stack taken over: the runs missed meanwhile are
        counted and said), and starts watching the clock."""
        now = time.time()
        saved = stack.journal.row.schedules
        for name, sched in self._scheduled().items():
            st = dict(saved.get(name, {}))
            anchor = float(st.get("anchor", now))
            last = float(st.get("last_due", now))
            if name in saved and last < now:
                missed = self._missed(sched, last, now, anchor)
                if missed:
                    st["missed"] = int(st.get("missed", 0)) + missed
                    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.next_due(sched, last, anchor)))
                    stack.journal.note(f"{missed} runs were due while no agent ran (the first at {when}); not run "
                                       f"now (corral run {name} runs it)", service=name)
            st.update(anchor=anchor, last_due=max(last, now) if name in saved else now)
            st.setdefault("runs", 0)
            st.setdefault("skipped", 0)
            st.setdefault("missed", 0)
            st["next"] = self.next_due(sched, now, anchor)
            self.state[name] = st
        self._save()
        if self.state:
            with contextlib.suppress(RuntimeError):
                self._task = asyncio.get_running_loop().create_task(self._loop(), name="corral-schedules")
        return []

    def stopping(self, stack: Stack) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def changed(self) -> None:
        """An apply may have changed the schedules: look again now."""
        for name, sched in self._scheduled().items():
            if name not in self.state:
                now = time.time()
                self.state[name] = {"anchor": now, "last_due": now, "runs": 0, "skipped": 0, "missed": 0,
                                    "next": self.next_due(sched, now, now)}
        if self._task is None and self.state and not self.stack.down:
            with contextlib.suppress(RuntimeError):
                self._task = asyncio.get_running_loop().create_task(self._loop(), name="corral-schedules")
        self._wake.set()

    def _save(self) -> None:
        self.stack.schedules = {k: dict(v) for k, v in self.state.items()}
        self.stack.journal.schedules(self.state)

    # --- the clock ---------------------------------------------------------------------

    async def _loop(self) -> None:
        while not self.stack.down:
            scheduled = self._scheduled()
            now = time.time()
            for name, sched in scheduled.items():
                st = self.state[name]
                if st["next"] <= now:
                    st["last_due"] = st["next"]
                    st["next"] = self.next_due(sched, now, st["anchor"])
                    try:
                        await self.start_run(name, "schedule: due")
                    except CorralError as e:
                        self.stack.warn(f"scheduled run of {name} not started: {e}")
            self._save()
            soonest = min((self.state[n]["next"] for n in scheduled), default=now + _NAP)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.01, min(_NAP, soonest - time.time())))

    async def run(self, name: str, start_service: Callable[[str], Awaitable[None]]) -> str:
        """``corral run``: a run of a scheduled service now (by its concurrency rule), or a
        one-shot service started again (``start_service``, which waits for it); the id of
        the instance that runs."""
        svc = self.running.spec.services.get(name)
        if svc is not None and svc.schedule is not None:
            inst = await self.start_run(name, "run requested")
            assert inst is not None
            return inst.id
        await start_service(name)
        return self.stack.by_service[name][0].id

    async def start_run(self, name: str, reason: str) -> InstanceRuntime | None:
        """Starts a run of ``name`` now, by its concurrency rule: the new instance, or None
        when ``forbid`` skipped it (said in an event). A run asked for by hand
        (``corral run``) under ``forbid`` with one going raises instead."""
        svc = self.running.spec.services.get(name)
        if svc is None or svc.schedule is None:
            raise UnknownService(f"{name!r} is not a scheduled service", name)
        sched = svc.schedule
        st = self.state[name]
        going = [i for i in self.stack.by_service.get(name, []) if i.state.alive]
        if going and sched.concurrency == "forbid":
            if reason != "schedule: due":
                raise CorralError(f"{name}: {going[0].id} still runs (concurrency: forbid)")
            st["skipped"] = int(st.get("skipped", 0)) + 1
            self.stack.journal.note(f"run skipped: {going[0].id} still runs (concurrency: forbid)", service=name)
            return None
        if going and sched.concurrency == "replace":
            await asyncio.gather(*(self.fleet.stop(i, "replaced by the next run (concurrency: replace)")
                                   for i in going))
        index = int(st.get("runs", 0))
        st["runs"] = index + 1
        version = self.running.versions.get(name, self.stack.journal.row.version)
        (inst,) = self.fleet.place(name, svc, [(index, f"{name}-{index}")], version)
        self.fleet.start([inst], reason)
        finished = [i for i in self.stack.by_service.get(name, []) if i.state.terminal and i is not inst]
        for old in finished[:max(0, len(finished) - sched.history)]:
            self.fleet.forget(old)
        self._save()
        return inst
