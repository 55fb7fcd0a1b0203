"""Planning: phases, priority, NUMA-aware placement, all-or-nothing, binpack/spread.

Topologies come from the fake sysfs trees (fakes on purpose: this machine is none of them).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from corral import PortAllocator, ResourceManager, Topology
from corral.exceptions import SpecError
from corral.scheduler import Scheduler, phases
from corral.spec import parse_spec


def _scheduler(sysfs: Path, name: str, policy: str = "binpack", memory_mb: int | None = None) -> Scheduler:
    topo = Topology.from_sysfs(sysfs / name)
    rm = ResourceManager(topo, memory_mb=memory_mb)
    return Scheduler(topo, rm, PortAllocator(21000, 21100), policy)


SPEC = """\
name: t
services:
  kv: {command: [kv], ports: {http: auto}, resources: {cpu: 1, memory: 1Gi}}
  api:
    command: [api]
    replicas: 3
    depends_on: {kv: healthy}
    ports: {http: auto, admin: auto}
    resources: {cpu: 0.5, memory: 256Mi}
  worker: {command: [w], depends_on: {api: started}, resources: {cores: 4, numa: require}, priority: 10}
  cache: {command: [c], resources: {cores: 8, cache: prefer-large}, priority: 5}
"""


def test_phases_are_dependency_levels() -> None:
    assert phases(parse_spec(SPEC)) == [["cache", "kv"], ["api"], ["worker"]]


def test_placement_is_numa_and_cache_aware_and_priority_goes_first(sysfs: Path) -> None:
    s = _scheduler(sysfs, "ryzen-7950x3d")
    topo = s.topology
    plan = s.plan(parse_spec(SPEC))
    worker = plan.placements["worker"][0]
    cache = plan.placements["cache"][0]
    # The 7950X3D: CCD0 has the 96 MiB L3. prefer-large puts the 8 cores there;
    # priority 10 placed the worker first, on whole cores of one L3 domain.
    big = max(topo.l3_domains, key=lambda d: d.size_kb)
    assert set(cache.cpus) <= set(big.cpus)
    assert len({topo.l3_of(c) for c in worker.cpus}) == 1
    # `cores` counts logical CPUs; they come as whole physical cores (both SMT siblings).
    whole = {tuple(c) for c in topo.cores if c[0] in worker.cpus}
    assert sorted(c for core in whole for c in core) == worker.cpus and len(whole) == 2
    assert not set(worker.cpus) & set(cache.cpus)
    ports = [p for ps in plan.placements.values() for i in ps for p in i.ports.values()]
    assert len(ports) == len(set(ports)) == 7 and all(21000 <= p <= 21100 for p in ports)
    assert [i.id for i in plan.instances()] == ["cache-0", "kv-0", "api-0", "api-1", "api-2", "worker-0"]
    s.release(plan)
    assert s.resources.usage().grants == 0 and s.ports.in_use == 0


def test_all_or_nothing_names_the_instance_and_releases(sysfs: Path) -> None:
    s = _scheduler(sysfs, "ryzen-7800x3d", memory_mb=1000)
    spec = parse_spec("name: t\nservices:\n  a:\n    command: [a]\n    replicas: 3\n"
                      "    ports: {p: auto}\n    resources: {memory: 400Mi}\n", "x.yaml")
    with pytest.raises(SpecError) as info:
        s.plan(spec)
    e = info.value
    assert (e.file, e.line, e.field) == ("x.yaml", 7, "services.a.resources")
    assert e.message.startswith("a-2 does not fit: memory")
    assert s.resources.usage().grants == 0 and s.ports.in_use == 0


@pytest.mark.parametrize(("policy", "same_node"), [("binpack", True), ("spread", False)])
def test_binpack_fills_a_node_spread_balances(sysfs: Path, policy: str, same_node: bool) -> None:
    s = _scheduler(sysfs, "dual-socket", policy)
    spec = parse_spec("name: t\nservices:\n  a: {command: [a], replicas: 2, resources: {cpu: 0.5, memory: 1Gi}}\n")
    plan = s.plan(spec)
    used = [n.used_mb for _, n in sorted(s.resources.usage().memory_by_node.items())]
    assert (0 in used) == same_node, used
    assert sum(used) == 2048
    s.release(plan)


def test_fixed_ports_and_fronts_are_reserved_before_any_auto_port(sysfs: Path) -> None:
    s = _scheduler(sysfs, "no-smt")
    spec = parse_spec("""\
name: t
services:
  first: {command: [a], ports: {http: auto, admin: auto}, priority: 10}
  fixed: {command: [b], ports: {http: 21000}}
  front: {command: [c], ports: {http: auto}, expose: 21001}
""")
    plan = s.plan(spec)
    assert plan.placements["fixed"][0].ports == {"http": 21000}
    assert plan.fronts == {"front": 21001}
    auto = [*plan.placements["first"][0].ports.values(), plan.placements["front"][0].ports["http"]]
    assert not {21000, 21001} & set(auto), auto
    s.release(plan)
    assert s.ports.in_use == 0
