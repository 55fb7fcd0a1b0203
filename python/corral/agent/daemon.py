"""``up -d``: the agent as a daemon, under a keeper, forked from the CLI.

The CLI forks the keeper's process, which starts a new session and forks the agent: the
agent is the CLI's own process twice forked, with everything imported already, which saves
an interpreter start-up on the way to the first process. Nothing has started a thread yet
(the native runtimes start in the agent), so forking is safe. The keeper's process then
execs ``python -m corral.agent.keeper`` (see :mod:`corral.agent.keeper`: a small process
that holds the instances' output, restarts the agent, reaps orphans); the agent, its child,
sends its output to ``agent.log`` and runs until ``down``. How ``up`` ended the agent writes
to a pipe the CLI reads (never a log file, which may hold an earlier run's words), so
``up -d`` reports what a foreground ``up`` reports, with the same exit code; when the
agent dies first, the keeper writes that line for it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from corral._core import keeper_listen
from corral.agent.fronthost import front_listen, release_fronts
from corral.agent.jsonlog import log_to
from corral.agent.keeper import CRASHED
from corral.agent.wire import from_wire, to_wire
from corral.exceptions import AgentUnavailable, CorralError, DeploymentError
from corral.spec import DeploymentSpec
from corral.state import DeploymentStatus, secure_state_dir
from corral.statedir import FRONTS_SOCKET, KEEPER_SOCKET
from corral.statesafe import drop_inherited_locks

__all__ = ["start_detached"]


def start_detached(spec: Path, parsed: DeploymentSpec, state_dir: Path, timeout: float) -> DeploymentStatus:
    """Forks the keeper and the agent for ``parsed`` and returns once ``up`` succeeded (both
    go on). The agent reports how ``up`` ended through a pipe: its error is raised here as
    the same class a foreground ``up`` raises (so both exit alike). When ``up`` does not
    finish within ``timeout`` seconds, the agent is stopped (it rolls back) and
    :class:`DeploymentError` is raised; when the agent dies without a word,
    :class:`AgentUnavailable`."""
    secure_state_dir(state_dir)
    # A keeper left from before (it gave up on its agent) holds the fronts: they close there.
    release_fronts(state_dir / FRONTS_SOCKET)
    log = state_dir / "agent.log"
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()  # not inherited by instances (O_CLOEXEC)
    keeper = os.fork()
    if keeper == 0:
        drop_inherited_locks()  # the lock stays with this up until it returns
        os.close(read_end)
        _become_keeper(spec, parsed, state_dir, log, write_end)
    os.close(write_end)
    agent: int | None = None
    try:
        pending = bytearray()
        report, timed_out = _read_report(read_end, timeout, pending)
        if report is not None and "agent_pid" in report and "ok" not in report:
            agent = int(report["agent_pid"])
            report, timed_out = _read_report(read_end, timeout, pending)
    finally:
        os.close(read_end)
    # The keeper's process is our child until it is reaped; it lives on as the keeper.
    if timed_out:
        # up is still running: stop it (SIGTERM makes the agent roll back) and say so.
        if agent is not None:
            os.kill(agent, signal.SIGTERM)
        raise DeploymentError(f"up did not finish within {timeout:g}s; the agent stopped everything it started")
    if report is None:
        raise AgentUnavailable(f"the agent and its keeper died before they could report (log: {log})")
    if not report.get("ok"):
        raise from_wire(report["error"])
    st = DeploymentStatus.from_dict(report["status"])
    st.agent_pid = agent if agent is not None else st.agent_pid
    return st


def _become_keeper(spec: Path, parsed: DeploymentSpec, state_dir: Path, log: Path, report_fd: int) -> NoReturn:
    """The keeper's process: a new session, the agent forked, then exec of the keeper."""
    try:
        os.setsid()
        # Listening before the agent exists: its first hand-over (and its fronts) need no wait.
        listen_fd = keeper_listen(state_dir / KEEPER_SOCKET)
        fronts = front_listen(state_dir / FRONTS_SOCKET)
        agent = os.fork()
        if agent == 0:
            os.close(listen_fd)
            fronts.close()
            _become_agent(spec, parsed, state_dir, log, report_fd)
        fd = os.open(state_dir / "keeper.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.set_inheritable(report_fd, True)
        os.set_inheritable(listen_fd, True)
        fronts.set_inheritable(True)
        os.execv(sys.executable, [sys.executable, "-m", "corral.agent.keeper", str(state_dir), str(agent),
                                  str(spec.resolve()), str(report_fd), str(listen_fd), str(fronts.fileno())])
    except BaseException as e:  # never return into the CLI's code
        with contextlib.suppress(OSError):
            os.write(report_fd, json.dumps({"ok": False, "error": to_wire(
                CorralError(f"cannot start the keeper: {type(e).__name__}: {e}"))}).encode() + b"\n")
    os._exit(1)


def _read_report(fd: int, timeout: float, pending: bytearray) -> tuple[dict[str, Any] | None, bool]:
    """The next JSON line from the agent (None at end of file), and whether ``timeout`` ran
    out first; ``pending`` keeps what was read past that line, for the next call."""
    deadline = time.monotonic() + timeout
    while b"\n" not in pending:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None, True
        chunk = os.read(fd, 65536)
        if not chunk:
            return None, False
        pending.extend(chunk)
    line, _, rest = bytes(pending).partition(b"\n")
    pending[:] = rest
    doc: dict[str, Any] = json.loads(line)
    return doc, False


def _become_agent(spec: Path, parsed: DeploymentSpec, state_dir: Path, log: Path, report_fd: int) -> NoReturn:
    """The agent, forked by the keeper's process: output to the agent log, then the agent
    until down; its pid, then how ``up`` ended, go to ``report_fd`` as JSON lines."""
    import asyncio  # here, not in the CLI that forks us: up -d itself never needs it

    from corral.agent.server import run_agent
    from corral.engine import Deployment

    def report(doc: dict[str, Any]) -> None:
        nonlocal report_fd
        if report_fd < 0:
            return
        with contextlib.suppress(OSError):
            os.write(report_fd, json.dumps(doc, default=str).encode() + b"\n")
        os.close(report_fd)
        report_fd = -1

    def failed(e: CorralError) -> None:
        report({"ok": False, "error": to_wire(e)})

    code = 1
    try:
        # First words: who the agent is (the CLI stops it by this pid if up takes too long).
        os.write(report_fd, json.dumps({"agent_pid": os.getpid()}).encode() + b"\n")
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        os.fchmod(fd, 0o600)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        os.close(null)
        log_to(log, parsed.logs.max_size, parsed.logs.keep)
        d = Deployment(parsed, file=spec, state_dir=state_dir, keeper=state_dir / KEEPER_SOCKET)
        code = asyncio.run(run_agent(d, on_up=lambda dep: report({"ok": True, "status": dep.status().to_dict()}),
                                     on_failed=failed))
    except CorralError as e:
        logging.getLogger("corral").error("%s", e, extra={"event": "agent"})
        failed(e)
        code = e.exit_code
    except BaseException as e:  # the agent must never return into the CLI's code
        logging.getLogger("corral").exception("the agent failed: %s: %s", type(e).__name__, e,
                                              extra={"event": "agent"})
        failed(CorralError(f"the agent failed: {type(e).__name__}: {e}"))
        code = CRASHED  # the keeper restarts it
    finally:
        from corral.engine.tracing import finish

        finish()  # the last spans (the down's) out before os._exit, which waits for no thread
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
