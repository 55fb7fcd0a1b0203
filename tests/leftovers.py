"""The suite leaves nothing behind (a pytest plugin, loaded by conftest.py).

Every process a test starts carries a marker in its environment: ``CORRAL_TEST_RUN`` is set
to a token of this run before the first test, and everything inherits it (the CLI, agents,
keepers, instances and what they start, whatever session or group they move to). After
each test's teardown, any live process that carries the token fails that test, named with
its command line, and is then killed by pid; the run's summary lists them again and the
run fails. `.ci/run` checks the same after the whole suite (any token).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Generator
from pathlib import Path

import pytest

from corral._core import find_by_env, process_alive

MARK = "CORRAL_TEST_RUN"
GRACE = 3.0
"""Seconds a test's processes get to end after its teardown (a down that just returned may
leave a process a moment from its exit; a zombie counts as gone)."""

_token = f"{os.getpid()}-{time.time_ns()}"
_leaked: list[str] = []


def marked() -> list[int]:
    """Live processes carrying this run's marker (this process excepted)."""
    return [p for p in find_by_env(f"{MARK}={_token}") if p != os.getpid() and process_alive(p)]


def describe(pid: int) -> str:
    """``pid 123 (parent 45): sleep 300``."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        ppid = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
    except (OSError, IndexError):
        cmd, ppid = "?", "?"
    return f"pid {pid} (parent {ppid}): {cmd}"


def pytest_configure(config: pytest.Config) -> None:
    # A fresh token even when an outer run set one (a pytester run inside the suite).
    os.environ[MARK] = _token


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    yield
    deadline = time.monotonic() + GRACE
    left = marked()
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = marked()
    if not left:
        return
    named = [describe(p) for p in left]
    for p in left:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _leaked.extend(f"{item.nodeid}: {n}" for n in named)
    pytest.fail(f"{item.nodeid} left {len(named)} process(es) running (killed now):\n  " + "\n  ".join(named),
                pytrace=False)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    late = marked()
    for p in late:
        _leaked.append(f"(after the last test) {describe(p)}")
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if _leaked and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _leaked:
        terminalreporter.section("processes left behind")
        for line in _leaked:
            terminalreporter.write_line(line)
