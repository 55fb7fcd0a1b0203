"""Honest states under `up -d`: `down` wins against the keeper whenever it arrives, a
re-adopted stack is not "up" before its services meet their conditions under the new agent,
an exit nobody saw is not "exit status None", and every file of the state directory is
owner-only whatever the umask. Real processes: the CLI, its agent, its keeper, `sleep`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from corral._core import find_by_env, process_alive, process_start_time
from corral.state import StateStore
from corral.statedir import STACK, stack_id
from tests.e2e import env_without_state, owner_only, wait_until, write_spec

NEVER_READY = """
    name: dying
    services:
      web:
        command: ["sleep", "300"]
        health: {readiness: {exec: ["false"], period: 100ms}}
        start_timeout: 3s
    """


def corral(*args: str, cwd: Path, timeout: float = 60, env: dict[str, str] | None = None,
           ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "corral", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env or env_without_state())


def keeper_of(state: Path) -> tuple[int, int] | None:
    try:
        doc = json.loads((state / "keeper.json").read_text())
    except (OSError, ValueError):
        return None
    return int(doc["pid"]), int(doc["start"])


def agent_of(db: Path) -> int | None:
    rows = StateStore.read_deployments(db) if db.exists() else []
    return rows[-1].agent_pid if rows else None


def alive(proc: tuple[int, int] | None) -> bool:
    return proc is not None and process_start_time(proc[0]) == proc[1] and process_alive(proc[0])


def stack_processes(state: Path) -> list[int]:
    return [p for p in find_by_env(f"{STACK}={stack_id(state)}") if process_alive(p)]


def start_dying_up(tmp_path: Path) -> tuple[subprocess.Popen[str], int]:
    """`up -d` of a never-ready service, its first agent killed before it reported."""
    write_spec(tmp_path, NEVER_READY)
    db = tmp_path / ".corral" / "state.db"
    p = subprocess.Popen([sys.executable, "-m", "corral", "up", "-d"], cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env_without_state())
    wait_until(lambda: agent_of(db) is not None, 30, "the agent")
    agent = agent_of(db)
    assert agent is not None
    return p, agent


# The moments after the kill at which down arrives: at once (the keeper has not noticed),
# during its restart pause, while the new agent imports and opens its socket, while it
# re-adopts, and while it waits for the never-ready probe.
@pytest.mark.parametrize("delay", [0.0, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.8, 1.2, 2.0])
def test_down_wins_against_the_keeper_whenever_it_arrives(tmp_path: Path, delay: float) -> None:
    state = tmp_path / ".corral"
    p, agent = start_dying_up(tmp_path)
    try:
        keeper = keeper_of(state)
        os.kill(agent, signal.SIGKILL)
        time.sleep(delay)
        r = corral("down", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert "Traceback" not in r.stderr
        # Reported only once everything is gone: nothing to wait for here.
        assert not alive(keeper), f"the keeper still runs after down (delay {delay})"
        left = stack_processes(state)
        assert not left, f"down returned with the stack's processes alive: {left}"
        newest = agent_of(state / "state.db")
        assert newest is None or not process_alive(newest), f"agent {newest} still runs"
        time.sleep(0.5)  # and nothing comes back after it
        assert not stack_processes(state)
    finally:
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=30)
        corral("down", cwd=tmp_path)


def test_a_readopted_up_is_not_up_before_its_services_are(tmp_path: Path) -> None:
    """The agent dies in the middle of up; the keeper's new agent goes on with that up, as
    it was: the never-ready service fails it (rolled back), the stack is never "up"."""
    state = tmp_path / ".corral"
    db = state / "state.db"
    p, agent = start_dying_up(tmp_path)
    try:
        os.kill(agent, signal.SIGKILL)
        _out, err = p.communicate(timeout=30)
        assert p.returncode == 1 and "the agent died before it could report" in err, err
        seen: set[str] = set()

        def ended() -> bool:
            rows = StateStore.read_deployments(db)
            seen.add(rows[-1].status)
            return rows[-1].status == "failed"

        wait_until(ended, 30, "the re-adopting agent to give up on the never-ready service")
        assert "up" not in seen, seen
        reasons = [e.reason for e in StateStore.read_events(db, 0, 10000)]
        assert not any(r.startswith("every service meets its condition") for r in reasons), reasons
        row = StateStore.read_deployments(db)[-1]
        assert "web not up within 3s under this agent" in row.message, row.message
        wait_until(lambda: not stack_processes(state), 15, "the rolled-back instance to be gone")
        assert not any(i.healthy for i in StateStore.read_instances(db, "dying"))
    finally:
        if p.poll() is None:
            p.kill()
        corral("down", cwd=tmp_path)


def test_a_readopted_stack_whose_service_stopped_being_ready_is_degraded(tmp_path: Path) -> None:
    flag = tmp_path / "ready"
    flag.write_text("")
    write_spec(tmp_path, f"""
        name: flaky
        services:
          web:
            command: ["sleep", "300"]
            health: {{readiness: {{exec: ["test", "-e", "{flag}"], period: 100ms}}}}
            start_timeout: 2s
        """)
    state = tmp_path / ".corral"
    db = state / "state.db"
    try:
        r = corral("up", "-d", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        first = agent_of(db)
        assert first is not None
        flag.unlink()
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: agent_of(db) not in (None, first), 30, "the keeper's new agent")
        wait_until(lambda: StateStore.read_deployments(db)[-1].status == "degraded", 30, "the verdict")
        row = StateStore.read_deployments(db)[-1]
        assert "web not up within 2s under this agent" in row.message, row.message
        (inst,) = StateStore.read_instances(db, "flaky")
        assert inst.state == "running" and not inst.healthy, inst
        # Once its probe passes under this agent, it is up again (the instance at least).
        flag.write_text("")
        wait_until(lambda: StateStore.read_instances(db, "flaky")[0].healthy, 15, "healthy again")
    finally:
        r = corral("down", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert not stack_processes(state)


def test_every_file_of_a_detached_stack_is_owner_only_under_umask_000(tmp_path: Path) -> None:
    """`up -d` under umask 000, its agent killed (the keeper restarts it), then an instance
    killed (the keeper, its subreaper now, records the exit in `exits`)."""
    write_spec(tmp_path, """
        name: modes
        services:
          web:
            command: ["sleep", "300"]
            restart: {policy: always, initial: 0s}
        """)
    state = tmp_path / ".corral"
    db = state / "state.db"
    env = env_without_state()
    up = subprocess.run(["sh", "-c", f"umask 000; exec {sys.executable} -m corral up -d"], cwd=tmp_path,
                        capture_output=True, text=True, timeout=60, env=env)
    try:
        assert up.returncode == 0, up.stderr
        first = agent_of(db)
        assert first is not None
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: agent_of(db) not in (None, first) and StateStore.read_deployments(db)[-1].status == "up",
                   30, "the re-adopting agent")
        (inst,) = StateStore.read_instances(db, "modes")
        assert inst.pid is not None
        os.kill(inst.pid, signal.SIGKILL)
        wait_until(lambda: (state / "exits").exists() and f"{inst.pid} -9" in (state / "exits").read_text(), 15,
                   "the keeper's record of the exit")
        seen = owner_only(state)
        for expected in ("state.db", "exits", "keeper.json", "keeper.log", "keeper.sock", "agent.log", "agent.sock",
                         "pids", "logs", "logs/web-0.log"):
            assert expected in seen, (expected, seen)
        # The instance the keeper saw die is reported with its real status, not "None".
        wait_until(lambda: StateStore.read_instances(db, "modes")[0].restarts >= 1, 15, "the restart")
        reasons = [e.reason for e in StateStore.read_events(db, 0, 10000) if e.instance == "web-0"]
        assert any("killed by signal 9" in r for r in reasons), reasons
        assert not any("None" in r for r in reasons), reasons
    finally:
        corral("down", cwd=tmp_path)


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5])
def test_down_right_after_up_d_stops_what_comes_up(tmp_path: Path, delay: float) -> None:
    """`up -d` holds the stack's lock until its agent reported; a `down` fired meanwhile waits
    for it, then stops everything: it never reports down beside a stack about to run."""
    write_spec(tmp_path, """
        name: soon
        services:
          web:
            command: ["sleep", "1000"]
            health: {readiness: {exec: ["sh", "-c", "sleep 0.6"], period: 100ms}}
        """)
    state = tmp_path / ".corral"
    up = subprocess.Popen([sys.executable, "-m", "corral", "up", "-d"], cwd=tmp_path, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env_without_state())
    try:
        # From when up -d is under way (its lock taken: the first thing it does).
        wait_until(lambda: (state / "lock").exists(), 30, "up -d to begin")
        time.sleep(delay)
        r = corral("down", cwd=tmp_path)
        up.communicate(timeout=60)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r
        assert not stack_processes(state), "down returned with the stack running"
        keeper = keeper_of(state)
        assert not alive(keeper), "the keeper outlived down"
        time.sleep(1.0)  # and nothing comes up after it
        assert not stack_processes(state)
    finally:
        if up.poll() is None:
            up.kill()
            up.communicate()
        corral("down", cwd=tmp_path)


@pytest.mark.parametrize("attempt", range(4))
def test_two_fresh_up_d_at_once_start_one_stack(tmp_path: Path, attempt: int) -> None:
    """The second waits for the first's lock, then applies to the stack the first started (no
    second keeper takes the first's socket); the stack then restarts an instance as usual."""
    write_spec(tmp_path, """
        name: twice
        services:
          web:
            command: ["sleep", "1000"]
            restart: {policy: always, initial: 0s}
        """)
    db = tmp_path / ".corral" / "state.db"
    ups = [subprocess.Popen([sys.executable, "-m", "corral", "up", "-d"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env_without_state()) for _ in range(2)]
    try:
        outs = [u.communicate(timeout=60) for u in ups]
        assert [u.returncode for u in ups] == [0, 0], outs
        keepers = [p for p in find_by_env(f"CORRAL_TEST_RUN={os.environ['CORRAL_TEST_RUN']}")
                   if "corral.agent.keeper" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]
        assert len(keepers) == 1, keepers
        (inst,) = StateStore.read_instances(db, "twice")
        assert inst.pid is not None
        os.kill(inst.pid, signal.SIGKILL)
        wait_until(lambda: (lambda i: i.restarts >= 1 and i.state == "healthy" and i.pid != inst.pid)(
            StateStore.read_instances(db, "twice")[0]), 15, "the restart")
        reasons = [e.reason for e in StateStore.read_events(db, 0, 10000)]
        assert not any("Broken pipe" in r for r in reasons), reasons
    finally:
        r = corral("down", cwd=tmp_path)
        assert r.returncode == 0, r.stderr


def test_a_changed_spec_over_a_stopped_keeper_rolls_and_the_old_keeper_stands_down(tmp_path: Path) -> None:
    """The keeper stopped (SIGSTOP), the agent killed, then `up -d` of a changed spec: the
    instances are re-adopted and the change rolls over them (no restart of everything); the
    old keeper, resumed, finds the new one's record and ends without touching it."""
    spec = write_spec(tmp_path, """
        name: rolled
        services:
          web:
            replicas: 2
            command: ["sleep", "1000"]
            env: {VERSION: "1"}
        """)
    state = tmp_path / ".corral"
    db = state / "state.db"
    r = corral("up", "-d", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    old_keeper = keeper_of(state)
    assert old_keeper is not None
    agent = agent_of(db)
    assert agent is not None
    os.kill(old_keeper[0], signal.SIGSTOP)
    try:
        os.kill(agent, signal.SIGKILL)
        spec.write_text(spec.read_text().replace('VERSION: "1"', 'VERSION: "2"'))
        r = corral("up", "-d", cwd=tmp_path, timeout=120)
        assert r.returncode == 0, (r.stdout, r.stderr)
        assert "re-adopted what a dead agent left" in r.stdout, r.stdout
        reasons = [e.reason for e in StateStore.read_events(db, 0, 10000)]
        assert any(x.startswith("re-adopted 2 instances") for x in reasons), reasons
        assert not any("left by a previous agent" in x for x in reasons), reasons
        ids = sorted(i.id for i in StateStore.read_instances(db, "rolled") if i.state in ("running", "healthy"))
        assert ids == ["web-0-v2", "web-1-v2"], ids
    finally:
        os.kill(old_keeper[0], signal.SIGCONT)
    try:
        wait_until(lambda: not alive(old_keeper), 20, "the old keeper to stand down")
        now = keeper_of(state)
        assert now is not None and now != old_keeper and alive(now), (now, old_keeper)
    finally:
        r = corral("down", cwd=tmp_path)
        assert r.returncode == 0, r.stderr


def test_the_keepers_death_is_noticed_said_and_survived(tmp_path: Path) -> None:
    """kill -9 of the keeper: the agent says so (status and event), restarts the instance
    whose output had no reader any more, logs through itself from then on, and a later
    restart works (it used to fail for good with 'log keeper ...: Broken pipe')."""
    write_spec(tmp_path, """
        name: orphaned
        services:
          chatty:
            command: ["sh", "-c", "while :; do echo tick; sleep 0.1; done"]
            restart: {policy: always, initial: 0s}
        """)
    state = tmp_path / ".corral"
    db = state / "state.db"
    log = state / "logs" / "chatty-0.log"
    try:
        r = corral("up", "-d", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        keeper = keeper_of(state)
        assert keeper is not None
        (first,) = StateStore.read_instances(db, "orphaned")
        os.kill(keeper[0], signal.SIGKILL)

        def said() -> bool:
            return "the keeper (pid" in StateStore.read_deployments(db)[-1].message

        wait_until(said, 15, "status to say the keeper died")
        wait_until(lambda: StateStore.read_instances(db, "orphaned")[0].pid not in (None, first.pid), 30,
                   "the instance restarted")
        st = corral("status", cwd=tmp_path)
        assert "the keeper (pid" in st.stdout and "died" in st.stdout, st.stdout
        size = log.stat().st_size
        wait_until(lambda: log.stat().st_size > size, 10, "new output in the log, through the agent")
        (now,) = StateStore.read_instances(db, "orphaned")
        assert now.pid is not None
        os.kill(now.pid, signal.SIGKILL)
        wait_until(lambda: (lambda i: i.pid not in (None, now.pid) and i.state in ("running", "healthy"))(
            StateStore.read_instances(db, "orphaned")[0]), 15, "a restart after the keeper's death")
        reasons = [e.reason for e in StateStore.read_events(db, 0, 10000)]
        assert not any("Broken pipe" in x for x in reasons), reasons
        assert any("the keeper (pid" in x and "died" in x for x in reasons), reasons
    finally:
        r = corral("down", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert not stack_processes(state)


def test_a_keeper_dead_before_the_watch_begins_is_noticed_too() -> None:
    """The keeper can die between the agent's start and its watch (pidfd_open then fails, or
    the pid is someone else's): that death is said and acted on as one seen later is. The
    stack and journal here are stand-ins recording what the watch does to them (timing a
    real keeper's death into that gap cannot be done reliably); the pid is a real process
    that has ended."""
    import asyncio
    from types import SimpleNamespace
    from typing import Any

    from corral.engine.keeperwatch import KeeperWatch

    gone = subprocess.Popen(["true"])
    gone.wait()
    said: list[str] = []
    restarted: list[str] = []
    stack: Any = SimpleNamespace(down=False, supervisor=None, instances={}, warn=said.append)
    journal: Any = SimpleNamespace(row=SimpleNamespace(status="up"),
                                   status=lambda _status, message: said.append(message))

    async def restart(name: str) -> None:
        restarted.append(name)

    async def main() -> None:
        watch = KeeperWatch(stack, journal, restart, list)
        watch.start(gone.pid)
        assert watch.task is not None, "a keeper already dead went unnoticed"
        await watch.task
        # Our own parent is alive but not the keeper named: also a keeper gone.
        other = KeeperWatch(stack, journal, restart, list)
        other.start(os.getpid())
        assert other.task is not None
        await other.task

    asyncio.run(main())
    assert any(f"the keeper (pid {gone.pid}) died" in m for m in said), said
    assert restarted == []  # no instance ran
