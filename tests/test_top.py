"""``corral top`` driven by Textual's pilot against a real agent (``corral up -d``, real
processes): the rows and their columns, CPU% from two readings, sorting, the selected
instance's log following (literal text, not markup), the keys that scale, stop, start and
restart through the agent, and the machine panel (this machine, and the 7950X3D fixture)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from textual.widgets import DataTable, Log, Static

from corral._core import Topology
from corral.agent.client import AgentClient
from corral.top import COLUMNS, TopApp
from tests.e2e import write_spec
from tests.test_cli import corral

pytestmark = pytest.mark.timeout(150)

SYSFS = Path(__file__).parent / "fixtures" / "sysfs"

SPEC = """
    name: watched
    services:
      web:
        replicas: 2
        command: ["{py}", "{server}"]
        ports: {http: auto}
        health:
          readiness: {http: {port: http, path: /health}, period: 100ms, failure_threshold: 1}
      chatty:
        command: ["sh", "-c", "echo '[bold]not markup[/bold]'; while :; do echo tick; sleep 0.2; done"]
"""


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentClient]:
    write_spec(tmp_path, SPEC)
    r = corral("up", "-d", cwd=tmp_path)
    assert r.returncode == 0, r
    try:
        yield AgentClient(tmp_path / ".corral")
    finally:
        corral("down", cwd=tmp_path)


async def _until(pilot: object, pred: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    for _ in range(int(timeout / 0.1)):
        if pred():
            return
        await pilot.pause(0.1)  # type: ignore[attr-defined]
    raise AssertionError(f"timed out waiting for {what}")


def _table(app: TopApp) -> list[list[str]]:
    t = app.query_one("#instances", DataTable)
    return [[str(c) for c in t.get_row_at(i)] for i in range(t.row_count)]


def _col(name: str) -> int:
    return COLUMNS.index(name)


def _select(app: TopApp, instance: str) -> None:
    t = app.query_one("#instances", DataTable)
    t.move_cursor(row=[r[_col("instance")] for r in _table(app)].index(instance))


async def test_top_shows_sorts_follows_and_acts_through_the_agent(agent: AgentClient) -> None:
    app = TopApp(agent, refresh=0.3)
    async with app.run_test(size=(180, 50)) as pilot:
        await _until(pilot, lambda: len(_table(app)) == 3, "three rows")
        rows = _table(app)
        assert [r[_col("instance")] for r in rows] == ["chatty-0", "web-0", "web-1"]
        web0 = rows[1]
        assert web0[_col("state")] == "healthy" and web0[_col("health")] == "healthy"
        assert int(web0[_col("pid")]) > 0 and web0[_col("ports")].startswith("http=")
        assert web0[_col("rss")].endswith("MiB")
        # At 80 columns the ports are on screen whole (they came after the figures, cut off).
        table = app.query_one("#instances", DataTable)
        upto = sum(table.columns[k].get_render_width(table) for k in list(table.columns)[:_col("ports") + 1])
        assert upto <= 80, upto
        # CPU% needs two readings of the process tree: a number from the second refresh on.
        await _until(pilot, lambda: _table(app)[1][_col("cpu%")] != "-", "a CPU% reading")
        float(_table(app)[1][_col("cpu%")])

        # Sorting: `o` moves to the next column (instance -> state), `O` reverses.
        await pilot.press("o")
        assert app.sort_column == "state"
        await pilot.press("O")
        assert app.sort_reverse
        app.sort_column, app.sort_reverse = "instance", False
        app.action_sort(0)
        app.action_sort(0)

        # The selected instance's log follows, its text literal.
        _select(app, "chatty-0")
        log = app.query_one("#log", Log)
        await _until(pilot, lambda: "[bold]not markup[/bold]" in log.lines, "chatty's first line, literally")
        n = len(log.lines)
        await _until(pilot, lambda: len(log.lines) > n + 2, "new lines followed")

        # + scales the selected service through the agent; - takes it back.
        _select(app, "web-0")
        await pilot.press("plus")
        await _until(pilot, lambda: "web-2" in [r[_col("instance")] for r in _table(app)], "web-2 in the table")
        await _until(pilot, lambda: not app._busy, "the scale to finish")
        assert len(agent.status().services["web"]) == 3
        _select(app, "web-2")
        await pilot.press("minus")
        await _until(pilot, lambda: len(_table(app)) == 3 and not app._busy, "back to two web replicas")

        # s stops the service, t starts it again, r restarts it (new pids).
        _select(app, "web-0")
        await pilot.press("s")
        await _until(pilot, lambda: not app._busy and {r[_col("state")] for r in _table(app)
                                                        if r[_col("service")] == "web"} == {"stopped"}, "web stopped")
        await pilot.press("t")
        await _until(pilot, lambda: not app._busy and {r[_col("state")] for r in _table(app)
                                                        if r[_col("service")] == "web"} == {"healthy"}, "web started")
        before = {i.id: i.pid for i in agent.status().services["web"]}
        await pilot.press("r")
        await _until(pilot, lambda: not app._busy, "the restart to finish")
        after = {i.id: i.pid for i in agent.status().services["web"]}
        assert after.keys() == before.keys() and all(after[k] != before[k] for k in after)
        assert "web: restart done" in str(app.query_one("#message", Static).render())

        machine = str(app.query_one("#machine", Static).render())
        assert machine.startswith("machine: ") and "core 0: cpu " in machine
        await pilot.press("q")


async def test_the_machine_panel_draws_a_fixture_topology(agent: AgentClient) -> None:
    app = TopApp(agent, topology=Topology.from_sysfs(SYSFS / "ryzen-7950x3d"), refresh=0.3)
    async with app.run_test(size=(180, 60)) as pilot:
        await _until(pilot, lambda: len(_table(app)) == 3, "three rows")
        machine = str(app.query_one("#machine", Static).render())
        assert machine.splitlines()[0] == "machine: 1 NUMA node, 2 L3 domains, 16 cores, 32 CPUs"
        assert "L3 0 (96 MiB)" in machine and "L3 1 (32 MiB)" in machine
        assert "cpu 0: reserved (system)" in machine and "shared" in machine


def test_top_without_a_terminal_says_so(tmp_path: Path) -> None:
    write_spec(tmp_path, SPEC)
    r = corral("top", cwd=tmp_path)
    assert r.returncode == 2 and "needs a terminal" in r.stderr
