"""Helpers for the end-to-end tests: real processes, real sockets, cleanup by process group."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from corral import Deployment
from corral._core import group_alive, signal_group

SERVER = Path(__file__).parent / "fixtures" / "services" / "server.py"
PY = sys.executable


def write_spec(dir: Path, text: str) -> Path:
    """Writes ``corral.yaml`` (``{py}`` and ``{server}`` filled in) and returns its path."""
    p = dir / "corral.yaml"
    p.write_text(textwrap.dedent(text).replace("{py}", PY).replace("{server}", str(SERVER)))
    return p


@contextlib.asynccontextmanager
async def running(spec: Path) -> AsyncIterator[Deployment]:
    """A deployment of ``spec``, brought up; on the way out ``down``, then SIGKILL to every
    process group it had recorded (whatever the test left)."""
    d = Deployment.from_file(spec)
    try:
        await d.up()
        yield d
    finally:
        pids = [i.pid for insts in d.status().services.values() for i in insts if i.pid]
        await d.down()
        kill_groups([p for p in pids if p])


def cpus_allowed(pid: int) -> list[int]:
    """What the kernel says about a process's CPU affinity."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            out: list[int] = []
            for part in line.split(":")[1].strip().split(","):
                lo, _, hi = part.partition("-")
                out.extend(range(int(lo), int(hi or lo) + 1))
            return out
    raise AssertionError(f"no Cpus_allowed_list for {pid}")


def alive(pid: int) -> bool:
    """A live, non-zombie process."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def kill_groups(pids: list[int]) -> None:
    """Test cleanup: SIGKILL the process groups of ``pids`` (never by name)."""
    for pid in pids:
        if pid and group_alive(pid):
            signal_group(pid, signal.SIGKILL)


def wait_until(pred: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    """Polls ``pred`` (synchronously)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


async def await_until(pred: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    """Polls ``pred`` without blocking the event loop."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def read_json(path: Path, timeout: float = 10.0) -> Any:
    """Waits for a JSON file a service writes at start."""
    wait_until(path.exists, timeout, f"{path}")
    return json.loads(path.read_text())


def listening(port: int) -> bool:
    """Whether something accepts TCP on 127.0.0.1:port."""
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def env_without_state() -> dict[str, str]:
    """The environment for CLI subprocesses, without an inherited CORRAL_STATE_DIR."""
    env = dict(os.environ)
    env.pop("CORRAL_STATE_DIR", None)
    return env


def owner_only(state: Path) -> list[str]:
    """Asserts that everything under ``state`` is owner-only (no group or other bits);
    returns the paths seen, relative to it."""
    import stat

    seen = []
    for root, dirs, files in os.walk(state):
        for name in [*dirs, *files]:
            p = Path(root) / name
            mode = stat.S_IMODE(p.lstat().st_mode)
            seen.append(p.relative_to(state).as_posix())
            assert mode & 0o077 == 0, f"{p} is {mode:o}"
    return seen
