"""The control API: HTTP/1.1 with JSON over a Unix socket in the state directory.

The socket is created with mode 0600, so only its owner can control the deployment; with
``access:`` in the spec, POSIX ACLs let the users and groups it names (and only them)
enter the state directory and connect (:mod:`corral.agent.grant`). The
agent (:func:`run_agent`) serves it; :class:`~corral.agent.client.AgentClient` is its client.

Routes: ``GET /v1/status``, ``GET /v1/up`` (waits until ``up`` has finished: ``ok`` and the
error), ``GET /v1/events?after=SEQ&limit=N`` (the event log by sequence number),
``POST /v1/restart?service=NAME``, ``POST /v1/run?service=NAME`` (a run now),
``POST /v1/kill?service=NAME&signal=SIG``, ``POST /v1/reload?service=NAME``,
``POST /v1/scale?service=NAME&replicas=N``,
``POST /v1/stop?service=A&service=B``, ``POST /v1/start?service=...``, ``POST /v1/down``,
``POST /v1/plan`` and ``POST /v1/apply`` (body: ``{"file": PATH, "text": SPEC}``; plan answers
the diff, apply carries it out and answers once the rollout has finished), and
discovery: ``GET /v1/services``
(every service) and ``GET /v1/services/NAME`` (one; ``?wait=GENERATION&timeout=S`` answers
once the registry has moved past that generation, a long poll for clients that follow
changes).

Who may call what is checked at the door, once, for every request: the caller is the
socket's peer as the kernel reports it (``SO_PEERCRED``), its role comes from the spec's
``access:`` (see :mod:`corral.access`), and a request its role does not allow is answered
403 and recorded in the audit trail, with nothing touched. ``GET /v1/logs?service=NAME``
serves a service's output to those who may not read the files (``lines=N``, or
``cursor=JSON`` for what came after an earlier answer's ``cursor``; ``instance=ID`` for one
instance's).

Errors are answered as ``{"error": {"type": ..., "args": [...], "message": ...}}`` (see
:mod:`corral.agent.wire`), so the client raises the same class again.

Every instance can reach this socket (``CORRAL_AGENT_SOCKET``), so it holds against a
careless or hostile client: HTTP is parsed by h11 (a maintained HTTP/1.1 state machine,
loaded by the agent only, never by the CLI), a request must arrive whole within
``header_timeout`` seconds, headers are capped at 16 KiB and bodies at ``max_body`` bytes
(413, before any of it is read), every number in a query is parsed strictly (400), at most
``max_connections`` are served at once (503 beyond), and one request is served per
connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.client
import json
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from corral.access import CALLER, Caller, Policy, Role, peer_caller
from corral.agent.client import socket_path
from corral.agent.grant import grant
from corral.agent.wire import ROUTES, query_number, query_one, query_seconds, to_wire
from corral.exceptions import (
    AccessDenied,
    AgentAlreadyRunning,
    ConfigError,
    CorralError,
    DeploymentError,
    UnknownService,
)
from corral.leftovers import live_agent
from corral.state import secure_state_dir

if TYPE_CHECKING:
    from corral.engine import Deployment
    from corral.spec import DeploymentSpec

__all__ = ["ControlServer", "run_agent", "socket_path"]


Handler = Callable[[dict[str, list[str]]], Awaitable[tuple[int, Any]]]
BodyHandler = Callable[[dict[str, list[str]], bytes], Awaitable[tuple[int, Any]]]

_MAX_HEADERS = 16 * 1024



class _Refused(Exception):
    """A request answered with an error status before any handler ran."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ControlServer:
    """Serves the control API of one deployment (limits: see the module docs)."""

    def __init__(self, deployment: Deployment, path: Path, *, header_timeout: float = 10.0,
                 max_body: int = 1 << 20, max_connections: int = 256) -> None:
        self.deployment = deployment
        self.path = path
        self.header_timeout = header_timeout
        self.max_body = max_body
        self.max_connections = max_connections
        self._active = 0
        self.up_task: asyncio.Task[None] | None = None
        self.stop = asyncio.Event()
        self.stopped = asyncio.Event()
        self._server: asyncio.AbstractServer | None = None
        self._policy: tuple[object, Policy] | None = None
        self.down_caller: Caller | None = None
        """Who asked for the down under way (the agent's own signal handler: None)."""
        self._routes: dict[tuple[str, str], Handler] = {
            ("GET", "/v1/status"): self._status,
            ("GET", "/v1/up"): self._up,
            ("GET", "/v1/events"): self._events,
            ("POST", "/v1/restart"): self._restart,
            ("POST", "/v1/run"): self._run,
            ("POST", "/v1/kill"): self._signal,
            ("POST", "/v1/reload"): functools.partial(self._signal, reload=True),
            ("POST", "/v1/scale"): self._scale,
            ("POST", "/v1/stop"): self._stop_services,
            ("POST", "/v1/start"): self._start_services,
            ("POST", "/v1/down"): self._down,
            ("GET", "/v1/services"): self._services,
            ("GET", "/v1/logs"): self._logs,
        }
        self._body_routes: dict[tuple[str, str], BodyHandler] = {
            ("POST", "/v1/plan"): self._plan,
            ("POST", "/v1/apply"): self._apply,
        }

    async def start(self) -> None:
        """Binds the socket, owner-only from the first moment (umask, then chmod to be sure)."""
        secure_state_dir(self.path.parent)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        self.share()

    def policy(self) -> Policy:
        """The running spec's ``access:`` as numbers (resolved again after an apply)."""
        spec = self.deployment.spec
        if self._policy is None or self._policy[0] is not spec.access:
            self._policy = (spec.access, Policy.of(spec.access))
        return self._policy[1]

    def share(self) -> None:
        """Gives the users and groups ``access:`` names the right to enter the state
        directory and connect to the socket, and nobody else (see :mod:`corral.agent.grant`)."""
        problem = grant(self.path.parent, self.path, self.policy())
        if problem:
            self.deployment.journal.note(problem)

    async def close(self) -> None:
        """Stops serving and removes the socket."""
        if self._server is not None:
            self._server.close()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._active += 1
        try:
            try:
                caller = peer_caller(writer.get_extra_info("socket"))
            except (OSError, AttributeError):
                return  # no credentials, no answer
            CALLER.set(caller)  # this connection's task only
            code, body = await self._answer(reader)
            data = json.dumps(body, default=str).encode()
            head = (f"HTTP/1.1 {code} {http.client.responses.get(code, '')}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n")
            writer.write(head.encode() + data)
            await asyncio.wait_for(writer.drain(), self.header_timeout)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass  # the client went away (or stopped reading): nothing to answer
        finally:
            self._active -= 1
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[int, Any]:
        import h11

        try:
            if self._active > self.max_connections:
                raise _Refused(503, f"more than {self.max_connections} connections at once")
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEADERS)
            try:
                method, target, body = await asyncio.wait_for(self._read_request(conn, reader),
                                                              self.header_timeout)
            except TimeoutError:
                raise _Refused(408, f"the request did not arrive within {self.header_timeout:g}s") from None
            except h11.RemoteProtocolError as e:
                raise _Refused(e.error_status_hint, f"malformed request: {e}") from None
        except _Refused as e:
            return e.status, {"error": to_wire(ConfigError(str(e)))}
        return await self._dispatch(method, target, body)

    async def _read_request(self, conn: Any, reader: asyncio.StreamReader) -> tuple[str, str, bytes]:
        """The method, target and body (bounded) of one whole request."""
        import h11

        request: Any = None
        received = 0
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                if not data and request is None:
                    raise ConnectionError("closed before a request")
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                request = event
                for name, value in event.headers:
                    if name == b"content-length" and int(value) > self.max_body:
                        raise _Refused(413, f"request body of {int(value)} bytes; at most {self.max_body}")
            elif isinstance(event, h11.Data):
                received += len(event.data)
                if received > self.max_body:
                    raise _Refused(413, f"request body over {self.max_body} bytes")
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return request.method.decode("ascii"), request.target.decode("ascii"), bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("closed mid-request")

    async def _dispatch(self, method: str, target: str, body: bytes = b"") -> tuple[int, Any]:
        url = urlsplit(target)
        try:
            query = parse_qs(url.query, strict_parsing=bool(url.query), max_num_fields=32)
        except ValueError as e:
            return 400, {"error": to_wire(ConfigError(f"malformed query: {e}"))}
        handler = self._routes.get((method, url.path))
        with_body = self._body_routes.get((method, url.path))
        route = ROUTES.get((method, url.path), ("discovery", Role.viewer))
        if handler is None and method == "GET" and url.path.startswith("/v1/services/"):
            handler = self._service
            query["name"] = [url.path.removeprefix("/v1/services/")]
        refused = self._refused(route, query)
        if refused is not None:
            return 403, {"error": to_wire(refused)}
        if handler is None and with_body is None:
            return 404, {"error": to_wire(ConfigError(f"no route {method} {url.path}"))}
        try:
            if with_body is not None:
                return await with_body(query, body)
            assert handler is not None
            return await handler(query)
        except UnknownService as e:
            return 404, {"error": to_wire(e)}
        except ConfigError as e:
            return 400, {"error": to_wire(e)}
        except CorralError as e:
            return 409, {"error": to_wire(e)}

    def _refused(self, route: tuple[str, Role], query: dict[str, list[str]]) -> AccessDenied | None:
        """The refusal of this request, recorded, when the caller's role does not allow it."""
        caller = CALLER.get()
        assert caller is not None
        op, needs = route
        d = self.deployment
        try:
            self.policy().check(caller, op, needs, d.name, d.file.name if d.file else "corral.yaml")
        except AccessDenied as e:
            args = {k: v[0] if len(v) == 1 else v for k, v in query.items()}
            d.auditor.record(caller, op, args, "refused", str(e))
            return e
        return None

    async def _status(self, _q: dict[str, list[str]]) -> tuple[int, Any]:
        return 200, self.deployment.status().to_dict()

    async def _up(self, _q: dict[str, list[str]]) -> tuple[int, Any]:
        if self.up_task is None:
            return 409, {"ok": False, "error": "up has not started"}
        try:
            await asyncio.shield(self.up_task)
        except CorralError as e:
            return 200, {"ok": False, "error": to_wire(e)}
        except asyncio.CancelledError:
            return 200, {"ok": False, "error": to_wire(DeploymentError("up was interrupted"))}
        return 200, {"ok": True, "status": self.deployment.status().to_dict()}

    async def _events(self, q: dict[str, list[str]]) -> tuple[int, Any]:
        after = query_number(q, "after", 0, 0, 1 << 62)
        limit = query_number(q, "limit", 1000, 1, 10000)
        return 200, {"events": [e.to_dict() for e in self.deployment.event_log(after, limit)]}

    async def _services(self, _q: dict[str, list[str]]) -> tuple[int, Any]:
        return 200, {name: self.deployment.discovery(name) for name in self.deployment.spec.services}

    async def _service(self, q: dict[str, list[str]]) -> tuple[int, Any]:
        name = q["name"][0]
        self.deployment.discovery(name)  # raises UnknownService
        wait = query_number(q, "wait", -1, -1, 1 << 62)
        if wait >= 0:
            timeout = query_seconds(q, "timeout", 30.0, 300.0)
            await self.deployment.wait_registry_change(wait, timeout)
        return 200, self.deployment.discovery(name)

    async def _logs(self, q: dict[str, list[str]]) -> tuple[int, Any]:
        from corral.agent.logs import lines_after, tail_and_cursor

        service = query_one(q, "service") or ""
        insts = self.deployment.status().services.get(service)
        if insts is None:
            raise UnknownService(f"unknown service {service!r} (services: {', '.join(self.deployment.spec.services)})",
                                 service)
        files = [(i.id, Path(i.log) if i.log else self.deployment.state_dir / "logs" / f"{i.id}.log") for i in insts]
        instance = query_one(q, "instance")
        if instance is not None:
            files = [(iid, f) for iid, f in files if iid == instance]
            if not files:
                raise UnknownService(f"service {service!r} has no instance {instance!r}", service)
        raw = query_one(q, "cursor")
        if raw is None:
            n = query_number(q, "lines", 50, 0, 100000)
            lines, cursor = tail_and_cursor(files, n)
            return 200, {"instances": [iid for iid, _ in files], "lines": lines, "cursor": cursor}
        try:
            doc = json.loads(raw)
            cursor = {str(k): (int(v[0]), int(v[1])) for k, v in doc.items()}
        except (ValueError, TypeError, AttributeError, IndexError):
            raise ConfigError("cursor: not a cursor from an earlier answer") from None
        new, after = lines_after(files, cursor)
        return 200, {"instances": [iid for iid, _ in files], "lines": new, "cursor": after}

    async def _restart(self, q: dict[str, list[str]]) -> tuple[int, Any]:
        service = q.get("service", [""])[0]
        await self.deployment.restart(service)  # raises UnknownService
        return 200, {"ok": True, "service": service}

    async def _run(self, q: dict[str, list[str]]) -> tuple[int, Any]:
        service = query_one(q, "service") or ""
        if service not in self.deployment.spec.services:
            raise UnknownService(f"unknown service {service!r}", service)
        return 200, {"ok": True, "service": service, "instance": await self.deployment.run(service)}

    async def _signal(self, q: dict[str, list[str]], reload: bool = False) -> tuple[int, Any]:
        # /v1/kill names its signal; /v1/reload sends the service's reload_signal.
        name = None if reload else query_one(q, "signal")
        if not (reload or name):
            raise ConfigError("signal: required")
        return 200, {"ok": True, "instances": await self.deployment.signal(query_one(q, "service") or "", name)}

    async def _scale(self, q: dict[str, list[str]]) -> tuple[int, Any]:
        service = query_one(q, "service") or ""
        replicas = query_number(q, "replicas", -1, 0, 10000)
        if replicas < 0:
            raise ConfigError("replicas: required")
        await self.deployment.scale(service, replicas)
        return 200, {"ok": True, "service": service, "replicas": replicas}

    async def _stop_services(self, q: dict[str, list[str]]) -> tuple[int, Any]:
        dependents: dict[str, list[str]] = {}
        for service in q.get("service", []):
            dependents[service] = await self.deployment.stop_service(service)
        return 200, {"ok": True, "dependents": dependents}

    async def _start_services(self, q: dict[str, list[str]]) -> tuple[int, Any]:
        for service in q.get("service", []):
            await self.deployment.start_service(service)
        return 200, {"ok": True}

    def _new_spec(self, body: bytes) -> tuple[DeploymentSpec, str]:
        """The spec a plan or apply request carries: its text, parsed here, with the file it
        came from (relative paths, ``env_file``) as its name."""
        from corral.spec import parse_spec

        try:
            doc = json.loads(body or b"null")
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError(f"request body: not JSON ({e})") from None
        if not (isinstance(doc, dict) and isinstance(doc.get("text"), str) and isinstance(doc.get("file"), str)):
            raise ConfigError('request body: expected {"file": PATH, "text": SPEC}')
        return parse_spec(doc["text"], doc["file"]), doc["file"]

    async def _plan(self, _q: dict[str, list[str]], body: bytes) -> tuple[int, Any]:
        await self._up_finished()
        spec, _ = self._new_spec(body)
        diff = self.deployment.plan_changes(spec)
        return 200, {"diff": diff.to_dict(), "lines": diff.lines()}

    async def _apply(self, _q: dict[str, list[str]], body: bytes) -> tuple[int, Any]:
        await self._up_finished()
        spec, file = self._new_spec(body)
        diff = await self.deployment.apply(spec, file)
        self.share()  # access: may have changed
        return 200, {"ok": True, "diff": diff.to_dict(), "lines": diff.lines(),
                     "version": self.deployment.journal.row.version}

    async def _up_finished(self) -> None:
        """A change waits for ``up`` to finish (and is refused when it failed)."""
        if self.up_task is None or not self.up_task.done():
            raise CorralError("the stack is still coming up; try again once 'corral up' has finished")
        if self.up_task.cancelled() or self.up_task.exception() is not None:
            raise CorralError("the stack failed to come up; nothing to change")

    async def _down(self, _q: dict[str, list[str]]) -> tuple[int, Any]:
        self.down_caller = CALLER.get()
        self.stop.set()
        await self.stopped.wait()
        return 200, {"ok": True, "agent_pid": os.getpid()}


async def run_agent(deployment: Deployment, *, run_for: float | None = None,
                    on_up: Callable[[Deployment], None] | None = None,
                    on_failed: Callable[[CorralError], None] | None = None, adopt: bool = False) -> int:
    """Brings ``deployment`` up, serves the control API and supervises until ``down``
    (API), SIGINT or SIGTERM, or ``run_for`` seconds. Returns the exit code: 0, or 1 when
    ``up`` failed (everything it started is rolled back; ``on_failed`` hears why). Errors
    found before anything started (a spec that does not fit, an agent already running)
    are raised. With ``adopt``, the stack a dead agent left is taken over instead of
    brought up (:meth:`~corral.engine.deployment.Deployment.adopt`)."""
    # Nobody but the agent removes its socket: a live one keeps it, even if it does not answer.
    other = live_agent(deployment.state_db)
    if other is not None and other.agent_pid != os.getpid():
        raise AgentAlreadyRunning(f"a corral agent is already running for {deployment.state_dir} "
                                  f"(pid {other.agent_pid})", other.agent_pid)
    server = ControlServer(deployment, socket_path(deployment.state_dir))
    await server.start()
    metrics = None
    if deployment.spec.metrics is not None:
        from corral.agent.metrics import MetricsServer

        m = deployment.spec.metrics
        token = None
        if m.token_file is not None:
            from corral.spec.checks import token_path

            where = token_path(m.token_file, Path(deployment.file).resolve().parent if deployment.file else Path.cwd())
            try:
                token = where.read_text().strip()
            except OSError as e:
                await server.close()
                raise deployment.spec.error(("metrics", "token_file"), f"cannot read {where}: "
                                            f"{e.strerror or e}") from None
        metrics = MetricsServer(m.listen, deployment.metrics, token)
        try:
            await metrics.start()
        except OSError as e:
            await server.close()
            raise deployment.spec.error(("metrics", "listen"), f"cannot listen on {deployment.spec.metrics.listen}: "
                                        f"{e.strerror or e}") from None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, server.stop.set)
    try:
        async def start() -> None:
            if adopt:
                await deployment.adopt()
            else:
                await deployment.up()

        server.up_task = asyncio.create_task(start(), name="corral-up")
        stop_wait = asyncio.create_task(server.stop.wait())
        await asyncio.wait([server.up_task, stop_wait], return_when=asyncio.FIRST_COMPLETED)
        if not server.up_task.done():
            # Interrupted during bring-up: cancelling up rolls back what it started; an
            # adoption is ended by a down of what it took over so far.
            server.up_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, CorralError):
                await server.up_task
            if adopt:
                await deployment.down()
            if on_failed is not None:
                on_failed(DeploymentError("up was interrupted; everything it started was stopped"))
            return 1
        exc = server.up_task.exception()
        if isinstance(exc, DeploymentError):
            if on_failed is not None:
                on_failed(exc)
            return 1
        if exc is not None:
            raise exc
        if on_up is not None:
            on_up(deployment)
        if run_for is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop_wait, run_for)
        else:
            await stop_wait
        CALLER.set(server.down_caller)  # the API's caller, or (a signal, run_for) this process
        await deployment.down()
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        server.stopped.set()
        if metrics is not None:
            await metrics.close()
        # Let a pending /v1/down answer before the socket goes.
        await asyncio.sleep(0.05)
        await server.close()
