"""The one event pump: process exits and probe verdicts become transitions.

A single asyncio task drains the supervisor's queue (``next_event`` then everything already
queued), so a quiet deployment costs the interpreter nothing. Exits go to the restart
strategy, which says restart (after a delay), complete, or fail.
"""

from __future__ import annotations

import asyncio
import logging
import signal as signals
import time

from corral._core import Instance, ProbeVerdict, ProcessExited, Supervisor, group_alive, signal_group
from corral.engine.instance import InstanceRuntime
from corral.engine.launch import Launcher
from corral.engine.metrics import Counters
from corral.engine.stack import Stack
from corral.leftovers import recorded_exit
from corral.lifecycle import State
from corral.recovery import Decision, Exit, RestartStrategy

__all__ = ["Verdicts"]

log = logging.getLogger("corral")


class Verdicts:
    """Turns what the supervisor reports into transitions of a stack's instances."""

    def __init__(self, stack: Stack, launcher: Launcher, restart_strategy: RestartStrategy) -> None:
        self.stack = stack
        self.launcher = launcher
        self.restart_strategy = restart_strategy
        self.counters = Counters()
        """What metrics count beside the instances' own fields."""

    async def pump(self, sup: Supervisor) -> None:
        """Runs until the supervisor is gone (or the task is cancelled)."""
        while True:
            ev = await sup.next_event()
            if ev is None:
                return
            for e in (ev, *sup.drain()):
                try:
                    if isinstance(e, ProcessExited):
                        self.exited(e)
                    else:
                        self.verdict(e)
                except Exception:
                    log.exception("corral: error handling %r", e)

    # --- exits ----------------------------------------------------------------------

    def recorded_exit(self, pid: int) -> int | None:
        """How a process that is not ours ended, as the keeper recorded it."""
        return recorded_exit(self.stack.state_dir, pid)

    def exited(self, ev: ProcessExited, tries: int = 0) -> None:
        """A process ended: a stop completes, anything else goes to the restart strategy."""
        inst = self.stack.instances.get(ev.id)
        proc = inst.proc if inst is not None else None
        if inst is None or proc is None or ev.pid != proc.pid:
            return
        code, sig = ev.code, ev.signal
        if proc.adopted and code is None and sig is None:
            # Re-adopted: its parent is the keeper, which reaps it and records the status a
            # moment later; wait for that a little (then: status unknown).
            status = self.recorded_exit(ev.pid)
            if status is None and tries < 20:
                asyncio.get_running_loop().call_later(0.05, self.exited, ev, tries + 1)
                return
            if status is not None:
                code, sig = (status, None) if status >= 0 else (None, -status)
        if self.stack.supervisor is not None:
            self.stack.supervisor.stop_health(inst.id)
        proc.exited.set()
        inst.exit_code = code if code is not None else (-sig if sig else None)
        # Nothing of the instance may outlive its leader: its helpers would hold ports.
        if group_alive(proc.pid):
            signal_group(proc.pid, signals.SIGKILL)
        if not self.stack.down:
            # Nor anything that left the group (a setsid daemon); down sweeps once, at its end.
            self.launcher.sweep(inst)
        if inst.state is State.STOPPING:
            inst.reason = inst.reason or "stopped"  # why it was stopped (set by the stop)
            inst.life.to(State.STOPPED, _exit_text(ev.pid, code, sig))
            self.stack.registry.deregister(inst.id)
            return
        now = time.monotonic()
        self.on_exit(inst, Exit(inst.id, inst.p.service, code, sig,
                                proc.kill_cause or "exit",
                                now - proc.started_at, now - inst.healthy_since if inst.healthy_since else 0.0,
                                proc.kill_detail))

    def on_exit(self, inst: InstanceRuntime, exit: Exit) -> None:
        """An instance's process ended, or never started: restart, complete or fail."""
        self.stack.registry.deregister(inst.id)
        inst.healthy_since = None
        inst.exit_text = exit.describe()
        decision: Decision = Decision("fail", reason=exit.describe()) if self.stack.down else \
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

    def _restart_now(self, inst: InstanceRuntime) -> None:
        if inst.state is State.RESTARTING and not self.stack.down:
            self.launcher.start([inst], f"restart {inst.restarts}")

    # --- probes ---------------------------------------------------------------------

    def verdict(self, ev: ProbeVerdict) -> None:
        """A probe changed its mind: healthy, unhealthy, or the process must end."""
        inst = self.stack.instances.get(ev.id)
        if inst is None or not inst.state.alive or inst.state is State.STOPPING:
            return
        proc = inst.live_process
        if proc is not None and proc.kill_cause:
            return
        msg = ev.message
        if not ev.ok:
            inst.probe_message = f"{ev.probe} probe failed: {msg}"
        if ev.probe == "startup":
            if not ev.ok:
                self.launcher.terminate(inst, "startup", msg)
            elif inst.svc.health.readiness is None:
                self.healthy(inst, f"startup probe passed: {msg}")
            else:
                self.stack.journal.note(f"startup probe passed: {msg}", instance=inst.id, service=inst.p.service)
        elif ev.probe == "readiness":
            if ev.ok:
                self.healthy(inst, f"readiness probe passed: {msg}")
            elif inst.state is not State.RUNNING:
                self.unhealthy(inst, f"readiness probe failed: {msg}")
            # Not ready from the start: it stays running; why is kept in probe_message.
        elif ev.probe == "liveness" and not ev.ok:
            self.launcher.terminate(inst, "liveness", msg)

    def healthy(self, inst: InstanceRuntime, reason: str) -> None:
        """Healthy: registered for discovery (or marked healthy again)."""
        if inst.state is State.HEALTHY:
            return
        inst.life.to(State.HEALTHY, reason)
        inst.healthy_since = time.monotonic()
        reg = self.stack.registry
        if not reg.set_health(inst.id, True):
            meta = {f"port.{k}": str(v) for k, v in inst.p.ports.items()}
            reg.register(Instance(service=inst.p.service, id=inst.id, host=self.stack.host,
                                  port=inst.main_port or 0, meta=meta))

    def unhealthy(self, inst: InstanceRuntime, reason: str) -> None:
        """Not ready: out of its front and discovery until its probe passes again."""
        if inst.state in (State.RUNNING, State.HEALTHY):
            inst.life.to(State.UNHEALTHY, reason)
            inst.healthy_since = None
            self.stack.registry.set_health(inst.id, False)


def _exit_text(pid: int, code: int | None, sig: int | None) -> str:
    if sig is not None:
        return f"pid {pid} ended by signal {sig}"
    if code is None:
        return f"pid {pid} ended (status unknown: not our child)"
    return f"pid {pid} exited with status {code}"
