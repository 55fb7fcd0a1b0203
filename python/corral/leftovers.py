"""What a dead agent left behind: instance processes recorded in the store whose pid still
runs with the same start time. Both a new ``up`` and ``down`` without an agent stop them,
by process group, through here.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from corral._core import (
    find_by_env,
    group_members,
    kill_pid,
    process_alive,
    process_start_time,
    signal_group,
)
from corral.state import DeploymentRow, StateStore
from corral.statedir import EXITS, PID_LOG, STACK, UNIT, stack_id

__all__ = ["EXITS", "PID_LOG", "live_agent", "logged_spawns", "marked_leaders", "recorded_exit", "reset_pid_log",
           "stop_leftovers", "sweep_stack"]



def recorded_exit(state_dir: Path, pid: int) -> int | None:
    """The exit status the keeper recorded for ``pid`` (negative: killed by that signal),
    the last one if several; None when it has not."""
    try:
        text = (state_dir / EXITS).read_text(errors="replace")
    except FileNotFoundError:
        return None
    found = None
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == str(pid):
            try:
                found = int(parts[1])
            except ValueError:
                continue
    return found


def reset_pid_log(state_dir: Path) -> None:
    """Empties the pid log (what it held is in the store now)."""
    with contextlib.suppress(FileNotFoundError):
        os.truncate(state_dir / PID_LOG, 0)


def _logged(state_dir: Path) -> list[tuple[int, int]]:
    """``(pid, start_time)`` of the pid log's lines."""
    return list(logged_spawns(state_dir).values())


def logged_spawns(state_dir: Path) -> dict[str, tuple[int, int]]:
    """Instance id -> ``(pid, start_time)`` of the pid log's lines (the last for an id):
    spawns the store may not have yet."""
    try:
        text = (state_dir / PID_LOG).read_text(errors="replace")
    except FileNotFoundError:
        return {}
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].isdigit() and parts[1].isdigit():
            out[parts[2]] = (int(parts[0]), int(parts[1]))
    return out


def sweep_stack(state_dir: Path, wait: float = 2.0) -> int:
    """SIGKILLs every process that inherited the stack's marker (``CORRAL_STACK``), wherever
    it went: the daemons that left their instance's process group or session. Waits (up to
    ``wait`` seconds) for them to be gone; returns how many there were."""
    found = find_by_env(f"{STACK}={stack_id(state_dir)}")
    for pid in found:
        kill_pid(pid, signal.SIGKILL)
    deadline = time.monotonic() + wait
    while any(process_alive(p) for p in found) and time.monotonic() < deadline:
        time.sleep(0.01)
    return len(found)


def marked_leaders(state_dir: Path) -> dict[str, tuple[int, int]]:
    """Instance id -> ``(pid, start_time)`` of the live process group leaders that carry
    this stack's marker: the instances that run now, whatever the store and the pid log
    say (an agent killed between a spawn and its record leaves one that only this finds)."""
    sid = stack_id(state_dir)
    prefix = f"{UNIT}={sid}/".encode()
    out = {}
    for pid in find_by_env(f"{STACK}={sid}"):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes()
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) != pid:  # not a group leader: a child of an instance
            continue
        unit = next((e[len(prefix):].decode(errors="replace") for e in env.split(b"\0") if e.startswith(prefix)), None)
        start = process_start_time(pid)
        if unit and start is not None:
            out[unit] = (pid, start)
    return out


def live_agent(db: Path, name: str | None = None) -> DeploymentRow | None:
    """The newest deployment (of ``name``, when given) whose recorded agent still runs."""
    if not db.exists():
        return None
    for row in reversed(StateStore.read_deployments(db)):
        if (name is None or row.name == name) and row.status not in ("down", "failed") and row.agent_running():
            return row
    return None


def stop_leftovers(db: Path, *, name: str | None = None, grace: float = 0.0, mark_down: str | None = None,
                   rules: dict[str, tuple[int, float, bool]] | None = None) -> int:
    """Stops every recorded instance process that still runs (of deployment ``name``, or of
    all), each by process group and all at once: its service's signal from ``rules``
    (``service -> (signal, timeout, main only)``, the spec's shutdown rule) or SIGTERM, then SIGKILL
    after its timeout (or ``grace`` seconds); ``grace`` 0 and no rules: SIGKILL at once.
    With ``mark_down``, deployments not already down or failed are recorded down with that
    message. Returns how many process groups were stopped."""
    rows = [d for d in StateStore.read_deployments(db) if name is None or d.name == name] if db.exists() else []
    # Process group leaders by pid: the start time that tells them from a recycled pid, and
    # the service whose shutdown rule applies.
    groups: dict[int, tuple[int, str | None]] = {}
    for d in rows:
        groups.update((r.pid, (r.pid_start, r.service)) for r in StateStore.read_instances(db, d.name)
                      if r.pid is not None and r.pid_start is not None and r.is_running())
    # Spawned but not yet in the store when the agent died: the pid log has them.
    for pid, start in _logged(db.parent):
        if pid not in groups and process_start_time(pid) == start:
            groups[pid] = (start, None)
    now = time.monotonic()
    deadlines: dict[int, float] = {}
    for pid, (_, service) in groups.items():
        sig, timeout, main = (rules or {}).get(service or "", (signal.SIGTERM, grace, False))
        if timeout > 0:
            if main:
                kill_pid(pid, sig)  # kill_mode: main: the leader stops its own children
            else:
                signal_group(pid, sig)
            deadlines[pid] = now + timeout
    while deadlines:
        now = time.monotonic()
        for pid in [p for p, t in deadlines.items() if process_start_time(p) != groups[p][0] or now >= t]:
            del deadlines[pid]
            signal_group(pid, signal.SIGKILL)
        time.sleep(0.02)
    for pid in groups:
        signal_group(pid, signal.SIGKILL)
    # Wait for them to be gone (a zombie holds no port), so a new up can bind their ports.
    deadline = time.monotonic() + 5.0
    while any(group_members(pid) for pid in groups) and time.monotonic() < deadline:
        time.sleep(0.01)
    sweep_stack(db.parent)
    if mark_down is not None:
        pending = [d for d in rows if d.status not in ("down", "failed")]
        if pending:
            store = StateStore(db)
            for d in pending:
                d.status, d.message = "down", mark_down
                store.put_deployment(d)
            store.close()
    reset_pid_log(db.parent)
    return len(groups)
