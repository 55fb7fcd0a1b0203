"""The agent's ``GET /metrics`` listener (``metrics: {listen: HOST:PORT}`` or
``corral up --metrics HOST:PORT``): Prometheus' text format, one scrape per connection.

It answers only that path, reads at most 16 KiB of request head within 5 s, and is off by
default; the exposition itself is :mod:`corral.engine.metrics`. With a token
(``metrics.token_file``), a scrape without ``Authorization: Bearer <token>`` is answered 401
and shown nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections.abc import Callable

from corral.engine.metrics import CONTENT_TYPE

__all__ = ["MetricsServer"]

_MAX_HEAD = 16 * 1024


class MetricsServer:
    """Serves ``render()`` at ``/metrics`` on ``listen``."""

    def __init__(self, listen: str, render: Callable[[], str], token: str | None = None) -> None:
        host, _, port = listen.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self.render = render
        self._expect = f"bearer {token}".encode() if token else None
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        """Binds (raises OSError naming the address when it cannot)."""
        self._server = await asyncio.start_server(self._serve, self.host, self.port)

    async def close(self) -> None:
        """Stops listening."""
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            line = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            if self._expect is not None and not self._authorized(head):
                body = body_out = b"a bearer token is needed here\n"
                status, ctype = "401 Unauthorized", "text/plain; charset=utf-8\r\nWWW-Authenticate: Bearer"
            elif len(line) >= 2 and line[0] in ("GET", "HEAD") and line[1].split("?")[0] == "/metrics":
                body = self.render().encode()
                status, ctype = "200 OK", CONTENT_TYPE
                if line[0] == "HEAD":
                    body_out = b""
                else:
                    body_out = body
            else:
                body = body_out = b"only GET /metrics here\n"
                status, ctype = "404 Not Found", "text/plain; charset=utf-8"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + body_out)
            await asyncio.wait_for(writer.drain(), 5.0)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _authorized(self, head: bytes) -> bool:
        assert self._expect is not None
        given = b""
        for raw in head.split(b"\r\n")[1:]:
            name, _, value = raw.partition(b":")
            if name.strip().lower() == b"authorization":
                scheme, _, cred = value.strip().partition(b" ")
                given = scheme.lower() + b" " + cred.strip()
        return hmac.compare_digest(given, self._expect)
