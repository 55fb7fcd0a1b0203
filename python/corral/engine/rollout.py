"""Rolling replace of one service's instances, and its revert, by the service's ``update:``
block.

``start-first`` (the default) places, starts and waits for a batch of ``max_parallel`` new
instances before the old ones of that batch are drained and stopped, as a Kubernetes
Deployment does with ``maxSurge: 1, maxUnavailable: 0``: the front gains the new instances
when they are ready and loses the old ones before their signal, so its clients see no
failure. When the ledgers cannot hold the extra batch (exclusive cores, memory, a fixed
port), the service goes on ``stop-first`` and says so. A new instance counts once it has
been ready for ``min_healthy_time``; one that exits first, or is not there by
``healthy_deadline``, stops the rollout. :func:`revert` brings back the previous version
of every instance already replaced, by the same surge-first rule.
"""

from __future__ import annotations

from dataclasses import dataclass

from corral.engine.fleet import Fleet
from corral.engine.instance import InstanceRuntime
from corral.exceptions import ConfigError
from corral.spec import ServiceSpec

__all__ = ["Replaced", "RollFailed", "revert", "roll"]


@dataclass
class Replaced:
    """One step of a rollout: the instance it retired (enough to bring it back) and the one
    that took its place."""

    service: str
    index: int
    iid: str | None
    """The old instance's id; None when the step added an instance (a scale-up)."""
    svc: ServiceSpec | None
    version: int
    new: InstanceRuntime | None
    """None when the old one was stopped first and no new one stands (it failed)."""


class RollFailed(Exception):
    """A rollout stopped at ``instance`` for ``reason``; ``done`` is what it had replaced."""

    def __init__(self, instance: str, reason: str, done: list[Replaced]) -> None:
        super().__init__(f"{instance}: {reason}")
        self.instance, self.reason, self.done = instance, reason, done
        self.service = instance.rsplit("-", 1)[0]
        """The service it stopped in (set by whoever knows it better)."""


def new_id(service: str, index: int, version: int) -> str:
    """A replacement's id: beside its predecessor, told apart by the spec version it runs."""
    return f"{service}-{index}-v{version}"


async def roll(fleet: Fleet, service: str, svc: ServiceSpec, version: int, replicas: int,
               fallback: str | None = None) -> list[Replaced]:
    """Replaces the instances of ``service`` with ones of ``svc`` (spec ``version``) and
    grows it to ``replicas``; the old instances past ``replicas`` are left for the caller
    to stop once the whole apply has succeeded. ``fallback`` (a reason) starts it on
    stop-first. Raises :class:`RollFailed` with what was replaced so far."""
    update = svc.update
    olds = sorted(fleet.stack.by_service.get(service, []), key=lambda i: i.p.index)
    keep = olds[:replicas]
    surge = update.order == "start-first" and fallback is None
    done: list[Replaced] = []
    for at in range(0, len(keep), update.max_parallel):
        batch = keep[at:at + update.max_parallel]
        slots = [(o.p.index, new_id(service, o.p.index, version)) for o in batch]
        with fleet.stack.tracing.span("rollout step", service=service, replaces=[o.id for o in batch],
                                      instances=[s[1] for s in slots], order="start-first" if surge else "stop-first"):
            memo = [Replaced(service, o.p.index, o.id, o.svc, o.version, None) for o in batch]
            news: list[InstanceRuntime] | None = None
            if surge:
                try:
                    news = fleet.place(service, svc, slots, version)
                except ConfigError as e:
                    surge = False
                    fleet.stack.warn(f"{service}: no room for a new instance beside the old ({e}); "
                                     "stop-first from here")
            if news is None:
                await fleet.retire(batch, f"replaced by v{version} (stop-first)")
                try:
                    news = fleet.place(service, svc, slots, version)
                except ConfigError as e:
                    raise RollFailed(slots[0][1], f"cannot be placed: {e}", done + memo) from None
            fleet.start(news, f"apply v{version}")
            bad = await fleet.counted(news, update.min_healthy_time, update.healthy_deadline)
            if bad is not None:
                await fleet.retire(news, f"rollout failed: {bad[1]}")
                raise RollFailed(bad[0].id, bad[1], done + ([] if surge else memo))
            if surge:
                await fleet.retire(batch, f"replaced by v{version}: {', '.join(n.id for n in news)}")
            for m, n in zip(memo, news, strict=True):
                m.new = n
            done += memo
            fleet.stack.journal.note(f"apply v{version}: {', '.join(n.id for n in news)} ready, "
                                     f"{', '.join(o.id for o in batch)} stopped", service=service)
    have = len(keep)
    if replicas > have:
        taken = {i.p.index for i in fleet.stack.by_service.get(service, [])}
        free = [i for i in range(replicas + len(taken)) if i not in taken][:replicas - have]
        try:
            news = fleet.place(service, svc, [(i, new_id(service, i, version)) for i in free], version)
        except ConfigError as e:
            raise RollFailed(new_id(service, free[0], version), f"cannot be placed: {e}", done) from None
        fleet.start(news, f"apply v{version}: scaled to {replicas}")
        bad = await fleet.counted(news, update.min_healthy_time, update.healthy_deadline)
        if bad is not None:
            await fleet.retire(news, f"rollout failed: {bad[1]}")
            raise RollFailed(bad[0].id, bad[1], done)
        done += [Replaced(service, n.p.index, None, None, version, n) for n in news]
    return done


async def revert(fleet: Fleet, done: list[Replaced], reason: str) -> list[str]:
    """Undoes the steps of a rollout, the last first: each retired instance comes back
    (placed beside its replacement when there is room, else after it stops), and the
    replacement goes. Returns what could not be brought back, as warnings."""
    problems = []
    for step in reversed(done):
        if step.iid is None or step.svc is None:
            if step.new is not None:
                await fleet.retire([step.new], f"revert: {reason}")
            continue
        slot = [(step.index, step.iid)]
        back: list[InstanceRuntime] | None = None
        try:
            back = fleet.place(step.service, step.svc, slot, step.version)
        except ConfigError:
            back = None
        if back is None:
            if step.new is not None:
                await fleet.retire([step.new], f"revert: {reason}")
                step.new = None
            try:
                back = fleet.place(step.service, step.svc, slot, step.version)
            except ConfigError as e:
                problems.append(f"revert: {step.iid} cannot be placed again: {e}")
                continue
        fleet.start(back, f"revert: {reason}")
        update = step.svc.update
        bad = await fleet.counted(back, update.min_healthy_time, update.healthy_deadline)
        if bad is not None:
            problems.append(f"revert: {bad[0].id} did not come back: {bad[1]}")
        if step.new is not None:
            await fleet.retire([step.new], f"revert: {reason}")
    return problems
