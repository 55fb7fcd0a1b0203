"""Restart decisions: policy, backoff, crash-loop breaker, reset; rollback order."""

from __future__ import annotations

import pytest

from corral.recovery import BackoffRestart, Exit, RollbackStrategy
from corral.spec import RestartSpec


def _exit(code: int | None = 1, *, signal: int | None = None, healthy_for: float = 0.0,
          cause: str = "exit") -> Exit:
    return Exit("api-0", "api", code, signal, cause, 1.0, healthy_for)  # type: ignore[arg-type]


def test_policies() -> None:
    s = BackoffRestart({"api": RestartSpec(policy="no")})
    assert s.on_exit(_exit(0)).action == "complete"
    assert s.on_exit(_exit(3)).action == "fail"
    s = BackoffRestart({"api": RestartSpec(policy="on-failure")})
    assert s.on_exit(_exit(0)).action == "complete"
    d = s.on_exit(_exit(None, signal=9))
    assert d.action == "restart" and "killed by signal 9" in d.reason
    s = BackoffRestart({"api": RestartSpec(policy="always")})
    assert s.on_exit(_exit(0)).action == "restart"
    # A probe-triggered kill is a failure even when the process exits 0 on SIGTERM.
    s = BackoffRestart({"api": RestartSpec(policy="on-failure")})
    d = s.on_exit(_exit(0, cause="liveness"))
    assert d.action == "restart" and "liveness probe failed" in d.reason


def test_exponential_backoff_capped_then_reset_after_healthy_running() -> None:
    s = BackoffRestart({"api": RestartSpec(initial=1, max=4, max_restarts=None)})
    delays = [s.on_exit(_exit()).delay for _ in range(5)]
    assert delays == [1, 2, 4, 4, 4]
    assert s.on_exit(_exit(healthy_for=601)).delay == 1


@pytest.mark.parametrize(("kind", "expected"), [
    ("fixed", [0.5, 0.5, 0.5]), ("linear", [0.5, 1.0, 1.5]), ("fibonacci", [0.5, 0.5, 1.0]),
])
def test_backoff_kinds(kind: str, expected: list[float]) -> None:
    s = BackoffRestart({"api": RestartSpec(backoff=kind, initial=0.5, max=10, max_restarts=None)})  # type: ignore[arg-type]
    assert [s.on_exit(_exit()).delay for _ in expected] == pytest.approx(expected)


def test_crash_loop_breaker_fails_after_max_restarts_in_window() -> None:
    s = BackoffRestart({"api": RestartSpec(initial=0.1, max_restarts=3, window=600)})
    assert [s.on_exit(_exit()).action for _ in range(3)] == ["restart"] * 3
    d = s.on_exit(_exit())
    assert d.action == "fail" and "crash loop: 3 restarts within 10m (max_restarts 3)" in d.reason
    s.forget("api-0")
    assert s.on_exit(_exit()).action == "restart"


def test_restarts_outside_the_window_do_not_count() -> None:
    s = BackoffRestart({"api": RestartSpec(initial=0.1, max_restarts=1, window=0.0)})
    assert [s.on_exit(_exit()).action for _ in range(4)] == ["restart"] * 4


def test_rollback_stops_dependents_first() -> None:
    phases = [["kv"], ["migrate"], ["api"], ["worker"]]
    assert RollbackStrategy().to_stop(["kv", "api", "migrate"], phases, "x") == ["api", "migrate", "kv"]


def test_a_crash_loop_with_no_backoff_is_still_bounded() -> None:
    s = BackoffRestart({"api": RestartSpec(initial=0, max_restarts=None)})
    quick = Exit("api-0", "api", 1, None, "exit", 0.01, 0.0)
    assert [s.on_exit(quick).delay for _ in range(3)] == [0, 0.1, 0.1], "runs of 10 ms in a row wait 100 ms"
    lived = Exit("api-0", "api", None, 9, "exit", 30.0, 30.0)
    assert s.on_exit(lived).delay == 0, "a process that ran a while is restarted at once, as configured"
    assert s.on_exit(quick).delay == 0, "one quick death after a long run (a kill -9, say) too"
