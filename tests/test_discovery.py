"""Discovery through the agent: GET /v1/services and corral.discover() following changes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import corral
from corral.agent.client import AgentClient
from corral.exceptions import AgentError
from corral.state import StateStore
from tests.e2e import env_without_state, kill_groups, read_json, wait_until, write_spec

pytestmark = pytest.mark.timeout(90)

SPEC = """
    name: disco
    services:
      web:
        replicas: 2
        command: ["{py}", "{server}"]
        env: {DUMP_ENV: "@DIR@/${ports.http}.json"}
        ports: {http: auto, admin: auto}
        expose: 23101
        health:
          readiness: {tcp: {port: http}, period: 100ms}
        restart: {policy: on-failure, backoff: fixed, initial: 2s}
      quiet:
        command: ["sleep", "300"]
"""


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Path]:
    write_spec(tmp_path, SPEC.replace("@DIR@", str(tmp_path)))
    r = subprocess.run([sys.executable, "-m", "corral", "up", "-d"], cwd=tmp_path, env=env_without_state(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    yield tmp_path
    subprocess.run([sys.executable, "-m", "corral", "down"], cwd=tmp_path, env=env_without_state(),
                   capture_output=True, timeout=60)
    db = tmp_path / ".corral" / "state.db"
    kill_groups([i.pid for i in StateStore.read_instances(db, "disco") if i.pid])


def test_services_route_and_discover_follow_the_registry(stack: Path) -> None:
    client = AgentClient(stack / ".corral")
    every = client.request("GET", "/v1/services")
    assert set(every) == {"web", "quiet"}
    web = every["web"]
    assert web["front"] == "127.0.0.1:23101"
    assert [i["id"] for i in web["instances"]] == ["web-0", "web-1"]
    assert all(i["healthy"] and set(i["ports"]) == {"http", "admin"} for i in web["instances"])
    assert every["quiet"]["front"] is None and every["quiet"]["instances"][0]["port"] == 0
    with pytest.raises(corral.CorralError, match="unknown service 'nope'"):
        client.request("GET", "/v1/services/nope")

    st = subprocess.run([sys.executable, "-m", "corral", "status", "--json"], cwd=stack, env=env_without_state(),
                        capture_output=True, text=True, timeout=30)
    front = json.loads(st.stdout)["fronts"]["web"]
    assert front["address"] == "127.0.0.1:23101" and len(front["upstreams"]) == 2
    text = subprocess.run([sys.executable, "-m", "corral", "status"], cwd=stack, env=env_without_state(),
                          capture_output=True, text=True, timeout=30).stdout
    assert "front web 127.0.0.1:23101: 2 upstreams" in text

    svc = corral.discover("web", state_dir=stack / ".corral")
    try:
        assert sorted(svc.addresses()) == sorted(i["address"] for i in web["instances"])
        assert svc.front == "127.0.0.1:23101"
        assert {svc.pick() for _ in range(4)} == set(svc.addresses())
        with svc.connection() as addr:
            assert addr in svc.addresses()
        # Kill one: its restart waits 2 s, so the balancer must drop it, then get it back.
        victim = web["instances"][0]
        pid = next(i.pid for i in StateStore.read_instances(stack / ".corral" / "state.db", "disco")
                   if i.id == victim["id"])
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: victim["address"] not in svc.addresses(), 10, "the killed instance dropped")
        assert len(svc.balancer) == 1
        wait_until(lambda: victim["address"] in svc.addresses(), 15, "the restarted instance back")
        assert len(svc.balancer) == 2
    finally:
        svc.close()


def test_instances_can_find_the_agent(stack: Path) -> None:
    port = AgentClient(stack / ".corral").request("GET", "/v1/services/web")["instances"][0]["ports"]
    env = read_json(stack / f"{port['http']}.json")["env"]
    assert env["CORRAL_AGENT_SOCKET"] == str(stack / ".corral" / "agent.sock")
    script = "import corral, json; print(json.dumps(sorted(corral.discover('web', follow=False).addresses())))"
    out = subprocess.run([sys.executable, "-c", script], cwd="/", capture_output=True, text=True, timeout=30,
                         env={**env_without_state(), "CORRAL_AGENT_SOCKET": env["CORRAL_AGENT_SOCKET"]})
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)) == 2


def test_plan_shows_the_front(tmp_path: Path) -> None:
    write_spec(tmp_path, SPEC.replace("@DIR@", str(tmp_path)))
    out = subprocess.run([sys.executable, "-m", "corral", "plan"], cwd=tmp_path, env=env_without_state(),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "front web: 127.0.0.1:23101 (least_connections, plain TCP)" in out.stdout


def test_discover_without_an_agent_raises(tmp_path: Path) -> None:
    with pytest.raises(AgentError, match="no agent at"):
        corral.discover("web", state_dir=tmp_path)


def test_errors_cross_the_socket_typed_and_events_page_by_sequence(stack: Path) -> None:
    from corral.exceptions import ConfigError, UnknownService

    client = AgentClient(stack / ".corral")
    with pytest.raises(UnknownService) as e:
        client.restart("nope")
    assert isinstance(e.value, ConfigError) and isinstance(e.value, KeyError) and e.value.service == "nope"
    with pytest.raises(UnknownService):
        client.request("GET", "/v1/services/nope")
    r = subprocess.run([sys.executable, "-m", "corral", "restart", "nope"], cwd=stack, env=env_without_state(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown service 'nope'" in r.stderr and "Traceback" not in r.stderr

    every = client.request("GET", "/v1/events?after=0&limit=10000")["events"]
    seqs = [ev["seq"] for ev in every]
    assert seqs == sorted(seqs) and len(seqs) == len(set(seqs)) and len(seqs) > 4
    middle = seqs[len(seqs) // 2]
    page = client.request("GET", f"/v1/events?after={middle}&limit=2")["events"]
    assert [ev["seq"] for ev in page] == [s for s in seqs if s > middle][:2], "a page starts right after `after`"
    later = client.request("GET", f"/v1/events?after={seqs[-1]}")["events"]
    assert all(ev["seq"] > seqs[-1] for ev in later)
    # The agent's answer and the state directory's are the same log.
    assert [ev.seq for ev in client.events(0, 10000)][:len(seqs)] == seqs
