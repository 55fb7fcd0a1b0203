"""pytest-benchmark suite for the Python face's hot paths.

Each case times a loop of OPS operations per round (as timeit does) and
records OPS in extra_info; benches/report.py divides the median by it.
Timing a single call per round would add pytest-benchmark's own call
overhead (40-130 ns on this machine) to operations that cost about as much.

`make bench` runs it against a release build and prints medians next to the
targets; `make test` runs each case once with --benchmark-disable (smoke).
The *_baseline cases are the pure-Python equivalents, in the same run, so
targets can be read as ratios on a noisy machine.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from typing import Any

from corral import (
    CircuitBreaker,
    CircuitOpenError,
    Instance,
    LoadBalancer,
    RetryPolicy,
    ServiceRegistry,
    retry,
)

OPS = 1000


_NO_ARG = object()


def per_op(benchmark: Any, op: Callable[..., object], arg: object = _NO_ARG) -> None:
    """Times OPS calls of `op` (or `op(arg)`) per round; the loop itself costs ~10 ns per call."""
    benchmark.extra_info["ops"] = OPS
    rng = range(OPS)

    def loop() -> None:
        for _ in rng:
            op()

    def loop_arg() -> None:
        for _ in rng:
            op(arg)

    benchmark(loop if arg is _NO_ARG else loop_arg)


def noop() -> int:
    return 1


def test_loop_overhead_noop_call(benchmark: Any) -> None:
    per_op(benchmark, noop)


def test_breaker_call_closed(benchmark: Any) -> None:
    b = CircuitBreaker()
    call = b.call
    per_op(benchmark, call, noop)
    assert b.stats().successes >= OPS


def test_breaker_rejected_open(benchmark: Any) -> None:
    b = CircuitBreaker(reset_timeout=3600)
    b.trip()
    call = b.call

    def rejected() -> None:
        try:
            call(noop)
        except CircuitOpenError:
            pass

    per_op(benchmark, rejected)
    assert b.stats().rejected >= OPS


def test_python_raise_catch_baseline(benchmark: Any) -> None:
    def raise_catch() -> None:
        try:
            raise KeyError("x")
        except KeyError:
            pass

    per_op(benchmark, raise_catch)


def test_retry_success(benchmark: Any) -> None:
    f = retry(RetryPolicy.fixed(0.0, max_attempts=3))(noop)
    assert f() == 1
    per_op(benchmark, f)


def test_retry_two_failures_then_success(benchmark: Any) -> None:
    state = [0]

    @retry(RetryPolicy.fixed(0.0, max_attempts=3), on=ValueError)
    def flaky() -> int:
        state[0] += 1
        if state[0] % 3:
            raise ValueError()
        return 1

    assert flaky() == 1
    per_op(benchmark, flaky)


def test_registry_lookup(benchmark: Any) -> None:
    reg = ServiceRegistry()
    for s in range(50):
        for i in range(4):
            reg.register(Instance(service=f"svc-{s}", id=f"svc-{s}-{i}", host="127.0.0.1", port=8000 + i))
    get = reg.get
    got = get("svc-17-2")
    assert got is not None and got.port == 8002
    per_op(benchmark, get, "svc-17-2")


def test_registry_lookup_baseline_dict_lock(benchmark: Any) -> None:
    d = {f"svc-{s}-{i}": object() for s in range(50) for i in range(4)}
    lock = threading.Lock()

    def get() -> object:
        with lock:
            return d.get("svc-17-2")

    per_op(benchmark, get)


def test_registry_register(benchmark: Any) -> None:
    reg = ServiceRegistry()
    inst = Instance(service="api", id="api-1", host="127.0.0.1", port=8080)
    register = reg.register
    per_op(benchmark, register, inst)
    assert len(reg) == 1


def test_round_robin_pick(benchmark: Any) -> None:
    lb = LoadBalancer(["a", "b", "c", "d"])
    assert lb.pick() in {"a", "b", "c", "d"}
    per_op(benchmark, lb.pick)


def test_round_robin_baseline_python(benchmark: Any) -> None:
    backends = ["a", "b", "c", "d"]
    counter = itertools.count()
    lock = threading.Lock()

    def pick() -> str:
        with lock:
            return backends[next(counter) % 4]

    per_op(benchmark, pick)


def test_least_connections_pick_16(benchmark: Any) -> None:
    lb = LoadBalancer([f"10.0.0.{i}:80" for i in range(16)], strategy="least_connections")
    assert lb.pick().startswith("10.0.0.")
    per_op(benchmark, lb.pick)


def test_least_connections_baseline_python_16(benchmark: Any) -> None:
    active = {f"10.0.0.{i}:80": 0 for i in range(16)}
    lock = threading.Lock()

    def pick() -> str:
        with lock:
            return min(active, key=active.__getitem__)

    per_op(benchmark, pick)
