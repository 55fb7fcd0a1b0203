"""The picture of the machine (`plan --map`, `status --map`): NUMA nodes, L3 domains with
their size, physical cores, SMT threads, and who holds each CPU. Fake sysfs trees of a
7950X3D and a dual-socket machine (this machine has neither), then the real CLI here."""

from __future__ import annotations

from pathlib import Path

from corral._core import ResourceManager, ResourceRequest, Topology
from corral.cpumap import machine_map
from tests.e2e import write_spec
from tests.test_cli import corral

SYSFS = Path(__file__).parent / "fixtures" / "sysfs"


def test_a_7950x3d_shows_both_l3_domains_their_sizes_and_a_holder_on_both_threads_of_a_core() -> None:
    t = Topology.from_sysfs(SYSFS / "ryzen-7950x3d")
    rm = ResourceManager(t)
    grant = rm.allocate(ResourceRequest(cores=2, cache="prefer-large"))
    lines = machine_map(t, dict.fromkeys(grant.cpus, "worker-0"), set(rm.usage().cpus))
    assert lines[0] == "machine: 1 NUMA node, 2 L3 domains, 16 cores, 32 CPUs"
    assert lines[1] == "└── node 0 (64 GiB)"
    assert "    ├── L3 0 (96 MiB)" in lines and "    └── L3 1 (32 MiB)" in lines
    assert "    │   ├── core 0: cpu 0: reserved (system), cpu 16: shared" in lines
    held = [line for line in lines if "worker-0" in line]
    assert len(held) == 1 and held[0].count("worker-0") == 2, "one physical core, both its threads"
    big = lines.index("    ├── L3 0 (96 MiB)")
    assert big < lines.index(held[0]) < lines.index("    └── L3 1 (32 MiB)"), "on the large-cache domain"
    assert sum(line.count("cpu ") for line in lines) == 32


def test_a_dual_socket_machine_draws_two_nodes_each_with_its_domains() -> None:
    t = Topology.from_sysfs(SYSFS / "dual-socket")
    lines = machine_map(t, {31: "db-0"}, set(ResourceManager(t).usage().cpus))
    assert lines[0] == "machine: 2 NUMA nodes, 4 L3 domains, 16 cores, 32 CPUs"
    nodes = [line for line in lines if "── node " in line]
    assert nodes == ["├── node 0 (64 GiB)", "└── node 1 (64 GiB)"]
    assert lines[-1].endswith("cpu 15: shared, cpu 31: db-0")
    assert sum(1 for line in lines if "── L3 " in line) == 4


def test_plan_and_status_draw_this_machine(tmp_path: Path) -> None:
    write_spec(tmp_path, """
        name: mapped
        services:
          pinned:
            command: ["sleep", "300"]
            resources: {cores: 1}
        """)
    r = corral("plan", "--map", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("machine: ") and "pinned-0" in r.stdout, r
    assert corral("up", "-d", cwd=tmp_path).returncode == 0
    try:
        r = corral("status", "--map", cwd=tmp_path)
        assert r.returncode == 0 and "pinned-0" in r.stdout and "reserved (system)" in r.stdout, r
    finally:
        corral("down", cwd=tmp_path)
