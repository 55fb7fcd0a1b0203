"""Rebuilding a machine ledger that could not be read, from the live stacks' own state.

Each holder left its state directory's path in the ledger's ``stacks/`` index. A stack
whose agent, keeper or instances still run gets its claims back as its ``state.db`` has
them: each recorded instance's exclusive CPUs, shared CPU, memory and ports, its storage
from the running spec, and its fronts' ports. That is safe only when every indexed stack can
be read here; otherwise the ledger is refused (see :mod:`corral.machine.store`).
"""

from __future__ import annotations

import contextlib
import math
import os
import pwd
import time
from pathlib import Path
from typing import TYPE_CHECKING

from corral._core import filesystem_id, find_by_env
from corral.exceptions import CorralError
from corral.state import StateStore
from corral.statedir import KEEPER_FILE, STACK, STATE_DB
from corral.volumes import space_of

if TYPE_CHECKING:
    from corral.machine.store import LedgerStore

__all__ = ["rebuild_claims", "unreadable_stacks"]


def _indexed(stacks: Path) -> dict[str, Path]:
    out = {}
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(stacks):
            if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                continue
            with contextlib.suppress(OSError):
                out[entry.name] = Path(Path(entry.path).read_text().strip())
    return out


def unreadable_stacks(stacks: Path) -> list[str]:
    """The indexed state directories whose ``state.db`` exists but cannot be read here."""
    bad = []
    for sd in _indexed(stacks).values():
        db = sd / STATE_DB
        if db.exists() and not os.access(db, os.R_OK):
            bad.append(str(sd))
    return bad


def rebuild_claims(store: LedgerStore) -> int:
    """Claims of every live indexed stack back into the (new, empty) ledger; returns how
    many stacks came back. Those found dead are dropped from the index."""
    from corral.spec import parse_spec

    count = 0
    for stack, sd in _indexed(store.directory / "stacks").items():
        db = sd / STATE_DB
        rows = StateStore.read_deployments(db) if db.exists() else []
        row = rows[-1] if rows else None
        instances = StateStore.read_instances(db, row.name) if row is not None else []
        running = [r for r in instances if r.is_running()]
        if row is None or (not row.agent_running() and not running and not find_by_env(f"{STACK}={stack}")):
            store.unindex(stack)
            continue
        spec = None
        with contextlib.suppress(CorralError):
            text = StateStore.running_spec(db, row)
            spec = parse_spec(text.text, row.spec) if text is not None and text.text else None
        keeper_pid, keeper_start = _keeper(sd)
        uid = os.stat(sd).st_uid
        try:
            user = pwd.getpwuid(uid).pw_name
        except KeyError:
            user = str(uid)
        now = time.time()
        with store.transaction() as tx:
            tx.execute("INSERT OR REPLACE INTO holders VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (stack, row.name, str(Path(row.spec).resolve().parent), str(sd), uid, user, row.agent_pid,
                        row.agent_start, keeper_pid, keeper_start, row.started_at, now))
            for r in instances:
                if not (r.is_alive_state() or r.state == "stopped"):
                    continue
                svc = spec.services.get(r.service) if spec is not None else None
                storage = svc.resources.storage if svc is not None else None
                fs = None
                if storage is not None:
                    with contextlib.suppress(OSError):
                        where = space_of(storage.enforce, (Path(row.spec).resolve().parent / storage.path).resolve(),
                                         sd)
                        fs = filesystem_id(where if where.exists() else where.parent)
                tx.execute("INSERT OR REPLACE INTO claims VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           (stack, r.id, r.service, r.millicores, r.memory_mb, r.numa_node, 0,
                            math.ceil((svc.resources.swap or 0) / (1 << 20)) if svc is not None else 0,
                            math.ceil(storage.size / (1 << 20)) if storage is not None and fs else 0, fs,
                            None))
                if r.exclusive:
                    for cpu in r.cpus:
                        tx.execute("INSERT OR IGNORE INTO cpus VALUES (?, ?, ?)", (cpu, stack, r.id))
                for name, port in r.ports.items():
                    tx.execute("INSERT OR IGNORE INTO ports VALUES (?, ?, ?)", (port, stack, f"{r.id}.{name}"))
            for name, svc in (spec.services.items() if spec is not None else ()):
                if svc.expose is not None:
                    tx.execute("INSERT OR IGNORE INTO ports VALUES (?, ?, ?)", (svc.expose, stack, f"{name}.front"))
        count += 1
    return count


def _keeper(state_dir: Path) -> tuple[int | None, int | None]:
    import json

    try:
        doc = json.loads((state_dir / KEEPER_FILE).read_text())
        return int(doc["pid"]), int(doc["start"])
    except (OSError, ValueError, KeyError, TypeError):
        return None, None
