from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from corral import Topology


def test_detect_matches_this_machine() -> None:
    t = Topology.detect()
    assert set(t.cpus) <= os.sched_getaffinity(0)
    assert set(t.cpus) == os.sched_getaffinity(0) & set(t.online)
    assert t.memory_mb > 0
    for c in t.cpus:
        assert c in t.siblings(c)


def test_7800x3d(sysfs: Path) -> None:
    t = Topology.from_sysfs(sysfs / "ryzen-7800x3d")
    assert len(t.cpus) == 16 and len(t.cores) == 8 and t.threads_per_core == 2
    assert len(t.numa_nodes) == 1 and t.numa_nodes[0].memory_mb == 32768
    [l3] = t.l3_domains
    assert l3.size_kb == 96 * 1024 and len(l3.cpus) == 16
    assert t.siblings(0) == [0, 8]


def test_7950x3d(sysfs: Path) -> None:
    t = Topology.from_sysfs(sysfs / "ryzen-7950x3d")
    assert [d.size_kb // 1024 for d in t.l3_domains] == [96, 32]
    assert t.l3_of(20) == 0 and t.l3_of(9) == 1


def test_dual_socket(sysfs: Path) -> None:
    t = Topology.from_sysfs(sysfs / "dual-socket")
    assert t.packages == [0, 1]
    assert [n.id for n in t.numa_nodes] == [0, 1]
    assert len(t.l3_domains) == 4
    assert t.numa_node_of(9) == 1 and t.numa_node_of(16) == 0


def test_no_smt(sysfs: Path) -> None:
    t = Topology.from_sysfs(sysfs / "no-smt")
    assert t.cpus == [0, 1, 2, 3] and t.threads_per_core == 1 and t.siblings(2) == [2]


def test_cpuset_narrows(sysfs: Path, tmp_path: Path) -> None:
    root = tmp_path / "sys"
    shutil.copytree(sysfs / "no-smt", root)
    (root / "fs/cgroup").mkdir(parents=True)
    (root / "fs/cgroup/cpuset.cpus.effective").write_text("2-3\n")
    t = Topology.from_sysfs(root)
    assert t.cpus == [2, 3] and t.online == [0, 1, 2, 3]


def test_missing_tree_is_an_oserror() -> None:
    with pytest.raises(FileNotFoundError):
        Topology.from_sysfs("/nonexistent/sys")
