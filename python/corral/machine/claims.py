"""Claims and holders: what one stack reserves in the machine ledger, and who it is.

A holder is a stack: its id (the ``CORRAL_STACK`` marker its processes carry), its name and
directories, its user, and the liveness of the process that holds its deployment (the
agent; the Python process for the API) and of its keeper, each as pid plus start time,
never pid alone. A holder whose agent, keeper and instances are all gone loses its claims
at the next reservation anyone makes, and the reservation says so.

:class:`StackClaims` is what the scheduler of one stack is handed: a reservation
(:meth:`~StackClaims.reserving`) opens one ledger transaction, reaps the dead, hands the
other holders' claims to the stack's own native ledgers (its ``ResourceManager`` and
``PortAllocator``, where the fitting is done) and records each grant and port as the
scheduler makes it. :class:`LocalClaims` is the same interface with no machine behind it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from corral._core import Grant, PortAllocator, ResourceManager, find_by_env, process_alive, process_start_time
from corral.exceptions import CorralError, MachineError
from corral.machine.store import LedgerStore
from corral.statedir import STACK
from corral.units import format_mib

__all__ = ["Claims", "Holder", "HolderRow", "LocalClaims", "StackClaims", "holder_alive", "reap", "same_process"]

log = logging.getLogger("corral")


@dataclass(frozen=True)
class Holder:
    """Who reserves: one stack, and the processes whose life its claims follow."""

    stack: str
    name: str
    directory: Path
    """The spec's directory."""
    state_dir: Path
    uid: int
    user: str
    pid: int | None = None
    pid_start: int | None = None
    keeper_pid: int | None = None
    keeper_start: int | None = None

    @classmethod
    def of(cls, stack: str, name: str, directory: Path, state_dir: Path, *, keeper_pid: int | None = None) -> Holder:
        """This process, as the holder of stack ``stack`` (with ``keeper_pid``'s keeper)."""
        uid = os.geteuid()
        try:
            user = pwd.getpwuid(uid).pw_name
        except KeyError:
            user = str(uid)
        pid = os.getpid()
        return cls(stack, name, directory, state_dir, uid, user, pid, process_start_time(pid), keeper_pid,
                   process_start_time(keeper_pid) if keeper_pid else None)


@dataclass
class HolderRow:
    """A holder as the ledger has it."""

    stack: str
    name: str
    directory: str
    state_dir: str
    uid: int
    user: str
    pid: int | None
    pid_start: int | None
    keeper_pid: int | None
    keeper_start: int | None
    since: float
    updated: float

    def who(self) -> str:
        """``stack 'shop' (/srv/shop)``: how messages name it."""
        return f"stack {self.name!r} ({self.directory})"


def same_process(pid: int | None, start: int | None) -> bool:
    """Whether that process runs: the pid with that start time, and not a zombie."""
    return bool(pid) and bool(start) and process_start_time(pid or 0) == start and process_alive(pid or 0)


_seen_alive: dict[str, float] = {}
"""Holders found alive by their instances alone, and when: a scan of /proc is not repeated
at every reservation."""


def holder_alive(h: HolderRow) -> bool:
    """Whether anything of the holder runs: its agent or its keeper (pid and start time), or
    a process carrying its marker. Another user's processes cannot be looked into unless we
    are root: such a holder counts as alive (its own user, or root, reclaims it)."""
    if same_process(h.pid, h.pid_start) or same_process(h.keeper_pid, h.keeper_start):
        return True
    if h.uid != os.geteuid() and os.geteuid() != 0:
        return True
    seen = _seen_alive.get(h.stack)
    if seen is not None and time.monotonic() - seen < 5.0:
        return True
    if find_by_env(f"{STACK}={h.stack}"):
        _seen_alive[h.stack] = time.monotonic()
        return True
    _seen_alive.pop(h.stack, None)
    return False


_HOLDER_COLUMNS = ("stack, name, directory, state_dir, uid, user, pid, pid_start, keeper_pid, keeper_start, since, "
                   "updated")


def read_holders(db: sqlite3.Connection) -> list[HolderRow]:
    """Every holder in the ledger."""
    return [HolderRow(*r) for r in db.execute(f"SELECT {_HOLDER_COLUMNS} FROM holders ORDER BY since")]


def drop_stack(db: sqlite3.Connection, stack: str) -> None:
    """Deletes a holder and everything it claims."""
    for table in ("claims", "cpus", "ports", "holders", "totals"):
        db.execute(f"DELETE FROM {table} WHERE stack = ?", (stack,))


def reap(store: LedgerStore, db: sqlite3.Connection, me: str | None) -> list[HolderRow]:
    """Deletes the holders (other than ``me``) whose processes are all gone, with their
    claims; returns them."""
    gone = [h for h in read_holders(db) if h.stack != me and not holder_alive(h)]
    for h in gone:
        drop_stack(db, h.stack)
        store.unindex(h.stack)
    if gone:
        bump(db)
    return gone


def bump(db: sqlite3.Connection) -> int:
    """Counts a change to the ledger; returns the new generation."""
    row = db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
    gen = int(row[0]) + 1 if row else 1
    db.execute("INSERT OR REPLACE INTO meta VALUES ('generation', ?)", (str(gen),))
    return gen


def generation(db: sqlite3.Connection) -> int:
    """How many changes the ledger has seen."""
    row = db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
    return int(row[0]) if row else 0


@dataclass
class Others:
    """What the other holders have, as read in one transaction: totals only (what the
    native ledgers need); who holds how much is read when a refusal must say it."""

    holders: dict[str, HolderRow] = field(default_factory=dict)
    cpus: dict[int, tuple[str, str]] = field(default_factory=dict)
    """CPU -> (stack, instance)."""
    ports: list[int] = field(default_factory=list)
    """Ports they hold (who holds one is asked when it matters: see ``port_holder``)."""
    millicores: int = 0
    memory_mb: int = 0
    swap_mb: int = 0
    node_memory: dict[int, int] = field(default_factory=dict)
    storage: dict[str, int] = field(default_factory=dict)
    """Filesystem -> MiB."""

    @classmethod
    def read(cls, db: sqlite3.Connection, me: str) -> Others:
        """Every claim of every holder but ``me``, summed in one pass over the claims."""
        o = cls()
        o.holders = {h.stack: h for h in read_holders(db) if h.stack != me}
        for node, fs, mc, mem, swap, storage in db.execute(
                "SELECT node, filesystem, millicores, memory_mb, swap_mb, storage_mb FROM totals WHERE stack != ?",
                (me,)):
            o.millicores += mc
            o.memory_mb += mem
            o.swap_mb += swap
            if node >= 0:
                o.node_memory[node] = o.node_memory.get(node, 0) + mem
            if storage and fs:
                o.storage[fs] = o.storage.get(fs, 0) + storage
        o.cpus = {cpu: (stack, inst) for cpu, stack, inst in
                  db.execute("SELECT cpu, stack, instance FROM cpus WHERE stack != ?", (me,))}
        # One row, not one per port: a thousand claimed ports cost one string to split.
        (joined,) = db.execute("SELECT group_concat(port) FROM ports WHERE stack != ?", (me,)).fetchone()
        o.ports = list(map(int, joined.split(","))) if joined else []
        return o

    def push(self, resources: ResourceManager, ports: PortAllocator) -> None:
        """Hands it to one stack's native ledgers."""
        resources.set_elsewhere(cpus=list(self.cpus), millicores=self.millicores, memory_mb=self.memory_mb,
                                node_memory_mb=self.node_memory, swap_mb=self.swap_mb, storage_mb=self.storage)
        ports.set_claimed(self.ports)

    def name(self, stack: str) -> str:
        h = self.holders.get(stack)
        return h.who() if h is not None else f"stack {stack}"

    def explain(self, message: str, store: LedgerStore, me: str) -> str:
        """A shortage message from the core, with the holders elsewhere that it is about."""
        def top(column: str, fmt: Callable[[int], str]) -> str:
            most = store.read(f"SELECT sum({column}) AS n, stack FROM totals WHERE stack != ? GROUP BY stack "
                              f"HAVING n > 0 ORDER BY n DESC", (me,))
            parts = [f"{self.name(str(s))} holds {fmt(int(str(v)))}" for v, s in most[:3]]
            if len(most) > 3:
                parts.append(f"{len(most) - 3} more stacks hold the rest")
            return "; ".join(parts)

        said = ""
        if message.startswith("cpu:") and "exclusive cores" in message and self.cpus:
            held = sorted(self.cpus.items())
            said = "; ".join(f"core {cpu} is held by {self.name(s)} {inst}" for cpu, (s, inst) in held[:4])
            if len(held) > 4:
                said += f"; and {len(held) - 4} more cores by other stacks"
        elif message.startswith("cpu:"):
            said = top("millicores", lambda m: f"{m / 1000:g} cores of it")
        elif message.startswith("memory:"):
            said = top("memory_mb", format_mib)
        elif message.startswith("swap:"):
            said = top("swap_mb", format_mib)
        elif message.startswith("storage:"):
            said = top("storage_mb", format_mib)
        return f"{message} ({said})" if said else message


class Claims(Protocol):
    """What a scheduler asks of the machine it places on (see the module docs)."""

    def reserving(self, *, dry: bool = False) -> contextlib.AbstractContextManager[None]:
        """One reservation: everything placed inside it is claimed together (or, ``dry``,
        only tried); re-entrant."""

    def grant(self, instance: str, service: str, grant: Grant) -> None:
        """Claims what a grant holds for ``instance``."""

    def port(self, port: int, owner: str) -> None:
        """Claims ``port`` for ``owner`` (``api-0.http``, ``web.front``)."""

    def release_instance(self, instance: str) -> None:
        """Gives back an instance's claims (not its ports)."""

    def release_port(self, port: int) -> None:
        """Gives back a port."""

    def port_holder(self, port: int) -> str | None:
        """Who else on the machine holds ``port`` (None: nobody else)."""

    def explain(self, message: str) -> str:
        """A shortage message with the other holders it is about."""

    def reset(self) -> None:
        """Inside a reservation: this stack's earlier claims are void (a fresh up, an
        adoption that claims again what it takes over)."""

    def forget(self) -> None:
        """This stack holds nothing any more (down)."""


class LocalClaims:
    """No machine behind the ledgers: nothing is shared, nothing recorded."""

    @contextlib.contextmanager
    def reserving(self, *, dry: bool = False) -> Iterator[None]:
        yield

    def grant(self, instance: str, service: str, grant: Grant) -> None:
        pass

    def port(self, port: int, owner: str) -> None:
        pass

    def release_instance(self, instance: str) -> None:
        pass

    def release_port(self, port: int) -> None:
        pass

    def port_holder(self, port: int) -> str | None:
        return None

    def explain(self, message: str) -> str:
        return message

    def reset(self) -> None:
        pass

    def forget(self) -> None:
        pass


class StackClaims:
    """One stack's claims in the machine ledger, over its own native ledgers; see the
    module docs. ``on_reclaim`` hears of each dead holder a reservation reclaims."""

    def __init__(self, store: LedgerStore, holder: Holder, resources: ResourceManager, ports: PortAllocator,
                 on_reclaim: Callable[[str], None] | None = None) -> None:
        self.store = store
        self.holder = holder
        self.resources = resources
        self.ports = ports
        self.on_reclaim = on_reclaim or (lambda text: log.warning("corral: %s", text))
        self._others = Others()
        self._synced = -1
        """The ledger generation the native ledgers reflect (-1: none yet)."""
        self._dry = False
        self._indexed = False

    # --- reserving --------------------------------------------------------------------

    @contextlib.contextmanager
    def reserving(self, *, dry: bool = False) -> Iterator[None]:
        if self.store.in_transaction:
            yield
            return
        with self.store.transaction() as db:
            self._sync(db)  # what it reaps stays reaped, dry or not
            # A claim never lacks its holder (the holder of a claim is what reaping checks).
            if dry:
                db.execute("SAVEPOINT dry")
            else:
                self._record_holder(db)
            try:
                yield
            finally:
                if dry:
                    db.execute("ROLLBACK TO dry")
                    db.execute("RELEASE dry")
                else:
                    # The statements mirror the native ledgers one for one, so they are
                    # kept even when the placement failed (it gave back what it took).
                    self._synced = bump(db)

    def _sync(self, db: sqlite3.Connection) -> None:
        """Reaps the dead, then hands what the others hold to the native ledgers (unless
        nothing changed since they last got it)."""
        gone = reap(self.store, db, self.holder.stack)
        for h in gone:
            self.on_reclaim(f"machine ledger: reclaimed what {h.who()} held: its agent, keeper and instances are "
                            f"all gone")
        gen = generation(db)
        if gen == self._synced:
            return
        self._others = Others.read(db, self.holder.stack)
        try:
            self._others.push(self.resources, self.ports)
        except CorralError as e:
            raise MachineError(f"machine ledger {self.store.path} disagrees with this stack's own ledger ({e})") \
                from None
        self._synced = gen

    def _record_holder(self, db: sqlite3.Connection) -> None:
        h = self.holder
        now = time.time()
        db.execute(
            "INSERT INTO holders VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (stack) DO UPDATE SET "
            "name = excluded.name, directory = excluded.directory, state_dir = excluded.state_dir, "
            "uid = excluded.uid, user = excluded.user, pid = excluded.pid, pid_start = excluded.pid_start, "
            "keeper_pid = excluded.keeper_pid, keeper_start = excluded.keeper_start, updated = excluded.updated",
            (h.stack, h.name, str(h.directory), str(h.state_dir), h.uid, h.user, h.pid, h.pid_start, h.keeper_pid,
             h.keeper_start, now, now))
        if not self._indexed:
            self.store.index(h.stack, h.state_dir)
            self._indexed = True

    def _write(self, *statements: tuple[str, tuple[object, ...]]) -> None:
        """Statements of a reservation, or of a transaction of their own (a release), which
        counts as a change for the other holders."""
        standalone = not self.store.in_transaction
        with self.store.transaction() as db:
            try:
                for sql, args in statements:
                    db.execute(sql, args)
            except sqlite3.IntegrityError as e:
                raise MachineError(f"machine ledger {self.store.path}: {e} (held twice?)") from None
            if standalone:
                gen = bump(db)
                if self._synced == gen - 1:
                    self._synced = gen  # only our own rows changed

    def grant(self, instance: str, service: str, grant: Grant) -> None:
        st = self.holder.stack
        for cpu in grant.cpus:
            holder = self._others.cpus.get(cpu)
            if holder is not None:
                raise MachineError(f"CPU {cpu} is claimed by {self._others.name(holder[0])} {holder[1]} already")
        self._write(("INSERT OR REPLACE INTO claims VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     (st, instance, service, grant.millicores, grant.memory_mb, grant.numa_node,
                      int(grant.memory_pinned), grant.swap_mb, grant.storage_mb, grant.filesystem, grant.volume)),
                    *(("INSERT OR REPLACE INTO cpus VALUES (?, ?, ?)", (cpu, st, instance)) for cpu in grant.cpus))

    def port(self, port: int, owner: str) -> None:
        holder = self.port_holder(port)
        if holder is not None:
            raise MachineError(f"port {port} is claimed by {holder} already")
        self._write(("INSERT OR REPLACE INTO ports VALUES (?, ?, ?)", (port, self.holder.stack, owner)))

    # --- giving back --------------------------------------------------------------------

    def _release(self, *statements: tuple[str, tuple[object, ...]]) -> None:
        # Stopping never depends on the ledger being writable: a release that fails is said.
        try:
            self._write(*statements)
        except MachineError as e:
            log.warning("corral: %s", e)

    def release_instance(self, instance: str) -> None:
        key = (self.holder.stack, instance)
        self._release(("DELETE FROM claims WHERE stack = ? AND instance = ?", key),
                      ("DELETE FROM cpus WHERE stack = ? AND instance = ?", key))

    def release_port(self, port: int) -> None:
        self._release(("DELETE FROM ports WHERE stack = ? AND port = ?", (self.holder.stack, port)))

    def reset(self) -> None:
        self._write(*((f"DELETE FROM {table} WHERE stack = ?", (self.holder.stack,))
                      for table in ("claims", "cpus", "ports", "totals")))

    def forget(self) -> None:
        try:
            with self.store.transaction() as db:
                drop_stack(db, self.holder.stack)
                bump(db)
        except MachineError as e:
            log.warning("corral: %s", e)
        self.store.unindex(self.holder.stack)

    # --- asking -------------------------------------------------------------------------

    def port_holder(self, port: int) -> str | None:
        rows = self.store.read("SELECT stack, owner FROM ports WHERE port = ? AND stack != ?",
                               (port, self.holder.stack))
        if not rows:
            return None
        stack, owner = str(rows[0][0]), str(rows[0][1])
        return f"{self._others.name(stack)} {owner.split('.')[0]}"

    def explain(self, message: str) -> str:
        return self._others.explain(message, self.store, self.holder.stack)
