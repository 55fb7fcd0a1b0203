"""``up -d``: the agent as a daemon, forked from the CLI.

The agent is the CLI's own process, forked: everything is imported already, which saves a
second interpreter start-up on the way to the first process. Nothing has started a thread
yet (the native runtimes start in the child), so forking is safe. The child starts a new
session, sends its output to ``agent.log`` and runs the agent until ``down``; the parent
waits for the socket, then for ``up`` to finish, and reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import NoReturn

from corral.agent.client import AgentClient, socket_path
from corral.exceptions import AgentUnavailable, ConfigError, CorralError, SpecError
from corral.spec import DeploymentSpec
from corral.state import DeploymentStatus, secure_state_dir

__all__ = ["start_detached"]


def start_detached(spec: Path, parsed: DeploymentSpec, state_dir: Path, timeout: float) -> DeploymentStatus:
    """Forks the agent for ``parsed`` and returns once ``up`` succeeded (the agent goes on).
    Raises what ``up`` raised; :class:`AgentUnavailable` (with the end of ``agent.log``) when
    the agent died or did not start within ``timeout`` seconds."""
    secure_state_dir(state_dir)
    log = state_dir / "agent.log"
    sock = socket_path(state_dir)
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _become_agent(spec, parsed, state_dir, log)
    client = AgentClient(state_dir)
    deadline = time.monotonic() + timeout
    while not sock.exists():
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            # Exit 2 is the agent's word for a spec that cannot be deployed (it does not fit).
            cls = ConfigError if code == 2 else AgentUnavailable
            raise cls(f"the agent exited with status {code}:\n{_log_tail(log)}")
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            raise AgentUnavailable(f"the agent did not start within {timeout:g}s (log: {log})")
        time.sleep(0.002)
    try:
        st = client.wait_up(timeout)
    except AgentUnavailable:
        raise AgentUnavailable("the agent stopped answering:\n" + _log_tail(log)) from None
    st.agent_pid = pid
    return st


def _become_agent(spec: Path, parsed: DeploymentSpec, state_dir: Path, log: Path) -> NoReturn:
    """The forked child: a new session, output to the agent log, then the agent until down."""
    from corral.agent.server import run_agent
    from corral.engine import Deployment

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
        code = asyncio.run(run_agent(d))
    except SpecError as e:
        for one in e.all:
            print(f"error: {one}", file=sys.stderr)
        code = 2
    except CorralError as e:
        print(f"error: {e}", file=sys.stderr)
        code = e.exit_code
    except BaseException as e:  # the agent must never return into the CLI's code
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _log_tail(log: Path, n: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""
