"""`make bench-real`: the examples' real daemons under their real clients, each figure beside
the direct connection and HAProxy (mode tcp, nbthread 1) in the same run.

- PostgreSQL (examples/postgres): `pgbench -c 8 -T 10` tps through the front, direct to the
  instance and through HAProxy; target: the front at least 0.9 times direct.
- Redis (examples/redis): `redis-benchmark` (SET and GET, 50 clients) req/s through the
  front, direct and through HAProxy; target: the front at least HAProxy's.
- A rolling restart of the redis replicas under `redis-benchmark -k 0` (a new connection per
  request) and under keep-alive `redis-benchmark` (each stop waits for the client's open
  connections: `shutdown.drain`): target zero client errors in both.
- After `corral down`, PostgreSQL's log says it shut down cleanly, and the next `up` runs
  no crash recovery.
- nginx (examples/nginx): from one API replica's health turning bad to nginx serving
  without it (its upstream block re-rendered, nginx reloaded); target <= 1 s.

`--rounds N` repeats each throughput figure N times (alternating who goes first) and reports
medians; `--seconds S` sets the pgbench duration. Each tool missing is said and its rows
skipped. Results as JSON with `--json FILE`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from proxy import wait_listening  # the same wait; benches/ is on sys.path when run

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
HAPROXY = """global
    nbthread 1
    maxconn 4096
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
frontend f
    bind 127.0.0.1:{front}
    default_backend b
backend b
    balance {balance}
{servers}
"""


def corral(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env["PATH"] = env.get("PATH", "") + ":/usr/sbin"
    return subprocess.run([PY, "-m", "corral", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env)


def status(cwd: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(corral("status", "--json", cwd=cwd).stdout)
    return doc


def copy_example(name: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix=f"corral-bench-{name}-"))
    d.chmod(0o755)
    shutil.copytree(ROOT / "examples" / name, d, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".corral"))
    return d


class HAProxy:
    """HAProxy in front of ``upstreams``, on ``front``."""

    def __init__(self, front: int, upstreams: list[int], balance: str = "roundrobin") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="corral-bench-haproxy-"))
        conf = self.dir / "haproxy.cfg"
        conf.write_text(HAPROXY.format(front=front, balance=balance, servers="\n".join(
            f"    server s{i} 127.0.0.1:{p}" for i, p in enumerate(upstreams))))
        self.proc = subprocess.Popen(["haproxy", "-f", str(conf), "-db"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        wait_listening(front)

    def close(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def median_rows(rounds: int, runs: dict[str, Any]) -> dict[str, float]:
    """Each named measurement ``rounds`` times, in a rotating order; the medians."""
    got: dict[str, list[float]] = {k: [] for k in runs}
    names = list(runs)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            got[name].append(runs[name]())
    return {k: statistics.median(v) for k, v in got.items()}


# --- PostgreSQL ------------------------------------------------------------------------


def bench_postgres(rounds: int, seconds: int) -> dict[str, Any]:
    d = copy_example("postgres")
    out: dict[str, Any] = {}
    try:
        r = corral("up", "-d", cwd=d)
        assert r.returncode == 0, r.stderr
        direct = status(d)["services"]["postgres"][0]["ports"]["pg"]
        base = ["-h", "127.0.0.1", "-U", "postgres", "postgres"]
        subprocess.run(["pgbench", "-i", "-s", "4", "-p", "25432", *base], check=True, capture_output=True)
        ha = HAProxy(25433, [direct])

        def tps(port: int) -> Any:
            def run() -> float:
                res = subprocess.run(["pgbench", "-c", "8", "-j", "2", "-T", str(seconds), "-p", str(port), *base],
                                     capture_output=True, text=True, check=True).stdout
                return float(re.search(r"tps = ([\d.]+)", res).group(1))  # type: ignore[union-attr]
            return run

        try:
            out["tps"] = median_rows(rounds, {"front": tps(25432), "direct": tps(direct), "haproxy": tps(25433)})
        finally:
            ha.close()
        log = d / ".corral" / "logs" / "postgres-0.log"
        assert corral("down", cwd=d).returncode == 0
        out["clean_shutdown"] = log.read_text().rstrip().endswith("database system is shut down")
        size = log.stat().st_size
        assert corral("up", "-d", cwd=d).returncode == 0
        again = log.read_text()[size:]
        out["no_recovery"] = not re.search(r"not properly shut down|automatic recovery", again)
    finally:
        corral("down", cwd=d)
        shutil.rmtree(d, ignore_errors=True)
    return out


# --- Redis -----------------------------------------------------------------------------


def redis_rps(port: int, extra: list[str] | None = None, n: int = 200_000) -> float:
    res = subprocess.run(["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-q", "-n", str(n), "-c", "50",
                          "-t", "set,get", *(extra or [])], capture_output=True, text=True, check=True).stdout
    values = [float(v) for v in re.findall(r"([\d.]+) requests per second", res)]
    return statistics.mean(values)


def bench_redis(rounds: int) -> dict[str, Any]:
    d = copy_example("redis")
    out: dict[str, Any] = {}
    try:
        assert corral("up", "-d", cwd=d).returncode == 0
        ports = [i["ports"]["redis"] for i in status(d)["services"]["redis"]]
        ha = HAProxy(26380, ports, balance="source")
        # CPU per request of each proxy's process: the front's is the keeper (it holds the
        # fronts), HAProxy's its own. set and get, 200,000 each.
        keeper = int(json.loads((d / ".corral" / "keeper.json").read_text())["pid"])
        cpu: dict[str, list[float]] = {"front": [], "haproxy": []}

        def costed(name: str, pid: int, port: int) -> Callable[[], float]:
            def run() -> float:
                before = cpu_seconds(pid)
                rps = redis_rps(port)
                cpu[name].append((cpu_seconds(pid) - before) / 400_000 * 1e6)
                return rps
            return run

        try:
            out["rps"] = median_rows(rounds, {"front": costed("front", keeper, 26379),
                                              "direct": lambda: redis_rps(ports[0]),
                                              "haproxy": costed("haproxy", ha.proc.pid, 26380)})
        finally:
            ha.close()
        out["cpu_us_per_request"] = {k: statistics.median(v) for k, v in cpu.items()}
        # kill -9 of the agent under keep-alive redis-benchmark: the front is the keeper's.
        agent = status(d)["agent_pid"]
        keep = subprocess.Popen(["redis-benchmark", "-h", "127.0.0.1", "-p", "26379", "-c", "20", "-n", "300000",
                                 "-t", "ping", "-q"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, preexec_fn=_default_sigint)
        time.sleep(0.5)
        running = keep.poll() is None
        os.kill(agent, signal.SIGKILL)
        said = keep.communicate(timeout=300)[0]
        errors = [ln for ln in said.splitlines() if "rror" in ln or "closed" in ln]
        for _ in range(150):
            st = status(d)
            if st.get("agent_running") and st["agent_pid"] != agent and st["status"] == "up":
                break
            time.sleep(0.2)
        out["agent_kill"] = {"ok": running, "client_errors": len(errors), "client_exit": keep.returncode,
                             "refused": st["fronts"]["redis"]["refused"], "said": errors[:3]}
        # The rolling restart under load: a new connection per request.
        load = subprocess.Popen(["redis-benchmark", "-h", "127.0.0.1", "-p", "26379", "-k", "0", "-c", "20",
                                 "-n", "10000000", "-t", "ping", "-q", "-l"], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                preexec_fn=_default_sigint)
        time.sleep(1.0)
        r = corral("restart", "redis", cwd=d)
        time.sleep(1.0)
        alive = load.poll() is None
        os.killpg(load.pid, signal.SIGINT)
        try:
            said = load.communicate(timeout=30)[0]
            hung = False
        except subprocess.TimeoutExpired:
            os.killpg(load.pid, signal.SIGKILL)
            said, hung = load.communicate()[0], True
        errors = [ln for ln in said.splitlines() if "rror" in ln]
        out["restart"] = {"ok": r.returncode == 0, "client_alive_throughout": alive, "client_errors": len(errors),
                          "client_hung": hung, "said": errors[:3]}
        # Keep-alive: the stop of each replica waits for the client's connections (drain).
        keep = subprocess.Popen(["redis-benchmark", "-h", "127.0.0.1", "-p", "26379", "-c", "20", "-n", "300000",
                                 "-t", "ping", "-q"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, preexec_fn=_default_sigint)
        time.sleep(0.5)
        running = keep.poll() is None
        r = corral("restart", "redis", cwd=d)
        said = keep.communicate(timeout=300)[0]
        errors = [ln for ln in said.splitlines() if "rror" in ln or "closed" in ln]
        out["restart_keepalive"] = {"ok": r.returncode == 0 and running, "client_errors": len(errors),
                                    "client_exit": keep.returncode, "said": errors[:3]}
    finally:
        corral("down", cwd=d)
        shutil.rmtree(d, ignore_errors=True)
    return out


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process, all its threads, so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _default_sigint() -> None:
    # A shell's background job ignores SIGINT, and the child would inherit that: the
    # client must end on it (and print its summary).
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# --- nginx -----------------------------------------------------------------------------


def fetch(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
        return str(r.read().decode().strip())


def bench_nginx(rounds: int) -> dict[str, Any]:
    d = copy_example("nginx")
    spec = d / "corral.yaml"
    spec.write_text(spec.read_text().replace("/tmp/corral-nginx-demo-{instance}.sick", f"{d}/{{instance}}.sick"))
    took: list[float] = []
    try:
        assert corral("up", "-d", cwd=d).returncode == 0
        for _ in range(max(3, rounds)):
            sick = d / "api-1.sick"
            t0 = time.monotonic()
            sick.touch()
            while any(fetch(28080) == "api-1" for _ in range(6)):
                time.sleep(0.005)
            took.append(time.monotonic() - t0)
            sick.unlink()
            while {fetch(28080) for _ in range(9)} != {"api-0", "api-1", "api-2"}:
                time.sleep(0.02)
    finally:
        corral("down", cwd=d)
        shutil.rmtree(d, ignore_errors=True)
    return {"reload_s": statistics.median(took), "samples": took}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--only", choices=("postgres", "redis", "nginx"), action="append",
                    help="run only these (repeatable)")
    args = ap.parse_args()
    wanted = set(args.only or ("postgres", "redis", "nginx"))
    results: dict[str, Any] = {}
    have = {t: shutil.which(t) is not None for t in ("pgbench", "redis-benchmark", "haproxy", "nginx")}
    have["nginx"] = have["nginx"] or Path("/usr/sbin/nginx").exists()
    if "postgres" not in wanted:
        pass
    elif have["pgbench"] and have["haproxy"]:
        results["postgres"] = bench_postgres(args.rounds, args.seconds)
    else:
        print("skipped PostgreSQL: needs pgbench (postgresql) and haproxy")
    if "redis" not in wanted:
        pass
    elif have["redis-benchmark"] and have["haproxy"]:
        results["redis"] = bench_redis(args.rounds)
    else:
        print("skipped Redis: needs redis-benchmark (redis-tools) and haproxy")
    if "nginx" not in wanted:
        pass
    elif have["nginx"]:
        results["nginx"] = bench_nginx(args.rounds)
    else:
        print("skipped nginx: needs nginx")
    print(f"{'measure':<58} {'target':>12} {'median':>12}")
    if "postgres" in results:
        t = results["postgres"]["tps"]
        print(f"{'pgbench -c 8 tps through the front (direct, HAProxy)':<58} {'>= 0.9x':>12} "
              f"{t['front']:>12.0f}   direct {t['direct']:.0f} ({t['front'] / t['direct']:.2f}x), "
              f"HAProxy {t['haproxy']:.0f} ({t['haproxy'] / t['direct']:.2f}x)")
        print(f"{'postgres: clean shutdown, no recovery at the next up':<58} {'yes':>12} "
              f"{results['postgres']['clean_shutdown'] and results['postgres']['no_recovery']!s:>12}")
    if "redis" in results:
        r = results["redis"]["rps"]
        print(f"{'redis-benchmark req/s through the front (HAProxy, direct)':<58} {'>= HAProxy':>12} "
              f"{r['front']:>12.0f}   HAProxy {r['haproxy']:.0f} ({r['front'] / r['haproxy']:.2f}x), "
              f"direct {r['direct']:.0f}")
        rs = results["redis"]["restart"]
        print(f"{'rolling restart under redis-benchmark -k 0: client errors':<58} {'0':>12} "
              f"{rs['client_errors']:>12}" + ("   (the client hung)" if rs["client_hung"] else ""))
        c = results["redis"]["cpu_us_per_request"]
        print(f"{'CPU per request, front (the keeper) vs HAProxy (us)':<58} {'report':>12} "
              f"{c['front']:>12.2f}   HAProxy {c['haproxy']:.2f} ({c['front'] / c['haproxy']:.2f}x)")
        ak = results["redis"]["agent_kill"]
        print(f"{'kill -9 of the agent under keep-alive redis-benchmark: errors':<58} {'0':>12} "
              f"{ak['client_errors'] + (ak['client_exit'] != 0) + ak['refused']:>12}")
        rk = results["redis"]["restart_keepalive"]
        print(f"{'rolling restart under keep-alive redis-benchmark: errors':<58} {'0':>12} "
              f"{rk['client_errors'] + (rk['client_exit'] != 0):>12}")
    if "nginx" in results:
        print(f"{'nginx: health change to the new upstream set served (s)':<58} {'<= 1':>12} "
              f"{results['nginx']['reload_s']:>12.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
