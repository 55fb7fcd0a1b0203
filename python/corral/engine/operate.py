"""Changes to one service of a running stack, each one at a time (the deployment's change
lock): a rolling restart, scaling, stopping and starting; and signals to its processes. A part of
:class:`~corral.engine.deployment.Deployment`, handed what runs and the collaborators that
start, stop and record instances."""

from __future__ import annotations

import asyncio
import signal as signals
from typing import TYPE_CHECKING

from corral._core import kill_pid
from corral.exceptions import ConfigError, CorralError, DeploymentError, UnknownService

if TYPE_CHECKING:
    from corral.engine.fleet import Fleet
    from corral.engine.instance import InstanceRuntime
    from corral.engine.journal import Journal
    from corral.engine.running import Running
    from corral.engine.stack import Stack

__all__ = ["ServiceOps", "parse_signal"]


class ServiceOps:
    """See the module docs."""

    def __init__(self, running: Running, *, stack: Stack, fleet: Fleet, journal: Journal,
                 changing: asyncio.Lock) -> None:
        self.running = running
        self.stack = stack
        self.fleet = fleet
        self.journal = journal
        self.changing = changing

    async def restart(self, service: str, reason: str = "restart requested") -> None:
        """Restarts the replicas of ``service`` one after the other, each waited for until it
        meets its condition again (a rolling restart). A replica that does not come back
        (failed, or not up within its ``start_timeout``) stops the rollout: raises
        :class:`~corral.exceptions.DeploymentError` naming it and why; the replicas after it
        are not touched."""
        async with self.changing:
            with self.stack.tracing.operation("restart", service=service):
                replicas = list(self._service(service))
                for done, inst in enumerate(replicas):
                    await self.fleet.stop(inst, reason)
                    inst.restarts += 1
                    self.fleet.start([inst], reason)
                    failed = await self.fleet.first_not_up([inst], inst.svc.start_timeout)
                    if failed is not None:
                        # The rest keep running the old way: a rollout that fails stops where it failed.
                        self.journal.flush()
                        raise DeploymentError(f"restart of {service} stopped at {inst.id}: it is {inst.state.value} "
                                              f"({failed[1]}); {done} of {len(replicas)} replicas restarted, the "
                                              f"others left as they were")
                self.journal.flush()

    def _service(self, name: str) -> list[InstanceRuntime]:
        if name not in self.running.spec.services:
            raise UnknownService(f"unknown service {name!r} (services: {', '.join(self.running.spec.services)})", name)
        if self.running.plan is None or self.stack.down:
            raise CorralError(f"deployment {self.running.spec.name!r} is not running")
        return self.stack.by_service[name]

    async def scale(self, service: str, replicas: int) -> None:
        """Runs ``replicas`` instances of ``service``. New ones are placed through the ledgers
        (all or none: :class:`~corral.exceptions.ConfigError` naming what is short, and
        nothing changes), started, probed, registered and put behind the front; the call
        returns once they meet their condition (:class:`DeploymentError`, with the new ones
        stopped again, when they do not). Scaling down drains and stops the highest-numbered
        instances first, and returns their resources and ports. The count holds until the
        next apply, where the spec's wins."""
        async with self.changing:
            with self.stack.tracing.operation("scale", service=service, replicas=replicas):
                insts = self._service(service)
                if not 0 <= replicas <= 10000:
                    raise ConfigError(f"replicas: {replicas} is not from 0 to 10000")
                svc = self.running.spec.services[service]
                have = len(insts)
                if replicas > have:
                    if replicas > 1 and any(p != "auto" for p in svc.ports.values()):
                        raise ConfigError(f"{service} has a fixed port: it cannot run {replicas} replicas")
                    taken = {i.p.index for i in insts}
                    free = [i for i in range(replicas + have) if i not in taken][:replicas - have]
                    try:
                        new = self.fleet.place(service, svc, self.running.slots(service, free),
                                               self.running.versions[service])
                    except ConfigError as e:
                        raise ConfigError(f"cannot scale {service} to {replicas}: {e}") from None
                    self.journal.note(f"scale {service}: {have} -> {replicas}")
                    self.fleet.start(new, f"scaled to {replicas}")
                    failed = await self.fleet.first_not_up(new, svc.start_timeout)
                    if failed is not None:
                        bad, why = failed
                        await self.fleet.retire(new, f"scale-up failed: {why}")
                        raise DeploymentError(f"scale {service} to {replicas}: {bad.id} is {bad.state.value} ({why}); "
                                              f"the new instances were stopped again")
                elif replicas < have:
                    self.journal.note(f"scale {service}: {have} -> {replicas}")
                    await self.fleet.shrink(service, replicas, f"scaled to {replicas}")
                self.journal.flush()

    async def stop_service(self, service: str, reason: str = "stopped by request") -> list[str]:
        """Stops every instance of ``service`` by its shutdown rule; it stays in the stack,
        ``stopped``, keeping its placement, until :meth:`start_service`. Dependents keep
        running: their names come back (as compose warns about them)."""
        async with self.changing:
            insts = self._service(service)
            await asyncio.gather(*(self.fleet.stop(i, reason) for i in insts))
            dependents = [n for n, s in self.running.spec.services.items() if service in s.depends_on]
            if dependents:
                self.stack.warn(f"{service} stopped; {', '.join(dependents)} depend on it and keep running")
            self.journal.flush()
            return dependents

    async def start_service(self, service: str) -> None:
        """Starts the stopped (or failed, or completed) instances of ``service`` and returns
        once they meet their condition (:class:`DeploymentError` naming the first that
        does not)."""
        async with self.changing:
            insts = self._service(service)
            todo = [i for i in insts if i.state.terminal]
            self.fleet.start(todo, "started by request")
            failed = await self.fleet.first_not_up(todo, self.running.spec.services[service].start_timeout)
            self.journal.flush()
            if failed is not None:
                bad, why = failed
                raise DeploymentError(f"start {service}: {bad.id} is {bad.state.value} ({why})")

    def signal(self, service: str, name: str | None = None) -> list[str]:
        """Sends signal ``name`` (``SIGUSR1``, ``USR1`` or a number; None: the service's
        ``reload_signal``, as ``systemctl reload`` signals ``$MAINPID``) to the main process
        of each live instance of ``service``, as ``docker compose kill -s`` does. Returns
        the instances signalled; :class:`ConfigError` for a signal that does not exist."""
        insts = self._service(service)
        sig = parse_signal(name or self.running.spec.services[service].reload_signal)
        done = []
        for inst in insts:
            proc = inst.live_process
            if inst.state.alive and proc is not None and kill_pid(proc.pid, sig):
                done.append(inst.id)
        self.journal.note(f"{'reload' if name is None else 'kill -s ' + signals.Signals(sig).name} {service}: "
                          f"{', '.join(done) or 'no live instance'}", service=service)
        return done


def parse_signal(name: str) -> int:
    """``SIGHUP``, ``HUP``, ``hup`` or ``1`` as a signal number; :class:`ConfigError` else."""
    text = name.strip().upper()
    try:
        sig = signals.Signals(int(text)) if text.isdigit() else signals.Signals[
            text if text.startswith("SIG") else "SIG" + text]
    except (KeyError, ValueError):
        raise ConfigError(f"unknown signal {name!r} (SIGHUP, SIGUSR1, HUP, 10, ...)") from None
    return int(sig)
