"""``shutdown.kill_mode``: ``group`` signals the whole process group; ``main`` (systemd's
``KillMode=mixed``) only the main process, which stops its children itself, as PostgreSQL's
postmaster expects. Seen from the processes' own record of what they received."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from corral import Deployment
from tests.e2e import await_until, write_spec

pytestmark = pytest.mark.timeout(90)

# The child records a SIGTERM; the main process records its own and waits for the child,
# which ends on a SIGTERM of its own, or at the timeout's SIGKILL (nothing to record).
CHILD = 'trap "echo child-term >> sig.log; exit 0" TERM; echo child-up >> sig.log; sleep 300 & wait'
MAIN = (f"sh -c '{CHILD}' & c=$!; trap 'echo main-term >> sig.log; wait $c; exit 0' TERM; "
        "echo main-up >> sig.log; sleep 300 & wait")


@pytest.mark.parametrize(("mode", "child_signalled"), [("group", True), ("main", False)])
async def test_kill_mode_decides_who_gets_the_signal(tmp_path: Path, mode: str, child_signalled: bool,
                                                     deployments: list[Deployment]) -> None:
    spec = write_spec(tmp_path, f"""
        name: modes
        services:
          app:
            command: ["sh", "-c", {json.dumps(MAIN)}]
            shutdown: {{signal: SIGTERM, timeout: 2s, kill_mode: {mode}}}
        """)
    d = Deployment.from_file(spec)
    deployments.append(d)
    await d.up()
    log = tmp_path / "sig.log"
    await await_until(lambda: log.exists() and {"child-up", "main-up"} <= set(log.read_text().split()),
                      what="both processes, their traps set")
    await d.down()
    got = log.read_text().split()
    assert "main-term" in got
    assert ("child-term" in got) is child_signalled, got
