"""Surviving the agent, end to end through `corral up -d`: kill -9 of the agent loses no
instance and no line of output, the keeper brings the agent back, the new agent re-adopts
what runs (same pids), a re-adopted instance that dies is restarted, the keeper's crash-loop
limit, a kill during up, a rolling apply and down, a removed state.db, and nothing escapes
`down` (checked over all of /proc by the stack's marker). Real processes."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral._core import find_by_env, process_alive
from corral.statedir import STACK, stack_id
from tests.e2e import alive, kill_groups, wait_until, write_spec
from tests.test_cli import corral
from tests.test_proxy import whoami

pytestmark = pytest.mark.timeout(180)

SPEC = """
    name: survive
    services:
      web:
        replicas: 2
        command: ["{py}", "{server}"]
        env: {VERSION: "1"}
        ports: {http: auto}
        expose: 23041
        health:
          readiness: {http: {port: http, path: /health}, period: 100ms, failure_threshold: 1}
        shutdown: {timeout: 3s}
      printer:
        command: ["sh", "-c", "i=0; while true; do i=$((i+1)); echo line $i; sleep 0.02; done"]
      daemon:
        command: ["sh", "-c", "setsid sleep 300 & exec sleep 300"]
"""


def status(cwd: Path) -> dict:  # type: ignore[type-arg]
    r = corral("status", "--json", cwd=cwd)
    assert r.returncode == 0, r
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def pids(st: dict) -> dict[str, int]:  # type: ignore[type-arg]
    return {i["id"]: i["pid"] for insts in st["services"].values() for i in insts}


def keeper(cwd: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((cwd / ".corral" / "keeper.json").read_text())  # type: ignore[no-any-return]


def marked(cwd: Path) -> list[int]:
    """Every live process on the machine that carries this stack's marker."""
    return find_by_env(f"{STACK}={stack_id(cwd / '.corral')}")


def printed(cwd: Path) -> list[int]:
    text = (cwd / ".corral" / "logs" / "printer-0.log").read_text()
    return [int(line.split()[1]) for line in text.splitlines() if line.startswith("line ")]


def agent_back(cwd: Path, old: int, timeout: float = 15.0) -> dict:  # type: ignore[type-arg]
    """The status once a new agent (not ``old``) answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = corral("status", "--json", cwd=cwd)
        if r.returncode == 0:
            st = json.loads(r.stdout)
            if st["agent_running"] and st["agent_pid"] != old and st["status"] == "up":
                return st  # type: ignore[no-any-return]
        time.sleep(0.1)
    raise AssertionError(f"no new agent within {timeout}s")


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Path]:
    write_spec(tmp_path, SPEC)
    r = corral("up", "-d", cwd=tmp_path)
    assert r.returncode == 0, r
    yield tmp_path
    corral("down", cwd=tmp_path)
    left = marked(tmp_path)
    kill_groups(left)
    for pid in left:
        os.kill(pid, signal.SIGKILL) if process_alive(pid) else None


def test_kill_9_of_the_agent_loses_no_instance_and_no_line_and_the_new_agent_readopts(stack: Path) -> None:
    before = status(stack)
    first = pids(before)
    wait_until(lambda: len(printed(stack)) > 20, 10, "the printer printing")
    os.kill(before["agent_pid"], signal.SIGKILL)
    killed_at = len(printed(stack))
    time.sleep(0.5)
    assert all(alive(p) for p in first.values()), "every instance lives on without its agent"
    after = agent_back(stack, before["agent_pid"])
    assert pids(after) == first, "re-adopted, not restarted: the same pids"
    assert all(i["restarts"] == 0 for insts in after["services"].values() for i in insts)
    assert keeper(stack)["agent_pid"] == after["agent_pid"]
    wait_until(lambda: len(printed(stack)) > killed_at + 25, 10, "more lines after the kill")
    lines = printed(stack)
    assert lines == list(range(1, len(lines) + 1)), "not one line lost across the kill"
    # The front is back, over the re-adopted instances.
    wait_until(lambda: _serves(23041), 10, "the front serving again")
    assert {whoami(23041) for _ in range(6)} <= {"web-0", "web-1"}
    events = corral("events", "-n", "400", cwd=stack).stdout
    assert "re-adopted 4 instances" in events, events[-2000:]
    # The keeper's restart of the agent is in the audit trail, as the keeper's own act.
    recs = [json.loads(line) for line in corral("audit", "--json", cwd=stack).stdout.splitlines()]
    restart = [r for r in recs if r["op"] == "agent-restart"]
    assert restart and restart[-1]["outcome"] == "ok" and restart[-1]["args"]["agent_pid"] == after["agent_pid"], recs
    assert restart[-1]["pid"] == keeper(stack)["pid"], restart

    # A re-adopted instance that dies is restarted by its policy (its parent is the keeper).
    os.kill(first["printer-0"], signal.SIGKILL)
    wait_until(lambda: pids(status(stack))["printer-0"] != first["printer-0"], 15, "printer restarted")
    st = status(stack)
    printer = st["services"]["printer"][0]
    assert (printer["restarts"] == 1 and "signal 9" in printer["reason"]) or printer["state"] == "healthy"

    # down ends everything, the setsid grandchild and the keeper included.
    daemons = [p for p in marked(stack) if p not in pids(status(stack)).values()]
    assert daemons, "the setsid sleep carries the marker"
    keeper_pid = keeper(stack)["pid"]
    r = corral("down", cwd=stack)
    assert r.returncode == 0 and r.stdout.strip() == "down", r
    assert marked(stack) == [], "no process of the stack survives down, wherever it went"
    assert not process_alive(keeper_pid), "nor the keeper"


def _serves(port: int) -> bool:
    try:
        whoami(port, 1.0)
        return True
    except OSError:
        return False


def test_the_keeper_gives_up_after_its_crash_loop_limit_and_status_says_why(stack: Path) -> None:
    first = pids(status(stack))
    agent = status(stack)["agent_pid"]
    for _ in range(6):
        os.kill(agent, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            k = keeper(stack)
            if k["agent"] == "down" or (k["agent_pid"] not in (None, agent) and process_alive(k["agent_pid"])):
                break
            time.sleep(0.05)
        if keeper(stack)["agent"] == "down":
            break
        agent = keeper(stack)["agent_pid"]
        wait_until(lambda a=agent: status(stack)["agent_pid"] == a and status(stack)["agent_running"], 15,  # type: ignore[misc]
                   "the new agent answering")
    k = keeper(stack)
    assert k["agent"] == "down" and "died 6 times within 60s" in k["reason"], k
    gave_up = [json.loads(line) for line in corral("audit", "--json", cwd=stack).stdout.splitlines()]
    assert any(r["op"] == "agent-restart" and r["outcome"] == "failed" and "died 6 times" in r["reason"]
               for r in gave_up), gave_up
    r = corral("status", cwd=stack)
    assert r.returncode == 0 and "agent not running; 4 instances run unsupervised" in r.stdout, r
    assert "died 6 times" in r.stdout
    assert all(alive(p) for p in first.values()), "the instances run on, unsupervised"
    # up -d with the same spec starts a new agent, which re-adopts them.
    r = corral("up", "-d", cwd=stack)
    assert r.returncode == 0, r
    st = status(stack)
    assert st["agent_running"] and pids(st) == first


def test_kill_9_during_a_rolling_apply_is_finished_cleanly_by_the_next_agent(stack: Path) -> None:
    before = status(stack)
    web = {i["id"]: i["pid"] for i in before["services"]["web"]}
    spec = stack / "corral.yaml"
    spec.write_text(spec.read_text().replace('VERSION: "1"', 'VERSION: "2"').replace(
        "failure_threshold: 1}", "failure_threshold: 1, initial_delay: 3s}"))
    import subprocess
    import sys

    from tests.e2e import env_without_state

    applying = subprocess.Popen([sys.executable, "-m", "corral", "up", "-d"], cwd=stack, env=env_without_state(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # The new instance is placed and started, not yet ready (initial_delay 3s): kill now.
    wait_until(lambda: any(i["id"].endswith("-v2") for i in status(stack)["services"]["web"]), 15, "surge")
    os.kill(before["agent_pid"], signal.SIGKILL)
    applying.communicate(timeout=60)
    assert applying.returncode != 0, "the apply did not finish"
    after = agent_back(stack, before["agent_pid"])
    # The last applied spec runs: the old instances, re-adopted; the half-made new one gone.
    assert {i["id"]: i["pid"] for i in after["services"]["web"]} == web
    assert after["version"] == 1
    wait_until(lambda: not any(i.endswith("-v2") for i in pids(status(stack))), 10, "no v2 left")
    # The version whose apply the death cut short says so, not "applying" for good.
    from corral.state import StateStore

    specs = {s.version: s for s in StateStore.read_specs(stack / ".corral" / "state.db", after["name"])}
    assert specs[2].state == "interrupted" and "v1 runs" in specs[2].message, specs[2]


def test_kill_9_during_down_is_finished_by_the_next_agent(stack: Path) -> None:
    import subprocess
    import sys

    from tests.e2e import env_without_state

    st = status(stack)
    spec = stack / "corral.yaml"
    # A service that ignores SIGTERM: down waits its shutdown timeout, and the kill lands then.
    spec.write_text(spec.read_text() + "  stubborn:\n    command: [sh, -c, \"trap '' TERM; sleep 300\"]\n"
                                       "    shutdown: {timeout: 4s}\n")
    assert corral("up", "-d", cwd=stack).returncode == 0  # an apply: the new service starts
    down = subprocess.Popen([sys.executable, "-m", "corral", "down"], cwd=stack, env=env_without_state(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: status(stack)["status"] == "stopping", 10, "down under way")
    os.kill(st["agent_pid"], signal.SIGKILL)
    down.communicate(timeout=60)
    wait_until(lambda: marked(stack) == [], 30, "everything stopped by the next agent")
    wait_until(lambda: not status(stack)["agent_running"], 10, "and that agent ended")
    assert status(stack)["status"] == "down"


def test_kill_9_during_up_is_finished_by_the_next_agent(tmp_path: Path) -> None:
    many = "\n".join(f"      s{i}:\n        replicas: 20\n        command: [sleep, '300']" for i in range(3))
    write_spec(tmp_path, "    name: early\n    services:\n" + many + "\n")
    import subprocess
    import sys

    from tests.e2e import env_without_state

    up = subprocess.Popen([sys.executable, "-m", "corral", "up", "-d"], cwd=tmp_path, env=env_without_state(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: (tmp_path / ".corral" / "keeper.json").exists(), 15, "the keeper")
        wait_until(lambda: marked(tmp_path) != [], 15, "the first spawns")
        os.kill(keeper(tmp_path)["agent_pid"], signal.SIGKILL)
        up.communicate(timeout=60)
        st = agent_back(tmp_path, -1, 30)
        assert sum(len(v) for v in st["services"].values()) == 60
        wait_until(lambda: len(marked(tmp_path)) == 60, 15, "all 60 running, none twice")
    finally:
        corral("down", cwd=tmp_path)
        left = marked(tmp_path)
        kill_groups(left)
    assert left == [], "nothing orphaned"


def test_a_removed_state_db_is_said_and_kills_nothing(stack: Path) -> None:
    first = pids(status(stack))
    db = stack / ".corral" / "state.db"
    for f in (db, db.with_name("state.db-wal"), db.with_name("state.db-shm")):
        f.unlink(missing_ok=True)
    wait_until(lambda: "was removed or replaced" in corral("status", cwd=stack).stdout, 10, "status saying so")
    assert pids(status(stack)) == first and all(alive(p) for p in first.values())
    assert "was removed or replaced" in (stack / ".corral" / "agent.log").read_text()
    r = corral("down", cwd=stack)
    assert r.returncode == 0, r
    assert marked(stack) == []


def test_down_without_an_agent_follows_each_services_shutdown_rule(tmp_path: Path) -> None:
    write_spec(tmp_path, f"""
        name: rules
        services:
          polite:
            # No output: with its keeper killed too, a write would end it (SIGPIPE, no reader).
            command: ["sh", "-c", "exec 2>/dev/null; trap 'touch {tmp_path}/got-usr1; exit 0' USR1;
                      while true; do sleep 0.05; done"]
            shutdown: {{signal: SIGUSR1, timeout: 5s}}
          stubborn:
            replicas: 3
            command: ["sh", "-c", "trap '' TERM; while true; do sleep 0.05; done"]
            shutdown: {{timeout: 1s}}
        """)
    assert corral("up", "-d", cwd=tmp_path).returncode == 0
    st = status(tmp_path)
    os.kill(keeper(tmp_path)["pid"], signal.SIGKILL)
    os.kill(st["agent_pid"], signal.SIGKILL)
    wait_until(lambda: not alive(st["agent_pid"]), 5, "agent gone")
    r = corral("down", cwd=tmp_path)
    assert r.returncode == 0 and "stopped 4 leftover process groups" in r.stdout, r
    assert (tmp_path / "got-usr1").exists(), "the spec's signal, not SIGTERM"
    assert marked(tmp_path) == []


def test_the_agent_log_is_json_lines_and_events_json_follows_the_event_log(stack: Path) -> None:
    st = status(stack)
    os.kill(st["services"]["printer"][0]["pid"], signal.SIGKILL)
    wait_until(lambda: pids(status(stack))["printer-0"] != st["services"]["printer"][0]["pid"], 15, "restart")
    lines = (stack / ".corral" / "agent.log").read_text().splitlines()
    docs = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"time", "level", "event", "message"} <= set(d) for d in docs)
    moves = [(d.get("instance"), d.get("from"), d.get("to")) for d in docs if d["event"] == "transition"]
    assert ("printer-0", "healthy", "restarting") in moves and ("web-0", "running", "healthy") in moves
    r = corral("events", "--json", "-n", "5", cwd=stack)
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(events) == 5 and all({"seq", "at", "instance", "from", "to", "reason"} <= set(e) for e in events)
