"""Schedules: cron in an explicit time zone (DST included) and ``every``; each run an
instance with its own log and exit status in status, events and metrics; the overlap
policies; ``corral run``; runs due while no agent ran counted, not replayed."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from corral import Deployment, SpecError
from corral._core import find_by_env
from corral.cron import Cron, zone
from corral.engine.environment import STACK
from corral.spec import load_spec
from corral.statedir import stack_id
from tests.e2e import await_until, env_without_state, kill_groups, wait_until, write_spec

UTC = dt.UTC


def at(s: str) -> dt.datetime:
    return dt.datetime.fromisoformat(s).replace(tzinfo=UTC)


@pytest.mark.parametrize(("expr", "after", "tz", "want"), [
    ("0 3 * * *", "2026-12-07T12:00", "UTC", "2026-12-08T03:00"),
    ("*/15 9-17 * * mon-fri", "2026-12-05T10:00", "UTC", "2026-12-07T09:00"),  # a Saturday: Monday next
    ("0 0 1 jan *", "2026-06-01T00:00", "UTC", "2027-01-01T00:00"),
    ("0 12 13 * 5", "2026-12-07T00:00", "UTC", "2026-12-11T12:00"),  # day 13 or a Friday, as Vixie cron
    ("@daily", "2026-12-07T23:59", "UTC", "2026-12-08T00:00"),
    ("0 3 * * *", "2026-12-07T12:00", "Europe/Paris", "2026-12-08T02:00"),
    # 02:30 does not exist in Paris on 2026-03-29 (clocks go 02:00 -> 03:00): the next day's.
    ("30 2 * * *", "2026-03-28T12:00", "Europe/Paris", "2026-03-30T00:30"),
    ("0 7 * * sun", "2026-12-07T00:00", "America/New_York", "2026-12-13T12:00"),
])
def test_cron_next_times_in_their_zone(expr: str, after: str, tz: str, want: str) -> None:
    assert Cron.parse(expr).next_after(at(after), zone(tz)).astimezone(UTC) == at(want)


@pytest.mark.parametrize(("text", "says"), [
    ("schedule: {cron: '0 3 * * *'}", "names its timezone"),
    ("schedule: {cron: '0 3 * * *', timezone: Mars/Olympus}", "unknown time zone 'Mars/Olympus'"),
    ("schedule: {cron: '61 * * * *', timezone: UTC}", "minute: 61 is outside 0-59"),
    ("schedule: {cron: '* * *', timezone: UTC}", "5 fields"),
    ("schedule: {every: 1s, cron: '* * * * *', timezone: UTC}", "exactly one of cron and every"),
    ("schedule: {every: 30s}\n    replicas: 2", "a scheduled service has no replicas"),
    ("schedule: {every: 30s}\n    restart: {policy: always}", "restart.policy always would never let a run end"),
])
def test_bad_schedules_are_refused_with_their_line(tmp_path: Path, text: str, says: str) -> None:
    write_spec(tmp_path, f"""
name: bad
services:
  job:
    command: ["true"]
    {text}
""")
    with pytest.raises(SpecError, match=r"corral.yaml:[456]: services.job") as e:
        load_spec(tmp_path / "corral.yaml")
    assert says in str(e.value), str(e.value)


def test_nothing_may_depend_on_a_scheduled_service(tmp_path: Path) -> None:
    write_spec(tmp_path, """
name: bad
services:
  job:
    command: ["true"]
    schedule: {every: 1m}
  web:
    command: ["sleep", "1"]
    depends_on: [job]
""")
    with pytest.raises(SpecError, match="web depends on job, which runs on a schedule"):
        load_spec(tmp_path / "corral.yaml")


def spec_of(tmp_path: Path, concurrency: str, run: str = "sleep 0.6") -> Path:
    return write_spec(tmp_path, f"""
        name: timed
        services:
          tick:
            command: ["sh", "-c", "echo run $CORRAL_INSTANCE >> runs; {run}"]
            restart: {{policy: "no"}}
            schedule: {{every: 250ms, concurrency: {concurrency}, history: 2}}
    """)


def runs(tmp_path: Path) -> list[str]:
    f = tmp_path / "runs"
    return f.read_text().split("\n")[:-1] if f.exists() else []


async def test_forbid_skips_a_run_due_while_the_last_runs(tmp_path: Path, deployments: list[Deployment]) -> None:
    d = Deployment.from_file(spec_of(tmp_path, "forbid"))
    deployments.append(d)
    await d.up()
    await await_until(lambda: len(runs(tmp_path)) >= 3, 15, "three runs")
    sc = d.status().schedules["tick"]
    assert sc["skipped"] >= 2, sc  # 0.6 s runs every 0.25 s: about two of three due are skipped
    st = d.status().services["tick"]
    assert all(i.id.startswith("tick-") for i in st) and len([i for i in st if i.state == "completed"]) <= 2
    assert sum(1 for i in st if i.state in ("running", "healthy")) <= 1, "never two at once"
    notes = [e.reason for e in d.event_log(0, 10_000)]
    assert any(n.startswith("run skipped: tick-") and "still runs (concurrency: forbid)" in n for n in notes)
    first = d.state_dir / "logs" / "tick-0.log"
    assert first.read_text() == "", "each run has its own log"
    fams = {f.name: f for f in text_string_to_metric_families(d.metrics())}
    assert fams["corral_schedule_runs"].samples[0].value >= 3
    assert fams["corral_schedule_skipped"].samples[0].value >= 2


async def test_allow_overlaps_and_replace_stops_the_last(tmp_path: Path, deployments: list[Deployment]) -> None:
    d = Deployment.from_file(spec_of(tmp_path, "allow"))
    deployments.append(d)
    await d.up()
    await await_until(lambda: sum(1 for i in d.status().services["tick"] if i.state in ("running", "healthy")) >= 2,
                      15, "two runs at once")
    await d.down()
    (tmp_path / "runs").unlink()
    d = Deployment.from_file(spec_of(tmp_path, "replace", run="sleep 30"))
    deployments.append(d)
    await d.up()
    await await_until(lambda: len(runs(tmp_path)) >= 3, 15, "three runs")
    st = d.status().services["tick"]
    assert sum(1 for i in st if i.state in ("running", "healthy")) == 1
    replaced = [i for i in st if i.state == "stopped"]
    assert replaced and all(i.reason == "replaced by the next run (concurrency: replace)" for i in replaced), st


def corral(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "corral", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=env_without_state())


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Path]:
    write_spec(tmp_path, """
        name: nightly
        services:
          db:
            command: ["sleep", "300"]
          backup:
            command: ["sh", "-c", "echo dumping; [ ! -e fail ]"]
            restart: {policy: "no"}
            depends_on: [db]
            schedule: {cron: "0 3 * * *", timezone: UTC}
          tick:
            command: ["true"]
            restart: {policy: "no"}
            schedule: {every: 1s}
          migrate:
            command: ["sh", "-c", "echo migrated >> migrations"]
            restart: {policy: "no"}
    """)
    yield tmp_path
    corral("down", cwd=tmp_path)
    kill_groups(find_by_env(f"{STACK}={stack_id(tmp_path / '.corral')}"))


def status(cwd: Path) -> dict:  # type: ignore[type-arg]
    return json.loads(corral("status", "--json", cwd=cwd).stdout)  # type: ignore[no-any-return]


def test_corral_run_and_runs_missed_while_no_agent_ran(stack: Path) -> None:
    assert corral("up", "-d", cwd=stack).returncode == 0
    r = corral("run", "backup", cwd=stack)
    assert r.returncode == 0 and r.stdout.splitlines() == ["backup: running backup-0", "backup-0: completed "
                                                           "(exit status 0)"], r
    (stack / "fail").touch()
    r = corral("run", "backup", cwd=stack)
    assert r.returncode == 1 and "backup-1: failed (exit status 1)" in r.stdout, r
    assert (stack / ".corral" / "logs" / "backup-1.log").read_text() == "dumping\n"
    r = corral("run", "migrate", cwd=stack)
    assert r.returncode == 0 and (stack / "migrations").read_text() == "migrated\nmigrated\n", r
    text = corral("status", cwd=stack).stdout
    assert "schedule backup: next run " in text and "2 runs, 0 skipped" in text, text
    # No agent for a while: every run of tick due meanwhile is counted, none replayed.
    st = status(stack)
    keeper = json.loads((stack / ".corral" / "keeper.json").read_text())["pid"]
    os.kill(keeper, signal.SIGSTOP)
    try:
        os.kill(st["agent_pid"], signal.SIGKILL)
        wait_until(lambda: not status(stack)["agent_running"], 10, "the agent gone")
        before = status(stack)["schedules"]["tick"]["runs"]
        time.sleep(3.2)
    finally:
        os.kill(keeper, signal.SIGCONT)
    wait_until(lambda: (lambda s: s["agent_running"] and s["status"] == "up")(status(stack)), 20, "the new agent up")
    sc = status(stack)["schedules"]["tick"]
    assert sc["missed"] >= 2, sc
    assert sc["runs"] <= before + 2, ("missed runs are not replayed", before, sc)
    events = corral("events", "-n", "500", cwd=stack).stdout
    assert "runs were due while no agent ran" in events, events[-1500:]
