from __future__ import annotations

import asyncio
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral import Instance, ServiceRegistry


def inst(svc: str, i: str, port: int = 8000, healthy: bool = True) -> Instance:
    return Instance(service=svc, id=i, host="127.0.0.1", port=port, healthy=healthy)


def test_register_get_instances_and_health() -> None:
    reg = ServiceRegistry()
    assert reg.register(inst("api", "a1", 1)) is True
    assert reg.register(inst("api", "a2", 2)) is True
    assert len(reg) == 2 and "a1" in reg
    got = reg.get("a1")
    assert got is not None and got.port == 1 and got.address == "127.0.0.1:1"
    assert reg.set_health("a1", False)
    assert [i.id for i in reg.instances("api")] == ["a1", "a2"]
    assert [i.id for i in reg.instances("api", healthy_only=True)] == ["a2"]
    assert reg.set_health("nope", True) is False
    assert reg.get("nope") is None
    assert reg.instances("nothing") == []


def test_replace_counts_once_and_is_visible() -> None:
    reg = ServiceRegistry()
    reg.register(inst("api", "a1", 1))
    g = reg.generation
    assert reg.register(inst("api", "a1", 2)) is False
    assert len(reg) == 1
    assert reg.generation == g + 1
    assert reg.get("a1") == inst("api", "a1", 2)


def test_tags_meta_and_replace() -> None:
    i = Instance(service="db", id="d", host="::1", port=5432, tags=("primary",), meta={"zone": "a"})
    assert i.tags == ("primary",) and i.meta == {"zone": "a"} and i.address == "[::1]:5432"
    j = i.replace(healthy=False, port=1)
    assert (j.healthy, j.port, j.service) == (False, 1, "db")
    reg = ServiceRegistry()
    reg.register(i)
    got = reg.get("d")
    assert got is not None and got.meta == {"zone": "a"}


def test_deregister() -> None:
    reg = ServiceRegistry()
    reg.register(inst("api", "a1"))
    gone = reg.deregister("a1")
    assert gone is not None and gone.id == "a1"
    assert reg.deregister("a1") is None
    assert len(reg) == 0 and reg.services() == []


def test_thousand_registrations_from_eight_python_threads() -> None:
    reg = ServiceRegistry()
    barrier = threading.Barrier(8)

    def work(t: int) -> None:
        barrier.wait()
        for i in range(125):
            reg.register(inst(f"s{i % 5}", f"{t}-{i}", 20000 + i))
            reg.instances("s1", healthy_only=True)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(reg) == 1000
    assert reg.generation == 1000
    assert sum(len(reg.instances(s)) for s in reg.services()) == 1000


async def test_watch_yields_changes_in_order() -> None:
    reg = ServiceRegistry()
    watch = reg.watch()
    reg.register(inst("api", "a1"))
    reg.set_health("a1", False)
    reg.deregister("a1")
    events = [await asyncio.wait_for(watch.__anext__(), 5) for _ in range(3)]
    assert [e.kind for e in events] == ["registered", "health_changed", "deregistered"]
    assert [e.generation for e in events] == [1, 2, 3]
    assert events[1].instance is not None and events[1].instance.healthy is False


async def test_watch_wakes_on_a_change_from_another_thread() -> None:
    reg = ServiceRegistry()

    async def first() -> str:
        async for ev in reg.watch():
            assert ev.instance is not None
            return ev.instance.id
        raise AssertionError("watch ended")

    task = asyncio.create_task(first())
    await asyncio.sleep(0.05)
    threading.Thread(target=reg.register, args=(inst("api", "late"),)).start()
    assert await asyncio.wait_for(task, 5) == "late"


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["reg", "dereg", "health"]), st.integers(0, 9),
                          st.sampled_from(["a", "b"]), st.booleans()), max_size=60))
def test_matches_a_dict_model(ops: list[tuple[str, int, str, bool]]) -> None:
    reg = ServiceRegistry()
    model: dict[str, tuple[str, bool]] = {}
    for op, n, svc, flag in ops:
        key = f"i{n}"
        if op == "reg":
            assert reg.register(inst(svc, key, healthy=flag)) == (key not in model)
            model[key] = (svc, flag)
        elif op == "dereg":
            assert (reg.deregister(key) is not None) == (key in model)
            model.pop(key, None)
        else:
            assert reg.set_health(key, flag) == (key in model)
            if key in model:
                model[key] = (model[key][0], flag)
        assert len(reg) == len(model)
        for s in ("a", "b"):
            assert sorted(i.id for i in reg.instances(s)) == sorted(k for k, v in model.items() if v[0] == s)
            assert sorted(i.id for i in reg.instances(s, healthy_only=True)) == sorted(
                k for k, v in model.items() if v[0] == s and v[1]
            )


def test_instance_requires_keywords() -> None:
    with pytest.raises(TypeError):
        Instance("api", "a", "h", 1)  # type: ignore[misc]
