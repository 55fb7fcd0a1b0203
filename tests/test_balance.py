from __future__ import annotations

import threading
from collections import Counter

import pytest

from corral import ConfigError, LoadBalancer, NoBackendError


def test_round_robin_cycles_and_skips_down() -> None:
    lb = LoadBalancer(["a", "b", "c"])
    assert [lb.pick() for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]
    lb.mark_down("b")
    assert "b" not in {lb.pick() for _ in range(10)}
    assert not lb.is_up("b")
    lb.mark_up("b")
    assert "b" in {lb.pick() for _ in range(10)}


def test_weighted_is_smooth() -> None:
    lb = LoadBalancer(["a", "b", "c"], strategy="weighted_round_robin", weights=[5, 1, 1])
    assert "".join(lb.pick() for _ in range(7)) == "aabacaa"


def test_least_connections_and_guard_survives_exceptions() -> None:
    lb = LoadBalancer(["a", "b", "c"], strategy="least_connections")
    g1, g2 = lb.connection(), lb.connection()
    busy = {g1.backend, g2.backend}
    free = ({"a", "b", "c"} - busy).pop()
    assert lb.pick() == free
    with pytest.raises(RuntimeError), lb.connection() as b:
        assert lb.active(b) == 1
        raise RuntimeError("body failed")
    assert lb.active(free) == 0
    g1.release()
    g1.release()  # idempotent
    g2.release()
    assert all(active == 0 for _, _, active, _ in lb.stats())


def test_least_connections_balances_held_connections_over_16_backends() -> None:
    backends = [f"10.0.0.{i}:80" for i in range(32)]
    lb = LoadBalancer(backends, strategy="least_connections")
    guards = [lb.connection() for _ in range(320)]
    counts = Counter(g.backend for g in guards)
    assert max(counts.values()) <= 16  # power of two choices keeps the max near the mean of 10
    for g in guards:
        g.release()


def test_ip_hash_sticky_and_minimal_movement() -> None:
    backends = [f"10.0.0.{i}:80" for i in range(5)]
    lb = LoadBalancer(backends, strategy="ip_hash")
    clients = [f"192.168.1.{i % 250}:{i}" for i in range(5000)]
    before = {c: lb.pick(c) for c in clients}
    assert before == {c: lb.pick(c) for c in clients}
    lb.remove(backends[1])
    after = {c: lb.pick(c) for c in clients}
    moved = [c for c in clients if before[c] != after[c]]
    assert all(before[c] == backends[1] for c in moved)
    assert 0.12 < len(moved) / len(clients) < 0.28  # about 1/5


def test_random_and_add() -> None:
    lb = LoadBalancer(["a"], strategy="random")
    lb.add("b")
    assert len(lb) == 2
    counts = Counter(lb.pick() for _ in range(2000))
    assert set(counts) == {"a", "b"} and min(counts.values()) > 800


def test_arbitrary_objects_as_backends() -> None:
    backends = [("127.0.0.1", 8000), ("127.0.0.1", 8001)]
    lb = LoadBalancer(backends, strategy="ip_hash")
    assert lb.pick(12345) in backends
    assert lb.pick(b"client") in backends


def test_no_backend_and_bad_config() -> None:
    lb = LoadBalancer(["a"])
    lb.mark_down("a")
    with pytest.raises(NoBackendError, match=r"1 configured, 1 down"):
        lb.pick()
    with pytest.raises(KeyError):
        lb.mark_down("zzz")
    with pytest.raises(ValueError, match="strategy"):
        LoadBalancer(["a"], strategy="fastest")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        LoadBalancer(["a"], strategy="weighted_round_robin", weights=[0])
    with pytest.raises(ValueError, match="weights"):
        LoadBalancer(["a"], weights=[1, 2])


def test_round_robin_is_even_under_threads() -> None:
    lb = LoadBalancer(["a", "b", "c", "d"])
    counts: Counter[str] = Counter()
    lock = threading.Lock()

    def work() -> None:
        local = Counter(lb.pick() for _ in range(4000))
        with lock:
            counts.update(local)

    ts = [threading.Thread(target=work) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert set(counts.values()) == {4000}
