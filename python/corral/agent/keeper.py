"""The keeper: the small process ``up -d`` leaves beside the agent, so that the stack never
depends on the agent being alive.

- It holds every instance's output pipe and writes the logs (:class:`corral._core.LogKeeper`):
  an agent killed with ``-9`` costs no line and no ``SIGPIPE``.
- It is the agent's parent and restarts it when it dies (``corral agent --adopt``: the new
  agent re-adopts the running instances), at once and then with a growing pause, at most
  :data:`MAX_RESTARTS` times in :data:`WINDOW` seconds; past that it records why in
  ``keeper.json`` (``corral status`` says so) and keeps holding the logs.
- It is a child subreaper: instances whose agent died, and daemons that left their
  instance, are re-parented to it; it reaps them and writes each exit status to the
  ``exits`` file, where the next agent reads what became of an instance it did not start.
- It ends once the agent exits cleanly (``down``) and the last pipe has closed.
- Only the live keeper's record stays in ``keeper.json``: one that was stopped while a new
  ``up -d`` replaced it finds the new one's record there when it resumes, writes nothing,
  restarts no agent and ends (``keeper.lock`` makes the read-then-write one step).
- ``SIGUSR1`` is ``corral down`` arriving: from then on it restarts no agent (one it was
  about to start is not started), records ``"down": true`` in ``keeper.json`` (the answer
  ``down`` waits for, with the pid of any agent it did start), and ends once the agent is
  gone and the pipes closed. ``SIGUSR2`` takes that back (a ``down`` that left the stack
  alone, its agent alive but not answering).

- It holds the stack's fronts (:mod:`corral.agent.fronthost`): their listening sockets and
  relays outlive the agent, which configures them through ``fronts.sock``.

Run as ``python -m corral.agent.keeper STATE_DIR AGENT_PID SPEC [REPORT_FD [LISTEN_FD [FRONTS_FD]]]``;
it imports the native core, the names of the state directory's files, the front host, the
audit trail and the standard library, nothing of the engine, to stay small.
"""

from __future__ import annotations

import collections
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from corral._core import LogKeeper, become_subreaper, process_start_time
from corral.agent.fronthost import FrontHost, front_listen
from corral.statedir import EXITS, FRONTS_SOCKET, KEEPER_FILE, KEEPER_LOCK, KEEPER_SOCKET

__all__ = ["CRASHED", "MAX_RESTARTS", "WINDOW", "main", "read_keeper", "restartable"]

MAX_RESTARTS = 5
"""Agent restarts allowed within :data:`WINDOW` seconds before the keeper gives up."""
WINDOW = 60.0
_PAUSES = (0.0, 0.1, 0.2, 0.4, 0.8)
"""Before each restart in a row: the first at once, none past the one-second target."""


def read_keeper(state_dir: Path) -> dict[str, object] | None:
    """What the keeper of a state directory last recorded (``pid``, ``start``, ``agent``,
    ``reason``), or None."""
    try:
        doc = json.loads((state_dir / KEEPER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _write(state_dir: Path, doc: dict[str, object]) -> None:
    tmp = state_dir / (KEEPER_FILE + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, state_dir / KEEPER_FILE)


def _append(path: Path, line: str) -> None:
    """Appends ``line`` to an owner-only file (whatever the umask; never through a link)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
        os.write(fd, line.encode())
    finally:
        os.close(fd)


class Keeper:
    """One keeper's state; see the module docs."""

    def __init__(self, state_dir: Path, agent: int, spec: Path, report_fd: int | None,
                 listen_fd: int | None = None, fronts_fd: int | None = None) -> None:
        self.state_dir = state_dir
        self.agent: int | None = agent
        self.spec = spec
        self.report_fd = report_fd
        self.restarts: collections.deque[float] = collections.deque()
        self.clean_exit_at: float | None = None
        self.stopping = False
        """Set by SIGUSR1 (``down`` under way): no agent is restarted."""
        self.doc: dict[str, object] = {"pid": os.getpid(), "start": process_start_time(os.getpid()),
                                       "agent": "running", "agent_pid": agent, "reason": ""}
        become_subreaper()
        # Before keeper.json names us: a down that reads it may signal at once.
        for sig in (signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, self.on_signal)
        # Bound before the first agent was forked (it may be handing over pipes already).
        self.logs = LogKeeper(fd=listen_fd) if listen_fd is not None else LogKeeper(state_dir / KEEPER_SOCKET)
        self.fronts = FrontHost(socket.socket(fileno=fronts_fd) if fronts_fd is not None
                                else front_listen(state_dir / FRONTS_SOCKET))
        self.superseded = False
        """Set when another live keeper's record is in keeper.json: it took over this stack."""
        self._record(take_over=True)

    def _record(self, *, take_over: bool = False) -> None:
        """Writes ``keeper.json``, under ``keeper.lock``: a new keeper takes the record over,
        and a keeper that finds another live one's record there (it was stopped while a
        new ``up -d`` replaced it) writes nothing and stands down (see :meth:`run`)."""
        import fcntl

        fd = os.open(self.state_dir / KEEPER_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            cur = read_keeper(self.state_dir)
            pid, start = (cur.get("pid"), cur.get("start")) if cur else (None, None)
            if (not take_over and isinstance(pid, int) and pid != self.doc["pid"]
                    and process_start_time(pid) == start):
                self.superseded = True
                return
            _write(self.state_dir, self.doc)
        finally:
            os.close(fd)

    def on_signal(self, signum: int, _frame: object = None) -> None:
        """SIGUSR1: ``down`` is under way; SIGUSR2: it is not after all (see the module docs)."""
        self.stopping = signum == signal.SIGUSR1

    def run(self) -> int:
        """Until the agent has exited cleanly and the last pipe closed."""
        pidfd = os.pidfd_open(self.agent) if self.agent else None
        while True:
            try:
                ready = select.select([pidfd] if pidfd is not None else [], [], [], 0.05)[0]
            except InterruptedError:
                ready = []
            self._reap()
            if ready and pidfd is not None:
                os.close(pidfd)
                pidfd = None
            if bool(self.doc.get("down")) != self.stopping:
                self.doc["down"] = self.stopping
                self._record()
            if self.superseded:
                self.stopping = True  # another keeper holds this stack: restart nothing, end
            if self.stopping and self.agent is None and self.clean_exit_at is None:
                self.clean_exit_at = time.monotonic()  # no agent will come: end once the pipes close
            if self.agent is None and pidfd is None and self.clean_exit_at is None and self.doc["agent"] == "running":
                pidfd = self._restart()
            if self._done():
                self.fronts.close()
                return 0

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            if pid == self.agent:
                self._agent_exited(code)
            else:
                # An instance of a dead agent, or a daemon that left its instance.
                _append(self.state_dir / EXITS, f"{pid} {code}\n")

    def _agent_exited(self, code: int) -> None:
        self.agent = None
        if self.report_fd is not None:
            # The first agent died before it could say how up ended: say it for it (if it
            # did report, the CLI has read that line already and reads no more).
            line = {"ok": False, "error": {"type": "AgentUnavailable", "args": [
                f"the agent died before it could report (exit status {code}); the keeper starts a new "
                f"one, which re-adopts what runs ('corral status' to look)"]}}
            try:
                os.write(self.report_fd, json.dumps(line).encode() + b"\n")
            except OSError:
                pass
            os.close(self.report_fd)
            self.report_fd = None
        if not restartable(code) or self.stopping:
            # It ended on purpose: down (0), an up that failed and rolled back (1), a refused
            # spec (2). Nothing to take over.
            self.clean_exit_at = time.monotonic()
            self.doc.update(agent="down", reason="stopped by 'corral down'" if code == 0 or self.stopping else
                            f"the agent ended with status {code}")
            self._record()
            return
        now = time.monotonic()
        while self.restarts and now - self.restarts[0] > WINDOW:
            self.restarts.popleft()
        if len(self.restarts) >= MAX_RESTARTS:
            self.doc.update(agent="down", agent_pid=None,
                            reason=f"the agent died {len(self.restarts) + 1} times within {WINDOW:g}s (last: exit "
                                   f"status {code}); the instances run unsupervised; 'corral up -d' starts a new "
                                   f"agent, 'corral down' stops them")
            self._record()
            _audit(self.state_dir, {"exit_status": code}, "failed", str(self.doc["reason"]))
        else:
            self.doc.update(reason=f"the agent died (exit status {code}); restarted")

    def _restart(self) -> int | None:
        time.sleep(_PAUSES[min(len(self.restarts), len(_PAUSES) - 1)])
        self._record()  # and learns whether another keeper took this stack over meanwhile
        if self.stopping or self.superseded:
            return None  # down arrived during the pause, or this keeper stands down: no agent now
        self.restarts.append(time.monotonic())
        log = os.open(self.state_dir / "agent.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        try:
            proc = subprocess.Popen([sys.executable, "-m", "corral", "agent", "--adopt", "--state-dir",
                                     str(self.state_dir), str(self.spec)],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True)
        finally:
            os.close(log)
        self.agent = proc.pid
        # The Popen object must not reap it behind our waitpid(-1): forget it.
        proc.returncode = 0
        self.doc.update(agent="running", agent_pid=proc.pid)
        self._record()
        _audit(self.state_dir, {"agent_pid": proc.pid}, "ok", str(self.doc.get("reason", "")))
        return os.pidfd_open(proc.pid)

    def _done(self) -> bool:
        if self.agent is not None:
            return False
        if self.doc["agent"] == "down" and self.clean_exit_at is None:
            # Given up: hold the logs while instances run.
            return self.logs.active == 0 and not _has_children()
        if self.clean_exit_at is None:
            return False
        # After down: until the last pipe closed (a writer that escaped gets 5 s).
        return self.logs.active == 0 or time.monotonic() - self.clean_exit_at > 5.0


CRASHED = 70
"""The agent's exit status when it failed unexpectedly (EX_SOFTWARE): restarted, as a signal is."""


def restartable(code: int) -> bool:
    """Whether an agent that ended with ``code`` died rather than stopped: killed by a signal
    (negative) or :data:`CRASHED`."""
    return code < 0 or code == CRASHED


def _audit(state_dir: Path, args: dict[str, object], outcome: str, reason: str) -> None:
    """The keeper's own line in the audit trail: it restarted the agent, or gave up."""
    from corral.access import Caller
    from corral.audit import AuditTrail

    # By the settings the agent saved from the spec (rotation, the syslog forward).
    AuditTrail.of(state_dir).record(Caller.this_process(), "agent-restart", args, outcome, reason)


def _has_children() -> bool:
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True


def main(argv: list[str]) -> int:
    """``STATE_DIR AGENT_PID SPEC [REPORT_FD [LISTEN_FD [FRONTS_FD]]]``."""
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C at the terminal of `up -d` is not for it
    state_dir, agent, spec = Path(argv[0]), int(argv[1]), Path(argv[2])
    report = int(argv[3]) if len(argv) > 3 else None
    listen = int(argv[4]) if len(argv) > 4 else None
    fronts = int(argv[5]) if len(argv) > 5 else None
    return Keeper(state_dir, agent, spec, report, listen, fronts).run()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
