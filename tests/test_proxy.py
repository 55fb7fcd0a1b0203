"""The data plane: a service's front address balancing over its healthy instances.
Real processes and sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import collections
import http.client
import os
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from corral import Deployment, Proxy
from corral.lifecycle import State
from tests.e2e import await_until, kill_groups, write_spec

pytestmark = pytest.mark.timeout(90)


def whoami(port: int, timeout: float = 5.0) -> str:
    """One request on a new connection through ``port``."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", "/whoami")
        r = c.getresponse()
        body = r.read().decode()
        if r.status != 200:
            raise OSError(f"HTTP {r.status}")
        return body
    finally:
        c.close()


class Load:
    """Requests in a loop on another thread, each on a new connection, ``interval`` seconds
    apart; records (time, ok, who) for each."""

    def __init__(self, port: int, interval: float = 0.0, timeout: float = 2.0) -> None:
        self.port = port
        self.interval = interval
        self.timeout = timeout
        self.results: list[tuple[float, bool, str]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.monotonic()
            try:
                self.results.append((t, True, whoami(self.port, self.timeout)))
            except (OSError, http.client.HTTPException) as e:
                # A response cut mid-body (its replica killed under it) is a failure, not the end of the load.
                self.results.append((t, False, str(e)))
            if self.interval:
                self._stop.wait(self.interval)

    def __enter__(self) -> Load:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join(10)


SPEC = """
    name: front
    services:
      web:
        replicas: 3
        command: ["{py}", "{server}"]
        ports: {http: auto}
        expose: 23001
        balance: BALANCE
        health:
          readiness: {http: {port: http, path: /health}, period: 100ms, failure_threshold: 1}
        restart: {policy: on-failure, backoff: fixed, initial: 300ms}
        shutdown: {timeout: 3s}
"""


@pytest.fixture
async def front(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Deployment]:
    balance = getattr(request, "param", "round_robin")
    d = Deployment.from_file(write_spec(tmp_path, SPEC.replace("BALANCE", balance)))
    try:
        await d.up()
        yield d
    finally:
        pids = [i.pid for i in d.status().services["web"] if i.pid]
        await d.down()
        kill_groups([p for p in pids if p])


async def test_round_robin_front_spreads_over_the_replicas(front: Deployment) -> None:
    answers = [await asyncio.to_thread(whoami, 23001) for _ in range(30)]
    assert collections.Counter(answers) == {"web-0": 10, "web-1": 10, "web-2": 10}
    stats = front.status().fronts["web"]
    assert stats["connections"] == 30 and stats["refused"] == 0 and stats["address"] == "127.0.0.1:23001"
    assert sorted(u["id"] for u in stats["upstreams"]) == ["web-0", "web-1", "web-2"]
    assert all(u["connections"] == 10 and u["bytes_out"] > 0 for u in stats["upstreams"])


async def test_a_killed_replica_loses_no_new_connection_once_out(front: Deployment) -> None:
    victim = front.status().services["web"][1]
    assert victim.pid is not None
    with Load(23001) as load:
        await asyncio.sleep(0.5)
        os.kill(victim.pid, signal.SIGKILL)
        await await_until(lambda: any(t.new is State.RESTARTING for t in front.events()), what="restarting")
        out_at = time.monotonic()
        await await_until(lambda: front.status().services["web"][1].state == "healthy", what="back")
        # Enough requests after the ejection, the restarted replica's among them (on a busy
        # machine one request can take most of a second: a fixed pause saw none).
        await await_until(lambda: sum(r[0] > out_at + 0.05 for r in load.results) >= 10
                          and any(r[0] > out_at + 0.05 and r[2] == "web-1" for r in load.results),
                          what="requests after the ejection")
    after = [r for r in load.results if r[0] > out_at + 0.05]
    assert after and all(ok for _, ok, _ in after), [r for r in after if not r[1]][:3]
    assert any(who == "web-1" for _, ok, who in after if ok), "the restarted replica gets traffic again"


async def test_a_rolling_restart_under_load_never_refuses(front: Deployment) -> None:
    with Load(23001) as load:
        await asyncio.sleep(0.3)
        await front.restart("web")
        await asyncio.sleep(0.3)
    failures = [r for r in load.results if not r[1]]
    assert len(load.results) > 50 and failures == [], failures[:3]
    assert [i.restarts for i in front.status().services["web"]] == [1, 1, 1]


async def test_restarting_the_only_replica_holds_connections_instead_of_refusing_them(
        tmp_path: Path, deployments: list[Deployment]) -> None:
    """With one replica a restart leaves the front without an upstream for a moment: the
    connections that arrive then wait for the new process (``front_hold``), none is refused."""
    d = Deployment.from_file(write_spec(tmp_path, SPEC.replace("replicas: 3", "replicas: 1")
                                        .replace("BALANCE", "round_robin").replace("23001", "23002")))
    deployments.append(d)
    await d.up()
    with Load(23002, interval=0.005, timeout=30.0) as load:
        await await_until(lambda: len(load.results) >= 5, what="requests before the restart")
        before = d.status().services["web"][0].pid
        await d.restart("web")
        await await_until(lambda: any(r[0] > time.monotonic() - 0.2 for r in load.results[-3:]) and
                          len(load.results) > 20, what="requests after the restart")
    assert d.status().services["web"][0].pid != before
    failures = [r for r in load.results if not r[1]]
    assert failures == [], failures[:3]
    assert d.status().fronts["web"]["refused"] == 0


async def test_an_http_front_ends_keep_alive_connections_at_a_response_so_a_restart_need_not_wait(
        tmp_path: Path, deployments: list[Deployment]) -> None:
    """front_protocol: http. A keep-alive client (http.client, one connection reused) through
    a restart of the only replica: the old instance's connection ends after a response that
    says ``Connection: close``, the client opens a new one (held until the new process is
    up), none fails, and the stop does not wait for the 30 s drain deadline. An idle
    keep-alive connection to the old instance is closed too."""
    spec = (SPEC.replace("replicas: 3", "replicas: 1").replace("BALANCE", "round_robin").replace("23001", "23003")
            .replace("shutdown: {timeout: 3s}", "shutdown: {timeout: 3s, drain: 30s}\n        front_protocol: http\n"
                     "        env: {HTTP11: '1'}"))
    d = Deployment.from_file(write_spec(tmp_path, spec))
    deployments.append(d)
    await d.up()
    answers: list[str] = []
    errors: list[str] = []
    closes = 0
    stop = threading.Event()

    def client() -> None:
        nonlocal closes
        c = http.client.HTTPConnection("127.0.0.1", 23003, timeout=30)
        while not stop.is_set():
            try:
                c.request("GET", "/whoami")
                r = c.getresponse()
                answers.append(r.read().decode())
                if r.getheader("Connection", "").lower() == "close":
                    closes += 1
                    c.close()
            except (OSError, http.client.HTTPException) as e:
                errors.append(f"{type(e).__name__}: {e}")
                c.close()
            time.sleep(0.002)
        c.close()

    idle = http.client.HTTPConnection("127.0.0.1", 23003, timeout=30)
    idle.request("GET", "/whoami")
    first = idle.getresponse().read().decode()
    t = threading.Thread(target=client, daemon=True)
    t.start()
    try:
        await await_until(lambda: len(answers) >= 20, what="keep-alive answers before the restart")
        before = d.status().services["web"][0].pid
        began = time.monotonic()
        await d.restart("web")
        took = time.monotonic() - began
        n = len(answers)
        await await_until(lambda: len(answers) >= n + 20, what="answers after the restart")
    finally:
        stop.set()
        t.join(30)
    assert errors == [], errors[:3]
    assert closes >= 1, "the old instance's connection ended at a response that said so"
    assert d.status().services["web"][0].pid != before, "a new process answers now"
    assert set(answers) == {first}
    assert took < 20, f"the stop waited for its drain deadline ({took:.1f}s)"
    assert idle.sock is not None and idle.sock.recv(1) == b"", "the idle connection was closed"
    idle.close()
    assert d.status().fronts["web"]["refused"] == 0


@pytest.mark.parametrize("front", ["ip_hash"], indirect=True)
async def test_ip_hash_front_keeps_a_client_on_one_replica(front: Deployment) -> None:
    answers = {await asyncio.to_thread(whoami, 23001) for _ in range(12)}
    assert len(answers) == 1


def test_proxy_class_validates_and_reports() -> None:
    with pytest.raises(ValueError, match="strategy"):
        Proxy(strategy="fastest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="IP address"):
        Proxy("localhost")
    p = Proxy()
    assert p.port > 0 and p.address == f"127.0.0.1:{p.port}"
    with pytest.raises(OSError):
        Proxy(port=p.port)
    p.set_upstreams([("a", "127.0.0.1", 1), ("b", "127.0.0.1", 2, 3)])
    assert sorted(u.id for u in p.stats().upstreams) == ["a", "b"]
    p.close()


ECHO = r"""import os, socket, threading
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(os.environ["PORT"])))
s.listen()
def serve(c):
    while (d := c.recv(100)):
        c.sendall(os.environ["CORRAL_INSTANCE"].encode() + b":" + d)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


def _echo_spec(tmp_path: Path, drain: str) -> Path:
    import json

    return write_spec(tmp_path, f"""
        name: drains
        services:
          echo:
            command: ["{{py}}", "-c", {json.dumps(ECHO)}]
            ports: {{tcp: auto}}
            expose: 23003
            health:
              readiness: {{tcp: {{port: tcp}}, period: 100ms}}
            shutdown: {{drain: {drain}, timeout: 3s}}
        """)


def _ask(c: socket.socket, what: bytes) -> bytes:
    c.sendall(what)
    return c.recv(100)


async def test_a_stop_waits_for_the_connections_it_has_until_they_close(tmp_path: Path,
                                                                        deployments: list[Deployment]) -> None:
    d = Deployment.from_file(_echo_spec(tmp_path, "60s"))
    deployments.append(d)
    await d.up()
    before = d.status().services["echo"][0].pid
    c = socket.create_connection(("127.0.0.1", 23003), timeout=10)
    assert _ask(c, b"x") == b"echo-0:x"
    restart = asyncio.create_task(d.restart("echo"))
    await await_until(lambda: d.status().services["echo"][0].state == "stopping", what="the stop")
    await asyncio.sleep(0.5)
    # Out of the front, but not signalled while its connection is open: it still answers.
    assert await asyncio.to_thread(_ask, c, b"y") == b"echo-0:y"
    assert not restart.done()
    c.close()
    await asyncio.wait_for(restart, 30)
    assert d.status().services["echo"][0].pid != before


async def test_the_drain_deadline_ends_a_connection_that_stays_open(tmp_path: Path,
                                                                     deployments: list[Deployment]) -> None:
    d = Deployment.from_file(_echo_spec(tmp_path, "1s"))
    deployments.append(d)
    await d.up()
    c = socket.create_connection(("127.0.0.1", 23003), timeout=10)
    assert _ask(c, b"x") == b"echo-0:x"
    began = time.monotonic()
    await asyncio.wait_for(d.restart("echo"), 30)
    assert time.monotonic() - began >= 0.9, "the drain waited for its deadline"
    try:
        gone = await asyncio.to_thread(_ask, c, b"y") == b""
    except OSError:
        gone = True
    assert gone, "the old process ended its connection once signalled"
    c.close()
