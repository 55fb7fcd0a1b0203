"""OpenTelemetry spans: a real stack (real processes, real probes) traced to an OTLP/HTTP
receiver run by the test, which decodes each export with ``opentelemetry-proto`` and checks
the tree: one root per operation (up, scale, apply, down), a span per phase, per rollout
step and per instance from spawn to ready, and the failure reason on the spans that failed.
Without tracing configured, importing and running corral never loads OpenTelemetry."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from corral import Deployment
from corral.engine.tracing import Tracing, endpoint_from
from corral.exceptions import DeploymentError, RolloutError
from corral.spec import load_spec
from tests.e2e import await_until, running, wait_until, write_spec
from tests.test_cli import corral

pytestmark = pytest.mark.timeout(120)


@dataclass
class Span:
    name: str
    id: bytes
    parent: bytes
    trace: bytes
    error: str | None
    attrs: dict[str, object]


@dataclass
class Receiver:
    """An OTLP/HTTP traces endpoint on 127.0.0.1: every span it was sent, decoded."""

    port: int = 0
    spans: list[Span] = field(default_factory=list)
    resources: list[dict[str, object]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def named(self, name: str) -> list[Span]:
        return [s for s in self.spans if s.name == name]

    def children(self, parent: Span) -> list[Span]:
        return [s for s in self.spans if s.parent == parent.id]


def _value(v: object) -> object:
    kind = v.WhichOneof("value")  # type: ignore[attr-defined]
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]  # type: ignore[attr-defined]
    return getattr(v, kind) if kind else None


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    got = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            req = ExportTraceServiceRequest()
            req.ParseFromString(body)
            got.paths.append(self.path)
            for rs in req.resource_spans:
                got.resources.append({a.key: _value(a.value) for a in rs.resource.attributes})
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        got.spans.append(Span(s.name, s.span_id, s.parent_span_id, s.trace_id,
                                              s.status.message if s.status.code == 2 else None,
                                              {a.key: _value(a.value) for a in s.attributes}))
            out = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    got.port = server.server_address[1]
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield got
    finally:
        server.shutdown()
        server.server_close()


SPEC = """
    name: traced
    tracing: {otlp: "URL"}
    services:
      db:
        command: ["{py}", "{server}"]
        ports: {http: auto}
        health:
          readiness: {http: {port: http, path: /health}, period: 100ms, failure_threshold: 1}
      api:
        replicas: 2
        command: ["{py}", "{server}"]
        env: {VERSION: "1"}
        ports: {http: auto}
        depends_on: {db: healthy}
        health:
          readiness: {http: {port: http, path: /health}, period: 100ms, failure_threshold: 1}
        update: {healthy_deadline: 5s}
"""


async def test_spans_reach_an_otlp_receiver_as_a_tree(tmp_path: Path, receiver: Receiver) -> None:
    spec = write_spec(tmp_path, SPEC.replace("URL", receiver.url))
    async with running(spec) as d:
        await await_until(lambda: bool(receiver.named("corral.up")), what="the up root exported")
        await await_until(lambda: len(receiver.spans) >= 6, what="up's spans")
        (up,) = receiver.named("corral.up")
        assert up.parent == b"" and up.error is None and up.attrs["corral.instances"] == 3
        phases = sorted(receiver.children(up), key=lambda s: s.name)
        assert [p.name for p in phases] == ["phase 0", "phase 1"]
        assert phases[0].attrs["corral.services"] == ["db"] and phases[1].attrs["corral.services"] == ["api"]
        assert [s.name for s in receiver.children(phases[0])] == ["instance db-0"]
        assert sorted(s.name for s in receiver.children(phases[1])) == ["instance api-0", "instance api-1"]
        assert all(s.trace == up.trace for s in receiver.spans)
        assert all(s.attrs["corral.state"] == "healthy" for s in receiver.spans if s.name.startswith("instance"))
        assert receiver.resources[0]["service.name"] == "corral"
        assert receiver.resources[0]["corral.deployment"] == "traced"
        assert set(receiver.paths) == {"/v1/traces"}

        await d.scale("api", 3)
        await await_until(lambda: bool(receiver.named("corral.scale")), what="the scale root")
        (scale,) = receiver.named("corral.scale")
        assert scale.parent == b"" and scale.trace != up.trace
        assert (scale.attrs["corral.service"], scale.attrs["corral.replicas"]) == ("api", 3)
        await await_until(lambda: bool(receiver.children(scale)), what="scale's instance span")
        assert [s.name for s in receiver.children(scale)] == ["instance api-2"]

        # A new version that exits at once: the rollout fails, is reverted, and each span on
        # the way says why.
        spec.write_text(spec.read_text().replace('VERSION: "1"', 'VERSION: "2", EXIT_NOW: "3"'))
        with pytest.raises(RolloutError):
            await d.apply(load_spec(spec))
        await await_until(lambda: bool(receiver.named("corral.apply")), what="the apply root")
        await await_until(lambda: bool(receiver.named("revert")), what="the revert span")
        (apply,) = receiver.named("corral.apply")
        assert apply.parent == b"" and apply.error is not None and "api-0-v2" in apply.error
        steps = [s for s in receiver.children(apply) if s.name == "rollout step"]
        assert len(steps) == 1 and steps[0].error is not None and "exit" in steps[0].error
        assert steps[0].attrs["corral.replaces"] == ["api-0"] and steps[0].attrs["corral.instances"] == ["api-0-v2"]
        (new,) = receiver.children(steps[0])
        assert new.name == "instance api-0-v2" and new.error is not None and "before it was ready" in new.error
        assert [s.name for s in receiver.children(apply) if s.name == "revert"] == ["revert"]
    await await_until(lambda: bool(receiver.named("corral.down")), what="the down root")
    (down,) = receiver.named("corral.down")
    await await_until(lambda: len(receiver.children(down)) == 2, what="down's phases")
    assert sorted(s.name for s in receiver.children(down)) == ["stop phase 0", "stop phase 1"]
    assert down.error is None


async def test_a_failed_up_puts_the_reason_on_its_spans(tmp_path: Path, receiver: Receiver) -> None:
    spec = write_spec(tmp_path, SPEC.replace("URL", receiver.url)
                      .replace('env: {VERSION: "1"}', 'env: {VERSION: "1", EXIT_NOW: "4"}')
                      .replace("depends_on: {db: healthy}", "depends_on: {db: healthy}\n"
                               "        restart: {policy: 'no'}"))

    d = Deployment.from_file(spec)
    with pytest.raises(DeploymentError):
        await d.up()
    await d.down()
    await await_until(lambda: bool(receiver.named("corral.up")), what="the up root")
    (up,) = receiver.named("corral.up")
    assert up.error is not None and "api-" in up.error
    await await_until(lambda: any(s.name.startswith("instance api") for s in receiver.spans), what="api spans")
    failed = [s for s in receiver.spans if s.name.startswith("instance api")]
    assert failed and all(s.error for s in failed), failed
    phase1 = next(s for s in receiver.children(up) if s.name == "phase 1")
    assert phase1.error is not None


def test_the_endpoint_comes_from_the_spec_then_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    assert endpoint_from(None) is None
    assert endpoint_from("http://127.0.0.1:4318") == "http://127.0.0.1:4318/v1/traces"
    assert endpoint_from("http://collector:4318/v1/traces") == "http://collector:4318/v1/traces"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318/")
    assert endpoint_from(None) == "http://127.0.0.1:4318/v1/traces"
    assert endpoint_from("http://other:4318") == "http://other:4318/v1/traces", "the spec wins"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4318/x")
    assert endpoint_from(None) == "http://traces:4318/x"


async def test_the_environment_turns_tracing_on(tmp_path: Path, receiver: Receiver,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
    spec = write_spec(tmp_path, "name: env-traced\nservices:\n  job:\n    command: [\"true\"]\n")
    async with running(spec):
        await await_until(lambda: bool(receiver.named("corral.up")), what="the up root")
    assert [s.name for s in receiver.spans if s.name.startswith("instance")] == ["instance job-0"]


def test_without_the_sdk_tracing_is_off_with_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    t = Tracing("http://127.0.0.1:4318/v1/traces", "x")
    assert not t.on and "pip install 'corral[otel]'" in t.problem
    with t.operation("up"), t.span("child"):
        pass  # a no-op, not an error


def test_corral_does_not_load_opentelemetry_unless_asked(tmp_path: Path) -> None:
    write_spec(tmp_path, "name: plain\nservices:\n  job:\n    command: [\"true\"]\n")
    code = (
        "import asyncio, os, sys\n"
        "for v in ('OTEL_EXPORTER_OTLP_ENDPOINT', 'OTEL_EXPORTER_OTLP_TRACES_ENDPOINT'): os.environ.pop(v, None)\n"
        "import corral, corral.cli, corral.engine.deployment\n"
        "async def main():\n"
        "    async with corral.Deployment.from_file('corral.yaml') as d:\n"
        "        await d.up()\n"
        "asyncio.run(main())\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


async def test_an_apply_can_turn_tracing_on(tmp_path: Path, receiver: Receiver) -> None:
    spec = write_spec(tmp_path, "name: later\nservices:\n  job:\n    command: [\"sleep\", \"60\"]\n")
    async with running(spec) as d:
        assert not d.tracing.on
        spec.write_text(spec.read_text().replace("name: later\n", f"name: later\ntracing: {{otlp: {receiver.url}}}\n")
                        .replace('"60"', '"61"'))
        await d.apply(load_spec(spec))
        assert d.tracing.on
        await d.scale("job", 2)
        await await_until(lambda: bool(receiver.named("corral.scale")), what="the scale root")


def test_the_detached_agent_exports_its_spans_down_included(tmp_path: Path, receiver: Receiver) -> None:
    write_spec(tmp_path, f"name: detached\ntracing: {{otlp: {receiver.url}}}\nservices:\n"
                         f"  job:\n    command: [\"sleep\", \"60\"]\n")
    r = corral("up", "-d", cwd=tmp_path)
    assert r.returncode == 0, r
    try:
        wait_until(lambda: bool(receiver.named("corral.up")), what="the agent's up root")
        assert [s.name for s in receiver.children(receiver.named("corral.up")[0])] == ["phase 0"]
    finally:
        assert corral("down", cwd=tmp_path).returncode == 0
    # The agent ends with os._exit: its last batch must have gone out before.
    wait_until(lambda: bool(receiver.named("corral.down")), timeout=5, what="the down root from the agent")
