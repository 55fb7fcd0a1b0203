"""Recovery strategies: what the engine does when an instance ends or ``up`` fails.

Each is a class a user can subclass and hand to :class:`corral.Deployment`:

- :class:`RestartStrategy` decides, per exit, between restarting after a delay, completing
  and failing. The default, :class:`BackoffRestart`, follows the service's ``restart`` rule:
  the policy (``no``, ``on-failure``, ``always``), a backoff from the retry policies that
  resets after ``reset_after`` of healthy running, and a crash-loop breaker that fails the
  instance after ``max_restarts`` restarts within ``window``.
- :class:`RollbackStrategy` decides what a failed ``up`` stops: by default everything it
  started, in reverse dependency order.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from corral._core import RetryPolicy, RetrySchedule
from corral.spec import RestartSpec

__all__ = ["BackoffRestart", "Decision", "Exit", "RestartStrategy", "RollbackStrategy"]


@dataclass(frozen=True)
class Exit:
    """Why an instance's process ended."""

    instance: str
    service: str
    code: int | None
    signal: int | None
    cause: Literal["exit", "liveness", "startup", "spawn"]
    """``exit``: it ended by itself; ``liveness``/``startup``: corral killed it after a probe
    failed; ``spawn``: it could not be started."""
    uptime: float
    """Seconds since it started (0 for a spawn failure)."""
    healthy_for: float
    """Seconds it had been healthy without interruption when it ended."""
    detail: str = ""

    @property
    def success(self) -> bool:
        """Ended by itself with status 0."""
        return self.cause == "exit" and self.code == 0

    def describe(self) -> str:
        """``exit status 3``, ``killed by signal 9``, ``liveness probe failed: HTTP 500``."""
        if self.cause in ("liveness", "startup"):
            return f"{self.cause} probe failed" + (f": {self.detail}" if self.detail else "")
        if self.cause == "spawn":
            return f"could not start: {self.detail}"
        if self.signal is not None:
            return f"killed by signal {self.signal}"
        if self.code is None:
            # Ended while no agent watched, and no keeper recorded how.
            return f"{self.detail or 'exited (not our child, no status recorded)'}: status unknown"
        return f"exit status {self.code}"


@dataclass(frozen=True)
class Decision:
    """What to do after an exit."""

    action: Literal["restart", "complete", "fail"]
    delay: float = 0.0
    reason: str = ""


class RestartStrategy:
    """Base class: decides after each exit. Subclass and override :meth:`on_exit`."""

    def on_exit(self, exit: Exit) -> Decision:
        """Called for every exit that corral did not ask for."""
        if exit.success:
            return Decision("complete", reason=exit.describe())
        return Decision("fail", reason=exit.describe())

    def forget(self, instance: str) -> None:
        """The instance was stopped or restarted by hand: drop what was counted for it."""


def backoff_policy(spec: RestartSpec) -> RetryPolicy:
    """The retry policy a restart rule describes (no attempt limit: the breaker limits)."""
    if spec.initial == 0 or spec.backoff == "fixed":
        return RetryPolicy.fixed(spec.initial, max_attempts=None)
    if spec.backoff == "linear":
        return RetryPolicy.linear(spec.initial, spec.initial, max_delay=spec.max, max_attempts=None)
    if spec.backoff == "fibonacci":
        return RetryPolicy.fibonacci(spec.initial, max_delay=spec.max, max_attempts=None)
    if spec.backoff == "decorrelated":
        return RetryPolicy.decorrelated(spec.initial, max_delay=spec.max, max_attempts=None)
    return RetryPolicy.exponential(spec.initial, max_delay=spec.max, max_attempts=None)


CRASH_LOOP_UPTIME = 1.0
"""A run shorter than this (seconds) is a crash, not a life; from the second such run in a
row, a restart waits at least..."""
MIN_CRASH_DELAY = 0.1
"""... this long (seconds), whatever the backoff says, so a crash loop with ``initial: 0``
restarts at most ten times a second per instance (one quick death, a kill -9 say, is
still restarted at once)."""


class BackoffRestart(RestartStrategy):
    """The restart rule of ``corral.yaml``: policy, backoff and crash-loop breaker. From the
    second run in a row shorter than :data:`CRASH_LOOP_UPTIME`, a restart waits at least
    :data:`MIN_CRASH_DELAY`."""

    def __init__(self, rules: dict[str, RestartSpec]) -> None:
        self.rules = rules
        self._policies = {s: backoff_policy(r) for s, r in rules.items()}
        self._schedules: dict[str, RetrySchedule] = {}
        self._restarts: dict[str, deque[float]] = {}
        self._short_runs: dict[str, int] = {}

    def set_rule(self, service: str, rule: RestartSpec) -> None:
        """A service's restart rule from now on (an apply changed it)."""
        self.rules[service] = rule
        self._policies[service] = backoff_policy(rule)

    def on_exit(self, exit: Exit) -> Decision:
        rule = self.rules.get(exit.service, RestartSpec())
        what = exit.describe()
        if rule.policy == "no" or (rule.policy == "on-failure" and exit.success):
            return Decision("complete" if exit.success else "fail", reason=what)
        now = time.monotonic()
        times = self._restarts.setdefault(exit.instance, deque())
        while times and now - times[0] > rule.window:
            times.popleft()
        if rule.max_restarts is not None and len(times) >= rule.max_restarts:
            return Decision("fail", reason=f"{what}; crash loop: {len(times)} restarts within "
                                           f"{_fmt(rule.window)} (max_restarts {rule.max_restarts})")
        if exit.healthy_for >= rule.reset_after or exit.instance not in self._schedules:
            self._schedules[exit.instance] = self._policies.get(exit.service, backoff_policy(rule)).schedule()
        delay = self._schedules[exit.instance].next_delay() or 0.0
        short = self._short_runs[exit.instance] = self._short_runs.get(exit.instance, 0) + 1 \
            if exit.uptime < CRASH_LOOP_UPTIME else 0
        if short >= 2:
            # A process that dies at once, again and again, restarted at once, is a storm:
            # hundreds of spawns a second cost the agent most of a core (systemd's RestartSec
            # floor, here only for runs too short to have done anything).
            delay = max(delay, MIN_CRASH_DELAY)
        times.append(now)
        return Decision("restart", delay=delay, reason=f"{what}; restart {len(times)} in {_fmt(delay)}")

    def forget(self, instance: str) -> None:
        self._schedules.pop(instance, None)
        self._restarts.pop(instance, None)
        self._short_runs.pop(instance, None)


class RollbackStrategy:
    """What a failed ``up`` stops. The default stops everything this ``up`` started, dependents
    first; override :meth:`to_stop` to keep some of it (for debugging, say)."""

    def to_stop(self, started: Sequence[str], phases: Sequence[Sequence[str]], reason: str) -> list[str]:
        """Services to stop, in order."""
        order = [s for phase in reversed(phases) for s in phase]
        return [s for s in order if s in started]


def _fmt(seconds: float) -> str:
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    return f"{seconds:g}s"
