"""The journal: the one place that writes a deployment's status and events to the store.

Instance rows are queued as instances change and written together a moment later (one
transaction per batch), so a 200-instance bring-up does not pay one commit per transition.
Events are the one history of a deployment: ``Deployment.events()``, ``corral events`` and
``GET /v1/events?after=SEQ`` all read them from the store, by sequence number.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from corral._core import process_start_time
from corral.exceptions import CorralError
from corral.lifecycle import State, Transition
from corral.state import DeploymentRow, EventRow, InstanceRow, StateStore
from corral.storageusage import StorageUsage

__all__ = ["Journal"]

log = logging.getLogger("corral")

_FLUSH_DELAY = 0.05
_PRUNE_EVERY = 1.0


class Journal:
    """Writes one deployment's row, its instances' rows and its events."""

    def __init__(self, state_dir: Path, name: str, spec_file: Path, rows: Callable[[str], InstanceRow | None], *,
                 max_rows: int = 100_000, max_age: float = 7 * 86400.0) -> None:
        self.state_dir = state_dir
        self.name = name
        self.row = DeploymentRow(name=name, spec=str(spec_file.resolve()), status="new", version=0)
        self._rows = rows
        self._store: StateStore | None = None
        self._dirty: set[str] = set()
        self._flush_handle: asyncio.TimerHandle | None = None
        self._start_seq = 0
        """The last event before this run: this run's events come after it."""
        self._max_rows, self._max_age = max_rows, max_age
        self._pruned_at = 0.0
        self._write_failed = False
        self._inode: tuple[int, int] | None = None
        self.problem = ""
        """What is wrong with the store, when something is (shown by status)."""

    @property
    def db(self) -> Path:
        """The SQLite file."""
        return self.state_dir / "state.db"

    def open(self) -> None:
        """Opens (creates) the store."""
        if self._store is None:
            self._store = StateStore(self.db)
            self._start_seq = StateStore.last_seq(self.db)
            st = os.stat(self.db)
            self._inode = (st.st_dev, st.st_ino)

    def begin(self, phases: list[list[str]]) -> None:
        """A run begins, with this process as its agent: the instances of an earlier run are
        forgotten."""
        assert self._store is not None, "open() first"
        self.row.phases = phases
        self.row.agent_pid = os.getpid()
        self.row.agent_start = process_start_time(os.getpid())
        self._store.clear_instances(self.name)

    def resume(self, row: DeploymentRow, phases: list[list[str]]) -> None:
        """A run goes on under this process as its agent (a dead agent's, re-adopted): its
        row is kept, with its version and start, and so are its instances' rows."""
        assert self._store is not None, "open() first"
        self.row = row
        self.row.phases = phases
        self.row.agent_pid = os.getpid()
        self.row.agent_start = process_start_time(os.getpid())

    def set_retention(self, max_rows: int, max_age: float) -> None:
        """How much of the event log is kept, from the next prune on."""
        self._max_rows, self._max_age = max_rows, max_age

    def next_version(self) -> int:
        """The number the next spec version gets: one past the newest recorded."""
        if self._store is None:
            return self.row.version + 1
        try:
            return max(self.row.version, StateStore.last_version(self.db, self.name)) + 1
        except CorralError:
            return self.row.version + 1

    def spec(self, version: int, digest: str, text: str, state: str, message: str = "") -> None:
        """Records a spec version and what became of it; ``applied`` makes it the running one."""
        if state == "applied":
            self.row.version = version
        if self._store is not None:
            self._write(self._store.put_spec, self.name, version, digest, text, state, message)
            if state == "applied":
                self._write(self._store.put_deployment, self.row)

    def status(self, status: str, message: str | None = None, *, event: tuple[str | None, str] | None = None) -> None:
        """Records the deployment's status (now, not batched) and, with ``event`` as
        ``(old, reason)``, the event of that change."""
        self.row.status = status
        if message is not None:
            self.row.message = message
        if self._store is None:
            return
        self._write(self._store.put_deployment, self.row)
        if event is not None:
            self.note(event[1], old=event[0], new=status)

    def storage(self, usage: dict[str, StorageUsage]) -> None:
        """The volumes as just measured: saved with the deployment's row (status and ``ls``
        read them from there when no agent answers)."""
        self.row.storage = dict(usage)
        if self._store is not None:
            self._write(self._store.put_deployment, self.row)

    def schedules(self, state: dict[str, dict[str, Any]]) -> None:
        """The scheduled services' runs so far: saved with the deployment's row (an agent
        that takes over counts the runs missed since)."""
        self.row.schedules = {k: dict(v) for k, v in state.items()}
        if self._store is not None:
            self._write(self._store.put_deployment, self.row)

    def transition(self, t: Transition) -> None:
        """An instance changed state: its event now, its row with the next batch."""
        if log.isEnabledFor(logging.INFO):
            log.info(t.reason, extra={"event": "transition", "service": t.service, "instance": t.instance,
                                      "from": t.old.value, "to": t.new.value})
        if self._store is not None:
            self._store.add_event(self.name, t.instance, t.service, t.old.value, t.new.value, t.reason, t.at)
            self._dirty.add(t.instance)
            self.flush_soon()

    def forget(self, instance: str) -> None:
        """An instance left the deployment: its row goes (its events stay)."""
        self._dirty.discard(instance)
        if self._store is not None:
            self._write(self._store.delete_instance, self.name, instance)

    def note(self, reason: str, *, old: str | None = None, new: str | None = None,
             instance: str | None = None, service: str | None = None) -> None:
        """An event that is no transition: of the deployment (a warning, a certificate renewal,
        a status) or of one instance (a startup probe that passed)."""
        if log.isEnabledFor(logging.INFO) and not reason.startswith("warning: "):  # warnings log themselves
            log.info(reason, extra={"event": "status" if new else "note", "service": service, "instance": instance,
                                    "from": old, "to": new})
        if self._store is not None:
            self._store.add_event(self.name, instance, service, old, new, reason)
            self.flush_soon()

    def flush_soon(self) -> None:
        """Writes what is queued within a moment (at once when no event loop runs)."""
        if self._flush_handle is not None or self._store is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._flush_handle = loop.call_later(_FLUSH_DELAY, self.flush)

    def flush(self) -> bool:
        """Writes what is queued now; False when the store refused it."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._store is None:
            return False
        self._check_file()
        for iid in self._dirty:
            row = self._rows(iid)
            if row is not None:
                self._store.put_instance(row)
        self._dirty.clear()
        ok = self._write(self._store.flush)
        now = time.monotonic()
        if now - self._pruned_at >= _PRUNE_EVERY:
            self._pruned_at = now
            self._write(self._store.prune, self._max_rows, self._max_age)
        return ok

    def _check_file(self) -> None:
        """A state.db deleted or replaced under the agent would take the writes into a file
        nobody reads again: say so, once, in the log and in the status (nothing is killed
        for it; supervision goes on)."""
        if self.problem or self._inode is None:
            return
        try:
            st = os.stat(self.db)
            same = (st.st_dev, st.st_ino) == self._inode
        except OSError:
            same = False
        if not same:
            self.problem = (f"{self.db} was removed or replaced while the agent ran; it supervises on but "
                            f"records nothing more ('corral down' and 'up' start a new one)")
            log.error("corral: %s", self.problem)

    def _write(self, write: Callable[..., object], *args: object) -> bool:
        """A write to the store that must not stop the deployment: supervision and ``down``
        go on when the database is locked, corrupt or on a full disk (the failure is logged
        once; what could not be written is dropped)."""
        try:
            write(*args)
        except (sqlite3.Error, OSError) as e:
            if not self._write_failed:
                self._write_failed = True
                log.error("corral: cannot write %s (%s); supervising on without recording", self.db, e)
            return False
        return True

    def events(self, after: int = 0, limit: int = 10000) -> list[EventRow]:
        """Events with a sequence number above ``after``, oldest first (queued ones written first)."""
        if self._store is None:
            return []
        self.flush()
        try:
            return StateStore.read_events(self.db, after, limit)
        except CorralError:
            return []

    def transitions(self) -> list[Transition]:
        """Every instance transition recorded for this run, oldest first."""
        out: list[Transition] = []
        after = self._start_seq
        while page := self.events(after):
            after = page[-1].seq
            out.extend(Transition(e.instance, e.service, State(e.old), State(e.new), e.reason, e.at) for e in page
                       if e.deployment == self.name and e.instance and e.service and e.old and e.new)
        return out

    def close(self) -> None:
        """Writes what is queued (the store stays readable by everyone else)."""
        self.flush()
