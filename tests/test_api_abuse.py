"""The control API holds against a careless or hostile client on its socket (every instance
can reach it): bodies capped, slow requests timed out, numbers parsed strictly, malformed
requests answered 400, connections capped; the agent keeps answering, its memory bounded."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from corral import Deployment
from corral.agent.server import ControlServer
from tests.e2e import kill_groups, write_spec

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Path]:
    d = Deployment.from_file(write_spec(tmp_path, """
        name: abuse
        services:
          web: {command: ["sleep", "300"]}
        """))
    await d.up()
    server = ControlServer(d, tmp_path / ".corral" / "agent.sock", header_timeout=1.0, max_connections=40)
    await server.start()
    try:
        yield server.path
    finally:
        await server.close()
        pids = [i.pid for insts in d.status().services.values() for i in insts if i.pid]
        await d.down()
        kill_groups(pids)


def _raw(path: Path, data: bytes, *, read: bool = True, timeout: float = 10.0) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        try:
            s.sendall(data)
        except OSError:
            pass
        if not read:
            return b""
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except OSError:
            pass
        return out


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def _get(path: Path, target: str) -> tuple[int, object]:
    answer = _raw(path, f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return _status(answer), json.loads(answer.split(b"\r\n\r\n", 1)[1] or b"null")


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_a_huge_body_is_refused_before_it_is_read(api: Path) -> None:
    before = _rss_kib()

    def flood() -> bytes:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(api))
            s.sendall(b"POST /v1/down HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000000\r\n\r\n")
            chunk = b"x" * (1 << 20)
            try:
                for _ in range(64):
                    s.sendall(chunk)
            except OSError:
                pass  # the agent answered and closed
            try:
                return s.recv(4096)
            except OSError:
                return b""

    answer = await asyncio.to_thread(flood)
    assert _status(answer) in (413, 0), answer  # 0: the reset may beat the answer to the client
    code, _ = await asyncio.to_thread(_get, api, "/v1/status")
    assert code == 200, "the agent still answers (and was not stopped by the refused down)"
    assert _rss_kib() - before < 32 * 1024, "the body was not buffered"
    chunked = b"POST /v1/down HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunked += (b"100000\r\n" + b"y" * 0x100000 + b"\r\n") * 2
    answer = await asyncio.to_thread(_raw, api, chunked)
    assert _status(answer) in (413, 0), answer
    assert (await asyncio.to_thread(_get, api, "/v1/status"))[0] == 200


async def test_numbers_are_parsed_strictly(api: Path) -> None:
    for target in ("/v1/services/web?wait=0&timeout=nan", "/v1/services/web?wait=0&timeout=inf",
                   "/v1/services/web?wait=0&timeout=1e9", "/v1/events?after=abc", "/v1/events?after=1e3",
                   "/v1/events?limit=0", "/v1/events?after=1&after=2", "/v1/services/web?wait=-5"):
        code, body = await asyncio.to_thread(_get, api, target)
        assert code == 400 and isinstance(body, dict) and body["error"]["type"] == "ConfigError", (target, body)
    code, body = await asyncio.to_thread(_get, api, "/v1/events?after=0&limit=5")
    assert code == 200 and isinstance(body, dict) and 0 < len(body["events"]) <= 5


_LONG_HEADER = b"GET /v1/status HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 70000 + b"\r\n\r\n"


@pytest.mark.parametrize("garbage", [b"GARBAGE\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"GET /v1/status\r\n\r\n",
                                     b"GET /v1/status HTTP/1.1\r\nBad Header\r\n\r\n", _LONG_HEADER])
async def test_malformed_requests_get_400(api: Path, garbage: bytes) -> None:
    answer = await asyncio.to_thread(_raw, api, garbage)
    assert 400 <= _status(answer) < 500, answer[:200]
    assert (await asyncio.to_thread(_get, api, "/v1/status"))[0] == 200


async def test_idle_and_half_sent_requests_are_dropped_and_capped(api: Path) -> None:
    held = []
    for _ in range(60):
        s = socket.socket(socket.AF_UNIX)
        s.setblocking(False)
        s.connect(str(api))
        s.send(b"GET /v1/status HTTP/1.1\r\nHo")
        held.append(s)
    try:
        await asyncio.sleep(0.2)
        # Past the cap, a new connection is turned away at once rather than queued.
        code, _ = await asyncio.to_thread(_get, api, "/v1/status")
        assert code == 503
        # The header timeout frees them all; then the agent answers again.
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            code, _ = await asyncio.to_thread(_get, api, "/v1/status")
            if code == 200 or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.1)
        assert code == 200
        # The 200 comes as soon as one slot is free; the rest time out on their own clocks, so each
        # held connection is given until the deadline to be answered and closed.
        closed = 0
        for s in held:
            while True:
                try:
                    closed += s.recv(4096) is not None
                    break
                except BlockingIOError:
                    if asyncio.get_running_loop().time() > deadline + 10:
                        break
                    await asyncio.sleep(0.05)
        assert closed == len(held), "every half-sent request was answered (408) and closed"
    finally:
        for s in held:
            s.close()
