"""The audit trail's file mechanics, on a real state directory: rotation by size with the
chain continued across files (and across the oldest file's removal), verify naming the
file and line of an edit in an old file, and the syslog forward to real sockets (a UDP
socket on 127.0.0.1 and a Unix datagram socket, as /dev/log is)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from corral.access import Caller
from corral.audit import AuditTrail, read_records, verify


def _trail(tmp_path: Path, **kw: object) -> tuple[Path, AuditTrail]:
    state = tmp_path / ".corral"
    state.mkdir(mode=0o700)
    return state, AuditTrail(state, **kw)  # type: ignore[arg-type]


def test_rotation_keeps_the_chain_across_files_and_verify_names_the_file(tmp_path: Path) -> None:
    state, trail = _trail(tmp_path, max_size=2000, keep=3)
    me = Caller.this_process()
    for i in range(60):
        trail.record(me, "scale", {"service": "web", "replicas": i}, "ok")
    files = sorted(p.name for p in state.glob("audit.log*"))
    assert files == ["audit.log", "audit.log.1", "audit.log.2", "audit.log.3"], files
    assert all((state / f).stat().st_mode & 0o077 == 0 for f in files)
    seqs = [r["seq"] for r in read_records(state)]
    assert seqs == list(range(seqs[0], 61)) and seqs[0] > 1, seqs  # the oldest went; the rest follow on
    count, broken = verify(state)
    assert broken is None and count == len(seqs), broken
    old = state / "audit.log.2"
    lines = old.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"replicas": ', b'"replicas": 1', 1)
    old.write_bytes(b"".join(lines))
    _, broken = verify(state)
    assert broken is not None and "audit.log.2:2" in str(broken) and "edited" in str(broken), broken


def test_records_are_forwarded_to_syslog_over_udp_and_a_unix_socket(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as unix:
        udp.bind(("127.0.0.1", 0))
        udp.settimeout(10)
        sock_path = tmp_path / "log.sock"
        unix.bind(str(sock_path))
        unix.settimeout(10)
        me = Caller.this_process()
        state, trail = _trail(tmp_path, syslog=f"udp://127.0.0.1:{udp.getsockname()[1]}")
        trail.record(me, "down", {}, "refused", "needs admin")
        AuditTrail(state, syslog=str(sock_path)).record(me, "restart", {"service": "web"}, "ok")
        for sock, op in ((udp, "down"), (unix, "restart")):
            data = sock.recv(65536).decode()
            assert data.startswith("<85>corral["), data  # authpriv.notice
            doc = json.loads(data.split("]: ", 1)[1])
            assert doc["op"] == op and doc["uid"] == me.uid and doc["hash"], doc
    assert [r["op"] for r in read_records(state)] == ["down", "restart"]


def test_the_keeper_records_by_the_settings_the_agent_saved(tmp_path: Path) -> None:
    """The keeper reads no spec: it takes the trail's settings (rotation, syslog) from the
    file the agent's trail saves with its first record (0600)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        udp.settimeout(10)
        sink = f"udp://127.0.0.1:{udp.getsockname()[1]}"
        state, trail = _trail(tmp_path, max_size=1234, keep=2, syslog=sink)
        trail.record(Caller.this_process(), "up", {}, "ok")
        assert udp.recv(65536)
        assert (state / "audit.json").stat().st_mode & 0o777 == 0o600
        keeper = AuditTrail.of(state)
        assert (keeper.max_size, keeper.keep, keeper.syslog) == (1234, 2, sink)
        keeper.record(Caller.this_process(), "agent-restart", {"agent_pid": 1}, "ok")
        assert b'"agent-restart"' in udp.recv(65536)
    (state / "audit.json").write_text("not json")
    assert AuditTrail.of(state).syslog is None  # unreadable: the defaults
