"""``corral top``: a terminal UI (Textual) for a running stack.

One row per instance (service, instance, state, health, ports, pid, CPU%, RSS, restarts,
CPUs, its service's storage as ``312Mi/1Gi``), sorted by any column (click its header, or
``o`` for the next column, ``O`` to reverse) and refreshed each second from the agent; the
selected instance's log, following;
keys that restart, stop, start and scale the selected service through the same
:class:`~corral.agent.client.AgentClient` as the CLI; and the machine drawn as
``corral status --map`` draws it (NUMA nodes, L3 domains, cores, threads, and who holds each
CPU).

The state comes from the agent (its status answers from the state database); CPU% and RSS
are read here, from ``/proc`` for each instance's process tree (the core's ``group_usage``),
as ``top`` reads them: the agent does no extra work for a watcher. Everything the stack's
services said (ids, reasons, log lines) is shown as text, never as markup.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Footer, Header, Log, Static

from corral._core import ResourceManager, Topology, group_usage
from corral.agent.client import AgentClient
from corral.agent.logs import Cursor
from corral.cpumap import held_cpus, machine_map
from corral.exceptions import AgentUnavailable, CorralError
from corral.state import DeploymentStatus, InstanceRow
from corral.terminal import printable

__all__ = ["COLUMNS", "Row", "TopApp", "rows_of"]

_TICK = os.sysconf("SC_CLK_TCK")

COLUMNS = ("service", "instance", "state", "health", "ports", "pid", "cpu%", "rss", "restarts", "cpus", "storage")
"""In this order: what an operator reads first (where it is reached, how it is) fits in 80
columns; the figures after it scroll."""


@dataclass
class Row:
    """One instance as the table shows it."""

    service: str
    instance: str
    state: str
    health: str
    pid: int | None
    cpu: float | None
    rss: int | None
    restarts: int
    ports: str
    cpus: str
    log: Path | None
    storage: str = ""
    """The service's volume, ``312Mi/1Gi`` (shared by its replicas)."""

    def key(self, column: str) -> Any:
        """What ``column`` sorts by (numbers as numbers, blanks last)."""
        value = {"cpu%": self.cpu, "rss": self.rss, "pid": self.pid}.get(column, getattr(self, column, None))
        return (value is None, value if value is not None else 0)

    def cells(self) -> list[Text]:
        """The row's cells, literal text."""
        return [Text(v) for v in (
            self.service, self.instance, self.state, self.health, self.ports or "-", str(self.pid or "-"),
            "-" if self.cpu is None else f"{self.cpu:.1f}", _mib(self.rss), str(self.restarts),
            self.cpus or "-", self.storage or "-")]


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 1048576:.1f} MiB"


def _cpus(cpus: list[int], exclusive: bool, millicores: int) -> str:
    if exclusive:
        return ",".join(map(str, cpus))
    return f"shared ({millicores}m)" if millicores else ("shared" if cpus else "")


class Usage:
    """CPU% between two readings of each instance's process tree, and its RSS."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[int, float]] = {}

    def read(self, insts: list[InstanceRow]) -> dict[str, tuple[float | None, int]]:
        live = [i for i in insts if i.pid and i.is_alive_state()]
        now = time.monotonic()
        out: dict[str, tuple[float | None, int]] = {}
        seen: dict[str, tuple[int, float]] = {}
        for inst, (ticks, rss, _fds, _n) in zip(live, group_usage([i.pid or 0 for i in live]), strict=True):
            key = f"{inst.id}:{inst.pid}"
            before = self._last.get(key)
            cpu = None if before is None else 100.0 * (ticks - before[0]) / _TICK / max(now - before[1], 1e-3)
            out[inst.id] = (cpu, rss)
            seen[key] = (ticks, now)
        self._last = seen
        return out


def rows_of(status: DeploymentStatus, usage: dict[str, tuple[float | None, int]], logs: Path) -> list[Row]:
    """The table's rows for a status and the usage read beside it (``logs``: where the
    instances' logs are when the status does not say)."""
    rows = []
    for insts in status.services.values():
        for i in insts:
            cpu, rss = usage.get(i.id, (None, None))
            alive = i.is_alive_state()
            rows.append(Row(i.service, i.id, i.state, "healthy" if i.healthy else ("not ready" if alive else "-"),
                            i.pid if alive else None, cpu, rss, i.restarts,
                            ",".join(f"{n}={p}" for n, p in sorted(i.ports.items())),
                            _cpus(i.cpus, i.exclusive, i.millicores), Path(i.log) if i.log else logs / f"{i.id}.log",
                            status.storage[i.service].text() if i.service in status.storage else ""))
    return rows


class TopApp(App[None]):
    """See the module docs."""

    TITLE = "corral top"
    CSS = """
    #instances { height: 1fr; }
    #bottom { height: 1fr; }
    #log { width: 3fr; border: solid $accent; }
    #machine { width: 2fr; border: solid $accent; overflow-y: auto; }
    #message { height: 1; }
    """
    BINDINGS: ClassVar[list[Binding | tuple[str, str] | tuple[str, str, str]]] = [
        Binding("q", "quit", "quit"),
        Binding("r", "restart", "restart"),
        Binding("s", "stop", "stop"),
        Binding("t", "start", "start"),
        Binding("plus,equals_sign", "scale(1)", "scale +1", key_display="+"),
        Binding("minus", "scale(-1)", "scale -1", key_display="-"),
        Binding("o", "sort(1)", "sort by next column"),
        Binding("O", "sort(0)", "reverse", show=False),
    ]

    def __init__(self, client: AgentClient, topology: Topology | None = None, refresh: float = 1.0) -> None:
        super().__init__()
        self.client = client
        self.topology = topology or Topology.detect()
        self.usable = set(ResourceManager(self.topology).usage().cpus)
        self.refresh_every = refresh
        self.usage = Usage()
        self.rows: list[Row] = []
        self.sort_column = "instance"
        self.sort_reverse = False
        self.status: DeploymentStatus | None = None
        self._log_key: tuple[str, str] | None = None
        self._log_cursor: Cursor | None = None
        self._busy = False

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical():
            yield DataTable(id="instances", cursor_type="row", zebra_stripes=True)
            yield Static(id="message")
            with Horizontal(id="bottom"):
                yield Log(id="log", highlight=False)
                yield Static(id="machine")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#instances", DataTable)
        for name in COLUMNS:
            table.add_column(name, key=name)
        self.query_one("#log", Log).border_title = "log"
        self.query_one("#machine", Static).border_title = "machine"
        self.poll()
        self.set_interval(self.refresh_every, self.poll)

    # --- refresh ----------------------------------------------------------------------

    @work(thread=True, exclusive=True, group="poll")
    def poll(self) -> None:
        """Reads the agent's status and the processes' usage (off the UI thread)."""
        try:
            status = self.client.status()
        except (AgentUnavailable, CorralError, OSError) as e:
            self.call_from_thread(self.say, f"no status from the agent: {e}")
            return
        usage = self.usage.read([i for insts in status.services.values() for i in insts])
        self.call_from_thread(self.show, status, rows_of(status, usage, self.client.state_dir / "logs"))

    def show(self, status: DeploymentStatus, rows: list[Row]) -> None:
        """Puts a fresh status on screen, keeping the selected instance selected."""
        self.status = status
        self.rows = rows
        agent = f"agent pid {status.agent_pid}" if status.agent_running else "agent not running"
        self.sub_title = f"{status.name}: {status.status}, spec v{status.version} ({agent})"
        self._fill_table()
        self._draw_machine(status)
        self._follow_log()

    def _fill_table(self) -> None:
        table = self.query_one("#instances", DataTable)
        selected = self.selected()
        self.rows.sort(key=lambda r: r.key(self.sort_column), reverse=self.sort_reverse)
        table.clear()
        for r in self.rows:
            table.add_row(*r.cells(), key=r.instance)
        ids = [r.instance for r in self.rows]
        if selected is not None and selected.instance in ids:
            table.move_cursor(row=ids.index(selected.instance))

    def _draw_machine(self, status: DeploymentStatus) -> None:
        holders = held_cpus(i for insts in status.services.values() for i in insts)
        lines = machine_map(self.topology, holders, self.usable)
        self.query_one("#machine", Static).update(Text("\n".join(lines)))

    def _follow_log(self) -> None:
        """Shows the selected instance's log: its tail when the selection changes, then
        what was added since (a rotated file starts over). Through the client, so a viewer
        (who may not read the files) sees it through the agent."""
        row = self.selected()
        log = self.query_one("#log", Log)
        key = (row.service, row.instance) if row is not None else None
        try:
            if key != self._log_key:
                self._log_key = key
                self._log_cursor = None
                log.clear()
                log.border_title = f"log: {row.instance}" if row is not None else "log"
            if key is None:
                return
            assert row is not None
            lines, self._log_cursor = self.client.instance_log(key[0], key[1], 200, self._log_cursor, row.log)
        except (AgentUnavailable, CorralError, OSError):
            return
        if lines:
            log.write_lines([printable(line) for line in lines])

    def selected(self) -> Row | None:
        """The row under the cursor."""
        table = self.query_one("#instances", DataTable)
        if not self.rows or table.row_count == 0:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        return next((r for r in self.rows if r.instance == key), None)

    def on_data_table_row_highlighted(self, _event: DataTable.RowHighlighted) -> None:
        self._follow_log()

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        column = str(event.column_key.value)
        self.sort_reverse = not self.sort_reverse if column == self.sort_column else False
        self.sort_column = column
        self._fill_table()

    def say(self, message: str) -> None:
        """One line under the table."""
        self.query_one("#message", Static).update(Text(message))

    # --- keys -------------------------------------------------------------------------

    def action_sort(self, step: int) -> None:
        """``o``: sort by the next column; ``O``: reverse."""
        if step:
            self.sort_column = COLUMNS[(COLUMNS.index(self.sort_column) + 1) % len(COLUMNS)]
        else:
            self.sort_reverse = not self.sort_reverse
        self.say(f"sorted by {self.sort_column}{' (reversed)' if self.sort_reverse else ''}")
        self._fill_table()

    def action_restart(self) -> None:
        self._act("restart", lambda s: self.client.restart(s))

    def action_stop(self) -> None:
        self._act("stop", lambda s: self.client.stop_services([s]))

    def action_start(self) -> None:
        self._act("start", lambda s: self.client.start_services([s]))

    def action_scale(self, by: int) -> None:
        row = self.selected()
        if row is None or self.status is None:
            return
        have = len(self.status.services.get(row.service, []))
        want = max(0, have + by)
        self._act(f"scale to {want}", lambda s: self.client.scale(s, want))

    def _act(self, what: str, call: Any) -> None:
        row = self.selected()
        if row is None:
            self.say("no instance selected")
            return
        if self._busy:
            self.say("one change at a time: the last one is still running")
            return
        self._busy = True
        self.say(f"{row.service}: {what} ...")
        self._run(what, row.service, call)

    @work(thread=True, group="action")
    def _run(self, what: str, service: str, call: Any) -> None:
        try:
            call(service)
            message = f"{service}: {what} done"
        except (AgentUnavailable, CorralError, OSError) as e:
            message = f"{service}: {what} failed: {e}"
        self.call_from_thread(self._done, message)

    def _done(self, message: str) -> None:
        self._busy = False
        self.say(message)
        self.poll()
