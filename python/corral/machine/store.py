"""The machine ledger's file: one SQLite database every stack on the machine reserves in.

A reservation is one transaction (``BEGIN IMMEDIATE``: one writer at a time, never a read
then a write): the holders that are gone lose their claims, the others' claims are read, the
new ones are placed (by the core, against what the others hold) and written, all before the
lock is let go. A CPU and a port are each a primary key, so the file itself refuses to hold
one twice. The file lives where processes do (``/run/corral`` for root, empty after a
reboot), so it is written without fsync: a crash of a process loses nothing committed, and
a crash of the machine loses the processes too. The boot id it was written under tells a
ledger that outlived a reboot (one in a directory that is not emptied), whose holders are
all gone.

Beside the database, ``stacks/<stack id>`` names each holder's state directory: a ledger
found corrupt is rebuilt from the live stacks' state directories when every one of them
can be read, and refused with a clear error otherwise.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from corral.exceptions import MachineError
from corral.machine.settings import trusted

__all__ = ["LEDGER_FILE", "STACKS_DIR", "LedgerStore", "Rebuilder", "boot_id"]

LEDGER_FILE = "ledger.db"
STACKS_DIR = "stacks"
SCHEMA_VERSION = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS holders (
    stack TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    directory TEXT NOT NULL,
    state_dir TEXT NOT NULL,
    uid INTEGER NOT NULL,
    user TEXT NOT NULL,
    pid INTEGER,
    pid_start INTEGER,
    keeper_pid INTEGER,
    keeper_start INTEGER,
    since REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS claims (
    stack TEXT NOT NULL,
    instance TEXT NOT NULL,
    service TEXT NOT NULL,
    millicores INTEGER NOT NULL DEFAULT 0,
    memory_mb INTEGER NOT NULL DEFAULT 0,
    node INTEGER,
    pinned INTEGER NOT NULL DEFAULT 0,
    swap_mb INTEGER NOT NULL DEFAULT 0,
    storage_mb INTEGER NOT NULL DEFAULT 0,
    filesystem TEXT,
    volume TEXT,
    PRIMARY KEY (stack, instance)
);
CREATE TABLE IF NOT EXISTS cpus (
    cpu INTEGER PRIMARY KEY,
    stack TEXT NOT NULL,
    instance TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS ports (
    port INTEGER PRIMARY KEY,
    stack TEXT NOT NULL,
    owner TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS cpus_by_stack ON cpus (stack, instance);
CREATE INDEX IF NOT EXISTS ports_by_stack ON ports (stack);
-- What each stack holds, summed by pinned node (-1: not pinned) and filesystem ('': none),
-- kept by the triggers below: a reservation reads a few of these rows, not every claim.
CREATE TABLE IF NOT EXISTS totals (
    stack TEXT NOT NULL,
    node INTEGER NOT NULL,
    filesystem TEXT NOT NULL,
    millicores INTEGER NOT NULL,
    memory_mb INTEGER NOT NULL,
    swap_mb INTEGER NOT NULL,
    storage_mb INTEGER NOT NULL,
    PRIMARY KEY (stack, node, filesystem)
);
CREATE TRIGGER IF NOT EXISTS claims_in AFTER INSERT ON claims BEGIN
    INSERT INTO totals VALUES (NEW.stack, CASE WHEN NEW.pinned AND NEW.node IS NOT NULL THEN NEW.node ELSE -1 END,
                               coalesce(NEW.filesystem, ''), NEW.millicores, NEW.memory_mb, NEW.swap_mb,
                               NEW.storage_mb)
    ON CONFLICT (stack, node, filesystem) DO UPDATE SET millicores = millicores + excluded.millicores,
        memory_mb = memory_mb + excluded.memory_mb, swap_mb = swap_mb + excluded.swap_mb,
        storage_mb = storage_mb + excluded.storage_mb;
END;
CREATE TRIGGER IF NOT EXISTS claims_out AFTER DELETE ON claims BEGIN
    UPDATE totals SET millicores = millicores - OLD.millicores, memory_mb = memory_mb - OLD.memory_mb,
        swap_mb = swap_mb - OLD.swap_mb, storage_mb = storage_mb - OLD.storage_mb
    WHERE stack = OLD.stack AND node = CASE WHEN OLD.pinned AND OLD.node IS NOT NULL THEN OLD.node ELSE -1 END
        AND filesystem = coalesce(OLD.filesystem, '');
END;
"""


def boot_id() -> str:
    """This boot's id (the kernel's), or "" where there is none."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


@dataclass(frozen=True)
class Rebuilder:
    """How a ledger SQLite cannot read is rebuilt (:mod:`corral.machine.rebuild` has one):
    ``unreadable`` names the indexed state directories that cannot be read here (the rebuild
    is unsafe while there is one), ``rebuild`` puts the live stacks' claims back into the new,
    empty ledger and says how many came back."""

    unreadable: Callable[[Path], list[str]]
    rebuild: Callable[[LedgerStore], int]


class LedgerStore:
    """The ledger database in ``directory`` (created owner-only; a shared directory, one
    its group may write, gives the file to the group too). A file SQLite cannot read is
    rebuilt by ``rebuilder``, and refused without one."""

    def __init__(self, directory: Path, rebuilder: Rebuilder | None = None) -> None:
        self.directory = directory
        self._rebuilder = rebuilder
        self.path = directory / LEDGER_FILE
        self._ensure_dir()
        self._depth = 0
        self.rebuilt: str | None = None
        """Set when a corrupt file was moved aside and the ledger rebuilt: what happened."""
        try:
            self._db = self._open()
        except sqlite3.DatabaseError as e:
            self._db = self._recover(str(e))

    # --- opening ----------------------------------------------------------------------

    def _ensure_dir(self) -> None:
        d = self.directory
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass
        except FileNotFoundError:
            os.makedirs(d.parent, 0o700, exist_ok=True)
            os.mkdir(d, 0o700)
        except OSError as e:
            raise MachineError(f"machine ledger directory {d}: cannot create it: {e.strerror}") from None
        st = trusted(d, "machine ledger directory", directory=True)
        self._mode = 0o660 if st.st_mode & stat.S_IWGRP else 0o600
        stacks = d / STACKS_DIR
        with contextlib.suppress(FileExistsError):
            os.mkdir(stacks, 0o770 if self._mode == 0o660 else 0o700)
        trusted(stacks, "machine ledger directory", directory=True)

    def _open(self) -> sqlite3.Connection:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, self._mode)
        except OSError as e:
            raise MachineError(f"machine ledger {self.path}: cannot open it: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise MachineError(f"machine ledger {self.path} is not a regular file; refusing to use it")
            if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != self._mode:
                os.fchmod(fd, self._mode)  # just what the directory shares, whatever the umask
        finally:
            os.close(fd)
        trusted(self.path, "machine ledger", directory=False)
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA busy_timeout = 30000")
            db.execute("PRAGMA synchronous = OFF")  # see the module docs
            db.execute("PRAGMA recursive_triggers = ON")  # INSERT OR REPLACE's delete counts in totals
            db.executescript(_SCHEMA)
            check = db.execute("PRAGMA quick_check").fetchone()
            if check is None or check[0] != "ok":
                raise sqlite3.DatabaseError(f"integrity check: {check[0] if check else 'no answer'}")
            self._check_meta(db)
        except BaseException:
            db.close()
            raise
        return db

    def _check_meta(self, db: sqlite3.Connection) -> None:
        db.execute("BEGIN IMMEDIATE")
        try:
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            version = meta.get("version")
            if version is not None and version != SCHEMA_VERSION:
                raise MachineError(f"machine ledger {self.path} is of version {version}, this corral writes "
                                   f"{SCHEMA_VERSION}; stop the stacks of the other corral first")
            boot = boot_id()
            if meta.get("boot") != boot:
                # Written under another boot: every holder it names is gone with it.
                for table in ("holders", "claims", "cpus", "ports", "totals"):
                    db.execute(f"DELETE FROM {table}")
                db.execute("INSERT OR REPLACE INTO meta VALUES ('boot', ?)", (boot,))
            db.execute("INSERT OR REPLACE INTO meta VALUES ('version', ?)", (SCHEMA_VERSION,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _recover(self, problem: str) -> sqlite3.Connection:
        """A file SQLite cannot read: moved aside, and the ledger rebuilt from the live
        stacks' state directories (by the rebuilder) when that is safe."""
        if self._rebuilder is None:
            raise MachineError(f"machine ledger {self.path} cannot be read ({problem}); move it away once its "
                               f"stacks are down")
        bad = self._rebuilder.unreadable(self.directory / STACKS_DIR)
        if bad:
            raise MachineError(f"machine ledger {self.path} cannot be read ({problem}), and it cannot be rebuilt "
                               f"safely: the state of {', '.join(bad)} cannot be read here; run corral as their "
                               f"owner or as root, or move the file away once those stacks are down")
        aside = self.path.with_name(f"{LEDGER_FILE}.corrupt-{int(time.time())}")
        try:
            os.replace(self.path, aside)
        except OSError as e:
            raise MachineError(f"machine ledger {self.path} cannot be read ({problem}) nor moved aside "
                               f"({e.strerror})") from None
        for suffix in ("-journal", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self.path}{suffix}")
        try:
            db = self._open()
        except sqlite3.DatabaseError as e:
            raise MachineError(f"machine ledger {self.path}: cannot create a new one: {e}") from None
        self._db = db
        stacks = self._rebuilder.rebuild(self)
        self.rebuilt = (f"machine ledger {self.path} could not be read ({problem}); moved to {aside.name} and "
                        f"rebuilt from the state of {stacks} live stacks")
        return db

    # --- transactions -----------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, committed whatever happens in it (re-entrant: a nested one
        joins the outer). Raises :class:`MachineError` when the file went bad under us."""
        db = self._db
        if self._depth:
            self._depth += 1
            try:
                yield db
            finally:
                self._depth -= 1
            return
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.DatabaseError as e:
            raise MachineError(f"machine ledger {self.path}: {e}") from None
        self._depth = 1
        try:
            yield db
        finally:
            self._depth = 0
            try:
                db.execute("COMMIT")
            except sqlite3.DatabaseError as e:
                with contextlib.suppress(sqlite3.DatabaseError):
                    db.execute("ROLLBACK")
                raise MachineError(f"machine ledger {self.path}: {e}") from None

    @property
    def in_transaction(self) -> bool:
        """Whether a transaction is open."""
        return self._depth > 0

    def read(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        """Rows of one query, outside any transaction of ours."""
        try:
            return self._db.execute(sql, args).fetchall()
        except sqlite3.DatabaseError as e:
            raise MachineError(f"machine ledger {self.path}: {e}") from None

    # --- the index of holders' state directories -----------------------------------------

    def index(self, stack: str, state_dir: Path) -> None:
        """Records where a holder's state lives (for a rebuild); once per holder."""
        path = self.directory / STACKS_DIR / stack
        if path.exists():
            return
        tmp = path.with_name(f".{stack}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, self._mode)
        try:
            os.fchmod(fd, self._mode)
            os.write(fd, str(state_dir).encode())
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def unindex(self, stack: str) -> None:
        """Forgets where a holder's state lives (it holds nothing now)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.directory / STACKS_DIR / stack)

    def close(self) -> None:
        """Closes the file."""
        with contextlib.suppress(sqlite3.Error):
            self._db.close()
