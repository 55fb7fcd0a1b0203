"""``up -d``: the agent as a daemon, forked from the CLI.

The agent is the CLI's own process, forked: everything is imported already, which saves a
second interpreter start-up on the way to the first process. Nothing has started a thread
yet (the native runtimes start in the child), so forking is safe. The child starts a new
session, sends its output to ``agent.log`` and runs the agent until ``down``; how ``up``
ended it writes to a pipe the parent reads (never a log file, which may hold an earlier
run's words), so ``up -d`` reports what a foreground ``up`` reports, with the same exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from corral.agent.wire import from_wire, to_wire
from corral.exceptions import AgentUnavailable, CorralError, DeploymentError
from corral.spec import DeploymentSpec
from corral.state import DeploymentStatus, secure_state_dir

__all__ = ["start_detached"]


def start_detached(spec: Path, parsed: DeploymentSpec, state_dir: Path, timeout: float) -> DeploymentStatus:
    """Forks the agent for ``parsed`` and returns once ``up`` succeeded (the agent goes on).
    The agent reports how ``up`` ended through a pipe: its error is raised here as the same
    class a foreground ``up`` raises (so both exit alike). When ``up`` does not finish
    within ``timeout`` seconds, the agent is stopped (it rolls back) and
    :class:`DeploymentError` is raised; when the agent dies without a word,
    :class:`AgentUnavailable`."""
    secure_state_dir(state_dir)
    log = state_dir / "agent.log"
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()  # not inherited by instances (O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        _become_agent(spec, parsed, state_dir, log, write_end)
    os.close(write_end)
    try:
        report, timed_out = _read_report(read_end, timeout)
    finally:
        os.close(read_end)
    if timed_out:
        # up is still running: stop it (SIGTERM makes the agent roll back) and say so.
        os.kill(pid, signal.SIGTERM)
        if _wait(pid, 60.0) is None:
            os.kill(pid, signal.SIGKILL)
        raise DeploymentError(f"up did not finish within {timeout:g}s; the agent stopped everything it started")
    if report is None:
        # The pipe closed without a word: the agent died (it may take a moment to be reaped).
        raise AgentUnavailable(f"the agent died before it could report (exit status {_wait(pid, 5.0)}; "
                               f"log: {log})")
    if not report.get("ok"):
        raise from_wire(report["error"])
    st = DeploymentStatus.from_dict(report["status"])
    st.agent_pid = pid
    return st


def _read_report(fd: int, timeout: float) -> tuple[dict[str, Any] | None, bool]:
    """The agent's one JSON line (None at end of file), and whether ``timeout`` ran out first."""
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None, True
        chunk = os.read(fd, 65536)
        if not chunk:
            return None, False
        data += chunk
    doc: dict[str, Any] = json.loads(data.split(b"\n", 1)[0])
    return doc, False


def _exited(pid: int) -> int | None:
    done, status = os.waitpid(pid, os.WNOHANG)
    return os.waitstatus_to_exitcode(status) if done else None


def _wait(pid: int, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = _exited(pid)
        if code is not None:
            return code
        time.sleep(0.01)
    return None


def _become_agent(spec: Path, parsed: DeploymentSpec, state_dir: Path, log: Path, report_fd: int) -> NoReturn:
    """The forked child: a new session, output to the agent log, then the agent until down;
    how ``up`` ended goes to ``report_fd`` as one JSON line."""
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
        os.setsid()
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        os.fchmod(fd, 0o600)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        os.close(null)
        d = Deployment(parsed, file=spec, state_dir=state_dir)
        code = asyncio.run(run_agent(d, on_up=lambda dep: report({"ok": True, "status": dep.status().to_dict()}),
                                     on_failed=failed))
    except CorralError as e:
        print(f"error: {e}", file=sys.stderr)
        failed(e)
        code = e.exit_code
    except BaseException as e:  # the agent must never return into the CLI's code
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        failed(CorralError(f"the agent failed: {type(e).__name__}: {e}"))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
