"""Prometheus metrics: the exposition parses with prometheus_client's parser, its families
move with what happens (a kill -9 moves a restart counter by one, requests through the front
move its connection counter), the agent serves it over HTTP (`up --metrics`), and a real
Prometheus (Debian's package, installed by .ci/run) scrapes and queries it."""

from __future__ import annotations

import asyncio
import http.client
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

import pytest
from prometheus_client.parser import text_string_to_metric_families

from corral import Deployment
from tests.e2e import await_until, running, wait_until, write_spec
from tests.test_cli import corral
from tests.test_proxy import whoami

pytestmark = pytest.mark.timeout(120)

SPEC = """
    name: metered
    services:
      web:
        replicas: 2
        command: ["{py}", "{server}"]
        ports: {http: auto}
        expose: 23061
        health:
          readiness: {http: {port: http, path: /health}, period: 100ms, failure_threshold: 1}
        restart: {policy: always, backoff: fixed, initial: 100ms}
      idle:
        command: ["sh", "-c", "sleep 300 & exec sleep 300"]
"""


def families(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """name -> [(labels, value)], through prometheus_client's own parser."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return out


def value(fams: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    got = [v for lab, v in fams[name] if all(lab.get(k) == x for k, x in labels.items())]
    assert len(got) == 1, (name, labels, fams.get(name))
    return got[0]


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Deployment]:
    async with running(write_spec(tmp_path, SPEC)) as d:
        yield d


async def test_the_exposition_parses_and_moves_with_what_happens(stack: Deployment) -> None:
    fams = families(stack.metrics())
    for name in ("corral_instance_up", "corral_instance_state", "corral_instance_restarts_total",
                 "corral_instance_cpu_seconds_total", "corral_instance_memory_rss_bytes", "corral_instance_open_fds",
                 "corral_front_connections_total", "corral_front_active_connections", "corral_front_bytes_total",
                 "process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"):
        assert name in fams, name
    assert value(fams, "corral_instance_up", instance="web-0") == 1.0
    assert value(fams, "corral_instance_state", instance="web-0", state="healthy") == 1.0
    assert value(fams, "corral_instance_state", instance="web-0", state="failed") == 0.0
    assert value(fams, "corral_instance_memory_rss_bytes", instance="idle-0") > 0
    # Every readiness attempt (every 100 ms) in the histogram; the first may have failed (the
    # server not listening yet), not all of them.
    count = value(fams, "corral_probe_duration_seconds_count", instance="web-0", probe="readiness")
    assert count >= 1 and value(fams, "corral_probe_duration_seconds_bucket", instance="web-0", probe="readiness",
                                le="+Inf") == count
    assert value(fams, "corral_probe_duration_seconds_sum", instance="web-0", probe="readiness") > 0
    assert value(fams, "corral_probe_failures_total", instance="web-0", probe="readiness") < count
    await asyncio.sleep(0.5)
    later = families(stack.metrics())
    assert value(later, "corral_probe_duration_seconds_count", instance="web-0", probe="readiness") >= count + 3
    assert value(fams, "corral_instance_open_fds", instance="idle-0") >= 3
    # Requests through the front move its connection counters.
    before = sum(v for _, v in fams["corral_front_connections_total"])
    for _ in range(10):
        whoami(23061)
    fams = families(stack.metrics())
    assert sum(v for _, v in fams["corral_front_connections_total"]) == before + 10
    assert value(fams, "corral_front_bytes_total", service="web", direction="out") > 0
    # ... and each of them its upstream's connect histogram: a count per connect, a sum of
    # their durations, the +Inf bucket equal to the count and the buckets cumulative.
    connects = {lab["upstream"]: v for lab, v in fams["corral_front_connect_duration_seconds_count"]}
    assert sorted(connects) == ["web-0", "web-1"] and sum(connects.values()) == before + 10
    for up in connects:
        buckets = [(float(lab["le"]), v) for lab, v in fams["corral_front_connect_duration_seconds_bucket"]
                   if lab["upstream"] == up]
        assert buckets[-1] == (float("inf"), connects[up])
        assert all(a[1] <= b[1] for a, b in itertools.pairwise(buckets))
        took = value(fams, "corral_front_connect_duration_seconds_sum", upstream=up)
        assert 0 < took < connects[up]  # loopback connects: well under a second each
    # A kill -9 moves the restart counter by exactly one.
    pid = stack.status().services["web"][0].pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    await await_until(lambda: stack.status().services["web"][0].state == "healthy"
                      and stack.status().services["web"][0].pid != pid, what="web-0 back")
    fams = families(stack.metrics())
    assert value(fams, "corral_instance_restarts_total", instance="web-0") == 1.0
    assert value(fams, "corral_instance_restarts_total", instance="web-1") == 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(port: int, path: str) -> tuple[int, str, str]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.getheader("Content-Type") or "", r.read().decode()
    finally:
        c.close()


def test_the_agent_serves_metrics_and_a_real_prometheus_scrapes_them(tmp_path: Path) -> None:
    write_spec(tmp_path, SPEC.replace("expose: 23061", "expose: 23062"))
    port = 23063
    r = corral("up", "-d", "--metrics", f"127.0.0.1:{port}", cwd=tmp_path)
    assert r.returncode == 0, r
    prom = None
    try:
        status, ctype, body = _get(port, "/metrics")
        assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
        assert value(families(body), "corral_instance_up", instance="web-1") == 1.0
        assert _get(port, "/other")[0] == 404
        if shutil.which("prometheus") is None:
            pytest.skip("no prometheus binary here (.ci/run installs Debian's package)")
        (tmp_path / "prometheus.yml").write_text(
            "global: {scrape_interval: 1s}\n"
            # honor_labels: corral's own `instance` label (the instance id) wins over the
            # scrape target's, which Prometheus would otherwise keep and rename ours.
            f"scrape_configs:\n  - job_name: corral\n    honor_labels: true\n"
            f"    static_configs: [{{targets: ['127.0.0.1:{port}']}}]\n")
        web = _free_port()
        prom = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{web}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

        def query(q: str) -> list[dict]:  # type: ignore[type-arg]
            try:
                _, _, text = _get(web, f"/api/v1/query?query={quote(q)}")
                doc = json.loads(text)
            except (OSError, ValueError):
                return []  # not up yet (it answers 503 in plain text while it starts)
            return doc["data"]["result"] if doc.get("status") == "success" else []  # type: ignore[no-any-return]

        wait_until(lambda: len(query('corral_instance_up{service="web"} == 1')) == 2, 60, "Prometheus has scraped")
        st = json.loads(corral("status", "--json", cwd=tmp_path).stdout)
        os.kill(st["services"]["web"][0]["pid"], signal.SIGKILL)
        wait_until(lambda: [r["value"][1] for r in query('corral_instance_restarts_total{instance="web-0"}')]
                   == ["1"], 60, "the restart we caused, in Prometheus")
    finally:
        if prom is not None:
            os.killpg(prom.pid, signal.SIGKILL)
            prom.wait(10)
        corral("down", cwd=tmp_path)


def _get_with(port: int, path: str, headers: dict[str, str]) -> tuple[int, str]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request("GET", path, headers=headers)
        r = c.getresponse()
        return r.status, r.read().decode()
    finally:
        c.close()


def test_a_token_file_makes_every_scrape_present_the_bearer_token(tmp_path: Path) -> None:
    port = 23064
    token = tmp_path / "metrics.token"
    token.write_text("s3cret-token\n")
    token.chmod(0o600)
    write_spec(tmp_path, f"""
        name: guarded
        metrics: {{listen: "127.0.0.1:{port}", token_file: metrics.token}}
        services:
          idle:
            command: ["sleep", "300"]
        """)
    r = corral("up", "-d", cwd=tmp_path)
    assert r.returncode == 0, r
    try:
        assert _get_with(port, "/metrics", {})[0] == 401
        assert _get_with(port, "/metrics", {"Authorization": "Bearer wrong"})[0] == 401
        status, body = _get_with(port, "/metrics", {"Authorization": "Bearer s3cret-token"})
        assert status == 200, body
        fams = families(body)
        assert value(fams, "corral_operations_total", op="up", outcome="ok") == 1.0
        assert "s3cret" not in body and "sleep" not in body  # no secrets, no command lines
    finally:
        corral("down", cwd=tmp_path)
