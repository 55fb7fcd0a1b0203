from __future__ import annotations

import itertools
import time

import pytest

from corral import ConfigError, RetryBudget, RetryExhausted, RetryPolicy, retry


def test_delay_kinds() -> None:
    take = lambda p: [round(d, 6) for d in p.delays()]  # noqa: E731
    assert take(RetryPolicy.fixed(0.1, max_attempts=4)) == [0.1, 0.1, 0.1]
    assert take(RetryPolicy.linear(0.1, 0.2, max_attempts=4)) == [0.1, 0.3, 0.5]
    assert take(RetryPolicy.exponential(0.1, max_attempts=5, max_delay=0.5)) == [0.1, 0.2, 0.4, 0.5]
    assert take(RetryPolicy.fibonacci(0.1, max_attempts=6)) == [0.1, 0.1, 0.2, 0.3, 0.5]


def test_jitter_and_decorrelated_are_seedable_and_bounded() -> None:
    p = RetryPolicy.decorrelated(0.01, max_delay=1.0, max_attempts=30, seed=42)
    a, b = list(p.delays()), list(p.delays())
    assert a == b and all(0.01 <= d <= 1.0 for d in a)
    full = list(RetryPolicy.fixed(1.0, jitter="full", max_attempts=50, seed=1).delays())
    assert all(0 <= d <= 1 for d in full) and len(set(full)) > 1
    equal = list(RetryPolicy.fixed(1.0, jitter="equal", max_attempts=50, seed=1).delays())
    assert all(0.5 <= d <= 1 for d in equal)
    unlimited = RetryPolicy.fixed(0.0, max_attempts=None).delays()
    assert len(list(itertools.islice(unlimited, 1000))) == 1000


def test_schedule_respects_max_elapsed() -> None:
    s = RetryPolicy.fixed(1.0, max_attempts=None, max_elapsed=2.5).schedule()
    assert s.next_delay(0.0) == 1.0
    assert s.next_delay(1.0) == 1.0
    assert s.next_delay(2.0) is None


def test_sync_retry_until_success() -> None:
    calls = []

    @retry(RetryPolicy.fixed(0.0, max_attempts=5), on=ValueError)
    def flaky(x: int) -> int:
        calls.append(x)
        if len(calls) < 3:
            raise ValueError("not yet")
        return x * 2

    assert flaky(21) == 42 and calls == [21, 21, 21]


def test_sync_gives_up_with_the_last_exception() -> None:
    n = 0

    @retry(RetryPolicy.fixed(0.0, max_attempts=3), on=ValueError)
    def bad() -> None:
        nonlocal n
        n += 1
        raise ValueError(f"attempt {n}")

    with pytest.raises(ValueError, match="attempt 3"):
        bad()


def test_other_exceptions_are_not_retried() -> None:
    n = 0

    @retry(RetryPolicy.fixed(0.0, max_attempts=5), on=ValueError)
    def bad() -> None:
        nonlocal n
        n += 1
        raise KeyError("k")

    with pytest.raises(KeyError):
        bad()
    assert n == 1


def test_retry_if_result() -> None:
    values = iter([None, None, 3])

    @retry(RetryPolicy.fixed(0.0, max_attempts=5), retry_if_result=lambda r: r is None)
    def poll() -> int | None:
        return next(values)

    assert poll() == 3

    @retry(RetryPolicy.fixed(0.0, max_attempts=2), retry_if_result=lambda r: True)
    def never() -> str:
        return "still"

    with pytest.raises(RetryExhausted) as e:
        never()
    assert e.value.last_result == "still" and e.value.attempts == 2


def test_sleeps_between_attempts() -> None:
    n = 0

    @retry(RetryPolicy.fixed(0.05, max_attempts=3), on=OSError)
    def f() -> None:
        nonlocal n
        n += 1
        raise OSError()

    t0 = time.monotonic()
    with pytest.raises(OSError):
        f()
    assert time.monotonic() - t0 >= 0.1  # two waits of 50 ms; a floor, not a speed target


def test_budget_limits_retries_across_callers() -> None:
    budget = RetryBudget(ratio=0.0, min_per_second=1.0, ttl=1.0)
    n = 0

    @retry(RetryPolicy.fixed(0.0, max_attempts=10), on=ValueError, budget=budget)
    def bad() -> None:
        nonlocal n
        n += 1
        raise ValueError()

    for _ in range(3):
        with pytest.raises(ValueError):
            bad()
    assert n == 4  # three first attempts plus the one retry the budget allowed


def test_method_binding() -> None:
    class C:
        def __init__(self) -> None:
            self.n = 0

        @retry(RetryPolicy.fixed(0.0, max_attempts=3))
        def m(self) -> int:
            self.n += 1
            if self.n < 2:
                raise RuntimeError()
            return self.n

    assert C().m() == 2


async def test_async_retry() -> None:
    n = 0

    @retry(RetryPolicy.fixed(0.01, max_attempts=4), on=ConnectionError)
    async def connect() -> str:
        nonlocal n
        n += 1
        if n < 3:
            raise ConnectionError()
        return "up"

    assert await connect() == "up" and n == 3

    @retry(RetryPolicy.fixed(0.0, max_attempts=2), on=ConnectionError)
    async def down() -> None:
        raise ConnectionError("down")

    with pytest.raises(ConnectionError, match="down"):
        await down()


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="multiplier"):
        RetryPolicy.exponential(0.1, 0.5)
    with pytest.raises(ValueError, match="jitter"):
        RetryPolicy.fixed(0.1, jitter="some")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="delay"):
        RetryPolicy.fixed(-1)
    with pytest.raises(TypeError):
        retry(on=(42,))  # type: ignore[arg-type]
