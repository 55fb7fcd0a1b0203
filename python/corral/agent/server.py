"""The control API: HTTP/1.1 with JSON over a Unix socket in the state directory.

The socket is created with mode 0600, so only its owner can control the deployment. The
agent (:func:`run_agent`) serves it; :class:`~corral.agent.client.AgentClient` is its client.

Routes: ``GET /v1/status``, ``GET /v1/up`` (waits until ``up`` has finished: ``ok`` and the
error), ``GET /v1/events?after=SEQ&limit=N`` (the event log by sequence number),
``POST /v1/restart?service=NAME``, ``POST /v1/down``, and discovery: ``GET /v1/services``
(every service) and ``GET /v1/services/NAME`` (one; ``?wait=GENERATION&timeout=S`` answers
once the registry has moved past that generation, a long poll for clients that follow
changes).

Errors are answered as ``{"error": {"type": ..., "args": [...], "message": ...}}`` (see
:func:`corral.exceptions.to_wire`), so the client raises the same class again.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from corral.agent.client import socket_path
from corral.agent.wire import to_wire
from corral.exceptions import ConfigError, CorralError, DeploymentError, UnknownService
from corral.state import secure_state_dir

if TYPE_CHECKING:
    from corral.engine import Deployment

__all__ = ["ControlServer", "run_agent", "socket_path"]


Handler = Callable[[dict[str, list[str]]], Awaitable[tuple[int, Any]]]


class ControlServer:
    """Serves the control API of one deployment."""

    def __init__(self, deployment: Deployment, path: Path) -> None:
        self.deployment = deployment
        self.path = path
        self.up_task: asyncio.Task[None] | None = None
        self.stop = asyncio.Event()
        self.stopped = asyncio.Event()
        self._server: asyncio.AbstractServer | None = None
        self._routes: dict[tuple[str, str], Handler] = {
            ("GET", "/v1/status"): self._status,
            ("GET", "/v1/up"): self._up,
            ("GET", "/v1/events"): self._events,
            ("POST", "/v1/restart"): self._restart,
            ("POST", "/v1/down"): self._down,
            ("GET", "/v1/services"): self._services,
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

    async def close(self) -> None:
        """Stops serving and removes the socket."""
        if self._server is not None:
            self._server.close()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            length = 0
            for h in lines[1:]:
                k, _, v = h.partition(":")
                if k.strip().lower() == "content-length":
                    length = int(v.strip())
            if length:
                await reader.readexactly(length)
            url = urlsplit(target)
            handler = self._routes.get((method, url.path))
            query = parse_qs(url.query)
            if handler is None and method == "GET" and url.path.startswith("/v1/services/"):
                handler = self._service
                query["name"] = [url.path.removeprefix("/v1/services/")]
            body: Any
            if handler is None:
                code, body = 404, {"error": to_wire(ConfigError(f"no route {method} {url.path}"))}
            else:
                try:
                    code, body = await handler(query)
                except UnknownService as e:
                    code, body = 404, {"error": to_wire(e)}
                except CorralError as e:
                    code, body = 409, {"error": to_wire(e)}
            data = json.dumps(body, default=str).encode()
            writer.write(f"HTTP/1.1 {code} {http.client.responses.get(code, '')}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

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
        after = int(q.get("after", ["0"])[0])
        limit = min(int(q.get("limit", ["1000"])[0]), 10000)
        return 200, {"events": [e.to_dict() for e in self.deployment.event_log(after, limit)]}

    async def _services(self, _q: dict[str, list[str]]) -> tuple[int, Any]:
        return 200, {name: self.deployment.discovery(name) for name in self.deployment.spec.services}

    async def _service(self, q: dict[str, list[str]]) -> tuple[int, Any]:
        name = q["name"][0]
        self.deployment.discovery(name)  # raises UnknownService
        wait = int(q.get("wait", ["-1"])[0])
        if wait >= 0:
            timeout = min(float(q.get("timeout", ["30"])[0]), 300.0)
            await self.deployment.wait_registry_change(wait, timeout)
        return 200, self.deployment.discovery(name)

    async def _restart(self, q: dict[str, list[str]]) -> tuple[int, Any]:
        service = q.get("service", [""])[0]
        await self.deployment.restart(service)  # raises UnknownService
        return 200, {"ok": True, "service": service}

    async def _down(self, _q: dict[str, list[str]]) -> tuple[int, Any]:
        self.stop.set()
        await self.stopped.wait()
        return 200, {"ok": True}


async def run_agent(deployment: Deployment, *, run_for: float | None = None,
                    on_up: Callable[[Deployment], None] | None = None) -> int:
    """Brings ``deployment`` up, serves the control API and supervises until ``down``
    (API), SIGINT or SIGTERM, or ``run_for`` seconds. Returns the exit code: 0, or 1 when
    ``up`` failed (everything it started is rolled back). Errors found before anything
    started (a spec that does not fit, an agent already running) are raised."""
    server = ControlServer(deployment, socket_path(deployment.state_dir))
    await server.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, server.stop.set)
    try:
        server.up_task = asyncio.create_task(deployment.up(), name="corral-up")
        stop_wait = asyncio.create_task(server.stop.wait())
        await asyncio.wait([server.up_task, stop_wait], return_when=asyncio.FIRST_COMPLETED)
        if not server.up_task.done():
            # Interrupted during bring-up: cancelling up rolls back what it started.
            server.up_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, DeploymentError):
                await server.up_task
            return 1
        exc = server.up_task.exception()
        if isinstance(exc, DeploymentError):
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
        await deployment.down()
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        server.stopped.set()
        # Let a pending /v1/down answer before the socket goes.
        await asyncio.sleep(0.05)
        await server.close()
