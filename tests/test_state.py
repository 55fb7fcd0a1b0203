"""The SQLite state file: WAL, batched writes, readers that need no agent."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

from corral.state import DeploymentRow, InstanceRow, StateStore


def test_writes_are_batched_and_readable_from_another_connection(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    store = StateStore(db)
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.put_deployment(DeploymentRow(name="shop", spec="/x/corral.yaml", status="up", phases=[["a"], ["b"]]))
    row = InstanceRow(id="a-0", deployment="shop", service="a", idx=0, state="running", pid=42, ports={"http": 1},
                      cpus=[3], exclusive=True)
    store.put_instance(row)
    store.add_event("shop", "a-0", "a", "starting", "running", "pid 42")
    assert StateStore.read_instances(db, "shop") == [], "queued, not yet committed"
    row.state = "healthy"
    store.put_instance(row)
    store.flush()
    got = StateStore.read_instances(db, "shop")
    assert len(got) == 1 and got[0].state == "healthy" and got[0].cpus == [3] and got[0].exclusive
    assert got[0].to_dict()["ports"] == {"http": 1}
    (ev,) = StateStore.read_events(db)
    assert (ev.instance, ev.old, ev.new, ev.reason) == ("a-0", "starting", "running", "pid 42")
    (dep,) = StateStore.read_deployments(db)
    assert dep.status == "up" and dep.phases == [["a"], ["b"]]
    store.close()


def test_readers_before_the_schema_exists(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    sqlite3.connect(db).close()
    assert StateStore.read_deployments(db) == [] and StateStore.read_events(db) == []


def test_repeats_are_coalesced_and_the_log_is_bounded(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    store = StateStore(db)
    for _ in range(50):
        store.add_event("d", None, None, None, None, "warning: the same thing")
    store.add_event("d", "a-0", "a", "running", "restarting", "exit status 1")
    store.flush()
    rows = StateStore.read_events(db)
    assert [(r.reason, r.repeats) for r in rows] == [("warning: the same thing", 50), ("exit status 1", 1)]
    for i in range(300):
        store.add_event("d", "a-0", "a", "running", "restarting", f"exit status 1; restart {i}")
    store.flush()
    assert store.prune(max_rows=100, max_age=3600) == 202
    rows = StateStore.read_events(db)
    assert len(rows) == 100 and rows[-1].reason == "exit status 1; restart 299"
    old = time.time() - 7200
    store.add_event("d", "a-0", "a", "running", "restarting", "ancient", at=old)
    store.flush()
    store.prune(max_rows=1000, max_age=3600)
    assert all(r.reason != "ancient" for r in StateStore.read_events(db))
    store.close()


def test_leftovers_in_the_pid_log_alone_are_stopped_too(tmp_path: Path) -> None:
    """A process spawned after the last commit of the store is only in the supervisor's pid
    log: a down without an agent finds it there (and a recycled pid, whose start time
    differs, is left alone)."""
    import subprocess

    from corral._core import process_start_time
    from corral.leftovers import PID_LOG, stop_leftovers

    db = tmp_path / "state.db"
    store = StateStore(db)
    store.put_deployment(DeploymentRow(name="d", spec="x", status="up"))
    store.close()
    p = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        start = process_start_time(p.pid)
        (tmp_path / PID_LOG).write_text(f"{p.pid} {start} web-0\n{os.getpid()} 1 not-this-one\n")
        assert stop_leftovers(db, mark_down="x") == 1
        assert p.wait(5) == -9
        assert (tmp_path / PID_LOG).read_text() == "", "the log is emptied once its processes are stopped"
    finally:
        if p.poll() is None:
            p.kill()
