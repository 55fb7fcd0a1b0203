"""Commands about the machine every stack shares: ``ls`` (every stack on it, as ``docker
compose ls``) and ``machine`` (its settings, its ledger, what is left)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from corral.cli.common import app, out, printable
from corral.units import format_bytes, format_mib

if TYPE_CHECKING:
    from corral.state import DeploymentStatus

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _size(mib: int | None, default: str) -> str:
    return format_mib(mib) if mib is not None else default


def _cpus(cpus: list[int]) -> str:
    return ",".join(map(str, cpus)) if cpus else "-"


@app.command(name="ls")
def ls(as_json: JsonOpt = False) -> None:
    """List the stacks on the machine you may view (root: every one): state, healthy/total
    instances, and the cores, memory, storage and ports each holds in the machine ledger."""
    from corral.machine import Machine
    from corral.machine.ls import port_ranges, stack_rows

    rows = stack_rows(Machine().view(), ask=_status_as_me)
    if as_json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
        return
    if not rows:
        out.print("no stacks on this machine", markup=False)
        return
    # Plain columns, never wrapped (as docker compose ls prints them): read by grep and awk too.
    table = [("NAME", "DIRECTORY", "STATE", "INSTANCES", "CORES", "CPU", "MEMORY", "STORAGE", "PORTS", "AGENT")]
    for r in rows:
        table.append((printable(r.name), printable(r.directory), printable(r.state),
                      "?" if r.total is None else f"{r.healthy}/{r.total}", _cpus(r.cpus),
                      f"{r.millicores / 1000:g}" if r.millicores else "-",
                      format_mib(r.memory_mb) if r.memory_mb else "-",
                      _storage(r.storage_used, r.storage_mb), port_ranges(r.ports) or "-",
                      str(r.agent_pid or "-")))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _storage(used: int | None, reserved_mb: int) -> str:
    """``312Mi/1Gi``: what the volumes hold, of what they reserve."""
    if not reserved_mb:
        return "-"
    return (format_bytes(used) if used is not None else "?") + "/" + format_mib(reserved_mb)


def _status_as_me(state_dir: Path) -> DeploymentStatus | None:
    """Another user's stack, as its agent answers this caller: None when it refuses (no
    role under its ``access:``) or does not answer."""
    from corral.agent.client import AgentClient
    from corral.exceptions import CorralError

    try:
        return AgentClient(state_dir).status()
    except (CorralError, OSError):
        return None


@app.command(name="machine")
def machine(as_json: JsonOpt = False) -> None:
    """Show the machine's settings (and where each comes from), its ledger, and what is left
    for a new stack."""
    from corral._core import Topology
    from corral.machine import Machine

    m = Machine()
    view = m.view(Topology.detect())
    if as_json:
        print(json.dumps(view.to_dict(), indent=2, default=str))
        return
    s, free = view.settings, view.free
    assert free is not None
    src = str(s.source) if s.source is not None else "none (every value is the default)"
    lines = [f"ledger: {view.directory}", f"settings: {src}"]

    def origin(key: str) -> str:
        return "file" if key in s.given else "default"

    reserved = (_cpus(list(s.reserved_cpus)) if s.reserved_cpus is not None
                else f"{_cpus(sorted(set(Topology.detect().cpus) - set(free.usable_cpus)))} (CPU 0 when more than one)")
    lines += [
        f"  reserved_cpus: {reserved} [{origin('reserved_cpus')}]",
        f"  memory_reserve: {_size(s.memory_reserve_mb, '10%, at most 1Gi')} [{origin('memory_reserve')}]",
        f"  disk_reserve: {_size(s.disk_reserve_mb, '5%, at most 10Gi')} of each filesystem [{origin('disk_reserve')}]",
        f"  cpu_overcommit: {s.cpu_overcommit:g} [{origin('cpu_overcommit')}]",
        f"  memory_overcommit: {s.memory_overcommit:g} [{origin('memory_overcommit')}]",
        f"  port_range: {s.port_range[0]}-{s.port_range[1]} [{origin('port_range')}]",
        f"stacks: {len(view.holders)} ({sum(1 for h in view.holders if h.alive)} running)",
        f"exclusive CPUs free: {_cpus(free.cpus)} of {_cpus(free.usable_cpus)}",
        f"shared CPU free: {free.shared_millicores / 1000:g} of {free.shared_capacity_millicores / 1000:g} cores",
        f"memory free: {format_mib(free.memory_mb)} of {format_mib(free.memory_capacity_mb)}",
        f"auto ports free: {free.ports} of {free.port_range[0]}-{free.port_range[1]}",
    ]
    for line in lines:
        out.print(printable(line), markup=False)
