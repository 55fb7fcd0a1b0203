"""``storage: {enforce: volume}`` for real: an ext4 image loop-mounted at the path (root
only, as CI runs), so a write past the size fails with ENOSPC and nothing outside grows;
the data survives a restart, ``down`` (unmounted, image kept), a killed agent (re-adopted,
still mounted) and the next ``up``; ``down --volumes`` says what it removes, then removes
it; a mount that fails rolls the up back; ``validate`` refuses what the machine cannot do."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral import Deployment, DeploymentError
from corral._core import find_by_env, mounted_volume_image, process_alive, volume_mounts, volume_support
from corral.engine.environment import STACK
from corral.statedir import stack_id
from corral.volumes import image_of
from tests.e2e import await_until, env_without_state, kill_groups, wait_until, write_spec
from tests.test_access import SYSTEM_PY, user_env

pytestmark = pytest.mark.skipif(volume_support() is not None, reason=f"cannot loop-mount here: {volume_support()}")

# The writer tries 12 MiB into its 8 MiB volume and records how dd ended.
WRITE = ("echo start >> data/starts; dd if=/dev/zero of=data/fill bs=1M count=12 2>data/dd.err; echo $? > data/dd.rc; "
         "exec sleep 300")
SPEC = """
    name: vol
    services:
      db:
        command: ["sh", "-c", "WRITE"]
        resources:
          storage: {size: 8Mi, path: ./data, enforce: volume, period: 200ms}
""".replace("WRITE", WRITE)


def corral(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "corral", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=env_without_state())


def mounts_under(d: Path) -> list[tuple[str, str]]:
    return [(p, i) for p, i in volume_mounts() if i.startswith(str(d))]


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Path]:
    write_spec(tmp_path, SPEC)
    yield tmp_path
    corral("down", cwd=tmp_path)
    left = find_by_env(f"{STACK}={stack_id(tmp_path / '.corral')}")
    kill_groups(left)
    for point, _ in mounts_under(tmp_path):  # whatever a failure left mounted
        subprocess.run(["umount", "-l", point], check=False)


async def test_a_write_past_the_size_fails_with_enospc_and_the_data_outlives_down(stack: Path) -> None:
    d = Deployment.from_file(stack / "corral.yaml")
    try:
        await d.up()
        data = stack / "data"
        image = image_of(stack / ".corral", "db")
        assert mounted_volume_image(data) == str(image)
        await await_until(lambda: (data / "dd.rc").exists(), 15, "the writer done")
        assert (data / "dd.rc").read_text().strip() != "0"
        assert "No space left on device" in (data / "dd.err").read_text()
        assert (data / "fill").stat().st_size <= 8 << 20
        assert image.stat().st_blocks * 512 <= 8 << 20, "nothing outside the volume grew past its size"
        assert oct(image.stat().st_mode & 0o777) == "0o600" and oct(data.stat().st_mode & 0o777) == "0o700"
        st = d.status().storage["db"]
        assert st.enforce == "volume" and st.used is not None and st.used <= 8 << 20
        await d.restart("db")
        # Up once running (no probe): its first line may come a moment later.
        await await_until(lambda: len((data / "starts").read_text().split()) >= 2, 15, "the second start")
        assert (data / "starts").read_text().split() == ["start", "start"], "the data survives a restart"
    finally:
        await d.down()
    assert mounted_volume_image(stack / "data") is None and not mounts_under(stack), "down unmounts it"
    assert image.exists(), "and keeps the image"
    assert not (stack / "data" / "starts").exists(), "the data is in the image, not in the directory"
    d = Deployment.from_file(stack / "corral.yaml")
    try:
        await d.up()
        assert (stack / "data" / "starts").read_text().split() == ["start", "start", "start"], "mounted again"
    finally:
        await d.down()


def test_down_volumes_says_what_it_removes_then_removes_it(stack: Path) -> None:
    (stack / "logs").mkdir()
    r = corral("up", "-d", cwd=stack)
    assert r.returncode == 0, r
    image = image_of(stack / ".corral", "db")
    assert image.exists()
    r = corral("down", "--volumes", cwd=stack)
    assert r.returncode == 0, r
    lines = r.stdout.splitlines()
    assert lines[0] == "will remove 1 volume images after down:", lines
    assert lines[1].startswith(f"  db: {image} (8Mi, "), lines
    assert lines.index("down") > 1 and lines[-1] == f"removed {image}", lines
    assert not image.exists() and not mounts_under(stack)
    assert (stack / "logs").is_dir() and (stack / "data").is_dir(), "directories are kept"
    r = corral("down", "--volumes", cwd=stack)
    assert r.returncode == 0 and r.stdout.splitlines()[0] == "will remove 0 volume images after down", r


def test_a_killed_agent_leaves_it_mounted_for_the_next_and_down_without_one_unmounts(stack: Path) -> None:
    r = corral("up", "-d", cwd=stack)
    assert r.returncode == 0, r
    st = json.loads(corral("status", "--json", cwd=stack).stdout)
    os.kill(st["agent_pid"], signal.SIGKILL)
    wait_until(lambda: (lambda s: s["agent_running"] and s["agent_pid"] != st["agent_pid"])(
        json.loads(corral("status", "--json", cwd=stack).stdout)), 20, "the keeper's new agent")
    assert mounted_volume_image(stack / "data") == str(image_of(stack / ".corral", "db")), "still mounted, adopted"
    again = json.loads(corral("status", "--json", cwd=stack).stdout)
    assert again["storage"]["db"]["enforce"] == "volume"
    # Now no agent at all: the keeper and the agent killed.
    keeper = json.loads((stack / ".corral" / "keeper.json").read_text())["pid"]
    os.kill(keeper, signal.SIGSTOP)  # restarts nothing from here
    os.kill(again["agent_pid"], signal.SIGKILL)
    os.kill(keeper, signal.SIGKILL)
    wait_until(lambda: not process_alive(again["agent_pid"]), 10, "the agent gone")
    r = corral("down", cwd=stack)
    assert r.returncode == 0 and "no agent running" in r.stdout, r
    assert not mounts_under(stack), "down without an agent unmounts what the dead one mounted"


async def test_a_mount_that_fails_rolls_the_up_back(stack: Path) -> None:
    d = Deployment.from_file(stack / "corral.yaml")
    try:
        await d.up()
    finally:
        await d.down()
    image = image_of(stack / ".corral", "db")
    with open(image, "r+b") as f:  # the superblock and the group descriptors gone
        f.write(b"\0" * (1 << 20))
    d = Deployment.from_file(stack / "corral.yaml")
    with pytest.raises(DeploymentError, match="setting up the stack failed: mounting"):
        await d.up()
    st = d.status()
    assert st.status == "failed" and "mounting" in st.message
    assert all(i.state == "stopped" and i.pid is None for i in st.services["db"]), st.services
    assert not mounts_under(stack) and not find_by_env(f"{STACK}={stack_id(stack / '.corral')}")
    await d.down()


async def test_files_the_new_volume_would_hide_are_refused(stack: Path) -> None:
    (stack / "data").mkdir()
    (stack / "data" / "mine").write_text("keep me")
    d = Deployment.from_file(stack / "corral.yaml")
    with pytest.raises(DeploymentError, match="already holds files, which its new volume would hide"):
        await d.up()
    await d.down()
    assert (stack / "data" / "mine").read_text() == "keep me" and not mounts_under(stack)


def test_validate_refuses_a_volume_for_a_user_who_cannot_mount() -> None:
    with tempfile.TemporaryDirectory(prefix="corral-volume-") as d:  # under /tmp: nobody may enter it
        os.chmod(d, 0o755)
        write_spec(Path(d), SPEC)
        (Path(d) / "corral.yaml").chmod(0o644)
        r = subprocess.run([SYSTEM_PY, "-m", "corral", "validate"], cwd=d, capture_output=True, text=True,
                           timeout=60, env=user_env(), user=65534, group=65534, extra_groups=[])
    assert r.returncode == 2, r
    assert ("corral.yaml:7: services.db.resources.storage.enforce: enforce: volume cannot work on this machine: "
            "loop-mounting an image needs root (running as uid 65534)") in r.stderr, r.stderr
