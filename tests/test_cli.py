"""End-to-end through the command line: up -d, status, logs, restart, events, down; the agent
dying; a failing up. Real processes, the real Unix socket, the real SQLite file."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.state import StateStore
from tests.e2e import alive, cpus_allowed, env_without_state, kill_groups, listening, wait_until, write_spec

pytestmark = pytest.mark.timeout(120)

STACK = """
    name: clistack
    services:
      kv:
        command: ["{py}", "{server}"]
        ports: {http: auto}
        health:
          readiness: {http: {port: http, path: /health}, period: 100ms}
      job:
        command: ["sh", "-c", "echo migrated $CORRAL_KV_ADDR"]
        depends_on: {kv: healthy}
      api:
        replicas: 2
        command: ["{py}", "{server}"]
        depends_on: {kv: healthy, job: completed}
        ports: {http: auto}
        resources: {cpu: 0.2}
        health:
          readiness: {tcp: {port: http}, period: 100ms}
      worker:
        command: ["sleep", "300"]
        depends_on: {api: started}
        resources: {cores: 1}
"""


def corral(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "corral", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env_without_state())


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Path]:
    """A spec directory; on teardown `corral down`, then SIGKILL any group still recorded alive."""
    write_spec(tmp_path, STACK)
    yield tmp_path
    corral("down", cwd=tmp_path)
    db = tmp_path / ".corral" / "state.db"
    if db.exists():
        for d in StateStore.read_deployments(db):
            kill_groups([i.pid for i in StateStore.read_instances(db, d.name) if i.pid])
            if d.agent_pid and alive(d.agent_pid):
                os.kill(d.agent_pid, signal.SIGKILL)


def status(cwd: Path) -> dict:  # type: ignore[type-arg]
    r = corral("status", "--json", cwd=cwd)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def test_up_detached_status_logs_restart_events_down(stack: Path) -> None:
    r = corral("up", "-d", cwd=stack)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "clistack: up (5 instances" in r.stdout
    sock = stack / ".corral" / "agent.sock"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    st = status(stack)
    assert st["status"] == "up" and st["agent_running"]
    svcs = st["services"]
    assert [i["state"] for i in svcs["api"]] == ["healthy", "healthy"]
    assert svcs["job"][0]["state"] == "completed" and svcs["job"][0]["exit_code"] == 0
    for key in ("id", "state", "healthy", "pid", "ports", "cpus", "restarts"):
        assert key in svcs["api"][0]
    worker = svcs["worker"][0]
    assert cpus_allowed(worker["pid"]) == worker["cpus"] and worker["exclusive"]
    for inst in svcs["api"] + svcs["kv"]:
        assert listening(inst["ports"]["http"])
        assert cpus_allowed(inst["pid"]) == inst["cpus"]

    kv_port = svcs["kv"][0]["ports"]["http"]
    # The keeper writes the logs, a moment after the process printed (it may have exited).
    wait_until(lambda: f"migrated 127.0.0.1:{kv_port}" in corral("logs", "job", cwd=stack).stdout, 10,
               "the job's line in its log")
    logs = corral("logs", "job", cwd=stack)
    assert logs.returncode == 0
    api_logs = corral("logs", "api", "-n", "1", cwd=stack)
    assert "api-0 | listening on" in api_logs.stdout and "api-1 | listening on" in api_logs.stdout
    assert corral("logs", "nope", cwd=stack).returncode == 2

    old = [i["pid"] for i in svcs["api"]]
    r = corral("restart", "api", cwd=stack)
    assert r.returncode == 0, r.stderr
    after = status(stack)["services"]["api"]
    assert [i["restarts"] for i in after] == [1, 1] and {i["pid"] for i in after}.isdisjoint(old)
    assert not any(alive(p) for p in old)

    ev = corral("events", "-n", "500", cwd=stack)
    assert "api-0" in ev.stdout and "restart requested" in ev.stdout and "placed -> starting" in ev.stdout

    all_pids = [i["pid"] for insts in status(stack)["services"].values() for i in insts]
    agent = status(stack)["agent_pid"]
    r = corral("down", cwd=stack)
    assert r.returncode == 0 and "down" in r.stdout
    for pid in [*all_pids, agent]:
        wait_until(lambda p=pid: not alive(p), 5, f"pid {pid} gone")  # type: ignore[misc]
    assert not sock.exists()
    st = status(stack)
    assert st["status"] == "down" and not st["agent_running"]
    assert {i["state"] for insts in st["services"].values() for i in insts} == {"stopped"}


def test_status_answers_while_the_agent_is_down_and_down_cleans_up(stack: Path) -> None:
    assert corral("up", "-d", cwd=stack).returncode == 0
    st = status(stack)
    # The keeper too, or it would bring the agent back (test_survival covers that).
    os.kill(_keeper(stack), signal.SIGKILL)
    os.kill(st["agent_pid"], signal.SIGKILL)
    wait_until(lambda: not alive(st["agent_pid"]), 5, "agent gone")
    again = status(stack)
    assert not again["agent_running"]
    assert again["services"]["api"][0]["pid"] == st["services"]["api"][0]["pid"]
    r = corral("down", cwd=stack)
    assert r.returncode == 0 and "no agent running; stopped" in r.stdout
    for insts in st["services"].values():
        for i in insts:
            if i["state"] != "completed":
                wait_until(lambda p=i["pid"]: not alive(p), 5, f"{i['id']} gone")  # type: ignore[misc]
    # With no agent, a second up starts cleanly.
    assert corral("up", "-d", cwd=stack).returncode == 0
    assert status(stack)["status"] == "up"


def test_up_against_a_running_stack_applies_what_changed(stack: Path) -> None:
    assert corral("up", "-d", cwd=stack).returncode == 0
    before = status(stack)
    r = corral("up", "-d", cwd=stack)
    assert r.returncode == 0 and r.stdout.splitlines()[0] == "no changes", r
    spec = stack / "corral.yaml"
    text = spec.read_text()
    spec.write_text(text.replace("  api:\n    replicas: 2", "  api:\n    replicas: 3"))
    r = corral("plan", cwd=stack)
    assert r.returncode == 0 and r.stdout.splitlines() == [
        "~ api: replicas 2 => 3", "= 3 unchanged: kv, job, worker"], r
    doc = json.loads(corral("plan", "--json", cwd=stack).stdout)
    assert [(c["name"], c["change"]) for c in doc["services"]][2] == ("api", "scale")
    r = corral("up", cwd=stack)  # without -d too: the running agent applies it
    assert r.returncode == 0 and "applied: spec version 2 runs" in r.stdout, r
    after = status(stack)
    assert after["version"] == 2 and [i["id"] for i in after["services"]["api"]] == ["api-0", "api-1", "api-2"]
    assert after["services"]["kv"][0]["pid"] == before["services"]["kv"][0]["pid"]
    # A spec that does not parse: exit 2, where it is, nothing touched.
    spec.write_text(text.replace("replicas: 2", "replicas: two"))
    r = corral("up", "-d", cwd=stack)
    assert r.returncode == 2 and "corral.yaml:" in r.stderr and "replicas" in r.stderr, r
    assert "Traceback" not in r.stderr and status(stack)["version"] == 2
    # A new version of kv that exits at once: exit 1, reverted, named.
    spec.write_text(text.replace('    command: ["sh", "-c", "echo migrated $CORRAL_KV_ADDR"]',
                                 '    command: ["sh", "-c", "echo migrated again"]').replace(
        "  kv:\n", '  kv:\n    env: {EXIT_NOW: "4"}\n'))
    r = corral("up", "-d", cwd=stack)
    assert r.returncode == 1, r
    assert "failed at kv-0-v3 (kv): exit status 4, before it was ready; reverted" in r.stderr, r
    final = status(stack)
    assert final["version"] == 2 and final["services"]["kv"][0]["pid"] == before["services"]["kv"][0]["pid"]
    r = corral("up", "--run-for", "1s", cwd=stack)
    assert r.returncode == 2 and "--run-for starts a new stack" in r.stderr, r


def test_failing_up_detached_exits_1_and_rolls_back(tmp_path: Path) -> None:
    write_spec(tmp_path, f"""
        name: broken
        services:
          db:
            command: ["{{py}}", "{{server}}"]
            env: {{READY_FILE: "{tmp_path}/never"}}
            ports: {{http: auto}}
            start_timeout: 1s
            health:
              readiness: {{http: {{port: http, path: /health}}, period: 100ms}}
          web:
            command: ["sleep", "300"]
        """)
    r = corral("up", "-d", cwd=tmp_path)
    assert r.returncode == 1, r
    assert "db not up within 1s: db-0 running" in r.stderr and "Traceback" not in r.stderr
    db = tmp_path / ".corral" / "state.db"
    insts = StateStore.read_instances(db, "broken")
    assert insts and all(i.state == "stopped" for i in insts)
    for i in insts:
        assert i.pid and not alive(i.pid)
    assert StateStore.read_deployments(db)[-1].status == "failed"


def test_foreground_up_runs_for_a_while_and_stops(stack: Path) -> None:
    r = corral("up", "--run-for", "1s", cwd=stack, timeout=90)
    assert r.returncode == 0, r.stderr
    assert "clistack: up (5 instances)" in r.stdout and "clistack: down" in r.stdout
    assert "worker-0" in r.stdout and "-> healthy" in r.stdout
    insts = StateStore.read_instances(stack / ".corral" / "state.db", "clistack")
    for i in insts:
        assert i.pid and not alive(i.pid)


def test_foreground_up_stops_cleanly_on_sigterm(stack: Path) -> None:
    p = subprocess.Popen([sys.executable, "-m", "corral", "up"], cwd=stack, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env_without_state())
    try:
        wait_until(lambda: (stack / ".corral" / "state.db").exists()
                   and any(d.status == "up" for d in StateStore.read_deployments(stack / ".corral" / "state.db")),
                   30, "up")
        pids = [i.pid for i in StateStore.read_instances(stack / ".corral" / "state.db", "clistack") if i.pid]
        p.send_signal(signal.SIGTERM)
        _out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    for pid in pids:
        assert not alive(pid)


def test_plan_prints_phases_and_placements(stack: Path) -> None:
    r = corral("plan", "--json", cwd=stack)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["phases"] == [["kv"], ["job"], ["api"], ["worker"]]
    assert len(doc["services"]["worker"][0]["cpus"]) == 1
    text = corral("plan", cwd=stack)
    assert "phase 0: kv" in text.stdout and "worker-0" in text.stdout
    assert not (stack / ".corral" / "agent.sock").exists()


def test_commands_without_a_deployment(tmp_path: Path) -> None:
    write_spec(tmp_path, STACK)
    for cmd in (["status"], ["events"], ["logs", "api"]):
        r = corral(*cmd, cwd=tmp_path)
        assert r.returncode == 1 and "no deployment in" in r.stderr, (cmd, r)
    r = corral("restart", "api", cwd=tmp_path)
    assert r.returncode == 1 and "no agent running" in r.stderr
    assert corral("down", cwd=tmp_path).stdout.strip() == "nothing running"


def test_foreground_up_on_a_terminal_shows_the_live_table(stack: Path) -> None:
    import pty

    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(stack)
        os.environ.pop("CORRAL_STATE_DIR", None)
        os.environ["COLUMNS"] = "160"
        os.execv(sys.executable, [sys.executable, "-m", "corral", "up", "--run-for", "1500ms"])
    chunks = []
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    _, status = os.waitpid(pid, 0)
    screen = b"".join(chunks).decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, screen[-2000:]
    assert "services up" in screen and "4/4" in screen, screen[-2000:]
    assert "worker-0" in screen and "healthy" in screen and "(excl)" in screen
    assert "clistack: down" in screen


def test_events_follow_prints_new_transitions(stack: Path) -> None:
    assert corral("up", "-d", cwd=stack).returncode == 0
    follower = subprocess.Popen([sys.executable, "-m", "corral", "events", "-f", "-n", "1"], cwd=stack,
                                stdout=subprocess.PIPE, text=True, env=env_without_state())
    try:
        assert follower.stdout is not None
        # The newest past event comes first; once it is out, the follower is following.
        assert "every service meets its condition" in follower.stdout.readline()
        assert corral("restart", "worker", cwd=stack).returncode == 0
        lines: list[str] = []
        while not any("worker-0" in x and "-> healthy" in x for x in lines):
            lines.append(follower.stdout.readline())
    finally:
        follower.terminate()
        follower.wait(timeout=10)
    text = "".join(lines)
    assert "worker-0" in text and "stopping" in text and "restart requested" in text


def test_logs_follow_prints_new_output(tmp_path: Path) -> None:
    write_spec(tmp_path, """
        name: ticker
        services:
          tick:
            command: ["sh", "-c", "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.1; done"]
        """)
    assert corral("up", "-d", cwd=tmp_path).returncode == 0
    follower = subprocess.Popen([sys.executable, "-m", "corral", "logs", "tick", "-f", "-n", "1"], cwd=tmp_path,
                                stdout=subprocess.PIPE, text=True, env=env_without_state())
    try:
        assert follower.stdout is not None
        seen = [follower.stdout.readline() for _ in range(5)]
    finally:
        follower.terminate()
        follower.wait(timeout=10)
        assert corral("down", cwd=tmp_path).returncode == 0
    numbers = [int(x.split()[1]) for x in seen]
    assert all(x.startswith("tick ") for x in seen)
    assert numbers == list(range(numbers[0], numbers[0] + 5)), "consecutive lines, none lost or repeated"


def test_interrupting_a_foreground_up_says_so(tmp_path: Path) -> None:
    write_spec(tmp_path, """
        name: slow
        services:
          web:
            command: ["{py}", "{server}"]
            env: {READY_FILE: "never"}
            ports: {http: auto}
            health:
              readiness: {http: {port: http, path: /health}, period: 100ms}
        """)
    p = subprocess.Popen([sys.executable, "-m", "corral", "up"], cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env_without_state())
    db = tmp_path / ".corral" / "state.db"
    try:
        wait_until(lambda: db.exists() and any(i.pid for i in StateStore.read_instances(db, "slow")), 30, "a spawn")
        pids = [i.pid for i in StateStore.read_instances(db, "slow") if i.pid]
        p.send_signal(signal.SIGINT)
        _out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 1 and "up was interrupted" in err and "CancelledError" not in err, err
    for pid in pids:
        wait_until(lambda pid=pid: not alive(pid), 10, f"{pid} gone")  # type: ignore[misc]


def test_detached_and_foreground_up_report_the_same_failure(tmp_path: Path) -> None:
    """up -d used to exit 1 with no output, or with an earlier run's error read from a stale
    agent.log: the agent now hands its error to the waiting CLI directly."""
    held = __import__("socket").socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    port = held.getsockname()[1]
    try:
        cases = {
            "port held by another program": (f"""
                name: held
                services:
                  web: {{command: ["sleep", "300"], ports: {{http: {port}}}}}
                """, 2, f"port {port} is in use"),
            "does not fit": ("""
                name: big
                services:
                  web: {command: ["sleep", "300"], resources: {memory: 100Ti}}
                """, 2, "does not fit"),
            "never ready": ("""
                name: slow
                services:
                  web:
                    command: ["sleep", "300"]
                    start_timeout: 500ms
                    health: {readiness: {exec: ["false"], period: 100ms}}
                """, 1, "web not up within 0.5s"),
        }
        for what, (text, code, says) in cases.items():
            write_spec(tmp_path, text)
            (tmp_path / ".corral").mkdir(exist_ok=True, mode=0o700)
            (tmp_path / ".corral" / "agent.log").write_text("error: a stale message from an earlier run\n")
            fg = corral("up", cwd=tmp_path)
            bg = corral("up", "-d", cwd=tmp_path)
            for r in (fg, bg):
                assert r.returncode == code and says in r.stderr, (what, r)
                assert "stale message" not in r.stderr and "Traceback" not in r.stderr, (what, r)
        (tmp_path / ".corral" / "state.db").write_bytes(b"this is not a database" * 100)
        write_spec(tmp_path, "name: corrupt\nservices:\n  web: {command: [sleep, '300']}\n")
        for r in (corral("up", cwd=tmp_path), corral("up", "-d", cwd=tmp_path)):
            assert r.returncode == 2 and "cannot be used" in r.stderr and "Traceback" not in r.stderr, r
    finally:
        held.close()


def test_detached_up_gives_up_after_its_timeout_and_stops_what_it_started(tmp_path: Path) -> None:
    write_spec(tmp_path, """
        name: slow
        services:
          web:
            command: ["sleep", "300"]
            health: {readiness: {exec: ["false"], period: 100ms}}
        """)
    r = corral("up", "-d", "--timeout", "1", cwd=tmp_path)
    assert r.returncode == 1 and "did not finish within 1s" in r.stderr, r
    db = tmp_path / ".corral" / "state.db"
    for i in StateStore.read_instances(db, "slow"):
        assert i.pid is not None
        wait_until(lambda pid=i.pid: not alive(pid), 10, "the instance stopped")  # type: ignore[misc]


FIXED = """
    name: NAME
    services:
      web:
        command: ["{py}", "{server}"]
        ports: {http: 24301}
        health:
          readiness: {tcp: {port: http}, period: 100ms}
"""


def _keeper(tmp_path: Path) -> int:
    return int(json.loads((tmp_path / ".corral" / "keeper.json").read_text())["pid"])


def test_up_right_after_a_crash_of_agent_and_keeper_and_a_rename_starts_cleanly(tmp_path: Path) -> None:
    write_spec(tmp_path, FIXED.replace("NAME", "before"))
    assert corral("up", "-d", cwd=tmp_path).returncode == 0
    st = json.loads(corral("status", "--json", cwd=tmp_path).stdout)
    old_pid = st["services"]["web"][0]["pid"]
    # Both gone at once (the keeper too, or nothing would be left over): the instance runs on.
    os.kill(_keeper(tmp_path), signal.SIGKILL)
    os.kill(st["agent_pid"], signal.SIGKILL)
    # At once: the dead agent may still be a zombie, and its instance still holds port 24301.
    write_spec(tmp_path, FIXED.replace("NAME", "after"))
    try:
        r = corral("up", "-d", cwd=tmp_path)
        assert r.returncode == 0, r
        assert not alive(old_pid), "the renamed deployment's leftover was stopped"
        st = json.loads(corral("status", "--json", cwd=tmp_path).stdout)
        assert st["name"] == "after" and st["services"]["web"][0]["state"] == "healthy"
    finally:
        corral("down", cwd=tmp_path)
        kill_groups([old_pid])


def test_up_right_after_an_agent_crash_finds_the_agent_the_keeper_started(tmp_path: Path) -> None:
    write_spec(tmp_path, FIXED.replace("NAME", "kept"))
    assert corral("up", "-d", cwd=tmp_path).returncode == 0
    st = json.loads(corral("status", "--json", cwd=tmp_path).stdout)
    pid = st["services"]["web"][0]["pid"]
    os.kill(st["agent_pid"], signal.SIGKILL)
    try:
        r = corral("up", "-d", cwd=tmp_path)  # at once, while the keeper restarts the agent
        assert r.returncode == 0 and r.stdout.splitlines()[0] == "no changes", r
        again = json.loads(corral("status", "--json", cwd=tmp_path).stdout)
        assert again["agent_pid"] != st["agent_pid"] and again["services"]["web"][0]["pid"] == pid
        write_spec(tmp_path, FIXED.replace("NAME", "renamed"))
        r = corral("up", "-d", cwd=tmp_path)
        assert r.returncode == 2 and "the running deployment is 'kept'" in r.stderr, r
        assert alive(pid)
    finally:
        corral("down", cwd=tmp_path)
        kill_groups([pid])


def test_a_corrupt_state_db_does_not_hide_or_strand_a_running_stack(tmp_path: Path) -> None:
    write_spec(tmp_path, FIXED.replace("NAME", "corrupt"))
    assert corral("up", "-d", cwd=tmp_path).returncode == 0
    db = tmp_path / ".corral" / "state.db"
    pid = json.loads(corral("status", "--json", cwd=tmp_path).stdout)["services"]["web"][0]["pid"]
    try:
        for f in (db, db.with_name("state.db-wal"), db.with_name("state.db-shm")):
            if f.exists():
                f.write_bytes(b"garbage" * 4096)
        st = corral("status", cwd=tmp_path)
        assert st.returncode == 0 and "web-0" in st.stdout, st
        r = corral("down", cwd=tmp_path)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r
        wait_until(lambda: not alive(pid), 10, "the instance stopped")
        for cmd in (["status"], ["events"], ["logs", "web"]):
            r = corral(*cmd, cwd=tmp_path)
            assert r.returncode == 2 and "cannot be used" in r.stderr and "Traceback" not in r.stderr, (cmd, r)
    finally:
        kill_groups([pid])


def test_an_agent_that_does_not_answer_keeps_its_socket_and_its_stack(tmp_path: Path) -> None:
    write_spec(tmp_path, FIXED.replace("NAME", "stopped"))
    assert corral("up", "-d", cwd=tmp_path).returncode == 0
    st = json.loads(corral("status", "--json", cwd=tmp_path).stdout)
    agent, web = st["agent_pid"], st["services"]["web"][0]["pid"]
    sock = tmp_path / ".corral" / "agent.sock"
    os.kill(agent, signal.SIGSTOP)
    try:
        r = corral("up", "-d", cwd=tmp_path)
        assert r.returncode == 1 and "does not answer; nothing was applied" in r.stderr, r
        assert sock.exists(), "nobody but the agent removes its socket"
        st = json.loads(corral("status", "--json", cwd=tmp_path).stdout)
        assert st["agent_running"] and st["services"]["web"][0]["pid"] == web
        r = corral("down", cwd=tmp_path, timeout=60)
        assert r.returncode == 1 and alive(web), "down without an answering agent leaves its stack alone"
    finally:
        os.kill(agent, signal.SIGCONT)
    r = corral("down", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "down", r
    wait_until(lambda: not alive(web), 10, "the instance stopped")


def test_detached_up_says_so_when_the_agent_dies_before_reporting(tmp_path: Path) -> None:
    write_spec(tmp_path, """
        name: dying
        services:
          web:
            command: ["sleep", "300"]
            health: {readiness: {exec: ["false"], period: 100ms}}
        """)
    p = subprocess.Popen([sys.executable, "-m", "corral", "up", "-d"], cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env_without_state())
    db = tmp_path / ".corral" / "state.db"
    try:
        wait_until(lambda: db.exists() and bool(StateStore.read_deployments(db))
                   and StateStore.read_deployments(db)[0].agent_pid is not None, 30, "the agent")
        agent = StateStore.read_deployments(db)[0].agent_pid
        assert agent is not None
        os.kill(agent, signal.SIGKILL)
        _out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 1 and "the agent died before it could report (exit status -9" in err, err
    assert "Traceback" not in err
    r = corral("down", cwd=tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r
