"""Owner-only state whatever the umask, no trust in a state directory others can write,
no write through a planted link."""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from corral import Deployment
from corral.exceptions import DeploymentError, StateDirError
from tests.e2e import await_until, kill_groups, write_spec

pytestmark = pytest.mark.timeout(90)

SPEC = """
    name: private
    services:
      db:
        command: ["sh", "-c", "echo secret-token; exec sleep 300"]
        ports: {http: auto}
        expose: 24190
        mtls: true
"""


@pytest.fixture
def umask_000() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
async def deployments() -> AsyncIterator[list[Deployment]]:
    made: list[Deployment] = []
    yield made
    for d in made:
        pids = [i.pid for insts in d.status().services.values() for i in insts if i.pid]
        try:
            await d.down()
        finally:
            kill_groups(pids)


async def test_everything_in_the_state_directory_is_owner_only_under_umask_000(
        tmp_path: Path, umask_000: None, deployments: list[Deployment]) -> None:
    d = Deployment.from_file(write_spec(tmp_path, SPEC))
    deployments.append(d)
    await d.up()
    state = tmp_path / ".corral"
    log = state / "logs" / "db-0.log"
    await await_until(lambda: log.exists() and "secret-token" in log.read_text(), what="the service's output")
    await d.down()
    seen = []
    for root, dirs, files in os.walk(state):
        for name in [*dirs, *files]:
            p = Path(root) / name
            mode = stat.S_IMODE(p.lstat().st_mode)
            seen.append(p.relative_to(state).as_posix())
            assert mode & 0o077 == 0, f"{p} is {mode:o}"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for expected in ("state.db", "logs", "logs/db-0.log", "tls", "tls/ca.key", "tls/services/db.key"):
        assert expected in seen, expected


@pytest.mark.parametrize("mode", [0o777, 0o775])
async def test_a_state_directory_others_can_write_is_refused(tmp_path: Path, mode: int,
                                                             deployments: list[Deployment]) -> None:
    state = tmp_path / ".corral"
    state.mkdir()
    os.chmod(state, mode)
    d = Deployment.from_file(write_spec(tmp_path, SPEC))
    deployments.append(d)
    with pytest.raises(StateDirError, match="can be written by others"):
        await d.up()
    assert d.status().services["db"] == [], "nothing started"


async def test_a_planted_log_link_is_not_written_through(tmp_path: Path, deployments: list[Deployment]) -> None:
    target = tmp_path / "root-only"
    target.write_text("")
    logs = tmp_path / ".corral" / "logs"
    logs.mkdir(parents=True, mode=0o700)
    os.chmod(tmp_path / ".corral", 0o700)
    (logs / "db-0.log").symlink_to(target)
    spec = write_spec(tmp_path, SPEC.replace("        mtls: true\n", "") + "        start_timeout: 2s\n"
                      "        restart: {policy: no}\n")
    d = Deployment.from_file(spec)
    deployments.append(d)
    with pytest.raises(DeploymentError, match="cannot open log file"):
        await d.up()
    assert target.read_text() == "", "nothing was appended through the link"
