"""Log-line readiness (``readiness: {log: PATTERN}``, as process-compose's
``ready_log_line``): real processes printing on stdout and stderr; dependents wait for the
line; startup fails when it never comes; what an earlier run printed does not count; and a
re-adopted instance is judged again by the new agent: one that had passed stays passed, one
that had not is read from the log's end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral import Deployment, DeploymentError, SpecError
from corral._core import find_by_env
from corral.engine.environment import STACK
from corral.spec import load_spec
from corral.statedir import stack_id
from tests.e2e import env_without_state, kill_groups, wait_until, write_spec


async def test_dependents_wait_for_the_line_on_stderr(tmp_path: Path, deployments: list[Deployment]) -> None:
    said = "echo starting; sleep 0.3; echo 'LOG:  database system is ready to accept connections' >&2; exec sleep 300"
    spec = write_spec(tmp_path, """
        name: logged
        services:
          db:
            command: ["sh", "-c", "SAID"]
            health:
              readiness: {log: "ready to accept connections$", period: 50ms}
          app:
            command: ["sleep", "300"]
            depends_on: {db: healthy}
    """.replace("SAID", said))
    d = Deployment.from_file(spec)
    deployments.append(d)
    await d.up()
    events = [(e.instance, e.new, e.reason) for e in d.event_log(0, 1000)]
    ready = next(i for i, e in enumerate(events) if e[0] == "db-0" and e[1] == "healthy")
    started = next(i for i, e in enumerate(events) if e[0] == "app-0" and e[1] == "starting")
    assert ready < started, events
    assert events[ready][2] == ("readiness probe passed: log line matched: LOG:  database system is ready to accept "
                                "connections"), events[ready]


async def test_a_startup_line_that_never_comes_fails_the_start_and_an_old_run_does_not_count(
        tmp_path: Path, deployments: list[Deployment]) -> None:
    spec = write_spec(tmp_path, """
        name: silent
        services:
          db:
            command: ["sleep", "300"]
            restart: {policy: "no"}
            start_timeout: 10s
            health:
              startup: {log: "ready", period: 50ms, failure_threshold: 4}
    """)
    logs = tmp_path / ".corral" / "logs"
    logs.mkdir(parents=True)
    (logs / "db-0.log").write_text("ready (an earlier run said so)\n")
    d = Deployment.from_file(spec)
    deployments.append(d)
    with pytest.raises(DeploymentError, match="no log line matching /ready/ yet"):
        await d.up()


def test_a_log_probe_is_refused_for_liveness_and_a_bad_pattern_is_named(tmp_path: Path) -> None:
    for probe, says in (("liveness: {log: ok}", "a log line says a service is ready, never that it stopped"),
                        ("readiness: {log: \"(unclosed\"}", "log pattern \"(unclosed\": unclosed group")):
        spec = write_spec(tmp_path, f"""
            name: bad
            services:
              db:
                command: ["sleep", "1"]
                health:
                  {probe}
        """)
        with pytest.raises(SpecError, match=r"corral.yaml:[67]: services.db.health") as e:
            load_spec(spec)
        assert says in str(e.value), str(e.value)


# Prints its line only once the test says so: the agent is killed before or after.
WAITER = """
    name: readopt
    services:
      db:
        command: ["sh", "-c", "while [ ! -e go ]; do sleep 0.05; done; echo ready now; exec sleep 300"]
        health:
          readiness: {log: "^ready now$", period: 50ms}
"""


def corral(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "corral", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, env=env_without_state())


def status(cwd: Path) -> dict:  # type: ignore[type-arg]
    return json.loads(corral("status", "--json", cwd=cwd).stdout)  # type: ignore[no-any-return]


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Path]:
    write_spec(tmp_path, WAITER)
    yield tmp_path
    corral("down", cwd=tmp_path)
    kill_groups(find_by_env(f"{STACK}={stack_id(tmp_path / '.corral')}"))


def _new_agent(cwd: Path, old: int) -> dict:  # type: ignore[type-arg]
    got: dict = {}  # type: ignore[type-arg]

    def back() -> bool:
        got.update(status(cwd))
        return bool(got["agent_running"] and got["agent_pid"] != old)
    wait_until(back, 20, "the keeper's new agent")
    return got


def test_readoption_keeps_a_passed_line_and_reads_a_waiting_one_from_the_end(stack: Path) -> None:
    # Killed before the line: the new agent reads the log from its end and sees it come.
    r = subprocess.Popen([sys.executable, "-m", "corral", "up", "-d"], cwd=stack, env=env_without_state(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: (stack / ".corral" / "state.db").exists() and status(stack).get("agent_pid") is not None
                   and bool(status(stack)["services"].get("db")) and status(stack)["services"]["db"][0]["pid"],
                   20, "db running, not ready")
        first = status(stack)["agent_pid"]
        os.kill(first, signal.SIGKILL)
        again = _new_agent(stack, first)
        assert again["services"]["db"][0]["state"] == "running", again["services"]
        (stack / "go").touch()
        wait_until(lambda: status(stack)["services"]["db"][0]["state"] == "healthy", 15, "ready under the new agent")
    finally:
        r.communicate(timeout=60)
    # Killed after the line: still healthy under the next agent, though nothing new is printed.
    second = status(stack)["agent_pid"]
    os.kill(second, signal.SIGKILL)
    third = _new_agent(stack, second)
    wait_until(lambda: status(stack)["status"] == "up", 15, "up again")
    assert status(stack)["services"]["db"][0]["state"] == "healthy", third

