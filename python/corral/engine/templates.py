"""Config templates at run time, as Nomad's ``template`` block and consul-template do:
each instance's files rendered into its own directory before it starts, and rendered again
whenever their text would change, with the service's ``on_change`` then.

The directory is ``.corral/instances/ID/`` (0700, the service's user's), named
``${instance.dir}`` in the command, env and exec probes. What a template sees is in
:mod:`corral.templates`; here is when it is rendered:

- before each spawn (a failure is the spawn's: the instance does not start, and why is
  its reason);
- when a dependency's healthy set changes (an instance of it became healthy, or stopped
  being so), a moment later (changes within 50 ms are one), for every live instance of
  the services that depend on it and have templates. A file whose text changed is
  replaced by a rename; then ``restart`` restarts the service rolling (once, whatever
  changed), ``reload`` sends its ``reload_signal`` to each changed instance's main process
  (as ``systemctl reload`` sends ``$MAINPID`` SIGHUP), ``none`` does nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal as signals
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from corral.engine.hooks import Hook
from corral.engine.instance import InstanceRuntime
from corral.engine.running import Running
from corral.engine.stack import Stack
from corral.exceptions import CorralError
from corral.identity import credentials
from corral.lifecycle import State, Transition
from corral.statedir import instance_dir
from corral.templates import TemplateError, render, write_atomically

__all__ = ["TemplateActions", "Templates"]

log = logging.getLogger("corral")

_DEBOUNCE = 0.05


class TemplateActions(Protocol):
    """What a changed file may set off."""

    async def restart(self, service: str, reason: str = ...) -> None:
        """Restarts the service's replicas, rolling."""


class Templates(Hook):
    """See the module docs."""

    name = "templates"

    def __init__(self, running: Running, stack: Stack) -> None:
        self.running = running
        self.stack = stack
        self.actions: TemplateActions | None = None
        self.environment: Callable[[InstanceRuntime], list[tuple[str, str]]] | None = None
        """The instance's environment now (the launcher's), for a render after the start."""
        self._pending: set[str] = set()
        self._handle: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def wire(self, environment: Callable[[InstanceRuntime], list[tuple[str, str]]],
             actions: TemplateActions) -> None:
        """What it needs once the start is done, from parts made after it (the launcher
        needs it first)."""
        self.environment, self.actions = environment, actions

    # --- before a spawn ------------------------------------------------------------------

    def prepare(self, inst: InstanceRuntime, env: list[tuple[str, str]]) -> None:
        """The instance's directory, and its files rendered for this start (raises
        :class:`~corral.templates.TemplateError` or ``OSError``)."""
        if inst.svc.templates:
            self._render(inst, env)
        elif inst.svc.mentions_instance_dir():
            self.directory(inst)

    def directory(self, inst: InstanceRuntime) -> Path:
        """The instance's directory, made (0700, the service's user's) if missing."""
        d = instance_dir(self.stack.state_dir, inst.id)
        if not d.is_dir():
            d.parent.mkdir(mode=0o700, exist_ok=True)
            d.mkdir(mode=0o700, exist_ok=True)
            uid, gid, _, _ = credentials(inst.svc.user, inst.svc.group)
            if uid is not None or gid is not None:
                os.chown(d, -1 if uid is None else uid, -1 if gid is None else gid)
                for up in (d.parent, self.stack.state_dir):
                    os.chmod(up, 0o711)  # enter, not list: it reaches its own directory only
        return d

    def _context(self, inst: InstanceRuntime, env: list[tuple[str, str]]) -> dict[str, Any]:
        stack = self.stack
        deps: dict[str, list[dict[str, Any]]] = {}
        for dep in inst.svc.depends_on:
            deps[dep] = [{"id": d.id, "host": stack.host, "port": d.main_port, "ports": dict(d.p.ports),
                          "address": f"{stack.host}:{d.main_port}"}
                         for d in sorted(stack.by_service.get(dep, []), key=lambda i: i.p.index)
                         if d.state is State.HEALTHY and d.main_port is not None]
        return {"ports": dict(inst.p.ports), "env": dict(env), "deps": deps,
                "instance": {"id": inst.id, "index": inst.p.index, "service": inst.p.service,
                             "dir": str(instance_dir(stack.state_dir, inst.id))}}

    def _render(self, inst: InstanceRuntime, env: list[tuple[str, str]]) -> list[str]:
        """Renders every template of the instance; returns the ``on_change`` of those whose
        file changed."""
        d = self.directory(inst)
        context = self._context(inst, env)
        uid, gid, _, _ = credentials(inst.svc.user, inst.svc.group)
        changed: list[str] = []
        for t in inst.svc.templates:
            text = render(self.stack.base / t.source, context, t.source)
            dest = d / t.destination
            dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if write_atomically(dest, text, uid, gid):
                changed.append(t.on_change)
        return changed

    # --- after: the healthy sets of dependencies -----------------------------------------

    def prerun(self, stack: Stack) -> list[str]:
        stack.listeners.append(self._heard)
        return []

    def stopping(self, stack: Stack) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        for task in self._tasks:
            task.cancel()

    def _heard(self, t: Transition) -> None:
        if self.stack.down or (t.old is not State.HEALTHY and t.new is not State.HEALTHY):
            return
        for name, svc in self.running.spec.services.items():
            if svc.templates and t.service in svc.depends_on:
                self._pending.add(name)
        if self._pending and self._handle is None:
            with contextlib.suppress(RuntimeError):
                self._handle = asyncio.get_running_loop().call_later(_DEBOUNCE, self._fire)

    def _fire(self) -> None:
        self._handle = None
        services, self._pending = sorted(self._pending), set()
        task = asyncio.get_running_loop().create_task(self._again(services), name="corral-templates")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _again(self, services: list[str]) -> None:
        for name in services:
            restart = False
            for inst in list(self.stack.by_service.get(name, [])):
                proc = inst.live_process
                if proc is None or inst.state is State.STOPPING or self.environment is None:
                    continue
                try:
                    changed = self._render(inst, self.environment(inst))
                except (TemplateError, OSError) as e:
                    self.stack.warn(f"re-rendering the templates of {inst.id} failed; it keeps its files: {e}")
                    continue
                if not changed:
                    continue
                self.stack.journal.note(f"templates re-rendered ({', '.join(sorted(set(changed)))})",
                                        instance=inst.id, service=name)
                if "restart" in changed:
                    restart = True
                elif "reload" in changed:
                    sig = signals.Signals[inst.svc.reload_signal]
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, sig)
            if restart and self.actions is not None:
                try:
                    await self.actions.restart(name, "its templates changed")
                except CorralError as e:
                    log.warning("corral: restart of %s after its templates changed: %s", name, e)


