"""The mesh end to end: a deployment's CA, service certificates in the instances'
environment, an mTLS front with an allow list, and rotation. Real processes and TLS."""

from __future__ import annotations

import http.client
import socket
import ssl
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from corral import Authority, Deployment
from tests.e2e import await_until, read_json, running, write_spec

pytestmark = pytest.mark.timeout(90)

SPEC = """
    name: shop
    mesh: {cert_lifetime: 6s}
    services:
      db:
        command: ["{py}", "{server}"]
        env: {DUMP_ENV: "@DIR@/db.json"}
        ports: {http: auto}
        expose: 23201
        mtls: true
        allow: [api]
        health:
          readiness: {tcp: {port: http}, period: 100ms}
      api:
        command: ["sleep", "300"]
      worker:
        command: ["sleep", "300"]
"""


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Deployment]:
    async with running(write_spec(tmp_path, SPEC.replace("@DIR@", str(tmp_path)))) as d:
        yield d


def _get(ctx: ssl.SSLContext) -> tuple[str, bytes]:
    """GET /whoami through the mTLS front; returns the answer and the front's certificate."""
    raw = socket.create_connection(("127.0.0.1", 23201), timeout=5)
    with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        peer = tls.getpeercert(binary_form=True)
        assert peer is not None
        conn = http.client.HTTPConnection("127.0.0.1", 23201, timeout=5)
        conn.sock = tls
        conn.request("GET", "/whoami")
        return conn.getresponse().read().decode(), peer


def _ctx(tls_dir: Path, service: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(tls_dir / "ca.crt"))
    if service is not None:
        ctx.load_cert_chain(tls_dir / "services" / f"{service}.crt", tls_dir / "services" / f"{service}.key")
    return ctx


async def test_mtls_front_lets_the_allowed_service_in_and_refuses_the_rest(mesh: Deployment, tmp_path: Path) -> None:
    tls_dir = mesh.state_dir / "tls"
    assert stat.S_IMODE((tls_dir / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tls_dir / "services" / "api.key").stat().st_mode) == 0o600
    env = read_json(tmp_path / "db.json")["env"]
    assert env["CORRAL_TLS_CA"] == str(tls_dir / "ca.crt")
    assert env["CORRAL_TLS_CERT"] == str(tls_dir / "services" / "db.crt")
    assert env["CORRAL_TLS_KEY"] == str(tls_dir / "services" / "db.key")
    assert env["CORRAL_SPIFFE_ID"] == "spiffe://shop.corral/svc/db"

    answer, _ = _get(_ctx(tls_dir, "api"))
    assert answer == "db-0"
    for who in (None, "worker"):
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            _get(_ctx(tls_dir, who))
    other = Authority(tmp_path / "elsewhere", "shop.corral")
    other.issue("api")
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        _get(_ctx_mixed(tls_dir, tmp_path / "elsewhere"))
    # The front counts a refusal once its side of the handshake has failed, which may be just
    # after the client saw the alert.
    await await_until(lambda: mesh.status().fronts["db"]["tls_refused"] >= 3, what="three refusals counted")
    stats = mesh.status().fronts["db"]
    assert stats["tls_refused"] == 3 and stats["connections"] == 1


def _ctx_mixed(trust: Path, client: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(trust / "ca.crt"))
    ctx.load_cert_chain(client / "services" / "api.crt", client / "services" / "api.key")
    return ctx


async def test_certificates_rotate_before_expiry_without_dropping_the_front(mesh: Deployment) -> None:
    tls_dir = mesh.state_dir / "tls"
    _, first = _get(_ctx(tls_dir, "api"))
    before = (tls_dir / "services" / "api.crt").read_bytes()
    # 6 s certificates are renewed after 4 s.
    await await_until(lambda: (tls_dir / "services" / "api.crt").read_bytes() != before, 10, "renewal")
    time.sleep(0.2)
    answer, second = _get(_ctx(tls_dir, "api"))
    assert answer == "db-0" and second != first, "new connections see the renewed certificate"


async def test_an_allow_change_applies_in_place_and_mtls_can_be_switched_off(mesh: Deployment) -> None:
    from corral.spec import load_spec

    tls_dir = mesh.state_dir / "tls"
    pid = mesh.status().services["db"][0].pid
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        _get(_ctx(tls_dir, "worker"))
    mesh.file.write_text(mesh.file.read_text().replace("allow: [api]", "allow: [api, worker]"))
    diff = await mesh.apply(load_spec(mesh.file))
    assert diff.lines()[0] == '~ db: allow ["api"] => ["api", "worker"] (in place)'
    assert _get(_ctx(tls_dir, "worker"))[0] == "db-0" and _get(_ctx(tls_dir, "api"))[0] == "db-0"
    mesh.file.write_text(mesh.file.read_text().replace("    mtls: true\n    allow: [api, worker]\n", ""))
    await mesh.apply(load_spec(mesh.file))
    conn = http.client.HTTPConnection("127.0.0.1", 23201, timeout=5)
    conn.request("GET", "/whoami")
    assert conn.getresponse().read() == b"db-0", "plain TCP now, on the same port"
    assert mesh.status().services["db"][0].pid == pid, "the instance never restarted"
