"""Day 2: a changed spec applied to a running stack. Real processes behind a real front,
with a load generator opening a new connection every ~20 ms: a changed service rolls
start-first with no failed request, an unchanged one keeps its pids, a front change applies
in place, a failing new version is reverted, and an apply that cannot fit changes nothing."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from corral import Deployment
from corral.exceptions import RolloutError, SpecError
from corral.spec import load_spec
from corral.state import StateStore
from tests.e2e import read_json, running, write_spec
from tests.test_proxy import Load

pytestmark = pytest.mark.timeout(150)

FRONT = 23021
SPEC = """
    name: applied
    services:
      web:
        replicas: 2
        command: ["{py}", "{server}"]
        env: {VERSION: "1"}
        ports: {http: auto}
        expose: 23021
        balance: round_robin
        health:
          readiness: {http: {port: http, path: /health}, period: 100ms, failure_threshold: 1}
        shutdown: {timeout: 3s}
      other:
        command: ["sleep", "300"]
"""


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Deployment]:
    async with running(write_spec(tmp_path, SPEC)) as d:
        yield d


def _edit(d: Deployment, old: str, new: str) -> Path:
    """Rewrites the stack's spec file with ``old`` replaced by ``new``."""
    text = d.file.read_text()
    assert old in text, old
    d.file.write_text(text.replace(old, new))
    return d.file


def _pids(d: Deployment, service: str) -> dict[str, int | None]:
    return {i.id: i.pid for i in d.status().services[service]}


def _failed(load: Load) -> list[tuple[float, bool, str]]:
    return [r for r in load.results if not r[1]]


async def test_a_changed_env_rolls_that_service_start_first_and_no_request_fails(stack: Deployment) -> None:
    other = _pids(stack, "other")
    with Load(FRONT, interval=0.02) as load:
        await asyncio.sleep(0.3)
        diff = await stack.apply(load_spec(_edit(stack, 'VERSION: "1"', 'VERSION: "2"')))
        await asyncio.sleep(0.3)
    assert not _failed(load), _failed(load)[:5]
    assert [c.change for c in diff.services] == ["replace", "unchanged"]
    assert _pids(stack, "other") == other, "the unchanged service kept its processes"
    web = stack.status().services["web"]
    assert [i.id for i in web] == ["web-0-v2", "web-1-v2"] and {i.version for i in web} == {2}
    assert {r[2] for r in load.results[-10:]} <= {"web-0-v2", "web-1-v2"}, "the new version serves"
    assert {r[2] for r in load.results[:5]} <= {"web-0", "web-1"}
    # Start-first: at every moment of the rollout some instance served (the load saw both).
    served = [r[2] for r in load.results]
    assert served.index("web-0-v2") < len(served) - 1 - served[::-1].index("web-1")
    assert stack.status().version == 2
    specs = StateStore.read_specs(stack.state_db, "applied")
    assert [(s.version, s.state) for s in specs] == [(1, "applied"), (2, "applied")]
    assert 'VERSION: "2"' in specs[1].text and specs[0].digest != specs[1].digest
    events = [e.reason for e in stack.event_log()]
    assert any(r.startswith("apply v2: ~ web: env.VERSION \"1\" => \"2\"; rolling 2 instances, start-first")
               for r in events), events[-20:]


async def test_replicas_only_scales_without_touching_anything_else(stack: Deployment) -> None:
    web, other = _pids(stack, "web"), _pids(stack, "other")
    with Load(FRONT, interval=0.02) as load:
        diff = await stack.apply(load_spec(_edit(stack, "replicas: 2", "replicas: 3")))
        await asyncio.sleep(0.3)
    assert diff.get("web").change == "scale" and diff.get("web").replicas == (2, 3)
    after = _pids(stack, "web")
    assert {k: after[k] for k in web} == web and list(after) == ["web-0", "web-1", "web-2"]
    assert _pids(stack, "other") == other and not _failed(load)
    diff = await stack.apply(load_spec(_edit(stack, "replicas: 3", "replicas: 1")))
    assert list(_pids(stack, "web")) == ["web-0"], "the highest-numbered went first"


async def test_a_balance_change_applies_in_place_on_the_same_listener(stack: Deployment) -> None:
    web = _pids(stack, "web")
    front = stack.front("web")
    with Load(FRONT, interval=0.02) as load:
        await asyncio.sleep(0.3)
        diff = await stack.apply(load_spec(_edit(stack, "balance: round_robin", "balance: ip_hash")))
        mark = len(load.results)
        await asyncio.sleep(0.6)
    assert diff.get("web").change == "in-place"
    assert diff.lines()[0] == "~ web: balance round_robin => ip_hash (in place)"
    assert stack.front("web") is front and _pids(stack, "web") == web, "no restart, the same proxy"
    assert not _failed(load)
    assert len({r[2] for r in load.results[:mark]}) == 2, "round robin before"
    assert len({r[2] for r in load.results[mark + 2:]}) == 1, "one client address, one instance after"


async def test_a_front_hold_change_applies_in_place(stack: Deployment) -> None:
    """front_hold 0 by apply: with no instance, the same front then closes a connection at
    once (counted refused) where it held it before."""
    web = _pids(stack, "web")
    diff = await stack.apply(load_spec(_edit(stack, "balance: round_robin", "balance: round_robin\n    front_hold: 0")))
    assert diff.get("web").change == "in-place" and _pids(stack, "web") == web
    await stack.stop_service("web")
    front = stack.front("web")
    assert front is not None
    began = time.monotonic()
    with socket.create_connection(("127.0.0.1", FRONT), timeout=10) as s:
        s.sendall(b"GET /whoami HTTP/1.0\r\n\r\n")
        assert s.recv(100) == b"", "closed: no instance to take it"
    assert time.monotonic() - began < 3.0, "not held for the old 5 s"
    assert front.stats().refused == 1 and front.held == 0


async def test_a_new_version_that_exits_at_once_is_reverted_and_the_old_serves_throughout(
        stack: Deployment) -> None:
    web = _pids(stack, "web")
    with Load(FRONT, interval=0.02) as load:
        await asyncio.sleep(0.3)
        with pytest.raises(RolloutError) as e:
            await stack.apply(load_spec(_edit(stack, 'VERSION: "1"', 'VERSION: "2", EXIT_NOW: "3"')))
        await asyncio.sleep(0.3)
    assert e.value.service == "web" and e.value.instance == "web-0-v2" and e.value.reverted
    assert e.value.reason == "exit status 3, before it was ready", e.value.reason
    assert not _failed(load), _failed(load)[:5]
    assert {r[2] for r in load.results} == {"web-0", "web-1"}, "the old version served throughout"
    assert _pids(stack, "web") == web and stack.status().version == 1
    assert stack.spec.services["web"].env == {"VERSION": "1"}, "the running spec stays the previous one"
    specs = StateStore.read_specs(stack.state_db, "applied")
    assert [(s.version, s.state) for s in specs] == [(1, "applied"), (2, "failed")]


async def test_healthy_deadline_bounds_a_new_version_that_never_gets_ready(stack: Deployment, tmp_path: Path) -> None:
    _edit(stack, 'env: {VERSION: "1"}', f'env: {{VERSION: "1", READY_FILE: "{tmp_path}/never"}}\n'
                                          f'    update: {{healthy_deadline: 1s}}')
    web = _pids(stack, "web")
    t0 = time.monotonic()
    with pytest.raises(RolloutError) as e:
        await stack.apply(load_spec(stack.file))
    took = time.monotonic() - t0
    assert "not ready within healthy_deadline 1s" in e.value.reason and "readiness probe failed" in e.value.reason
    assert took < 20, took
    assert _pids(stack, "web") == web


async def test_a_replaced_instance_counts_only_after_min_healthy_time(stack: Deployment) -> None:
    _edit(stack, 'env: {VERSION: "1"}', 'env: {VERSION: "2"}\n    update: {min_healthy_time: 700ms}')
    t0 = time.monotonic()
    await stack.apply(load_spec(stack.file))
    assert time.monotonic() - t0 >= 1.4, "two instances, one after the other, each ready for 0.7 s"


async def test_an_apply_that_cannot_fit_changes_nothing(stack: Deployment) -> None:
    web, other = _pids(stack, "web"), _pids(stack, "other")
    usage, ports = stack.resources.usage(), stack.ports.in_use
    text = stack.file.read_text() + "  big:\n    command: [sleep, '300']\n    resources: {cores: 64}\n"
    stack.file.write_text(text.replace('VERSION: "1"', 'VERSION: "2"'))
    with pytest.raises(SpecError) as e:
        await stack.apply(load_spec(stack.file))
    assert e.value.field == "services.big.resources", e.value
    assert _pids(stack, "web") == web and _pids(stack, "other") == other
    assert stack.resources.usage() == usage and stack.ports.in_use == ports
    assert stack.status().version == 1 and "big" not in stack.status().services


async def test_a_removed_service_stops_and_gives_back_its_ports_and_grants(tmp_path: Path) -> None:
    async with running(write_spec(tmp_path, SPEC + """
      cache:
        replicas: 2
        command: ["{py}", "{server}"]
        ports: {http: auto}
        resources: {cpu: 0.25, memory: 32Mi}
    """)) as d:
        usage, ports = d.resources.usage(), d.ports.in_use
        cache = [i.pid for i in d.status().services["cache"]]
        text = d.file.read_text()
        d.file.write_text(text[:text.index("  cache:")])
        diff = await d.apply(load_spec(d.file))
        assert diff.lines()[0] == "- cache (removed, 2 instances stopped)"
        assert "cache" not in d.status().services
        assert d.ports.in_use == ports - 2
        after = d.resources.usage()
        assert after.memory_used_mb == usage.memory_used_mb - 64
        assert after.shared_used_millicores == usage.shared_used_millicores - 500
        assert after.grants == usage.grants - 2
        from tests.e2e import alive
        assert not any(alive(p) for p in cache if p)
        rows = StateStore.read_instances(d.state_db, "applied")
        assert not any(r.service == "cache" for r in rows)


async def test_a_new_service_starts_after_its_dependency_and_the_plan_says_so(stack: Deployment) -> None:
    text = stack.file.read_text() + """  cache:
    command: ["sleep", "300"]
    depends_on: {web: healthy}
"""
    stack.file.write_text(text)
    spec = load_spec(stack.file)
    assert stack.plan_changes(spec).lines() == ["+ cache (new, 1 instance)", "= 2 unchanged: web, other"]
    web = _pids(stack, "web")
    await stack.apply(spec)
    assert [i.state for i in stack.status().services["cache"]] == ["healthy"]
    assert _pids(stack, "web") == web


DEPS = """
    name: deps
    services:
      db:
        command: ["{py}", "{server}"]
        env: {VERSION: "1"}
        ports: {http: auto}
        health:
          readiness: {http: {port: http, path: /health}, period: 100ms, failure_threshold: 1}
      api:
        command: ["{py}", "{server}"]
        env: {DUMP_ENV: "DIR/api-{instance}.json"}
        ports: {http: auto}
        depends_on: {db: {condition: healthy, restart: true}}
        health:
          readiness: {http: {port: http, path: /health}, period: 100ms, failure_threshold: 1}
      web:
        command: ["sleep", "300"]
        depends_on: {db: healthy}
      pinned:
        command: ["sleep", "300"]
        resources: {cores: 1}
"""


async def test_restart_true_rolls_the_dependent_after_its_dependency_with_the_new_address(tmp_path: Path) -> None:
    async with running(write_spec(tmp_path, DEPS.replace("DIR", str(tmp_path)))) as d:
        db_before = d.status().services["db"][0].ports["http"]
        first = read_json(tmp_path / "api-api-0.json")
        assert first["env"]["CORRAL_DB_ADDR"] == f"127.0.0.1:{db_before}"
        web = _pids(d, "web")
        spec = load_spec(_edit(d, 'VERSION: "1"', 'VERSION: "2"'))
        lines = d.plan_changes(spec).lines()
        assert lines[:4] == [
            '~ db: env.VERSION "1" => "2"; rolling 1 instance, start-first',
            "    web keeps the old address of db (CORRAL_DB_ADDR); give its depends_on.db restart: true to "
            "restart it after",
            "~ api: restart after its dependencies; rolling 1 instance, start-first",
            "    api restarts after db (restart: true)",
        ], lines
        await d.apply(spec)
        db_after = d.status().services["db"][0]
        assert db_after.id == "db-0-v2" and db_after.ports["http"] != db_before
        api = d.status().services["api"]
        assert [i.id for i in api] == ["api-0-v2"]
        again = read_json(tmp_path / "api-api-0-v2.json")
        assert again["env"]["CORRAL_DB_ADDR"] == f"127.0.0.1:{db_after.ports['http']}"
        assert _pids(d, "web") == web, "without restart: true, web keeps running (and its stale address)"


async def test_the_plan_names_each_kind_of_change_and_a_stop_first_fallback(tmp_path: Path) -> None:
    async with running(write_spec(tmp_path, DEPS.replace("DIR", str(tmp_path)))) as d:
        text = d.file.read_text()
        text = text.replace('  pinned:\n    command: ["sleep", "300"]', '  pinned:\n    command: ["sleep", "301"]')
        text = text.replace('  web:\n    command: ["sleep", "300"]\n    depends_on: {db: healthy}\n', "")
        text += '  cache:\n    command: ["sleep", "300"]\n    replicas: 2\n'
        d.file.write_text(text)
        diff = d.plan_changes(load_spec(d.file))
        assert diff.lines() == [
            '~ pinned: command ["sleep", "300"] => ["sleep", "301"]; rolling 1 instance, stop-first',
            "    pinned falls back to stop-first: " + diff.get("pinned").fallback,  # type: ignore[operator]
            "+ cache (new, 2 instances)",
            "- web (removed, 1 instance stopped)",
            "= 2 unchanged: db, api",
        ], diff.lines()
        assert "cores" in (diff.get("pinned").fallback or "")
        doc = diff.to_dict()
        assert json.loads(json.dumps(doc)) == doc and not doc["empty"]
        assert [s["change"] for s in doc["services"]] == ["unchanged", "unchanged", "replace", "added", "removed"]
        pinned = _pids(d, "pinned")
        await d.apply(load_spec(d.file))
        assert list(_pids(d, "pinned")) == ["pinned-0-v2"] and _pids(d, "pinned") != pinned
        assert sorted(d.status().services) == ["api", "cache", "db", "pinned"]


async def test_an_unchanged_spec_and_an_env_file_edit(stack: Deployment, tmp_path: Path) -> None:
    assert stack.plan_changes(load_spec(stack.file)).lines() == ["no changes", "= 2 unchanged: web, other"]
    (tmp_path / "web.env").write_text("COLOR=blue\n")
    _edit(stack, 'env: {VERSION: "1"}', 'env: {VERSION: "1"}\n    env_file: web.env')
    await stack.apply(load_spec(stack.file))
    assert stack.plan_changes(load_spec(stack.file)).empty
    (tmp_path / "web.env").write_text("COLOR=green\n")
    diff = stack.plan_changes(load_spec(stack.file))
    assert diff.get("web").change == "replace", "the file's contents count, not only its name"
    assert 'env_file.contents.COLOR "blue" => "green"' in diff.lines()[0]
