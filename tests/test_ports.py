from __future__ import annotations

import socket
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral import ConfigError, CorralError, PortAllocator, PortError, PortInUse, PortsExhausted


def test_defaults_and_counts() -> None:
    p = PortAllocator()
    assert p.ranges == [(20000, 32000)] and p.capacity == 12001
    x = p.allocate()
    assert 20000 <= x <= 32000 and p.available == 12000 and p.in_use == 1
    p.release(x)
    assert p.available == 12001


def test_exhausted_names_range_and_counts() -> None:
    p = PortAllocator(20000, 20002)
    for _ in range(3):
        p.allocate()
    with pytest.raises(PortsExhausted) as e:
        p.allocate()
    assert str(e.value) == "port range 20000-20002 exhausted (3 of 3 in use)"
    assert (e.value.ranges, e.value.in_use, e.value.total) == ("20000-20002", 3, 3)
    assert isinstance(e.value, PortError) and isinstance(e.value, CorralError)


def test_reserved_static_named_and_holder() -> None:
    p = PortAllocator(20000, 20010, reserved=[20001])
    assert p.allocate(20005, name="db.http") == 20005
    with pytest.raises(PortInUse) as e:
        p.allocate(20005)
    assert e.value.port == 20005 and e.value.holder == "db.http"
    with pytest.raises(PortInUse, match="reserved"):
        p.allocate(20001)
    assert 20001 not in {p.allocate() for _ in range(9)}
    with pytest.raises(PortError, match="not allocated"):
        p.release(20001)


def test_multiple_ranges_and_bad_ranges() -> None:
    p = PortAllocator(ranges=[(21000, 21000), (20000, 20000)])
    assert sorted([p.allocate(), p.allocate()]) == [20000, 21000]
    with pytest.raises(ConfigError, match="start after end"):
        PortAllocator(5, 4)
    with pytest.raises(ValueError):
        PortAllocator(0, 4)


def test_just_released_port_is_not_reused_at_once() -> None:
    p = PortAllocator(20000, 20099)
    a = p.allocate()
    p.release(a)
    assert a not in {p.allocate() for _ in range(50)}


def _two_free_ports() -> int:
    """A port whose next port is free too, below the kernel's ephemeral range (32768+): a
    port the kernel hands out (as port 0 would) may have its neighbour taken by any
    outgoing connection on a busy machine."""
    for base in range(24600, 25600, 2):
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", base))
                b.bind(("127.0.0.1", base + 1))
            except OSError:
                continue
            return base
    raise AssertionError("no two free ports in 24600-25600")


def test_bind_check_skips_a_port_another_process_holds() -> None:
    # A real listening socket holds the port; the allocator must skip it and say who holds it.
    with socket.socket() as s:
        s.bind(("127.0.0.1", _two_free_ports()))
        s.listen()
        held = s.getsockname()[1]
        p = PortAllocator(held, held + 1, check_bind="127.0.0.1")
        got = p.allocate()
        assert got == held + 1
        with pytest.raises(PortInUse) as e:
            p.allocate(held)
        assert e.value.holder is not None
        assert f"pid {__import__('os').getpid()}" in e.value.holder
    assert p.refresh() == 1
    assert not p.is_allocated(held)


def test_concurrent_threads_never_share_a_port() -> None:
    p = PortAllocator(20000, 20999)
    results: list[list[int]] = [[] for _ in range(8)]

    def work(i: int) -> None:
        mine = results[i]
        for k in range(1500):
            if k % 3 == 2 and mine:
                p.release(mine.pop())
            else:
                try:
                    mine.append(p.allocate())
                except PortsExhausted:
                    pass

    ts = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    held = [x for r in results for x in r]
    assert len(held) == len(set(held))
    assert p.available == 1000 - len(held)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.just(("dyn", 0)), st.tuples(st.just("static"), st.integers(95, 125)),
                          st.tuples(st.just("rel"), st.integers(95, 125))), max_size=80))
def test_model(ops: list[tuple[str, int]]) -> None:
    p = PortAllocator(100, 119)
    held: set[int] = set()
    for op, x in ops:
        if op == "dyn":
            try:
                got = p.allocate()
            except PortsExhausted:
                assert len(held) == 20
            else:
                assert got not in held and 100 <= got <= 119
                held.add(got)
        elif op == "static":
            ok = 100 <= x <= 119 and x not in held
            if ok:
                assert p.allocate(x) == x
                held.add(x)
            else:
                with pytest.raises(PortError):
                    p.allocate(x)
        else:
            if x in held:
                p.release(x)
                held.remove(x)
            else:
                with pytest.raises(PortError):
                    p.release(x)
        assert p.available == 20 - len(held)
