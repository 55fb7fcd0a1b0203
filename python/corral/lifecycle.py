"""The lifecycle state machine of one instance.

::

    pending -> placed -> starting -> running -> healthy <-> unhealthy
                                        \\          \\         /
                                         +-> restarting -> starting
    any live state -> stopping -> stopped;  running/healthy/unhealthy -> completed | failed

Only the transitions in :data:`TRANSITIONS` happen; anything else raises
:class:`~corral.exceptions.LifecycleError`, because it means the engine has a bug. Every
transition goes to the listener as a :class:`Transition` with its time and reason; the
engine's journal keeps them (the event log is the one history).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from corral.exceptions import LifecycleError

__all__ = ["TRANSITIONS", "Lifecycle", "State", "Transition"]


class State(StrEnum):
    """Where an instance is in its life."""

    PENDING = "pending"
    PLACED = "placed"
    STARTING = "starting"
    RUNNING = "running"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    RESTARTING = "restarting"
    STOPPING = "stopping"
    STOPPED = "stopped"
    COMPLETED = "completed"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value

    @property
    def alive(self) -> bool:
        """A process may exist in this state."""
        return self in _ALIVE

    @property
    def terminal(self) -> bool:
        """Nothing happens without an outside request (restart, down)."""
        return self in (State.STOPPED, State.COMPLETED, State.FAILED)


S = State
_ALIVE = frozenset({S.STARTING, S.RUNNING, S.HEALTHY, S.UNHEALTHY, S.STOPPING})

TRANSITIONS: dict[State, frozenset[State]] = {
    S.PENDING: frozenset({S.PLACED, S.FAILED, S.STOPPED}),
    S.PLACED: frozenset({S.STARTING, S.FAILED, S.STOPPED}),
    # starting: the spawn is under way; it may fail (failed / restarting) before running,
    # or complete without running (its skip_if_exists path exists).
    S.STARTING: frozenset({S.RUNNING, S.RESTARTING, S.COMPLETED, S.FAILED, S.STOPPING}),
    S.RUNNING: frozenset({S.HEALTHY, S.UNHEALTHY, S.RESTARTING, S.COMPLETED, S.FAILED, S.STOPPING}),
    S.HEALTHY: frozenset({S.UNHEALTHY, S.RESTARTING, S.COMPLETED, S.FAILED, S.STOPPING}),
    S.UNHEALTHY: frozenset({S.HEALTHY, S.RESTARTING, S.COMPLETED, S.FAILED, S.STOPPING}),
    S.RESTARTING: frozenset({S.STARTING, S.FAILED, S.STOPPED}),
    S.STOPPING: frozenset({S.STOPPED}),
    # Terminal states leave only on request: a manual restart, or down.
    S.STOPPED: frozenset({S.STARTING}),
    S.COMPLETED: frozenset({S.STARTING, S.STOPPED}),
    S.FAILED: frozenset({S.STARTING, S.STOPPED}),
}
"""Legal transitions: state -> the states it may move to."""


@dataclass(frozen=True)
class Transition:
    """One recorded change of state."""

    instance: str
    service: str
    old: State
    new: State
    reason: str
    at: float
    """Wall-clock time (``time.time()``)."""

    def to_dict(self) -> dict[str, object]:
        """JSON-ready."""
        return {"instance": self.instance, "service": self.service, "from": self.old.value,
                "to": self.new.value, "reason": self.reason, "at": self.at}


class Lifecycle:
    """The state machine of one instance; ``listener`` hears every transition."""

    __slots__ = ("_listener", "instance", "service", "since", "state")

    def __init__(self, instance: str, service: str,
                 listener: Callable[[Transition], None] | None = None) -> None:
        self.instance = instance
        self.service = service
        self.state = State.PENDING
        self.since = time.time()
        self._listener = listener

    def can(self, new: State) -> bool:
        """Whether ``new`` is reachable in one step."""
        return new in TRANSITIONS[self.state]

    def resume(self, state: State, reason: str) -> Transition:
        """A new instance takes up ``state`` as the store last recorded it (an agent that
        re-adopts what a dead one ran): one transition from ``pending``, not checked against
        the table."""
        if self.state is not State.PENDING:
            raise LifecycleError(f"{self.instance}: only a new instance resumes a recorded state")
        t = Transition(self.instance, self.service, self.state, state, reason, time.time())
        self.state = state
        self.since = t.at
        if self._listener is not None:
            self._listener(t)
        return t

    def to(self, new: State, reason: str = "") -> Transition:
        """Moves to ``new``; raises :class:`LifecycleError` if the table forbids it."""
        if new not in TRANSITIONS[self.state]:
            raise LifecycleError(
                f"{self.instance}: illegal transition {self.state.value} -> {new.value} ({reason or 'no reason'})")
        t = Transition(self.instance, self.service, self.state, new, reason, time.time())
        self.state = new
        self.since = t.at
        if self._listener is not None:
            self._listener(t)
        return t
