"""pytest-benchmark suite for the Python face's hot paths.

`make bench` runs it against a release build and prints medians next to the
targets; `make test` runs it once per case with --benchmark-disable (smoke).
The *_baseline cases measure the pure-Python equivalents in the same run, so
targets can be read as ratios on a noisy machine.
"""

from __future__ import annotations

import itertools
import threading
from typing import Any

import pytest

from corral import (
    CircuitBreaker,
    CircuitOpenError,
    Instance,
    LoadBalancer,
    RetryPolicy,
    ServiceRegistry,
    retry,
)


def noop() -> int:
    return 1


def test_breaker_call_closed(benchmark: Any) -> None:
    b = CircuitBreaker()
    assert benchmark(b.call, noop) == 1


def test_breaker_rejected_open(benchmark: Any) -> None:
    b = CircuitBreaker(reset_timeout=3600)
    b.trip()

    def rejected() -> None:
        try:
            b.call(noop)
        except CircuitOpenError:
            pass

    benchmark(rejected)


def test_retry_success(benchmark: Any) -> None:
    f = retry(RetryPolicy.fixed(0.0, max_attempts=3))(noop)
    assert benchmark(f) == 1


def test_retry_two_failures_then_success(benchmark: Any) -> None:
    state = [0]

    @retry(RetryPolicy.fixed(0.0, max_attempts=3), on=ValueError)
    def flaky() -> int:
        state[0] += 1
        if state[0] % 3:
            raise ValueError()
        return 1

    assert benchmark(flaky) == 1


def test_registry_lookup(benchmark: Any) -> None:
    reg = ServiceRegistry()
    for s in range(50):
        for i in range(4):
            reg.register(Instance(service=f"svc-{s}", id=f"svc-{s}-{i}", host="127.0.0.1", port=8000 + i))
    got = benchmark(reg.get, "svc-17-2")
    assert got is not None and got.port == 8002


def test_registry_lookup_baseline_dict_lock(benchmark: Any) -> None:
    d = {f"svc-{s}-{i}": object() for s in range(50) for i in range(4)}
    lock = threading.Lock()

    def get(k: str) -> object:
        with lock:
            return d.get(k)

    benchmark(get, "svc-17-2")


def test_round_robin_pick(benchmark: Any) -> None:
    lb = LoadBalancer(["a", "b", "c", "d"])
    assert benchmark(lb.pick) in {"a", "b", "c", "d"}


def test_round_robin_baseline_python(benchmark: Any) -> None:
    backends = ["a", "b", "c", "d"]
    counter = itertools.count()
    lock = threading.Lock()

    def pick() -> str:
        with lock:
            return backends[next(counter) % 4]

    benchmark(pick)


def test_least_connections_pick_16(benchmark: Any) -> None:
    lb = LoadBalancer([f"10.0.0.{i}:80" for i in range(16)], strategy="least_connections")
    assert benchmark(lb.pick).startswith("10.0.0.")


def test_least_connections_baseline_python_16(benchmark: Any) -> None:
    active = {f"10.0.0.{i}:80": 0 for i in range(16)}
    lock = threading.Lock()

    def pick() -> str:
        with lock:
            return min(active, key=active.__getitem__)

    benchmark(pick)


@pytest.mark.parametrize("n", [1])
def test_registry_register(benchmark: Any, n: int) -> None:
    reg = ServiceRegistry()
    inst = Instance(service="api", id="api-1", host="127.0.0.1", port=8080)
    benchmark(reg.register, inst)
    assert len(reg) == n
