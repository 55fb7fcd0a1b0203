"""The state database: deployments, instances and the event log, in SQLite (WAL).

The agent writes; anyone reads, so ``corral status`` and ``corral events`` answer while the
agent is down. Writes are queued and committed together (one transaction per batch), which
keeps a 200-instance bring-up from paying one fsync per transition.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral._core import process_alive, process_start_time
from corral.exceptions import StateDirError
from corral.statesafe import default_state_dir, private_file, secure_state_dir
from corral.storageusage import StorageUsage

__all__ = ["DeploymentRow", "DeploymentStatus", "EventRow", "InstanceRow", "SpecRow", "StateStore",
           "default_state_dir", "private_file", "secure_state_dir"]


_SCHEMA = """
CREATE TABLE IF NOT EXISTS deployments (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    status TEXT NOT NULL,
    message TEXT NOT NULL DEFAULT '',
    agent_pid INTEGER,
    agent_start INTEGER,
    started_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    phases TEXT NOT NULL DEFAULT '[]',
    version INTEGER NOT NULL DEFAULT 1,
    storage TEXT NOT NULL DEFAULT '{}',
    schedules TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS instances (
    id TEXT NOT NULL,
    deployment TEXT NOT NULL,
    service TEXT NOT NULL,
    idx INTEGER NOT NULL,
    state TEXT NOT NULL,
    healthy INTEGER NOT NULL DEFAULT 0,
    pid INTEGER,
    pid_start INTEGER,
    ports TEXT NOT NULL DEFAULT '{}',
    cpus TEXT NOT NULL DEFAULT '[]',
    exclusive INTEGER NOT NULL DEFAULT 0,
    numa_node INTEGER,
    millicores INTEGER NOT NULL DEFAULT 0,
    memory_mb INTEGER NOT NULL DEFAULT 0,
    restarts INTEGER NOT NULL DEFAULT 0,
    exit_code INTEGER,
    reason TEXT NOT NULL DEFAULT '',
    since REAL NOT NULL,
    log TEXT,
    version INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (deployment, id)
);
CREATE TABLE IF NOT EXISTS specs (
    deployment TEXT NOT NULL,
    version INTEGER NOT NULL,
    digest TEXT NOT NULL,
    text TEXT NOT NULL,
    state TEXT NOT NULL,
    message TEXT NOT NULL DEFAULT '',
    applied_at REAL NOT NULL,
    PRIMARY KEY (deployment, version)
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    deployment TEXT NOT NULL,
    instance TEXT,
    service TEXT,
    old TEXT,
    new TEXT,
    reason TEXT NOT NULL DEFAULT '',
    repeats INTEGER NOT NULL DEFAULT 1
);
"""

_ADDED_COLUMNS = (
    ("events", "repeats", "INTEGER NOT NULL DEFAULT 1"),
    ("instances", "version", "INTEGER NOT NULL DEFAULT 1"),
    ("deployments", "version", "INTEGER NOT NULL DEFAULT 1"),
    ("deployments", "storage", "TEXT NOT NULL DEFAULT '{}'"),
    ("deployments", "schedules", "TEXT NOT NULL DEFAULT '{}'"),
)
"""Columns newer than the first schema, added to an older state.db when it is opened."""


@dataclass
class DeploymentRow:
    """One deployment."""

    name: str
    spec: str
    status: str
    message: str = ""
    agent_pid: int | None = None
    agent_start: int | None = None
    started_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    phases: list[list[str]] = field(default_factory=list)
    version: int = 1
    """The spec version running (each apply that succeeds adds one)."""
    storage: dict[str, StorageUsage] = field(default_factory=dict)
    """Per service with storage: its volume as last measured."""
    schedules: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per scheduled service: its runs so far, the last one due, the next (see
    :mod:`corral.engine.schedules`)."""

    def agent_running(self) -> bool:
        """Whether the recorded agent is alive: its pid, with the same start time, and not a
        zombie (a dead agent may wait a while to be reaped)."""
        return _same_process(self.agent_pid, self.agent_start) and process_alive(self.agent_pid or 0)


@dataclass
class InstanceRow:
    """One instance as last recorded."""

    id: str
    deployment: str
    service: str
    idx: int
    state: str
    healthy: bool = False
    pid: int | None = None
    pid_start: int | None = None
    ports: dict[str, int] = field(default_factory=dict)
    cpus: list[int] = field(default_factory=list)
    exclusive: bool = False
    numa_node: int | None = None
    millicores: int = 0
    memory_mb: int = 0
    restarts: int = 0
    exit_code: int | None = None
    reason: str = ""
    since: float = field(default_factory=time.time)
    log: str | None = None
    version: int = 1
    """The spec version it runs."""

    def is_alive_state(self) -> bool:
        """Whether its recorded state is one of a process that runs (or is being started or
        stopped): what holds its grant."""
        return self.state in ("starting", "running", "healthy", "unhealthy", "stopping", "restarting")

    def is_running(self) -> bool:
        """Whether the recorded process is alive (its pid, with the same start time): what a
        dead agent may have left behind."""
        return _same_process(self.pid, self.pid_start)

    def to_dict(self) -> dict[str, Any]:
        """The ``status --json`` shape of an instance."""
        return {
            "id": self.id, "service": self.service, "index": self.idx, "state": self.state, "healthy": self.healthy,
            "pid": self.pid,
            "ports": self.ports, "cpus": self.cpus, "exclusive": self.exclusive, "numa_node": self.numa_node,
            "cpu": self.millicores / 1000, "memory_mb": self.memory_mb, "restarts": self.restarts,
            "exit_code": self.exit_code, "reason": self.reason, "since": self.since, "version": self.version,
        }


    @classmethod
    def from_dict(cls, deployment: str, service: str, doc: dict[str, Any]) -> InstanceRow:
        """Back from :meth:`to_dict` (what a client reads off the socket)."""
        return cls(id=doc["id"], deployment=deployment, service=doc.get("service", service),
                   idx=int(doc.get("index", 0)), state=doc["state"], healthy=bool(doc["healthy"]), pid=doc["pid"],
                   ports=dict(doc["ports"]), cpus=list(doc["cpus"]), exclusive=bool(doc["exclusive"]),
                   numa_node=doc["numa_node"], millicores=round(float(doc["cpu"]) * 1000),
                   memory_mb=int(doc["memory_mb"]), restarts=int(doc["restarts"]), exit_code=doc["exit_code"],
                   reason=doc["reason"], since=float(doc["since"]), version=int(doc.get("version", 1)))


@dataclass
class DeploymentStatus:
    """A deployment and its instances, by service: what ``status`` answers, from the agent or,
    with none running, from the store. :meth:`to_dict` is the one producer of its JSON."""

    name: str
    status: str
    message: str
    agent_pid: int | None
    agent_running: bool = False
    services: dict[str, list[InstanceRow]] = field(default_factory=dict)
    fronts: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per exposed service: its proxy's address and counters (``ProxyStats.to_dict()``); only
    while the agent runs, since they live in its memory."""
    version: int = 1
    """The spec version running (during a rollout, each instance says which it runs)."""
    storage: dict[str, StorageUsage] = field(default_factory=dict)
    """Per service with storage: its volume's size and usage as last measured."""
    schedules: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per scheduled service: runs, skipped, missed, the next run's time."""

    def to_dict(self) -> dict[str, Any]:
        """The ``corral status --json`` and ``GET /v1/status`` document."""
        return {
            "name": self.name, "status": self.status, "message": self.message, "agent_pid": self.agent_pid,
            "agent_running": self.agent_running,
            "services": {s: [i.to_dict() for i in insts] for s, insts in self.services.items()},
            "fronts": self.fronts, "version": self.version,
            "storage": {s: u.to_dict() for s, u in self.storage.items()}, "schedules": self.schedules,
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> DeploymentStatus:
        """Back from :meth:`to_dict`."""
        name = doc["name"]
        return cls(name=name, status=doc["status"], message=doc["message"], agent_pid=doc["agent_pid"],
                   agent_running=bool(doc.get("agent_running", False)),
                   services={s: [InstanceRow.from_dict(name, s, i) for i in insts]
                             for s, insts in doc["services"].items()},
                   fronts=dict(doc.get("fronts", {})), version=int(doc.get("version", 1)),
                   storage={s: StorageUsage.from_dict(u) for s, u in doc.get("storage", {}).items()},
                   schedules=dict(doc.get("schedules", {})))

    @classmethod
    def from_rows(cls, row: DeploymentRow, instances: list[InstanceRow], agent_running: bool) -> DeploymentStatus:
        """What the store recorded: services in phase order, each with its instances."""
        services: dict[str, list[InstanceRow]] = {s: [] for phase in row.phases for s in phase}
        for i in instances:
            services.setdefault(i.service, []).append(i)
        return cls(row.name, row.status, row.message, row.agent_pid, agent_running, services, version=row.version,
                   storage=row.storage, schedules=row.schedules)


@dataclass(frozen=True)
class SpecRow:
    """One applied (or tried) spec version."""

    version: int
    digest: str
    text: str
    state: str
    """``applying``, ``applied``, ``failed`` (reverted), ``partial`` (failed, not reverted),
    ``interrupted`` (the agent died during it), or ``superseded``."""
    message: str
    applied_at: float


@dataclass(frozen=True)
class EventRow:
    """One entry of the event log."""

    seq: int
    at: float
    deployment: str
    instance: str | None
    service: str | None
    old: str | None
    new: str | None
    reason: str
    repeats: int = 1
    """The same event, back to back, this many times (``at`` is the last)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"seq": self.seq, "at": self.at, "deployment": self.deployment, "instance": self.instance,
                "service": self.service, "from": self.old, "to": self.new, "reason": self.reason,
                "repeats": self.repeats}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> EventRow:
        """What :meth:`to_dict` made."""
        return cls(seq=int(doc["seq"]), at=float(doc["at"]), deployment=str(doc["deployment"]),
                   instance=doc.get("instance"), service=doc.get("service"), old=doc.get("from"), new=doc.get("to"),
                   reason=str(doc.get("reason", "")), repeats=int(doc.get("repeats", 1)))


def _same_process(pid: int | None, start: int | None) -> bool:
    # A pid alone may have been recycled; its start time tells the original apart.
    if not pid or not start:
        return False
    return process_start_time(pid) == start


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA busy_timeout = 10000")
    return db


class StateStore:
    """The database at ``<state_dir>/state.db``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        secure_state_dir(self.path.parent)
        # SQLite creates its -wal and -shm files with the database's mode: 0600 for all three.
        private_file(self.path)
        try:
            self._db = _connect(self.path)
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._db.executescript(_SCHEMA)
            for table, column, ddl in _ADDED_COLUMNS:  # a state.db from before these columns
                if column not in {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {ddl}")
        except sqlite3.DatabaseError as e:
            raise StateDirError(f"state database {self.path} cannot be used ({e}); move it away to start "
                                f"afresh") from None
        self._instances: dict[tuple[str, str], InstanceRow] = {}
        self._events: list[list[Any]] = []

    # --- writes (queued) ---------------------------------------------------------------

    def put_instance(self, row: InstanceRow) -> None:
        """Queues the latest row of an instance (later puts of the same instance win)."""
        self._instances[(row.deployment, row.id)] = row

    def add_event(self, deployment: str, instance: str | None, service: str | None, old: str | None,
                  new: str | None, reason: str, at: float | None = None) -> None:
        """Queues an event; one identical to the event queued last is counted on it instead
        (a warning or a failure repeated in a storm is one row)."""
        when = at or time.time()
        last = self._events[-1] if self._events else None
        if last is not None and last[1:7] == [deployment, instance, service, old, new, reason]:
            last[0] = when
            last[7] += 1
            return
        self._events.append([when, deployment, instance, service, old, new, reason, 1])

    @property
    def dirty(self) -> bool:
        """Whether writes are queued."""
        return bool(self._instances or self._events)

    def flush(self) -> None:
        """Commits the queued writes in one transaction."""
        if not self.dirty:
            return
        rows, events = list(self._instances.values()), self._events
        self._instances, self._events = {}, []
        with self._tx():
            self._db.executemany(
                "INSERT OR REPLACE INTO instances VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [(r.id, r.deployment, r.service, r.idx, r.state, int(r.healthy), r.pid, r.pid_start,
                  json.dumps(r.ports), json.dumps(r.cpus), int(r.exclusive), r.numa_node, r.millicores, r.memory_mb,
                  r.restarts,
                  r.exit_code, r.reason, r.since, r.log, r.version) for r in rows])
            self._db.executemany(
                "INSERT INTO events (at, deployment, instance, service, old, new, reason, repeats) "
                "VALUES (?,?,?,?,?,?,?,?)", events)

    def prune(self, max_rows: int, max_age: float) -> int:
        """Forgets events beyond the newest ``max_rows`` and those older than ``max_age``
        seconds; returns how many went."""
        with self._tx():
            cur = self._db.execute(
                "DELETE FROM events WHERE seq <= (SELECT COALESCE(MAX(seq), 0) FROM events) - ? OR at < ?",
                (max_rows, time.time() - max_age))
        return cur.rowcount

    def put_deployment(self, row: DeploymentRow) -> None:
        """Writes a deployment row now (rare: start, status changes, end)."""
        row.updated_at = time.time()
        with self._tx():
            self._db.execute(
                "INSERT OR REPLACE INTO deployments (name, spec, status, message, agent_pid, agent_start, "
                "started_at, updated_at, phases, version, storage, schedules) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (row.name, row.spec, row.status, row.message, row.agent_pid, row.agent_start,
                 row.started_at, row.updated_at, json.dumps(row.phases), row.version,
                 json.dumps({s: u.to_dict() for s, u in row.storage.items()}), json.dumps(row.schedules)))

    def put_spec(self, deployment: str, version: int, digest: str, text: str, state: str,
                 message: str = "") -> None:
        """Records a spec version (``applying``, ``applied``, ``failed``, ``reverted``) now."""
        with self._tx():
            self._db.execute(
                "INSERT INTO specs VALUES (?,?,?,?,?,?,?) ON CONFLICT (deployment, version) DO UPDATE SET "
                "state = excluded.state, message = excluded.message",
                (deployment, version, digest, text, state, message, time.time()))

    def delete_instance(self, deployment: str, instance: str) -> None:
        """Forgets one instance (it left the deployment)."""
        self._instances.pop((deployment, instance), None)
        with self._tx():
            self._db.execute("DELETE FROM instances WHERE deployment = ? AND id = ?", (deployment, instance))

    def clear_instances(self, deployment: str) -> None:
        """Forgets the instances of a deployment (a new ``up`` starts from a clean table)."""
        self.flush()
        with self._tx():
            self._db.execute("DELETE FROM instances WHERE deployment = ?", (deployment,))

    def close(self) -> None:
        """Flushes and closes."""
        self.flush()
        self._db.close()

    def _tx(self) -> _Tx:
        return _Tx(self._db)

    # --- reads (work without the agent) ------------------------------------------------

    @staticmethod
    def read_deployments(path: str | Path) -> list[DeploymentRow]:
        """Every deployment recorded."""
        rows = _read(path, "SELECT name, spec, status, message, agent_pid, agent_start, started_at, updated_at, "
                           "phases, version, storage, schedules FROM deployments ORDER BY started_at", ())
        return [DeploymentRow(name=r[0], spec=r[1], status=r[2], message=r[3], agent_pid=r[4], agent_start=r[5],
                              started_at=r[6], updated_at=r[7], phases=json.loads(r[8]), version=r[9],
                              storage={s: StorageUsage.from_dict(u) for s, u in json.loads(r[10]).items()},
                              schedules=json.loads(r[11]))
                for r in rows]

    @staticmethod
    def read_specs(path: str | Path, deployment: str) -> list[SpecRow]:
        """Every spec version recorded for a deployment, oldest first."""
        rows = _read(path, "SELECT version, digest, text, state, message, applied_at FROM specs "
                           "WHERE deployment = ? ORDER BY version", (deployment,))
        return [SpecRow(*r) for r in rows]

    @staticmethod
    def read_instances(path: str | Path, deployment: str) -> list[InstanceRow]:
        """The instances of a deployment, by service then index."""
        rows = _read(path, "SELECT id, deployment, service, idx, state, healthy, pid, pid_start, ports, cpus, "
                           "exclusive, numa_node, millicores, memory_mb, restarts, exit_code, reason, since, log, "
                           "version FROM instances WHERE deployment = ? ORDER BY service, idx", (deployment,))
        return [InstanceRow(r[0], r[1], r[2], r[3], r[4], bool(r[5]), r[6], r[7], json.loads(r[8]),
                            json.loads(r[9]), bool(r[10]), r[11], r[12], r[13], r[14], r[15], r[16], r[17], r[18],
                            r[19])
                for r in rows]

    @staticmethod
    def read_events(path: str | Path, after: int = 0, limit: int = 10000) -> list[EventRow]:
        """Events with ``seq > after``, oldest first."""
        rows = _read(path, "SELECT * FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit))
        return [EventRow(*r) for r in rows]

    @staticmethod
    def running_spec(path: str | Path, row: DeploymentRow) -> SpecRow | None:
        """The spec version a deployment runs (its row's ``version``), if recorded."""
        found = [v for v in StateStore.read_specs(path, row.name) if v.version == row.version]
        return found[-1] if found else None

    @staticmethod
    def last_version(path: str | Path, deployment: str) -> int:
        """The newest spec version recorded for a deployment (0 when none)."""
        rows = _read(path, "SELECT COALESCE(MAX(version), 0) FROM specs WHERE deployment = ?", (deployment,))
        return int(rows[0][0]) if rows else 0

    @staticmethod
    def last_seq(path: str | Path) -> int:
        """The sequence number of the newest event (0 when none)."""
        rows = _read(path, "SELECT COALESCE(MAX(seq), 0) FROM events", ())
        return int(rows[0][0]) if rows else 0

    @staticmethod
    def iter_tail(path: str | Path, n: int) -> Iterator[EventRow]:
        """The last ``n`` events, oldest first."""
        rows = _read(path, "SELECT * FROM (SELECT * FROM events ORDER BY seq DESC LIMIT ?) ORDER BY seq", (n,))
        return (EventRow(*r) for r in rows)


def _read(path: str | Path, sql: str, args: tuple[Any, ...]) -> list[Any]:
    """Rows of a query; none while the agent has not created the schema yet."""
    try:
        with closing(_connect(Path(path))) as db:
            try:
                return db.execute(sql, args).fetchall()
            except sqlite3.OperationalError as e:
                if "no such table" in str(e):
                    return []
                raise
    except sqlite3.DatabaseError as e:
        raise StateDirError(f"state database {path} cannot be used ({e}); move it away to start afresh") from None


class _Tx:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
