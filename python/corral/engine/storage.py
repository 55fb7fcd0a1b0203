"""The storage watch: every service's volume measured every ``storage.period``, its usage
shown and acted on at the limit.

The walk is the core's (:func:`corral._core.disk_usage`: no symlinks followed, one
filesystem, hard links once, bounded by entries), run on a worker thread so the event loop
never waits for a disk. What it finds goes to the stack (metrics and ``status`` read it
there) and to the store with the deployment's row (``status`` and ``ls`` without an agent).

Thresholds are edges, as an alert fires once: an event when a volume passes 80% of its
size and another when it passes its size, each again only after it fell back below. Past
the size, ``on_full`` decides:

- ``warn`` (the default): the event, nothing else;
- ``stop``: the service is stopped (its reason says ``storage full: 1.03Gi of 1Gi in
  ./data``; its dependents are named in a warning), and stopped again at any measurement
  that finds it started while still full;
- ``restart``: a rolling restart, once per passing; one that does not bring the usage back
  under the size is said in a warning and not repeated until the volume falls below it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

from corral._core import DiskUsage, disk_usage
from corral.engine.hooks import Hook
from corral.engine.running import Running
from corral.engine.stack import Stack
from corral.exceptions import CorralError
from corral.spec.service import StorageSpec
from corral.storageusage import StorageUsage
from corral.units import format_bytes

__all__ = ["MAX_ENTRIES", "StorageActions", "StorageWatch"]

log = logging.getLogger("corral")

MAX_ENTRIES = 2_000_000
"""The most entries one measurement walks (about a second and a half on a warm cache): past
it the usage shown is a lower bound, marked so."""


class StorageActions(Protocol):
    """What the watch may do to a service at its limit."""

    async def stop_service(self, service: str, reason: str = ...) -> list[str]:
        """Stops the service; returns its dependents."""

    async def restart(self, service: str, reason: str = ...) -> None:
        """Restarts the service's replicas."""


class StorageWatch(Hook):
    """See the module docs."""

    name = "storage"

    def __init__(self, running: Running, actions: StorageActions) -> None:
        self.running = running
        self.actions = actions
        self._stack: Stack | None = None
        self._task: asyncio.Task[None] | None = None
        self._next: dict[str, float] = {}
        self._restarted: dict[str, bool] = {}
        """Services restarted at this passing of their size (not again until under it), and
        whether the warning that it did not help was said."""
        self._acting: dict[str, asyncio.Task[None]] = {}

    def _specs(self) -> dict[str, tuple[StorageSpec, Path]]:
        out = {}
        for name, svc in self.running.spec.services.items():
            st = svc.resources.storage
            path = self.running.volumes.get(name)
            if st is not None and path is not None:
                out[name] = (st, path)
        return out

    def prerun(self, stack: Stack) -> list[str]:
        """Measures every volume once, now (a volume already past its size is said at once),
        and starts the periodic watch."""
        self._stack = stack
        warnings = []
        for name, (st, path) in self._specs().items():
            u = self._record(name, st, path, self._walk(path))
            if u.used is not None and u.used > u.size:
                warnings.append(f"volume {st.path} of {name} already holds {format_bytes(u.used)}, more than its "
                                f"size {format_bytes(u.size)} (on_full: {st.on_full})")
                u.level = 100
            self._next[name] = time.monotonic() + st.period
        stack.journal.storage(stack.storage)
        with contextlib.suppress(RuntimeError):  # no loop: measured once, not watched
            self._task = asyncio.get_running_loop().create_task(self._run(), name="corral-storage")
        return warnings

    def stopping(self, stack: Stack) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for task in self._acting.values():
            task.cancel()

    def postrun(self, stack: Stack) -> None:
        self.stopping(stack)

    # --- the watch ---------------------------------------------------------------------

    async def _run(self) -> None:
        stack = self._stack
        assert stack is not None
        while not stack.down:
            specs = self._specs()
            now = time.monotonic()
            for name in [n for n in specs if self._next.setdefault(n, now) <= now]:
                st, path = specs[name]
                try:
                    got = await asyncio.to_thread(self._walk, path)
                    await self._judge(stack, name, st, self._record(name, st, path, got))
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # one volume's trouble never ends the watch
                    log.warning("corral: storage watch of %s: %s", name, e)
                self._next[name] = time.monotonic() + st.period
            for gone in set(stack.storage) - set(specs):
                del stack.storage[gone]
            stack.journal.storage(stack.storage)
            wait = min((t for n, t in self._next.items() if n in specs), default=now + 10.0) - time.monotonic()
            await asyncio.sleep(max(wait, 0.05))

    @staticmethod
    def _walk(path: Path) -> tuple[DiskUsage | None, float, str]:
        t0 = time.perf_counter()
        try:
            return disk_usage(path, MAX_ENTRIES), time.perf_counter() - t0, ""
        except (OSError, CorralError) as e:
            return None, time.perf_counter() - t0, str(e)

    def _record(self, name: str, st: StorageSpec, path: Path,
                got: tuple[DiskUsage | None, float, str]) -> StorageUsage:
        stack = self._stack
        assert stack is not None
        du, seconds, problem = got
        before = stack.storage.get(name)
        u = StorageUsage(name, st.path, int(st.size), st.enforce, st.on_full, level=before.level if before else 0)
        u.seconds = seconds
        if du is not None:
            u.used, u.inodes, u.truncated, u.measured_at = du.bytes, du.inodes, du.truncated, time.time()
        elif before is not None:  # keep what was last seen; say why it is old
            u.used, u.inodes, u.truncated, u.measured_at = before.used, before.inodes, before.truncated, \
                before.measured_at
            log.warning("corral: measuring %s of %s: %s", path, name, problem)
        stack.storage[name] = u
        return u

    async def _judge(self, stack: Stack, name: str, st: StorageSpec, u: StorageUsage) -> None:
        if u.used is None:
            return
        level = 100 if u.used > u.size else 80 if u.used >= 0.8 * u.size else 0
        said = f"{format_bytes(u.used)} of {format_bytes(u.size)} in {st.path}"
        if level > u.level:
            stack.journal.note(u.full_reason() if level == 100 else f"storage at {u.percent:.0f}%: {said}",
                               service=name)
        elif level < u.level:
            stack.journal.note(f"storage back under {'its size' if u.level == 100 else '80%'}: {said}",
                               service=name)
        passed = level == 100 and u.level < 100
        u.level = level
        if level < 100:
            self._restarted.pop(name, None)
            return
        if st.on_full == "stop" and any(i.state.alive for i in stack.by_service.get(name, [])):
            self._act(name, lambda: self.actions.stop_service(name, u.full_reason()))
        elif st.on_full == "restart":
            if passed:
                self._restarted[name] = False
                self._act(name, lambda: self.actions.restart(name, u.full_reason()))
            elif self._restarted.get(name) is False:
                self._restarted[name] = True  # said once, until the next passing
                stack.warn(f"{name} was restarted at its storage limit and its volume is still full ({said}); "
                           f"not restarting it again until it falls below its size")

    def _act(self, name: str, call: Callable[[], Awaitable[object]]) -> None:
        """Runs an action beside the watch (a rolling restart takes a while), one at a time
        per service."""
        if name in self._acting:
            return
        self._acting[name] = asyncio.get_running_loop().create_task(self._acting_on(name, call))

    async def _acting_on(self, name: str, call: Callable[[], Awaitable[object]]) -> None:
        try:
            await call()
        except CorralError as e:
            log.warning("corral: storage action on %s: %s", name, e)
        finally:
            self._acting.pop(name, None)
