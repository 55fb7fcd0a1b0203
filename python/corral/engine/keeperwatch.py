"""The keeper's death, noticed at once: the agent of ``up -d`` watches its keeper (its
parent) through a pidfd. When the keeper dies, the instances' output pipes lose their
reader and the fronts it held are gone, so: the fronts listen again in the agent at once
(with the upstreams they had), later spawns log through the agent itself (the supervisor drops the keeper),
``status`` and the event log say what happened, and the instances started before, whose
output nobody reads any more, are restarted one service at a time (a rolling restart, each
replica waited for), so that none is left writing into a dead pipe. A part of
:class:`~corral.engine.deployment.Deployment`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from corral.exceptions import CorralError

if TYPE_CHECKING:
    from corral.engine.journal import Journal
    from corral.engine.stack import Stack

__all__ = ["KeeperWatch"]


class KeeperWatch:
    """See the module docs; ``restart`` is the deployment's rolling restart of a service,
    ``rehome`` binds the keeper's fronts here (returning what could not be)."""

    def __init__(self, stack: Stack, journal: Journal, restart: Callable[[str], Awaitable[None]],
                 rehome: Callable[[], list[str]]) -> None:
        self.stack = stack
        self.journal = journal
        self.restart = restart
        self.rehome = rehome
        self.task: asyncio.Task[None] | None = None

    def start(self, pid: int) -> None:
        """Watches the keeper ``pid``, this agent's parent. A keeper that died before the watch
        began (no such process, or this agent was handed to another parent: the pid may be
        someone else's by now) is noticed here, as a death seen later would be."""
        loop = asyncio.get_running_loop()
        try:
            fd: int | None = os.pidfd_open(pid)
        except OSError:
            fd = None
        # With the pidfd held the pid cannot be reused: our parent still being it means the
        # pidfd is the keeper's.
        if fd is None or os.getppid() != pid:
            if fd is not None:
                os.close(fd)
            if not self.stack.down:
                self.task = loop.create_task(self._after(pid), name="corral-keeper-died")
            return

        def died() -> None:
            loop.remove_reader(fd)
            os.close(fd)
            if not self.stack.down:
                self.task = loop.create_task(self._after(pid), name="corral-keeper-died")

        loop.add_reader(fd, died)

    async def _after(self, pid: int) -> None:
        stack, sup = self.stack, self.stack.supervisor
        for problem in self.rehome():
            stack.warn(problem)
        if sup is not None:
            sup.drop_keeper(f"the keeper (pid {pid}) died")
        services = sorted({i.p.service for i in stack.instances.values() if i.live_process is not None})
        when = time.strftime("%H:%M:%S")
        what = (f"the keeper (pid {pid}) died at {when}: output now goes through the agent; "
                + (f"restarting {', '.join(services)} one replica at a time, whose output had no reader any more"
                   if services else "no instance ran"))
        stack.warn(what)
        self.journal.status(self.journal.row.status, what)
        for name in services:
            if stack.down:
                return
            with contextlib.suppress(CorralError):
                await self.restart(name)
        self.journal.status(self.journal.row.status, f"the keeper (pid {pid}) died at {when}; output goes "
                                                     f"through the agent (restarted: {', '.join(services) or '-'})")
