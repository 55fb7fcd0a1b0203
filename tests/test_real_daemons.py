"""The examples as their users run them, with the real daemons from Debian's packages:
PostgreSQL (initdb once, postgres as its own user, log readiness, SIGINT, a dump on
``corral run``, a clean shutdown and no crash recovery at the next up), Redis (two replicas
behind the front, a warmer, a rolling restart no new client notices) and nginx (its upstream
block rendered from the API's healthy replicas and reloaded when one falls ill).

Without a daemon (a machine without the package) its test is skipped, naming the package;
``.ci/run`` installs them."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral._core import find_by_env
from corral.audit import read_records
from corral.engine.environment import STACK
from corral.spec import load_spec
from corral.statedir import stack_id
from tests.e2e import env_without_state, kill_groups, wait_until

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _postgres() -> bool:
    return bool(list(Path("/usr/lib/postgresql").glob("*/bin/postgres")) or shutil.which("postgres"))


def needs(found: bool, what: str, package: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(not found, reason=f"needs {what} from Debian's {package} "
                                                f"(apt-get install {package})")


def corral(*args: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "corral", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env_without_state())


def status(cwd: Path) -> dict:  # type: ignore[type-arg]
    return json.loads(corral("status", "--json", cwd=cwd).stdout)  # type: ignore[no-any-return]


@pytest.fixture
def example(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A copy of ``examples/NAME`` in a directory other users may enter (the daemons run as
    their own users); on teardown ``down``, then whatever still carries the stack's mark."""
    d = Path(tempfile.mkdtemp(prefix=f"corral-{request.param}-"))
    d.chmod(0o755)
    shutil.copytree(EXAMPLES / request.param, d, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".corral"))
    try:
        yield d
    finally:
        corral("down", cwd=d)
        kill_groups(find_by_env(f"{STACK}={stack_id(d / '.corral')}"))
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("name", ["postgres", "redis", "nginx", "stack"])
def test_every_example_validates(name: str) -> None:
    spec = load_spec(EXAMPLES / name / "corral.yaml")
    assert spec.services


@needs(_postgres() and shutil.which("pgbench") is not None, "PostgreSQL (postgres, initdb, pgbench)", "postgresql")
@pytest.mark.parametrize("example", ["postgres"], indirect=True)
def test_postgres_comes_up_serves_through_the_front_dumps_and_shuts_down_clean(example: Path) -> None:
    r = corral("up", "-d", cwd=example)
    assert r.returncode == 0, r
    st = status(example)
    pg = st["services"]["postgres"][0]
    assert st["services"]["initdb"][0]["state"] == "completed"
    assert "ready to accept connections" in pg["reason"] or pg["state"] == "healthy", pg
    assert os.stat(f"/proc/{pg['pid']}").st_uid == pwd.getpwnam("postgres").pw_uid, "runs as postgres"
    bench = ["pgbench", "-h", "127.0.0.1", "-p", "25432", "-U", "postgres", "postgres"]
    init = subprocess.run([*bench[:1], "-i", *bench[1:]], capture_output=True, text=True, timeout=120)
    assert init.returncode == 0, init.stderr
    run = subprocess.run([bench[0], "-c", "4", "-T", "2", *bench[1:]], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "number of failed transactions: 0" in run.stdout, run.stdout + run.stderr
    r = corral("run", "backup", cwd=example)
    assert r.returncode == 0, r
    (dump,) = (example / "backups").glob("pg-*.sql")
    assert "CREATE TABLE public.pgbench_accounts" in dump.read_text()
    assert corral("down", cwd=example).returncode == 0
    log = example / ".corral" / "logs" / "postgres-0.log"
    assert log.read_text().rstrip().endswith("database system is shut down"), log.read_text()[-500:]
    size = log.stat().st_size
    assert corral("up", "-d", cwd=example).returncode == 0
    init_run = status(example)["services"]["initdb"][0]
    assert init_run["state"] == "completed" and "skipped: data/PG_VERSION exists" in init_run["reason"], init_run
    again = log.read_text()[size:]
    assert "database system is ready to accept connections" in again
    assert not re.search(r"not properly shut down|automatic recovery", again), again
    assert corral("down", cwd=example).returncode == 0


def _redis(port: int, *args: str) -> str:
    out = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args], capture_output=True, text=True,
                         timeout=10)
    return out.stdout.strip()


@needs(shutil.which("redis-server") is not None and shutil.which("redis-cli") is not None, "redis-server",
       "redis-server")
@pytest.mark.parametrize("example", ["redis"], indirect=True)
def test_redis_replicas_behind_the_front_a_warmer_and_a_restart_no_client_notices(example: Path) -> None:
    assert corral("up", "-d", cwd=example).returncode == 0
    assert _redis(26379, "set", "k", "v") == "OK" and _redis(26379, "get", "k") == "v", "ip_hash: one replica"
    r = corral("run", "warmer", cwd=example)
    assert r.returncode == 0, r
    ports = [i["ports"]["redis"] for i in status(example)["services"]["redis"]]
    assert any(_redis(p, "get", "warmed-at").isdigit() for p in ports), "the warmer wrote through the front"
    # A rolling restart while a client connects anew for each command: none refused or failed.
    errors, done = [], 0
    proc = subprocess.Popen([sys.executable, "-m", "corral", "restart", "redis"], cwd=example,
                            env=env_without_state(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None or done < 50:
        try:
            with socket.create_connection(("127.0.0.1", 26379), timeout=5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64) != b"+PONG\r\n":
                    errors.append("not PONG")
        except OSError as e:
            errors.append(str(e))
        done += 1
    assert proc.returncode == 0, proc.communicate()
    assert not errors and done >= 50, (errors[:5], done)
    assert all(i["restarts"] == 1 for i in status(example)["services"]["redis"])
    if shutil.which("redis-benchmark") is None:
        return
    # Keep-alive: redis-benchmark's connections stay open on one replica (ip_hash); its stop
    # waits for them to close (shutdown.drain) before the signal, so none is cut.
    bench = subprocess.Popen(["redis-benchmark", "-h", "127.0.0.1", "-p", "26379", "-c", "10", "-n", "100000",
                              "-t", "ping", "-q"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        time.sleep(0.3)
        assert bench.poll() is None, "the client still runs when the restart begins"
        r = corral("restart", "redis", cwd=example)
        said = bench.communicate(timeout=120)[0]
    finally:
        if bench.poll() is None:
            os.killpg(bench.pid, 9)
            bench.wait()
    assert r.returncode == 0, r
    assert bench.returncode == 0 and "rror" not in said and "closed" not in said, said[-500:]
    assert all(i["restarts"] == 2 for i in status(example)["services"]["redis"])


@needs(shutil.which("redis-benchmark") is not None, "redis-benchmark", "redis-tools")
@pytest.mark.parametrize("example", ["redis"], indirect=True)
def test_kill_9_of_the_agent_under_keep_alive_redis_benchmark_cuts_nothing(example: Path) -> None:
    """The front lives in the keeper: the agent's death cuts no redis-benchmark connection
    and refuses none of the new ones (-k 0: a connection per request as well)."""
    assert corral("up", "-d", cwd=example).returncode == 0
    before = status(example)
    benches = [subprocess.Popen(["redis-benchmark", "-h", "127.0.0.1", "-p", "26379", "-c", "10", "-n", n,
                                 "-k", keep, "-t", "ping", "-q"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True) for n, keep in (("100000", "1"), ("20000", "0"))]
    try:
        time.sleep(0.3)
        assert all(b.poll() is None for b in benches), "the clients still run when the agent is killed"
        os.kill(before["agent_pid"], signal.SIGKILL)
        said = [b.communicate(timeout=120)[0] for b in benches]
    finally:
        for b in benches:
            if b.poll() is None:
                os.killpg(b.pid, 9)
                b.wait()
    for b, text in zip(benches, said, strict=True):
        assert b.returncode == 0 and "rror" not in text and "closed" not in text, text[-500:]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        st = status(example)
        if st.get("agent_running") and st["agent_pid"] != before["agent_pid"] and st["status"] == "up":
            break
        time.sleep(0.2)
    else:
        raise AssertionError("no new agent")
    assert [i["pid"] for i in st["services"]["redis"]] == [i["pid"] for i in before["services"]["redis"]]
    assert st["fronts"]["redis"]["refused"] == 0


def _fetch(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
        return str(r.read().decode().strip())


@needs(shutil.which("nginx") is not None or Path("/usr/sbin/nginx").exists(), "nginx", "nginx")
@pytest.mark.parametrize("example", ["nginx"], indirect=True)
def test_nginx_follows_the_apis_healthy_set_by_reloading(example: Path) -> None:
    spec = example / "corral.yaml"
    spec.write_text(spec.read_text().replace("/tmp/corral-nginx-demo-{instance}.sick", f"{example}/{{instance}}.sick"))
    env = env_without_state()
    env["PATH"] = env.get("PATH", "") + ":/usr/sbin"
    r = subprocess.run([sys.executable, "-m", "corral", "up", "-d"], cwd=example, capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0, r
    assert {_fetch(28080) for _ in range(9)} == {"api-0", "api-1", "api-2"}
    nginx = status(example)["services"]["nginx"][0]["pid"]
    (example / "api-1.sick").touch()
    t0 = time.monotonic()
    wait_until(lambda: all(_fetch(28080) != "api-1" for _ in range(6)), 10, "nginx without api-1")
    took = time.monotonic() - t0
    # nginx's old worker finishes what it had after a reload: give it a moment to go.
    time.sleep(1.0)
    assert {_fetch(28080) for _ in range(12)} == {"api-0", "api-2"}
    st = status(example)
    assert st["services"]["nginx"][0]["pid"] == nginx and st["services"]["nginx"][0]["restarts"] == 0, "reloaded"
    conf = (example / ".corral" / "instances" / "nginx-0" / "nginx.conf").read_text()
    assert "# api-1" not in conf and "# api-0" in conf and "# api-2" in conf
    (example / "api-1.sick").unlink()
    wait_until(lambda: {_fetch(28080) for _ in range(9)} == {"api-0", "api-1", "api-2"}, 10, "api-1 back")
    print(f"nginx served the new upstream set {took:.2f}s after the health change was made")
    # corral reload: nginx's own log says it got SIGHUP and reconfigured; kill -s goes to it too.
    log = example / ".corral" / "logs" / "nginx-0.log"
    seen = log.read_text().count("reconfiguring")
    r = corral("reload", "nginx", cwd=example)
    assert r.returncode == 0 and "nginx: reloaded nginx-0" in r.stdout, r
    wait_until(lambda: log.read_text().count("reconfiguring") > seen, 10, "nginx's log of the reload")
    r = corral("kill", "-s", "USR1", "nginx", cwd=example)  # nginx reopens its log files on SIGUSR1
    assert r.returncode == 0 and "USR1 sent to nginx-0" in r.stdout, r
    wait_until(lambda: "reopening logs" in log.read_text(), 10, "nginx's log of SIGUSR1")
    assert status(example)["services"]["nginx"][0]["pid"] == nginx
    r = corral("kill", "-s", "SIGNOPE", "nginx", cwd=example)
    assert r.returncode == 2 and "unknown signal 'SIGNOPE'" in r.stderr and "Traceback" not in r.stderr, r
    ops = [(rec["op"], rec["args"].get("signal"), rec["outcome"]) for rec in read_records(example / ".corral")]
    assert ("reload", "", "ok") in ops and ("kill", "USR1", "ok") in ops, ops
