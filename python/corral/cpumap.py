"""The picture of the machine that ``corral plan --map`` and ``corral status --map`` draw:
NUMA nodes, then L3 domains with their size, then physical cores, then SMT threads, each
CPU with what holds it: an instance (exclusively), the shared pool, or the system
(reserved). This module builds the picture as lines of text; the CLI prints them literally.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from corral._core import Topology

if TYPE_CHECKING:
    from corral.machine import MachineView
    from corral.state import InstanceRow

__all__ = ["held_cpus", "machine_map", "others_cpus"]


def held_cpus(instances: Iterable[InstanceRow]) -> dict[int, str]:
    """CPU -> the instance holding it exclusively, from a running stack's status (what
    ``status --map`` and ``corral top`` draw)."""
    return {cpu: i.id for i in instances if i.exclusive and i.is_alive_state() for cpu in i.cpus}


def others_cpus(view: MachineView, me: str) -> dict[int, str]:
    """CPU -> ``<stack>:<instance>`` for the exclusive CPUs other stacks hold on the machine
    (``me`` is this stack's id): the map shows them under their stack's name."""
    return {cpu: f"{h.name}:{inst}" for cpu, (h, inst) in view.cpu_holders().items() if h.stack != me}


def _size(kb: int) -> str:
    return f"{kb // 1024} MiB" if kb >= 1024 and kb % 1024 == 0 else f"{kb} KiB"


def machine_map(topology: Topology, holders: Mapping[int, str], usable: set[int]) -> list[str]:
    """The lines of the picture. ``holders``: CPU -> the instance holding it exclusively;
    ``usable``: the CPUs the ledger may hand out (the others are the system's)."""
    def who(cpu: int) -> str:
        if cpu in holders:
            return holders[cpu]
        return "shared" if cpu in usable else "reserved (system)"

    l3s = topology.l3_domains
    cores = topology.cores
    nodes = topology.numa_nodes
    lines = [f"machine: {len(nodes)} NUMA node{'s' if len(nodes) != 1 else ''}, {len(l3s)} L3 domain"
             f"{'s' if len(l3s) != 1 else ''}, {len(cores)} cores, {len(topology.cpus)} CPUs"]
    for n_i, node in enumerate(nodes):
        last_node = n_i == len(nodes) - 1
        lines.append(f"{'└' if last_node else '├'}── node {node.id} ({node.memory_mb // 1024} GiB)")
        pad = "    " if last_node else "│   "
        domains = [d for d in l3s if d.numa_node == node.id]
        for d_i, dom in enumerate(domains):
            last_dom = d_i == len(domains) - 1
            lines.append(f"{pad}{'└' if last_dom else '├'}── L3 {dom.id} ({_size(dom.size_kb)})")
            pad2 = pad + ("    " if last_dom else "│   ")
            members = set(dom.cpus)
            mine = [(k, c) for k, c in enumerate(cores) if c and c[0] in members]
            for c_i, (number, core) in enumerate(mine):
                last_core = c_i == len(mine) - 1
                threads = ", ".join(f"cpu {cpu}: {who(cpu)}" for cpu in core)
                lines.append(f"{pad2}{'└' if last_core else '├'}── core {number}: {threads}")
    return lines
