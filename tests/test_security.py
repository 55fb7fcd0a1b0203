"""Owner-only state whatever the umask, no trust in a state directory others can write,
no write through a planted link."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral import Deployment
from corral.exceptions import DeploymentError, SpecError, StateDirError
from tests.e2e import await_until, owner_only, write_spec

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


async def test_everything_in_the_state_directory_is_owner_only_under_umask_000(
        tmp_path: Path, umask_000: None, deployments: list[Deployment]) -> None:
    d = Deployment.from_file(write_spec(tmp_path, SPEC))
    deployments.append(d)
    await d.up()
    state = tmp_path / ".corral"
    log = state / "logs" / "db-0.log"
    await await_until(lambda: log.exists() and "secret-token" in log.read_text(), what="the service's output")
    await d.down()
    seen = owner_only(state)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for expected in ("state.db", "logs", "logs/db-0.log", "tls", "tls/ca.key", "tls/services/db.key", "pids"):
        assert expected in seen, expected
    assert (state / "pids").read_text() == "", "the pid log is emptied once the store holds the pids"


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


@pytest.fixture
def open_project() -> Iterator[Path]:
    """A project directory other users can enter (pytest's tmp_path is under a root-only
    directory, which a service running as nobody could not reach)."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="corral-users-", dir="/tmp"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="running a service as another user needs root")
async def test_a_service_runs_as_its_user_and_cannot_read_the_ca_key(open_project: Path,
                                                                      deployments: list[Deployment]) -> None:
    import pwd

    nobody = pwd.getpwnam("nobody")
    tls = open_project / ".corral" / "tls"
    report = ("echo uid=$(id -u) gid=$(id -g) groups=$(id -G) user=$USER; "
              "cat \"$CORRAL_TLS_KEY\" >/dev/null 2>&1 && echo own-key-readable; "
              f"cat {tls}/ca.key >/dev/null 2>&1 && echo ca-key-readable; "
              f"cat {open_project}/.corral/state.db >/dev/null 2>&1 && echo state-readable; "
              "echo done; exec sleep 300")
    spec = write_spec(open_project, f"""
        name: users
        services:
          db:
            command: ["sleep", "300"]
            ports: {{http: auto}}
            expose: 24191
            mtls: true
          app:
            command: ["sh", "-c", {report!r}]
            working_dir: /
            user: nobody
        """)
    d = Deployment.from_file(spec)
    deployments.append(d)
    await d.up()
    log = open_project / ".corral" / "logs" / "app-0.log"
    await await_until(lambda: log.exists() and "done" in log.read_text(), what="the service's report")
    out = log.read_text()
    assert f"uid={nobody.pw_uid} gid={nobody.pw_gid} groups={nobody.pw_gid} user=nobody" in out, out
    assert "own-key-readable" in out, "the service reads its own certificate key"
    assert "ca-key-readable" not in out and "state-readable" not in out, "but not the CA key or the state"
    assert stat.S_IMODE((tls / "ca.key").stat().st_mode) == 0o600


def test_an_unknown_user_is_refused_at_validate(tmp_path: Path) -> None:
    from corral.spec import load_spec

    spec = write_spec(tmp_path, "name: u\nservices:\n  a: {command: [a], user: no-such-user-here}\n")
    with pytest.raises(SpecError, match="unknown user 'no-such-user-here'") as e:
        load_spec(spec)
    assert e.value.field == "services.a.user"


@pytest.mark.skipif(os.geteuid() != 0, reason="running a service as another user needs root")
async def test_an_exec_probe_runs_as_the_services_user_in_its_directory(open_project: Path,
                                                                      deployments: list[Deployment]) -> None:
    """A probe with more privilege than its service would be a way around ``user:`` (and
    PostgreSQL logs ``role "root" does not exist`` at every ``psql`` probe run as root)."""
    import pwd

    nobody = pwd.getpwnam("nobody")
    run = open_project / "run"
    run.mkdir()
    run.chmod(0o777)
    spec = write_spec(open_project, """
        name: probes
        services:
          app:
            command: ["sleep", "300"]
            working_dir: run
            user: nobody
            health:
              readiness: {exec: ["sh", "-c", "echo $(id -u) $(id -g) $(pwd) > probe.id"], period: 200ms}
        """)
    d = Deployment.from_file(spec)
    deployments.append(d)
    await d.up()
    said = run / "probe.id"
    await await_until(lambda: said.exists() and said.read_text().strip(), what="the probe's report")
    assert said.read_text().split() == [str(nobody.pw_uid), str(nobody.pw_gid), str(run)]
    assert said.stat().st_uid == nobody.pw_uid
