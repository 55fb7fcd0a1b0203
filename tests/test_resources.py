from __future__ import annotations

import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral import (
    ConfigError,
    InsufficientResources,
    ResourceError,
    ResourceManager,
    ResourceRequest,
    Topology,
)


def manager(sysfs: Path, name: str, **kw: object) -> ResourceManager:
    return ResourceManager(Topology.from_sysfs(sysfs / name), **kw)  # type: ignore[arg-type]


def test_exclusive_cores_whole_physical_cores_and_cpu0_reserved(sysfs: Path) -> None:
    rm = manager(sysfs, "ryzen-7800x3d")
    g = rm.allocate(ResourceRequest(cores=4))
    assert 0 not in g.cpus and len(g.cpus) == 4
    topo = Topology.from_sysfs(sysfs / "ryzen-7800x3d")
    for c in g.cpus:
        assert set(topo.siblings(c)) <= set(g.cpus)
    with pytest.raises(InsufficientResources, match=r"asked 12 exclusive cores, 11 free of 15 \(CPU 0 reserved"):
        rm.allocate(ResourceRequest(cores=12))


def test_prefer_large_cache(sysfs: Path) -> None:
    rm = manager(sysfs, "ryzen-7950x3d")
    g = rm.allocate(ResourceRequest(cores=4, cache="prefer-large"))
    assert g.l3_domains == [0]


def test_numa_require_and_node_memory(sysfs: Path) -> None:
    rm = manager(sysfs, "dual-socket", memory_mb=2000)
    a = rm.allocate(ResourceRequest(cores=2, numa="require", memory_mb=700))
    b = rm.allocate(ResourceRequest(cores=2, numa="require", memory_mb=700))
    assert {a.numa_node, b.numa_node} == {0, 1}
    with pytest.raises(InsufficientResources) as e:
        rm.allocate(ResourceRequest(cores=2, numa="require", memory_mb=500))
    assert str(e.value) == "memory: asked 500 MiB, 300 MiB free on node 0, 600 MiB free in total"


def test_storage_volume(sysfs: Path, tmp_path: Path) -> None:
    rm = manager(sysfs, "no-smt", volumes={"data": (str(tmp_path), 100), "scratch": str(tmp_path)})
    rm.allocate(ResourceRequest(storage_mb=80, volume="data"))
    with pytest.raises(InsufficientResources, match="storage: asked 30 MiB on volume 'data', 20 MiB free of 100 MiB"):
        rm.allocate(ResourceRequest(storage_mb=30, volume="data"))
    assert rm.usage().volumes["scratch"].capacity_mb > 0
    (tmp_path / "blob").write_bytes(b"x" * 100_000)
    assert rm.volume_usage("data") >= 100_000
    with pytest.raises(ConfigError, match="unknown volume"):
        rm.allocate(ResourceRequest(storage_mb=1, volume="nope"))


def test_shared_cpu_and_overcommit(sysfs: Path) -> None:
    rm = manager(sysfs, "no-smt", cpu_overcommit=2.0)  # 4 CPUs (reserved CPU 0 included) -> 8000 millicores
    g = rm.allocate(ResourceRequest(cpu=7.5))
    assert g.millicores == 7500
    with pytest.raises(InsufficientResources, match="shared pool"):
        rm.allocate(ResourceRequest(cpu=1.0))


def test_release_exactly_once_and_all_or_nothing(sysfs: Path) -> None:
    rm = manager(sysfs, "ryzen-7800x3d", memory_mb=100)
    before = rm.usage()
    with pytest.raises(InsufficientResources, match="memory"):
        rm.allocate(ResourceRequest(cores=2, cpu=1.0, memory_mb=500))
    assert rm.usage() == before
    g = rm.allocate(ResourceRequest(cores=2, memory_mb=50))
    rm.release(g)
    with pytest.raises(ResourceError, match="not held"):
        rm.release(g)
    with pytest.raises(ResourceError):
        rm.release(g.id)
    assert rm.usage() == before


def test_bad_requests(sysfs: Path) -> None:
    with pytest.raises(ValueError, match="numa"):
        ResourceRequest(numa="always")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cpu"):
        ResourceRequest(cpu=-1)
    with pytest.raises(ConfigError, match="reserved CPU 9"):
        manager(sysfs, "no-smt", reserved_cpus=[9])


def test_threads_never_double_grant(sysfs: Path) -> None:
    rm = manager(sysfs, "dual-socket")
    grants: list[list[int]] = []
    lock = threading.Lock()

    def work() -> None:
        for _ in range(200):
            try:
                g = rm.allocate(ResourceRequest(cores=3))
            except InsufficientResources:
                continue
            with lock:
                grants.append(g.cpus)

    ts = [threading.Thread(target=work) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    flat = [c for g in grants for c in g]
    assert len(flat) == len(set(flat)) == 30  # 31 usable CPUs, 10 grants of 3


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 2000), st.integers(0, 4000), st.booleans()),
                max_size=40))
def test_ledger_totals(sysfs: Path, ops: list[tuple[int, int, int, bool]]) -> None:
    rm = manager(sysfs, "ryzen-7950x3d", memory_mb=16000)
    held = []
    for cores, milli, mem, release in ops:
        if release and held:
            rm.release(held.pop(0))
            continue
        try:
            held.append(rm.allocate(ResourceRequest(cores=cores, cpu=milli / 1000, memory_mb=mem)))
        except InsufficientResources:
            pass
        u = rm.usage()
        assert u.memory_used_mb == sum(g.memory_mb for g in held) <= u.memory_capacity_mb
        assert u.shared_used_millicores <= u.shared_capacity_millicores
        cpus = [c for g in held for c in g.cpus]
        assert len(cpus) == len(set(cpus)) and sorted(cpus) == u.exclusive_cpus
