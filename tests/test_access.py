"""Roles on the control socket and the audit trail, end to end: real users and a group made
by the test (useradd/groupadd, removed afterwards), a real agent, the CLI run as each user.
Needs root and useradd; CI runs as root."""

from __future__ import annotations

import grp
import json
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e import env_without_state, wait_until, write_spec

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("useradd") is None,
                                reason="needs root and useradd to make real users")


# The test users run the CLI with the system's Python of the same version over this
# checkout and its venv's packages: the venv's interpreter is often a link into root's home,
# which they cannot enter.
SYSTEM_PY = "/usr/bin/python3"
ROOT = Path(__file__).resolve().parent.parent


def corral(*args: str, cwd: Path, user: str | None = None,
           extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    py, env = (sys.executable, env_without_state()) if user is None else (SYSTEM_PY, user_env())
    env.update(extra or {})
    return subprocess.run([py, "-m", "corral", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=env, **as_user(user))


def user_env() -> dict[str, str]:
    """The environment a test user runs this checkout's corral in."""
    env = env_without_state()
    env["HOME"] = "/tmp"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "python"), sysconfig.get_paths()["purelib"],
                                         sysconfig.get_paths()["platlib"]])
    return env


def as_user(user: str | None) -> dict[str, object]:
    """What makes a child that user, with its groups (as a login would)."""
    if user is None:
        return {}
    pw = pwd.getpwnam(user)
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": os.getgrouplist(user, pw.pw_gid)}


@pytest.fixture(scope="module")
def people() -> Iterator[dict[str, str]]:
    tag = secrets.token_hex(3)
    names = {"group": f"crlops{tag}", "viewer": f"crlview{tag}", "operator": f"crlop{tag}", "nobody": f"crlno{tag}"}
    subprocess.run(["groupadd", names["group"]], check=True)
    try:
        subprocess.run(["useradd", "-M", "-s", "/bin/sh", "-G", names["group"], names["viewer"]], check=True)
        subprocess.run(["useradd", "-M", "-s", "/bin/sh", names["operator"]], check=True)
        subprocess.run(["useradd", "-M", "-s", "/bin/sh", names["nobody"]], check=True)
        try:
            probe = corral("--help", cwd=Path("/tmp"), user=names["nobody"])
        except OSError as e:
            pytest.skip(f"the test users cannot run {SYSTEM_PY}: {e}")
        if probe.returncode != 0:
            pytest.skip(f"the test users cannot run this checkout's CLI with {SYSTEM_PY} (it must be "
                        f"{sys.version_info.major}.{sys.version_info.minor} and the checkout readable by them): "
                        f"{probe.stderr.strip()[-300:]}")
        yield names
    finally:
        for who in ("viewer", "operator", "nobody"):
            subprocess.run(["userdel", names[who]], capture_output=True)
        subprocess.run(["groupdel", names["group"]], capture_output=True)


@pytest.fixture
def stack(people: dict[str, str]) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="corral-access-", dir="/tmp"))
    d.chmod(0o755)  # the users must reach the directory; .corral inside stays owner-only
    write_spec(d, f"""
        name: shop
        access:
          viewer: ["group:{people['group']}"]
          operator: ["user:{people['operator']}"]
        services:
          web:
            command: ["sh", "-c", "while :; do echo tick; sleep 0.2; done"]
        """)
    (d / "corral.yaml").chmod(0o644)
    r = corral("up", "-d", cwd=d)
    assert r.returncode == 0, r.stderr
    try:
        yield d
    finally:
        corral("down", cwd=d)
        shutil.rmtree(d, ignore_errors=True)


def test_validate_refuses_an_unknown_user_naming_the_line(tmp_path: Path) -> None:
    write_spec(tmp_path, """
        name: shop
        access:
          viewer: ["user:no-such-user-here"]
        services:
          web: {command: ["true"]}
        """)
    r = corral("validate", cwd=tmp_path)
    assert r.returncode == 2 and "corral.yaml:4: access.viewer.0: unknown user 'no-such-user-here'" in r.stderr, r


def test_roles_audit_and_the_kernels_word(stack: Path, people: dict[str, str]) -> None:
    viewer, operator, nobody = people["viewer"], people["operator"], people["nobody"]
    vuid = pwd.getpwnam(viewer).pw_uid
    # A viewer (through its group) reads status, logs and events...
    r = corral("status", cwd=stack, user=viewer)
    assert r.returncode == 0 and "web-0" in r.stdout, r
    wait_until(lambda: "tick" in corral("logs", "web", cwd=stack, user=viewer).stdout, 15, "logs for the viewer")
    assert corral("events", cwd=stack, user=viewer).returncode == 0
    # The log panel of the viewer's top reads one instance's log through the agent, in
    # steps from a cursor (the viewer may not read the file).
    step = subprocess.run([SYSTEM_PY, "-c", f"""
import time
from pathlib import Path
from corral.agent.client import AgentClient
c = AgentClient(Path({str(stack / '.corral')!r}))
tail, cursor = c.instance_log("web", "web-0", 3)
time.sleep(1.0)
more, _ = c.instance_log("web", "web-0", 3, cursor)
print(c.guest, len(tail), len(more), set(tail + more))
"""], env=user_env(), **as_user(viewer), capture_output=True, text=True, timeout=60)
    assert step.returncode == 0, step.stderr
    guest, n_tail, n_more, texts = step.stdout.split(" ", 3)
    assert guest == "True" and n_tail == "3" and int(n_more) >= 2 and texts.strip() == "{'tick'}", step.stdout
    # ...and is refused restart and down, with its own exit code and the way to grant it.
    r = corral("restart", "web", cwd=stack, user=viewer)
    assert r.returncode == 77, r
    assert (f"{viewer} (uid {vuid}) may not `restart` stack shop: needs operator; grant it under access.operator "
            f"in corral.yaml") in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    r = corral("down", cwd=stack, user=viewer)
    assert r.returncode == 77 and "needs admin" in r.stderr, r
    assert corral("status", cwd=stack).stdout.count("web-0") == 1  # still up
    # An operator scales, and is refused an apply.
    r = corral("scale", "web", "2", cwd=stack, user=operator)
    assert r.returncode == 0, r
    changed = stack / "v2.yaml"
    changed.write_text((stack / "corral.yaml").read_text().replace("sleep 0.2", "sleep 0.3"))
    changed.chmod(0o644)
    r = corral("up", "-d", "v2.yaml", cwd=stack, user=operator)
    assert r.returncode == 77 and "may not `apply` stack shop: needs admin" in r.stderr, r
    # No role: refused even status, by the kernel; and none of the files can be read.
    r = corral("status", cwd=stack, user=nobody)
    assert r.returncode == 77 and "may not `status`" in r.stderr, r
    state = stack / ".corral"
    for f in ("state.db", "keeper.json", "keeper.sock", "audit.log", "logs/web-0.log", "agent.log"):
        probe = subprocess.run(["cat", str(state / f)], **as_user(nobody), capture_output=True, timeout=30)
        assert probe.returncode != 0, f"{f} readable by a user with no role"
    for f in ("state.db", "audit.log", "logs/web-0.log"):
        probe = subprocess.run(["cat", str(state / f)], **as_user(viewer), capture_output=True, timeout=30)
        assert probe.returncode != 0, f"{f} readable by the viewer (it reads logs through the API)"
    # A forged client that claims to be root changes nothing: the kernel says who it is.
    forged = subprocess.run([SYSTEM_PY, "-c", f"""
import socket
s = socket.socket(socket.AF_UNIX)
s.connect({str(state / 'agent.sock')!r})
s.sendall(b"POST /v1/down?uid=0&user=root HTTP/1.1\\r\\nHost: x\\r\\nX-Corral-User: root\\r\\nX-Uid: 0\\r\\n"
          b"Content-Length: 0\\r\\n\\r\\n")
print(s.recv(65536).split(b"\\r\\n", 1)[0].decode())
"""], **as_user(viewer), capture_output=True, text=True, timeout=30)
    assert "403" in forged.stdout, forged
    st = corral("status", "--json", cwd=stack)
    assert st.returncode == 0 and json.loads(st.stdout)["status"] == "up", st
    # Every attempt is in the trail, with who asked and how it ended.
    recs = [json.loads(line) for line in corral("audit", "--json", cwd=stack).stdout.splitlines()]
    seen = [(r["user"], r["op"], r["outcome"]) for r in recs]
    assert (viewer, "restart", "refused") in seen and (viewer, "down", "refused") in seen, seen
    assert (operator, "scale", "ok") in seen and (operator, "apply", "refused") in seen, seen
    assert ("root", "up", "ok") in seen
    scale = next(r for r in recs if r["op"] == "scale")
    assert scale["args"] == {"service": "web", "replicas": 2} and "scale" in scale["cmdline"], scale
    assert corral("audit", "--user", viewer, cwd=stack).stdout.count(viewer) >= 2
    assert corral("audit", "--verify", cwd=stack).returncode == 0


def _tampered(stack: Path, change: str) -> str:
    log = stack / ".corral" / "audit.log"
    keep = log.read_bytes()
    lines = keep.splitlines(keepends=True)
    try:
        if change == "edit":
            lines[1] = lines[1].replace(b'"outcome": "ok"', b'"outcome": "ko"', 1)
        elif change == "remove":
            del lines[1]
        else:
            lines[1], lines[2] = lines[2], lines[1]
        log.write_bytes(b"".join(lines))
        r = corral("audit", "--verify", cwd=stack)
        assert r.returncode == 1, r
        return r.stderr
    finally:
        log.write_bytes(keep)


def test_verify_finds_an_edit_a_removal_and_a_swap(stack: Path) -> None:
    for op in ("restart", "restart", "restart"):
        assert corral(op, "web", cwd=stack).returncode == 0
    assert "audit.log:2: record 2 was edited" in _tampered(stack, "edit")
    assert "audit.log:2: record 3 follows record 1: records were removed" in _tampered(stack, "remove")
    assert "audit.log:2: record 3 follows record 1" in _tampered(stack, "swap")
    assert corral("audit", "--verify", cwd=stack).returncode == 0


def test_ls_shows_a_user_the_stacks_they_may_view(people: dict[str, str]) -> None:
    # One ledger the ops group shares (setgid, group-writable), two of root's stacks in it:
    # one names the group under access.viewer, the other names no one.
    ledger = Path(tempfile.mkdtemp(prefix="corral-ledger-", dir="/tmp"))
    os.chown(ledger, 0, grp.getgrnam(people["group"]).gr_gid)
    ledger.chmod(0o2770)
    extra = {"CORRAL_MACHINE_DIR": str(ledger)}
    dirs: list[Path] = []
    try:
        for name, access in (("shop", f'access: {{viewer: ["group:{people["group"]}"]}}'), ("private", "")):
            d = Path(tempfile.mkdtemp(prefix=f"corral-{name}-", dir="/tmp"))
            dirs.append(d)
            d.chmod(0o755)
            write_spec(d, f"""
                name: {name}
                {access}
                services:
                  web: {{command: ["sleep", "600"]}}
                """)
            r = corral("up", "-d", cwd=d, extra=extra)
            assert r.returncode == 0, r.stderr
        mine = corral("ls", "--json", cwd=Path("/tmp"), extra=extra)
        assert sorted(row["name"] for row in json.loads(mine.stdout)) == ["private", "shop"], mine
        theirs = corral("ls", "--json", cwd=Path("/tmp"), user=people["viewer"], extra=extra)
        assert theirs.returncode == 0, theirs.stderr
        rows = json.loads(theirs.stdout)
        assert [row["name"] for row in rows] == ["shop"], rows
        assert rows[0]["total"] == 1 and rows[0]["state"] == "up", rows
        plain = corral("ls", cwd=Path("/tmp"), user=people["viewer"], extra=extra)
        assert "shop" in plain.stdout and "private" not in plain.stdout, plain
    finally:
        for d in dirs:
            corral("down", cwd=d, extra=extra)
            shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(ledger, ignore_errors=True)
