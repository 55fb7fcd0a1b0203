"""One service at a time on a running stack: scale up and down under load through the
front, stop and start, a scale that cannot fit changes nothing. Real processes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from corral import Deployment
from corral.exceptions import ConfigError, UnknownService
from corral.state import StateStore
from tests.e2e import alive, await_until, env_without_state, kill_groups, running, write_spec
from tests.test_proxy import Load

pytestmark = pytest.mark.timeout(120)

SPEC = """
    name: scaled
    services:
      web:
        replicas: 2
        command: ["{py}", "{server}"]
        ports: {http: auto}
        expose: 23011
        balance: round_robin
        health:
          readiness: {http: {port: http, path: /health}, period: 100ms, failure_threshold: 1}
        shutdown: {timeout: 3s}
      pinned:
        command: ["sleep", "300"]
        resources: {cores: 1}
      client:
        command: ["sleep", "300"]
        depends_on: {web: healthy}
"""


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Deployment]:
    async with running(write_spec(tmp_path, SPEC)) as d:
        yield d


def _ids(d: Deployment, service: str) -> list[str]:
    return [i.id for i in d.status().services[service]]


async def test_scale_up_and_down_under_load_loses_no_request(stack: Deployment) -> None:
    others = {i.id: i.pid for s in ("pinned", "client") for i in stack.status().services[s]}
    ports_before = stack.ports.in_use
    with Load(23011) as load:
        await asyncio.sleep(0.3)
        await stack.scale("web", 4)
        assert _ids(stack, "web") == ["web-0", "web-1", "web-2", "web-3"]
        assert all(i.state == "healthy" for i in stack.status().services["web"])
        await await_until(lambda: {"web-2", "web-3"} <= {r[2] for r in load.results[-40:] if r[1]},
                          what="the new instances serving through the front")
        await stack.scale("web", 1)
        await asyncio.sleep(0.3)
    failed = [r for r in load.results if not r[1]]
    assert not failed, failed[:5]
    assert _ids(stack, "web") == ["web-0"], "the highest-numbered went first"
    assert {r[2] for r in load.results[-10:]} == {"web-0"}
    assert stack.ports.in_use == ports_before - 1, "the removed instances' ports came back"
    assert {i.id: i.pid for s in ("pinned", "client") for i in stack.status().services[s]} == others
    rows = StateStore.read_instances(stack.state_db, "scaled")
    assert sorted(r.id for r in rows if r.service == "web") == ["web-0"]


async def test_a_scale_that_cannot_fit_changes_nothing(stack: Deployment) -> None:
    # This machine has one CPU to hand out exclusively, and `pinned` holds it.
    before = stack.resources.usage()
    with pytest.raises(ConfigError, match=r"cannot scale pinned to 2: .*exclusive cores"):
        await stack.scale("pinned", 2)
    assert _ids(stack, "pinned") == ["pinned-0"] and stack.resources.usage() == before
    with pytest.raises(UnknownService):
        await stack.scale("nope", 2)


async def test_stop_and_start_a_service(stack: Deployment) -> None:
    client_pid = stack.status().services["client"][0].pid
    dependents = await stack.stop_service("web")
    assert dependents == ["client"]
    web = stack.status().services["web"]
    assert [i.state for i in web] == ["stopped", "stopped"] and not any(alive(i.pid) for i in web if i.pid)
    assert stack.status().services["client"][0].pid == client_pid, "a dependent is warned about, not stopped"
    assert any("client depend on it" in w for w in stack.warnings)
    await stack.start_service("web")
    assert [i.state for i in stack.status().services["web"]] == ["healthy", "healthy"]
    with Load(23011) as load:
        await await_until(lambda: len(load.results) > 5, what="requests")
    assert all(r[1] for r in load.results)


async def test_the_cli_scales_stops_and_starts(tmp_path: Path) -> None:
    write_spec(tmp_path, SPEC)

    def corral(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "corral", *args], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120, env=env_without_state())

    assert corral("up", "-d").returncode == 0
    try:
        r = corral("scale", "web", "3")
        assert r.returncode == 0 and "web: 3 instances" in r.stdout, r
        r = corral("scale", "pinned", "2")
        assert r.returncode == 2 and "cannot scale pinned to 2" in r.stderr, r
        r = corral("scale", "nope", "2")
        assert r.returncode == 2 and "unknown service 'nope'" in r.stderr, r
        r = corral("stop", "web")
        assert r.returncode == 0 and "web: stopped" in r.stdout and "client depend on web" in r.stderr, r
        st = corral("status", "--json")
        assert '"state": "stopped"' in st.stdout
        r = corral("start", "web")
        assert r.returncode == 0 and "web: started" in r.stdout, r
    finally:
        corral("down")
        db = tmp_path / ".corral" / "state.db"
        kill_groups([i.pid for i in StateStore.read_instances(db, "scaled") if i.pid])
