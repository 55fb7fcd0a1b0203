"""Terminal escapes a service prints never act on the terminal: `corral logs` to a terminal
(read through a pseudo-terminal) and `corral top`'s log show them as visible escapes; to a
pipe `logs` keeps the bytes, unless `--escape`. A real service, a real agent."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from textual.widgets import Log

from corral.agent.client import AgentClient
from corral.top import TopApp
from tests.e2e import env_without_state, wait_until, write_spec
from tests.test_cli import corral

# OSC (window title), CSI (clear screen), SGR (red), CR, BS, and the C1 CSI (U+009B).
HOSTILE = "A\\033]0;pwned\\007B\\033[2JC\\033[31mRED\\r\\010\\302\\23331m"
RAW = "A\x1b]0;pwned\x07B\x1b[2JC\x1b[31mRED\r\x08\x9b31m"
SHOWN = "A\\x1b]0;pwned\\x07B\\x1b[2JC\\x1b[31mRED\\x0d\\x08\\x9b31m"


@pytest.fixture
def hostile(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "loud.sh").write_text(f"while :; do printf '{HOSTILE}\\n'; sleep 0.2; done\n")
    write_spec(tmp_path, """
        name: hostile
        services:
          loud:
            command: ["sh", "loud.sh"]
        """)
    r = corral("up", "-d", cwd=tmp_path)
    log = tmp_path / ".corral" / "logs" / "loud-0.log"
    try:
        assert r.returncode == 0, r
        wait_until(lambda: log.exists() and RAW.encode() in log.read_bytes(), 15, "the hostile line")
        yield tmp_path
    finally:
        corral("down", cwd=tmp_path)


def logs_on_a_terminal(cwd: Path, *args: str) -> bytes:
    """`corral logs loud` with its stdout a pseudo-terminal: every byte the terminal got."""
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "corral", "logs", "loud", "-n", "3", *args], cwd=cwd,
                         stdout=slave, stderr=subprocess.PIPE, env=env_without_state())
    os.close(slave)
    got = b""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the other end closed
                break
            if not chunk:
                break
            got += chunk
        elif p.poll() is not None:
            break
    p.wait(timeout=10)
    os.close(master)
    assert p.returncode == 0, p.stderr.read() if p.stderr else ""
    return got


def test_logs_to_a_terminal_show_escapes_instead_of_acting(hostile: Path) -> None:
    screen = logs_on_a_terminal(hostile)
    for seq in (b"\x1b", b"\x07", b"\x08", b"\xc2\x9b", b"\x9b"):
        assert seq not in screen, (seq, screen[:300])
    assert SHOWN.encode() in screen, screen[:300]
    # --raw: what the service wrote, on purpose.
    assert RAW.encode() in logs_on_a_terminal(hostile, "--raw").replace(b"\r\n", b"\n")


def test_logs_to_a_pipe_keep_the_bytes_unless_asked(hostile: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "corral", "logs", "loud", "-n", "2"], cwd=hostile,
                       capture_output=True, env=env_without_state(), timeout=30)
    assert r.returncode == 0 and RAW.encode() in r.stdout, r
    r = subprocess.run([sys.executable, "-m", "corral", "logs", "loud", "-n", "2", "--escape"], cwd=hostile,
                       capture_output=True, env=env_without_state(), timeout=30)
    assert r.returncode == 0 and SHOWN.encode() in r.stdout and b"\x1b" not in r.stdout, r
    r = corral("logs", "loud", "--raw", "--escape", cwd=hostile)
    assert r.returncode == 2 and "contradict" in r.stderr


@pytest.mark.timeout(120)
async def test_top_shows_escapes_in_its_log(hostile: Path) -> None:
    app = TopApp(AgentClient(hostile / ".corral"), refresh=0.3)
    async with app.run_test(size=(180, 50)) as pilot:
        log = app.query_one("#log", Log)
        for _ in range(300):
            if any(SHOWN in line for line in log.lines):
                break
            await pilot.pause(0.1)
        lines = list(log.lines)
        assert any(SHOWN in line for line in lines), lines[-3:]
        assert not any(c in line for line in lines for c in "\x1b\x07\x08\x9b\r"), lines[-3:]
        await pilot.press("q")
