"""OpenTelemetry spans of what the engine does, exported over OTLP/HTTP.

On when the spec says ``tracing: {otlp: URL}`` or the environment sets
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_ENDPOINT`` (the spec wins);
off otherwise, and then nothing here imports OpenTelemetry (the SDK is the optional extra
``corral[otel]``). The tree:

- one root per operation: ``corral.up``, ``corral.apply``, ``corral.down``,
  ``corral.scale``, ``corral.restart``;
- under ``up`` and ``down`` a span per phase (``phase 0`` ...), from the first service of the
  phase starting (or stopping) to the last one meeting its condition;
- under ``apply`` a span per rollout step (``rollout step``: the instances one batch
  replaces), and a span per added service;
- a span per instance (``instance <id>``) from its spawn to ready (healthy, or completed
  for a job), under whatever span started it.

A failure puts its reason on the span (status ERROR, the message as its description, and
an ``exception`` event): a root that raised, a step that failed, an instance that exited
or failed its probes before it was ready. Spans go out in batches on the SDK's thread, and
each root's end flushes them, so a receiver has the tree moments after the operation
returns. A collector that is down costs a batch at most two seconds, off the event loop.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
from collections.abc import Iterator
from typing import Any

from corral.lifecycle import State, Transition

__all__ = ["Tracing", "endpoint_from", "finish"]

_scope: contextvars.ContextVar[Any] = contextvars.ContextVar("corral_span", default=None)
"""The span new children go under, per asyncio task (tasks copy it when created)."""

_EXPORT_TIMEOUT = 2.0
"""Seconds one batch may take to export, retries included."""

_READY = frozenset({State.HEALTHY, State.COMPLETED})
_ENDED = frozenset({State.FAILED, State.STOPPED, State.STOPPING, State.RESTARTING})


def endpoint_from(spec_url: str | None) -> str | None:
    """Where spans go: the spec's ``tracing.otlp`` (a base URL; ``/v1/traces`` is added
    unless given), else the standard variables, else None (tracing off)."""
    if spec_url:
        return spec_url if spec_url.rstrip("/").endswith("/v1/traces") else spec_url.rstrip("/") + "/v1/traces"
    if os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return os.environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
    base = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    return base.rstrip("/") + "/v1/traces" if base else None


class Tracing:
    """The spans of one deployment; every method is a cheap no-op while tracing is off."""

    def __init__(self, endpoint: str | None, deployment: str) -> None:
        self.endpoint = endpoint
        self.problem = ""
        """Why tracing is off although it was asked for (the SDK is missing), for a warning."""
        self._tracer: Any = None
        self._provider: Any = None
        self._trace: Any = None
        self._instances: dict[str, Any] = {}
        self._phases: dict[int, Any] = {}
        self._phase_of: dict[str, int] = {}
        self._pending: dict[int, set[str]] = {}
        if endpoint:
            self._load(endpoint, deployment)

    @property
    def on(self) -> bool:
        """Spans are being exported."""
        return self._tracer is not None

    def _load(self, endpoint: str, deployment: str) -> None:
        try:
            from opentelemetry import trace
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError as e:
            self.problem = (f"tracing to {endpoint} is configured, but the OpenTelemetry SDK is not installed "
                            f"({e.name}): pip install 'corral[otel]'")
            return
        # A provider of our own, not the global one: a program that imports corral keeps its.
        self._provider = TracerProvider(resource=Resource.create({"service.name": "corral",
                                                                  "corral.deployment": deployment}))
        # A collector that is down costs each batch at most _EXPORT_TIMEOUT (retries included).
        self._provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint,
                                                                              timeout=_EXPORT_TIMEOUT)))
        self._tracer = self._provider.get_tracer("corral")
        self._trace = trace

    # --- spans ------------------------------------------------------------------------

    def _start(self, name: str, parent: Any, attrs: dict[str, Any]) -> Any:
        ctx = self._trace.set_span_in_context(parent) if parent is not None else None
        return self._tracer.start_span(name, context=ctx, attributes={f"corral.{k}": v for k, v in attrs.items()})

    def _fail(self, span: Any, reason: str) -> None:
        from opentelemetry.trace import Status, StatusCode

        span.set_status(Status(StatusCode.ERROR, reason))
        span.add_event("exception", {"exception.message": reason})

    @contextlib.contextmanager
    def operation(self, name: str, **attrs: Any) -> Iterator[None]:
        """A root span for one operation (``up``, ``apply`` ...); its end flushes the batch."""
        if self._tracer is None:
            yield
            return
        root = self._tracer.start_span(f"corral.{name}", context=self._trace.set_span_in_context(
            self._trace.INVALID_SPAN), attributes={f"corral.{k}": v for k, v in attrs.items()})
        with self._scoped(root):
            yield
        self._flush()

    @contextlib.contextmanager
    def span(self, name: str, **attrs: Any) -> Iterator[None]:
        """A child of the current span (nothing when there is none, or tracing is off)."""
        parent = _scope.get()
        if self._tracer is None or parent is None:
            yield
            return
        with self._scoped(self._start(name, parent, attrs)):
            yield

    @contextlib.contextmanager
    def _scoped(self, span: Any) -> Iterator[None]:
        token = _scope.set(span)
        try:
            yield
        except BaseException as e:
            self._fail(span, str(e) or type(e).__name__)
            for open_span in self._drain():
                self._fail(open_span, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
                open_span.end()
            raise
        finally:
            _scope.reset(token)
            span.end()

    def _drain(self) -> list[Any]:
        """The phase and instance spans still open (a failure or the end closes them)."""
        left = [*self._instances.values(), *self._phases.values()]
        self._instances.clear()
        self._phases.clear()
        return left

    # --- phases (up and down) ---------------------------------------------------------

    def phases(self, phases: list[list[str]]) -> None:
        """The phases of the coming ``up`` or ``down``."""
        self._phases.clear()
        self._phase_of = {s: k for k, phase in enumerate(phases) for s in phase}
        self._pending = {k: set(phase) for k, phase in enumerate(phases)}

    @contextlib.contextmanager
    def phase_of(self, service: str) -> Iterator[None]:
        """Runs the block under ``service``'s phase span (started by the phase's first
        service, ended when its last one leaves this block)."""
        k = self._phase_of.get(service)
        root = _scope.get()
        if self._tracer is None or k is None or root is None:
            yield
            return
        span = self._phases.get(k)
        if span is None:
            span = self._phases[k] = self._start(f"phase {k}", root, {"phase": k, "services": sorted(self._pending[k])})
        token = _scope.set(span)
        try:
            yield
        finally:
            _scope.reset(token)
        self._pending[k].discard(service)
        if not self._pending[k] and self._phases.pop(k, None) is span:
            span.end()

    # --- instances --------------------------------------------------------------------

    def on_transition(self, t: Transition) -> None:
        """A stack listener: an instance's span from its spawn to ready."""
        if self._tracer is None:
            return
        if t.new is State.STARTING:
            parent = _scope.get()
            old = self._instances.pop(t.instance, None)
            if old is not None:
                old.end()
            if parent is not None and parent.is_recording():
                self._instances[t.instance] = self._start(f"instance {t.instance}", parent,
                                                          {"service": t.service, "instance": t.instance})
            return
        span = self._instances.get(t.instance)
        if span is None:
            return
        if t.new in _READY:
            span.set_attribute("corral.state", t.new.value)
        elif t.new in _ENDED:
            span.set_attribute("corral.state", t.new.value)
            self._fail(span, f"{t.instance} {t.new.value} before it was ready: {t.reason}")
        else:
            return
        del self._instances[t.instance]
        span.end()

    # --- the end ----------------------------------------------------------------------

    def _flush(self) -> None:
        # Off the event loop: the exporter's HTTP post may take a while on a slow receiver.
        if self._provider is not None:
            threading.Thread(target=self._provider.force_flush, name="corral-otlp-flush", daemon=True).start()

    def close(self) -> None:
        """Exports what is left and stops the exporter, on a thread of its own: the caller
        (the event loop) does not wait for the collector, and the process does not exit
        before the last batch went out (or its export timed out)."""
        if self._provider is not None:
            for span in self._drain():
                span.end()
            t = threading.Thread(target=self._provider.shutdown, name="corral-otlp-close")
            t.start()
            _closing.append(t)
            self._provider = self._tracer = None


_closing: list[threading.Thread] = []


def finish(timeout: float = _EXPORT_TIMEOUT + 1.0) -> None:
    """Waits (up to ``timeout``) for the last batches to go out: for a process that ends
    with ``os._exit``, which does not wait for threads (the agent)."""
    for t in _closing:
        t.join(timeout)
    _closing.clear()
