"""The audit trail: every operation that changes a stack, and every refused attempt, as
one JSON line in ``<state dir>/audit.log``, kept across ``down`` and ``up``.

Each line carries ``seq`` (one more than the line before), ``prev`` (the SHA-256 of the line
before, as written) and ``hash`` (the SHA-256 of the line itself without that field), so
:func:`verify` names the first line that was edited, removed or reordered. The file is
rotated past ``max_size`` (``audit.log.1`` is the newest old one, ``keep`` old ones are kept) and the
chain goes on across files: the first line of a new file links to the last of the old one.

Writers are the agent (for its API's callers), the keeper (restarting the agent), and any
process using the Python API; each appends under ``flock`` on ``audit.lock``, reading the
last line's hash from the file itself, so the chain stays whole with several writers.

The chain shows a change to what was written; it cannot stop someone who can write the
file from rewriting everything after a line. That is what forwarding each record to
syslog (``audit.syslog``) is for: a copy outside the state directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.statesafe import secure_state_dir

if TYPE_CHECKING:
    from corral.access import Caller

__all__ = ["AUDIT_FILE", "SETTINGS_FILE", "AuditTrail", "Broken", "read_records", "verify"]

log = logging.getLogger("corral")

AUDIT_FILE = "audit.log"
SETTINGS_FILE = "audit.json"
"""The trail's settings as the agent last had them from the spec (``max_size``, ``keep``,
``syslog``): the keeper, which reads no spec, records by them too."""
_GENESIS = "0" * 64


def _digest(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def _files(state_dir: Path) -> list[Path]:
    """The trail's files, oldest first."""
    base = state_dir / AUDIT_FILE
    old = []
    for p in state_dir.glob(AUDIT_FILE + ".*"):
        suffix = p.name.removeprefix(AUDIT_FILE + ".")
        if suffix.isdigit():
            old.append((int(suffix), p))
    return [p for _, p in sorted(old, reverse=True)] + ([base] if base.exists() else [])


def _last_line(path: Path) -> bytes | None:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            back = min(size, 1 << 16)
            f.seek(size - back)
            tail = f.read(back)
    except FileNotFoundError:
        return None
    lines = tail.rstrip(b"\n").rsplit(b"\n", 1)
    return lines[-1] if lines and lines[-1] else None


class AuditTrail:
    """Appends records to a state directory's trail (see the module docs)."""

    def __init__(self, state_dir: Path, *, max_size: int = 4 << 20, keep: int = 5,
                 syslog: str | None = None) -> None:
        self.state_dir = state_dir
        self.max_size = max_size
        self.keep = keep
        self.syslog = syslog
        self._saved = False

    @classmethod
    def of(cls, state_dir: Path) -> AuditTrail:
        """The trail of ``state_dir`` with the settings its agent saved (the defaults when
        none were, or they cannot be read)."""
        try:
            doc = json.loads((state_dir / SETTINGS_FILE).read_text())
            return cls(state_dir, max_size=int(doc["max_size"]), keep=int(doc["keep"]),
                       syslog=str(doc["syslog"]) if doc.get("syslog") else None)
        except (OSError, ValueError, KeyError, TypeError):
            return cls(state_dir)

    def _save_settings(self) -> None:
        """Writes the settings for :meth:`of`, once per trail (with its first record)."""
        if self._saved:
            return
        self._saved = True
        doc = json.dumps({"max_size": self.max_size, "keep": self.keep, "syslog": self.syslog})
        tmp = self.state_dir / f".{SETTINGS_FILE}.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, doc.encode())
        finally:
            os.close(fd)
        os.replace(tmp, self.state_dir / SETTINGS_FILE)

    @property
    def path(self) -> Path:
        """The current file."""
        return self.state_dir / AUDIT_FILE

    def record(self, caller: Caller, op: str, args: Mapping[str, Any], outcome: str, reason: str = "",
               **more: Any) -> dict[str, Any]:
        """Appends one record (``outcome``: ``ok``, ``failed`` or ``refused``) and returns it.
        A trail that cannot be written is logged, never raised: the operation it records
        has happened, or been refused, already."""
        now = time.time()
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z",
            "uid": caller.uid, "user": caller.user, "pid": caller.pid, "cmdline": caller.cmdline,
            "op": op, "args": dict(args), "outcome": outcome, "reason": reason, **more,
        }
        try:
            self._append(doc)
            self._save_settings()
        except OSError as e:
            log.warning("corral: audit trail %s: %s", self.path, e.strerror or e)
        if self.syslog:
            self._forward(doc)
        return doc

    def _append(self, doc: dict[str, Any]) -> None:
        secure_state_dir(self.state_dir)
        fd = os.open(self.state_dir / "audit.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            last = _last_line(self.path)
            if last is None:
                older = _files(self.state_dir)
                last = _last_line(older[-1]) if older else None
            elif self.path.stat().st_size >= self.max_size:
                self._rotate()
            prev, seq = _GENESIS, 1
            if last is not None:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    seq = int(json.loads(last)["seq"]) + 1
                prev = _digest(last)
            body = {"seq": seq, **doc, "prev": prev}
            body["hash"] = _digest(json.dumps(body, sort_keys=True).encode())
            line = json.dumps(body, sort_keys=True).encode() + b"\n"
            out = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                os.fchmod(out, 0o600)
                os.write(out, line)
                os.fsync(out)
            finally:
                os.close(out)
            doc.update(seq=seq, prev=prev, hash=body["hash"])
        finally:
            os.close(fd)

    def _rotate(self) -> None:
        """``audit.log`` becomes ``audit.log.1``, and so on; past ``keep`` old files the oldest goes."""
        for n in range(self.keep, 0, -1):
            older = self.state_dir / f"{AUDIT_FILE}.{n}"
            if older.exists():
                if n == self.keep:
                    older.unlink()
                else:
                    older.rename(self.state_dir / f"{AUDIT_FILE}.{n + 1}")
        self.path.rename(self.state_dir / f"{AUDIT_FILE}.1")

    def _forward(self, doc: Mapping[str, Any]) -> None:
        """One syslog datagram (facility authpriv, severity notice): ``corral[pid]: JSON``."""
        assert self.syslog is not None
        data = f"<{10 * 8 + 5}>corral[{os.getpid()}]: {json.dumps(doc, sort_keys=True)}".encode()
        try:
            if self.syslog.startswith("udp://"):
                host, _, port = self.syslog.removeprefix("udp://").rpartition(":")
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.sendto(data, (host, int(port)))
            else:
                with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                    s.sendto(data, self.syslog)
        except OSError as e:
            log.warning("corral: audit syslog %s: %s", self.syslog, e.strerror or e)


def read_records(state_dir: Path) -> Iterator[dict[str, Any]]:
    """Every record of the trail, oldest first (lines that are not JSON are skipped)."""
    for path in _files(state_dir):
        with open(path, "rb") as f:
            for raw in f:
                with contextlib.suppress(ValueError):
                    doc = json.loads(raw)
                    if isinstance(doc, dict):
                        yield doc


@dataclass(frozen=True)
class Broken:
    """Where the chain breaks: the file, the line number in it (from 1), and what is wrong."""

    file: Path
    line: int
    problem: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.problem}"


def verify(state_dir: Path) -> tuple[int, Broken | None]:
    """How many records hold, and the first place the chain breaks (None when whole)."""
    prev: bytes | None = None
    seq: int | None = None
    count = 0
    for path in _files(state_dir):
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                line = raw.rstrip(b"\n")
                broken = _check(line, prev, seq)
                if broken is not None:
                    return count, Broken(path, n, broken)
                doc = json.loads(line)
                prev, seq = line, int(doc["seq"])
                count += 1
    return count, None


def _check(line: bytes, prev: bytes | None, seq: int | None) -> str | None:
    try:
        doc = json.loads(line)
        given, their_seq, their_prev = doc.pop("hash"), int(doc["seq"]), doc["prev"]
    except (ValueError, KeyError, TypeError, AttributeError):
        return "not an audit record (edited)"
    if _digest(json.dumps(doc, sort_keys=True).encode()) != given:
        return f"record {their_seq} was edited (its hash does not match its content)"
    if seq is not None and their_seq != seq + 1:
        what = "removed" if their_seq > seq + 1 else "reordered"
        return f"record {their_seq} follows record {seq}: records were {what}"
    if prev is not None and their_prev != _digest(prev):
        return f"record {their_seq} does not link to the line before it (that line was edited or replaced)"
    return None
