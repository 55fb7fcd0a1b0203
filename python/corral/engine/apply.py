"""Apply: a changed spec on a running stack (see :mod:`corral.engine.diff` for what counts as
a change, :mod:`corral.engine.rollout` for the rolling replace). A part of
:class:`~corral.engine.deployment.Deployment`, handed the collaborators it uses: the fleet
to place and retire instances, the fronts and mesh hooks to change in place, the journal
to record each spec version."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.engine.diff import FRONT_FIELDS, SpecDiff, diff_specs, effective
from corral.engine.instance import InstanceRuntime
from corral.engine.rollout import Replaced, RollFailed, revert, roll
from corral.engine.tracing import Tracing, endpoint_from
from corral.exceptions import ConfigError, CorralError, RolloutError
from corral.lifecycle import State
from corral.recovery import BackoffRestart
from corral.scheduler import check_fit, phases, volume_paths
from corral.spec import DeploymentSpec

if TYPE_CHECKING:
    from corral._core import Topology
    from corral.engine.fleet import Fleet
    from corral.engine.hooks import FrontsHook, MeshHook, VolumesHook
    from corral.engine.journal import Journal
    from corral.engine.launch import Launcher
    from corral.engine.running import Running
    from corral.engine.stack import Stack
    from corral.engine.verdicts import Verdicts
    from corral.machine import Claims, Machine
    from corral.scheduler import Scheduler

__all__ = ["Applier"]


class Applier:
    """``plan_changes`` and ``apply`` of a deployment, handed what they may touch: what runs
    (``running``, which an apply changes), the collaborators that place, start, retire and
    record instances, the hooks that change in place, the machine a change must fit, and
    the lock that keeps changes one at a time."""

    def __init__(self, running: Running, *, state_dir: Path, topology: Topology, machine: Machine, stack: Stack,
                 fleet: Fleet, scheduler: Scheduler, claims: Claims, journal: Journal, verdicts: Verdicts,
                 launcher: Launcher, volumes: VolumesHook, mesh: MeshHook, fronts: FrontsHook,
                 changing: asyncio.Lock) -> None:
        self.running = running
        self.state_dir = state_dir
        self.topology = topology
        self.machine = machine
        self.stack = stack
        self.fleet = fleet
        self.scheduler = scheduler
        self.claims = claims
        self.journal = journal
        self.verdicts = verdicts
        self.launcher = launcher
        self.vols = volumes
        self.mesh = mesh
        self.fronts = fronts
        self.changing = changing

    # --- apply: a changed spec on the running stack ----------------------------------------

    def plan_changes(self, spec: DeploymentSpec) -> SpecDiff:
        """What :meth:`apply` would do with ``spec``, nothing changed: the diff per service,
        which replaced services fall back to stop-first (a trial placement of one extra
        instance on the live ledgers), which dependents keep stale addresses. Raises the
        :class:`~corral.exceptions.SpecError` of a change that cannot be made or does not
        fit this machine."""
        if self.running.plan is None or self.stack.down:
            raise CorralError(f"deployment {self.running.spec.name!r} is not running")
        base = self.running.file.resolve().parent
        running = {n: len(i) for n, i in self.stack.by_service.items() if n in self.running.spec.services}
        diff = diff_specs(self.running.spec, self.running.configs, spec, base, running)
        diff.version = self.journal.row.version
        check_fit(spec, base, self.topology, machine=self.machine, state_dir=self.state_dir)
        volumes = volume_paths(spec, base)
        with self.claims.reserving(dry=True):  # trials: nothing is claimed
            for c in diff.changed:
                if c.change != "replace" or c.order != "start-first" or c.replicas[0] == 0:
                    continue
                svc = spec.services[c.name]
                if volumes.get(c.name) != self.running.volumes.get(c.name):
                    continue  # a new volume: the ledger learns of it at apply
                try:
                    trial = self.scheduler.place_one(c.name, 0, svc, volumes.get(c.name), iid=f"{c.name}-surge")
                except CorralError as e:
                    c.fallback, c.order = str(e), "stop-first"
                else:
                    self.scheduler.release_one(trial)
        return diff

    async def apply(self, spec: DeploymentSpec, file: str | Path | None = None) -> SpecDiff:
        """Makes the running stack what ``spec`` says, changing only what changed (see
        :mod:`corral.engine.diff`): unchanged services keep their processes, front changes
        apply in place, replaced services roll by their ``update:`` block, new services
        start in dependency order, removed ones stop. A spec that cannot be applied or does
        not fit raises its :class:`~corral.exceptions.SpecError` (or
        :class:`~corral.exceptions.ConfigError`) with nothing changed. A rollout that fails
        raises :class:`~corral.exceptions.RolloutError` naming the service, the instance
        and why; with ``auto_revert`` (the default) everything this apply changed is rolled
        back first, and the running spec stays the previous one. Returns the diff applied."""
        async with self.changing:
            diff = self.plan_changes(spec)
            if diff.empty:
                self.journal.note("apply: no changes")
                return diff
            version = self.journal.next_version()
            with self.stack.tracing.operation("apply", deployment=self.running.spec.name, version=version,
                                               changes=diff.lines()):
                await self._apply(spec, file, diff, version)
            self._retrace()
            return diff

    async def _apply(self, spec: DeploymentSpec, file: str | Path | None, diff: SpecDiff, version: int) -> None:
        self.journal.spec(version, diff.digest, spec.text, "applying")
        self.journal.note(f"apply v{version}: " + "; ".join(diff.lines()))
        run = self.running
        old, old_file, old_versions, old_configs = run.spec, run.file, dict(run.versions), dict(run.configs)
        added = self._place_added(spec, diff, version)  # all or none: nothing has changed yet
        self._switch(spec, Path(file) if file is not None else self.running.file)
        done: dict[str, list[Replaced]] = {}
        try:
            await self._carry_out(diff, spec, version, added, done)
        except RollFailed as e:
            service = e.service
            svc = spec.services[service]
            why = f"apply v{version} failed at {e.instance} ({service}): {e.reason}"
            self.journal.note(why, service=service)
            reverted = svc.update.auto_revert
            if reverted:
                with self.stack.tracing.span("revert", reason=why):
                    await self._revert(diff, done, added, old, old_file, old_versions, old_configs, why)
            self.journal.spec(version, diff.digest, spec.text, "failed" if reverted else "partial", why)
            self.verdicts.counters.rollout("reverted" if reverted else "partial")
            self.journal.flush()
            tail = ("; reverted: the previous version runs" if reverted else
                    "; auto_revert is off: what was replaced stays replaced")
            raise RolloutError(why + tail, service, e.instance, e.reason, reverted) from None
        for c in diff.changed:
            if c.change in ("replace", "scale") and c.replicas[1] < c.replicas[0]:
                await self.fleet.shrink(c.name, c.replicas[1], f"apply v{version}: {c.name} scaled to "
                                                                f"{c.replicas[1]}")
        for c in reversed(diff.services):
            if c.change == "removed":
                await self._remove(c.name, version)
        assert self.running.plan is not None
        self.running.plan.phases = phases(spec)
        self.journal.row.phases = self.running.plan.phases
        self.journal.spec(version, diff.digest, spec.text, "applied")
        self.verdicts.counters.rollout("succeeded")
        self.journal.status("up", "", event=("up", f"apply v{version} done"))
        self.journal.flush()

    def _retrace(self) -> None:
        """A changed ``tracing`` block takes effect from the next operation on."""
        want = endpoint_from(self.running.spec.tracing.otlp if self.running.spec.tracing else None)
        if want != self.stack.tracing.endpoint:
            self.stack.tracing.close()
            self.stack.tracing = Tracing(want, self.running.spec.name)
            if self.stack.tracing.problem:
                self.stack.warn(self.stack.tracing.problem)

    def _place_added(self, spec: DeploymentSpec, diff: SpecDiff, version: int) -> dict[str, list[InstanceRuntime]]:
        """Places the new services' instances and the scale-ups, all or none: the
        :class:`SpecError` of the service that does not fit, everything given back."""
        added: dict[str, list[InstanceRuntime]] = {}
        volumes = volume_paths(spec, self.running.file.resolve().parent)
        with self.claims.reserving():  # one reservation on the machine for all of them
            self._place_each(spec, diff, version, volumes, added)
        return added

    def _place_each(self, spec: DeploymentSpec, diff: SpecDiff, version: int, volumes: dict[str, Path],
                    added: dict[str, list[InstanceRuntime]]) -> None:
        for c in diff.changed:
            if not (c.change == "added" or (c.change == "scale" and c.replicas[1] > c.replicas[0])):
                continue
            have = self.stack.by_service.get(c.name, [])
            taken = {i.p.index for i in have}
            free = [i for i in range(c.replicas[1] + len(taken)) if i not in taken][:c.replicas[1] - len(have)]
            try:
                if c.change == "added":
                    self.vols.add(self.stack, {c.name: volumes[c.name]} if c.name in volumes else {}, spec)
                    slots, ver = [(i, f"{c.name}-{i}") for i in free], version
                else:
                    slots, ver = self.running.slots(c.name, free), self.running.versions[c.name]
                added[c.name] = self.fleet.place(c.name, spec.services[c.name], slots, ver)
            except (ConfigError, OSError) as e:
                for insts in added.values():
                    for inst in insts:
                        inst.life.to(State.STOPPED, "apply refused")
                        self.fleet.forget(inst)
                for name in added:
                    if diff.get(name).change == "added":
                        self.stack.by_service.pop(name, None)
                raise spec.error(("services", c.name, "resources"), f"does not fit now: {e}") from None

    def _switch(self, spec: DeploymentSpec, file: Path) -> None:
        """The deployment follows ``spec`` from here: fronts, mesh, volumes, restart rules,
        logs and events settings; instances keep the configuration they were started with."""
        old = self.running.spec
        self.running.spec = self.stack.spec = spec
        self.running.file = file
        base = file.resolve().parent
        self.vols.add(self.stack, volume_paths(spec, base))
        if any(s.mtls for s in spec.services.values()):
            self.mesh.extend(self.stack)
        for name, svc in spec.services.items():
            self.stack.by_service.setdefault(name, [])
            if isinstance(self.verdicts.restart_strategy, BackoffRestart):
                self.verdicts.restart_strategy.set_rule(name, svc.restart)
            before = old.services.get(name)
            if before is None or any(getattr(before, f) != getattr(svc, f) for f in FRONT_FIELDS):
                self._front(name, svc.expose)
        for name in old.services:
            if name not in spec.services:
                self._front(name, None)
        self.launcher.set_logs(spec.logs.max_size, spec.logs.keep)
        self.journal.set_retention(spec.events.max_rows, spec.events.max_age)
        self.scheduler.policy = spec.scheduler

    def _front(self, name: str, expose: int | None) -> None:
        """Puts ``name``'s front where ``expose`` says (None: no front)."""
        assert self.running.plan is not None
        port = self.running.plan.fronts.get(name)
        if expose is not None and port != expose:
            port = self.scheduler.front_port(expose, f"{name}.front")
        elif expose is None:
            port = None
        replaced = self.fronts.reconfigure(self.stack, name, port)
        if replaced is not None:
            self.scheduler.release_port(replaced.port)
        if port is None:
            self.running.plan.fronts.pop(name, None)
        else:
            self.running.plan.fronts[name] = port

    async def _carry_out(self, diff: SpecDiff, spec: DeploymentSpec, version: int,
                         added: dict[str, list[InstanceRuntime]], done: dict[str, list[Replaced]]) -> None:
        """New services, scale-ups and rollouts, phase by phase of the new spec (so a
        dependency is replaced before its ``restart: true`` dependents). ``done`` collects
        each service's steps, for a revert."""
        base = self.running.file.resolve().parent
        for phase in phases(spec):
            for name in phase:
                c = diff.get(name)
                svc = spec.services[name]
                steps = done.setdefault(name, [])
                try:
                    if c.change == "replace":
                        try:
                            steps += await roll(self.fleet, name, svc, version, c.replicas[1], c.fallback)
                        except RollFailed as e:
                            steps += e.done
                            raise
                        self.running.versions[name] = version
                    elif name in added:
                        steps += [Replaced(name, i.p.index, None, None, i.version, i) for i in added[name]]
                        with self.stack.tracing.span(f"start {name}", service=name,
                                                      instances=[i.id for i in added[name]]):
                            self.fleet.start(added[name], f"apply v{version}")
                            bad = await self.fleet.counted(added[name], svc.update.min_healthy_time,
                                                           min(svc.update.healthy_deadline, svc.start_timeout))
                            if bad is not None:
                                raise RollFailed(bad[0].id, bad[1], steps)
                        if c.change == "added":
                            self.running.versions[name] = version
                except RollFailed as e:
                    e.service = name
                    raise
                if c.change != "unchanged":
                    self.running.configs[name] = effective(svc, base)

    async def _revert(self, diff: SpecDiff, done: dict[str, list[Replaced]], added: dict[str, list[InstanceRuntime]],
                      old: DeploymentSpec, old_file: Path, old_versions: dict[str, int],
                      old_configs: dict[str, dict[str, Any]], why: str) -> None:
        """Undoes an apply that failed: the old spec's fronts, volumes, rules and settings
        first, then each rollout back (the last first), then the new instances stopped."""
        self._switch(old, old_file)
        for name in reversed(list(done)):
            for problem in await revert(self.fleet, done[name], why):
                self.stack.warn(problem)
        for insts in added.values():
            await self.fleet.retire([i for i in insts if i.id in self.stack.instances], f"revert: {why}")
        for c in diff.services:
            if c.change == "added":
                self.stack.by_service.pop(c.name, None)
        self.running.configs, self.running.versions = old_configs, old_versions

    async def _remove(self, name: str, version: int) -> None:
        """A service the new spec dropped: stopped by its shutdown rule, everything it held
        given back."""
        await self.fleet.retire(list(self.stack.by_service.get(name, [])), f"apply v{version}: {name} removed")
        self.stack.by_service.pop(name, None)
        self.running.configs.pop(name, None)
        self.running.versions.pop(name, None)
        for w in self.vols.remove(name):
            self.stack.warn(w)
        self.journal.note(f"apply v{version}: {name} removed", service=name)

