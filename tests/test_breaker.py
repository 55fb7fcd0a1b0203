from __future__ import annotations

import asyncio
import re
import threading
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral import CircuitBreaker, CircuitOpenError, ConfigError, CorralError


class Boom(Exception):
    pass


def boom() -> None:
    raise Boom("x")


def trip(b: CircuitBreaker, n: int) -> None:
    for _ in range(n):
        with pytest.raises(Boom):
            b.call(boom)


def test_call_passes_args_and_counts() -> None:
    b = CircuitBreaker()
    assert b.call(lambda a, *, k: a + k, 1, k=2) == 3
    s = b.stats()
    assert (s.state, s.successes, s.failures) == ("closed", 1, 0)


def test_consecutive_failures_open_and_reject() -> None:
    b = CircuitBreaker(failure_threshold=3, reset_timeout=60)
    trip(b, 3)
    assert b.state == "open"
    calls = []
    with pytest.raises(CircuitOpenError) as e:
        b.call(calls.append, 1)
    assert calls == []
    assert e.value.state == "open" and 59 < e.value.remaining <= 60
    assert re.fullmatch(r"circuit open: call rejected, retry in (59\.9\d\d|60\.000)s", str(e.value))
    assert isinstance(e.value, CorralError)
    assert b.stats().rejected == 1


def test_half_open_trial_closes_or_reopens() -> None:
    b = CircuitBreaker(failure_threshold=1, reset_timeout=0.05)
    trip(b, 1)
    time.sleep(0.08)
    trip(b, 1)  # the trial fails
    assert b.state == "open"
    time.sleep(0.08)
    assert b.call(lambda: "ok") == "ok"
    assert b.state == "closed"


def test_half_open_admits_limited_trials() -> None:
    b = CircuitBreaker(failure_threshold=1, reset_timeout=0.05, half_open_max_calls=2)
    trip(b, 1)
    time.sleep(0.08)
    assert b.allow() and b.allow()
    assert not b.allow()
    assert b.state == "half_open"
    b.record_success()
    b.record_success()
    assert b.state == "closed"


def test_failure_rate_window() -> None:
    b = CircuitBreaker(failure_threshold=0, failure_rate_threshold=0.5, window_size=10, minimum_calls=4)
    trip(b, 3)
    assert b.state == "closed"
    b.call(lambda: None)
    trip(b, 1)
    assert b.state == "open"
    assert b.stats().failure_rate == pytest.approx(0.8)


def test_slow_calls_count_as_failures() -> None:
    b = CircuitBreaker(failure_threshold=2, slow_call_duration=0.02)
    b.call(time.sleep, 0.03)
    b.call(time.sleep, 0.03)
    assert b.state == "open"
    assert b.stats().slow_calls == 2


def test_growing_open_duration_is_capped() -> None:
    b = CircuitBreaker(failure_threshold=1, reset_timeout=0.05, max_reset_timeout=0.1)
    trip(b, 1)
    first = b.stats().open_remaining
    time.sleep(0.07)
    trip(b, 1)
    second = b.stats().open_remaining
    assert first <= 0.05 < second <= 0.1


def test_excluded_and_non_exception_errors_do_not_count() -> None:
    b = CircuitBreaker(failure_threshold=1, exclude=KeyError)
    with pytest.raises(KeyError):
        b.call(lambda: {}["x"])
    with pytest.raises(KeyboardInterrupt):
        b.call(lambda: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert b.state == "closed" and b.stats().ignored == 2
    only = CircuitBreaker(failure_threshold=1, failure_on=(OSError,))
    with pytest.raises(ValueError):
        only.call(lambda: int("x"))
    assert only.state == "closed"
    with pytest.raises(OSError):
        only.call(lambda: open("/nonexistent/file"))
    assert only.state == "open"


def test_decorator_sync_and_method() -> None:
    b = CircuitBreaker(failure_threshold=2)

    @b
    def add(a: int, c: int = 0) -> int:
        """Adds."""
        return a + c

    class C:
        @b
        def m(self, x: int) -> int:
            return x * 2

    assert add(1, c=2) == 3 and add.__name__ == "add" and add.__doc__ == "Adds."
    assert C().m(4) == 8
    b.force_open()
    with pytest.raises(CircuitOpenError) as e:
        add(1)
    assert e.value.state == "forced_open"


async def test_async_call_and_decorator() -> None:
    b = CircuitBreaker(failure_threshold=2)

    @b
    async def get(x: int) -> int:
        await asyncio.sleep(0)
        return x

    async def fail() -> None:
        raise Boom()

    assert await get(5) == 5
    assert await b.call_async(get, 6) == 6
    for _ in range(2):
        with pytest.raises(Boom):
            await b.call_async(fail)
    with pytest.raises(CircuitOpenError):
        await get(1)


async def test_cancellation_does_not_count_as_failure() -> None:
    b = CircuitBreaker(failure_threshold=1)
    task = asyncio.create_task(b.call_async(asyncio.sleep, 10))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert b.state == "closed"


def test_context_manager() -> None:
    b = CircuitBreaker(failure_threshold=1)
    with b:
        pass
    with pytest.raises(Boom), b:
        raise Boom()
    assert b.state == "open"
    with pytest.raises(CircuitOpenError), b:
        pass


def test_listeners_see_transitions() -> None:
    b = CircuitBreaker(failure_threshold=1, reset_timeout=0.02)
    seen: list[tuple[str, str]] = []
    b.add_listener(lambda old, new: seen.append((old, new)))
    trip(b, 1)
    time.sleep(0.04)
    b.call(lambda: None)
    b.disable()
    b.reset()
    assert seen == [("closed", "open"), ("open", "half_open"), ("half_open", "closed"),
                    ("closed", "disabled"), ("disabled", "closed")]


def test_disabled_counts_nothing() -> None:
    b = CircuitBreaker(failure_threshold=1)
    b.disable()
    trip(b, 5)
    assert b.state == "disabled"


def test_threads_are_not_serialized_by_the_breaker() -> None:
    # Two calls that each wait for the other can only finish if no lock is held during the call.
    b = CircuitBreaker()
    barrier = threading.Barrier(2, timeout=5)
    results: list[int] = []

    def worker(i: int) -> None:
        results.append(b.call(lambda: (barrier.wait(), i)[1]))

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert sorted(results) == [0, 1]


def test_threads_counting_adds_up() -> None:
    b = CircuitBreaker(failure_threshold=10**9)

    def work() -> None:
        for i in range(2000):
            if i % 2:
                b.record_success()
            else:
                b.record_failure()

    ts = [threading.Thread(target=work) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    s = b.stats()
    assert (s.successes, s.failures) == (4000, 4000)


def test_bad_configuration_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="failure_rate_threshold"):
        CircuitBreaker(failure_rate_threshold=50)
    with pytest.raises(ValueError, match="reset_timeout"):
        CircuitBreaker(reset_timeout=-1)
    with pytest.raises(TypeError, match="exclude"):
        CircuitBreaker(exclude=[1])  # type: ignore[list-item]


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 4), st.lists(st.booleans(), max_size=40))
def test_state_follows_consecutive_failure_rule(threshold: int, outcomes: list[bool]) -> None:
    b = CircuitBreaker(failure_threshold=threshold, reset_timeout=60)
    run = 0
    for ok in outcomes:
        if b.state == "open":
            assert not b.allow()
            continue
        if ok:
            b.record_success()
            run = 0
        else:
            b.record_failure()
            run += 1
        assert b.state == ("open" if run >= threshold else "closed")


# --- the contract under concurrency (the peers' suites found these) -------------------


def test_a_failed_trial_counts_as_a_consecutive_failure() -> None:
    b = CircuitBreaker(failure_threshold=3, reset_timeout=0.05)
    for _ in range(3):
        with pytest.raises(ZeroDivisionError):
            b.call(lambda: 1 / 0)
    assert b.stats().consecutive_failures == 3
    time.sleep(0.06)
    with pytest.raises(ZeroDivisionError):
        b.call(lambda: 1 / 0)  # the trial
    assert b.state == "open" and b.stats().consecutive_failures == 4


@pytest.mark.parametrize("path", ["call", "decorator", "with", "call_async"])
def test_a_call_admitted_while_closed_cannot_close_the_circuit(path: str) -> None:
    """A slow call admitted while closed; two failures trip; after the timeout a trial is
    admitted and blocks; the slow call then succeeds: the state stays half-open, and the
    trial's failure opens the circuit again (before the fix: closed, and it stayed closed)."""
    b = CircuitBreaker(failure_threshold=2, reset_timeout=0.05)
    slow_started, slow_go = threading.Event(), threading.Event()
    trial_started, trial_go = threading.Event(), threading.Event()

    def slow() -> str:
        slow_started.set()
        slow_go.wait(10)
        return "ok"

    def trial() -> None:
        trial_started.set()
        trial_go.wait(10)
        raise ConnectionError("trial failed")

    def run(f: Any) -> None:
        if path == "call":
            b.call(f)
        elif path == "decorator":
            b(f)()
        elif path == "with":
            with b:
                f()
        else:
            async def af() -> Any:
                return await asyncio.to_thread(f)
            asyncio.run(b.call_async(af))

    errors: list[BaseException] = []

    def thread(f: Any) -> threading.Thread:
        def target() -> None:
            try:
                run(f)
            except BaseException as e:
                errors.append(e)
        t = threading.Thread(target=target)
        t.start()
        return t

    t_slow = thread(slow)
    assert slow_started.wait(10)
    for _ in range(2):
        with pytest.raises(ZeroDivisionError):
            b.call(lambda: 1 / 0)
    assert b.state == "open"
    time.sleep(0.06)
    t_trial = thread(trial)
    assert trial_started.wait(10)
    assert b.state == "half_open"
    slow_go.set()
    t_slow.join(10)
    assert b.state == "half_open", "the closed-state success did not close the circuit"
    trial_go.set()
    t_trial.join(10)
    assert b.state == "open", "the only trial failed"
    assert [type(e) for e in errors] == [ConnectionError]


def test_a_late_excluded_exception_frees_no_trial_permit() -> None:
    b = CircuitBreaker(failure_threshold=2, reset_timeout=0.05, half_open_max_calls=1, exclude=KeyError)
    go = threading.Event()
    started = threading.Event()

    def early() -> None:
        started.set()
        go.wait(10)
        raise KeyError("excluded")

    raised: list[BaseException] = []

    def run_early() -> None:
        try:
            b.call(early)
        except KeyError as e:
            raised.append(e)

    t = threading.Thread(target=run_early)
    t.start()
    assert started.wait(10)
    for _ in range(2):
        with pytest.raises(ZeroDivisionError):
            b.call(lambda: 1 / 0)
    time.sleep(0.06)
    assert b.allow(), "the one trial"
    go.set()
    t.join(10)
    assert len(raised) == 1
    assert not b.allow(), "the excluded pre-trip call freed no permit: still one trial at a time"


def test_half_open_admits_one_trial_at_a_time_across_threads() -> None:
    """Many threads hammer a breaker whose calls trip and recover it; with
    half_open_max_calls=1 no two trials ever run at once, whatever ends when."""
    b = CircuitBreaker(failure_threshold=3, reset_timeout=0.002, half_open_max_calls=1)
    running_trials = 0
    most = 0
    lock = threading.Lock()
    stop = time.monotonic() + 1.5
    rng_lock = threading.Lock()
    counter = [0]

    def work() -> None:
        nonlocal running_trials, most
        while time.monotonic() < stop:
            trial = b.state != "closed"
            try:
                ticket = b.admit()
            except CircuitOpenError:
                continue
            trial = b.state == "half_open" and trial
            if trial:
                with lock:
                    running_trials += 1
                    most = max(most, running_trials)
            with rng_lock:
                counter[0] += 1
                fail = counter[0] % 3 != 0
            time.sleep(0.0002)
            if trial:
                with lock:
                    running_trials -= 1
            if fail:
                b.record_failure(ticket=ticket)
            else:
                b.record_success(ticket=ticket)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert b.stats().opened > 3, "it tripped and recovered many times"
    assert most <= 1, f"{most} trials ran at once"


def test_generators_are_guarded_over_their_whole_iteration() -> None:
    b = CircuitBreaker(failure_threshold=1, reset_timeout=30)

    @b
    def gen(fail: bool) -> Any:
        yield 1
        if fail:
            raise ValueError("during iteration")
        yield 2

    assert list(gen(False)) == [1, 2]
    assert b.stats().successes == 1 and b.stats().failures == 0
    g = gen(False)
    next(g)
    g.close()  # the consumer stopped early: neither
    assert b.stats().ignored == 1 and b.state == "closed"
    with pytest.raises(ValueError):
        list(gen(True))
    assert b.state == "open" and b.stats().failures == 1
    with pytest.raises(CircuitOpenError):
        next(gen(False))


def test_async_generators_are_guarded_over_their_whole_iteration() -> None:
    b = CircuitBreaker(failure_threshold=1, reset_timeout=30)

    @b
    async def agen(fail: bool) -> Any:
        yield 1
        await asyncio.sleep(0)
        if fail:
            raise ValueError("during iteration")
        yield 2

    async def collect(fail: bool) -> list[int]:
        return [x async for x in agen(fail)]

    assert asyncio.run(collect(False)) == [1, 2]
    assert b.stats().successes == 1
    with pytest.raises(ValueError):
        asyncio.run(collect(True))
    assert b.state == "open" and b.stats().failures == 1
