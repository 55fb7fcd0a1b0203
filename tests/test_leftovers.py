"""The leftover check itself: a test that leaks a process on purpose fails, naming it with
its command line, and the process is killed (an inner pytest run, with the suite's plugin)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from corral._core import process_alive

ROOT = Path(__file__).resolve().parent.parent

LEAKY = """
import subprocess, sys

def test_leaks(tmp_path):
    # A daemon the way services make them: its own session, its parent gone.
    p = subprocess.Popen(["sh", "-c", "setsid sleep 123 >/dev/null 2>&1 & echo $!"], stdout=subprocess.PIPE, text=True)
    pid = int(p.communicate()[0])
    (tmp_path.parent.parent / "leaked.pid").write_text(str(pid))
    # Leaked once it runs as the daemon (under load, setsid may not have exec'd sleep yet).
    import time
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if open(f"/proc/{pid}/cmdline", "rb").read().split(bytes(1))[:2] == [b"sleep", b"123"]:
                break
        except OSError:
            pass
        time.sleep(0.01)

def test_clean():
    import subprocess
    subprocess.run(["sleep", "0.1"], check=True)
"""


def test_a_leaked_process_fails_its_test_and_is_killed(pytester: pytest.Pytester,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile(test_leaky=LEAKY)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    result = pytester.runpytest_subprocess("-p", "tests.leftovers", "-p", "no:cacheprovider",
                                           f"--basetemp={pytester.path / 'tmp'}")
    out = result.stdout.str()
    assert result.ret == pytest.ExitCode.TESTS_FAILED, out
    result.assert_outcomes(passed=2, errors=1)
    assert "test_leaky.py::test_leaks left 1 process(es) running (killed now)" in out, out
    assert re.search(r"pid \d+ \(parent \d+\): sleep 123", out), out
    assert "processes left behind" in out, out
    pid = int((pytester.path / "leaked.pid").read_text())
    assert not process_alive(pid), "the leaked process was killed by the check"
