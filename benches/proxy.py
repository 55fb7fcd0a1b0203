"""`make bench-proxy`: corral's proxy beside HAProxy (mode tcp, nbthread 1), same run.

wrk on CPU 0 drives three small HTTP backends through each proxy; the proxy and the
backends share CPU 1, so what one proxied request costs is what differs. Two shapes:
keep-alive connections, and a new connection per request (`Connection: close`). For each:
requests per second and the proxy's own CPU time per request (utime+stime from /proc over
the run) at 50 connections, the latency it adds at one connection (p50, p99) over going
to a backend directly, and the p99 it adds at 50 connections (under load). corral's proxy
runs the way the agent runs it: a Python process holding a `corral.Proxy`. `--rounds N`
measures every proxy N times in turn and reports medians; `--also DIR` adds another build
of the corral package (a before/after comparison of a change to the proxy, in the same run).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bringup import TICK, cpu_ticks  # the same /proc reading; benches/ is on sys.path when run

ROOT = Path(__file__).resolve().parent.parent
BACKEND = ROOT / "target" / "release" / "examples" / "http_backend"
BACKENDS = [24101, 24102, 24103]
FRONT = {"haproxy": 24110, "corral": 24111, "alt": 24112}

TARGETS = {  # HAProxy 2.6 as the issue measured it; the real bar is HAProxy in the same run.
    ("keepalive", "cpu_us"): 10.6, ("close", "cpu_us"): 56.0,
    ("keepalive", "p50_added_us"): 19.0, ("keepalive", "p99_added_us"): 23.0,
    ("close", "p50_added_us"): 50.0, ("close", "p99_added_us"): 110.0,
}

CORRAL_PROXY = """
import signal, sys
from corral import Proxy
p = Proxy("127.0.0.1", int(sys.argv[1]), strategy="round_robin")
p.set_upstreams([(f"b{i}", "127.0.0.1", int(port)) for i, port in enumerate(sys.argv[2:])])
print("ready", flush=True)
signal.sigwait({signal.SIGTERM, signal.SIGINT})
"""


def wait_listening(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listens on {port}")
        time.sleep(0.02)


_UNITS = {"us": 1.0, "ms": 1000.0, "s": 1e6}


def _micros(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    assert m, text
    return float(m.group(1)) * _UNITS[m.group(2)]


def wrk(port: int, conns: int, seconds: float, close: bool) -> dict[str, float]:
    cmd = ["taskset", "-c", "0", "wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--latency",
           f"http://127.0.0.1:{port}/"]
    if close:
        cmd[5:5] = ["-H", "Connection: close"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    reqs = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _micros(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _micros(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    bad = sum(int(x) for x in errors.groups()) if errors else 0
    bad += int(non2xx.group(1)) if non2xx else 0
    return {"requests": reqs, "rps": rps, "p50_us": p50, "p99_us": p99, "errors": bad}


def start_haproxy(work: Path) -> subprocess.Popen[bytes]:
    servers = "\n".join(f"    server b{i} 127.0.0.1:{p}" for i, p in enumerate(BACKENDS))
    (work / "haproxy.cfg").write_text(f"""global
    nbthread 1
    maxconn 4096
defaults
    mode tcp
    timeout connect 1s
    timeout client 30s
    timeout server 30s
frontend front
    bind 127.0.0.1:{FRONT["haproxy"]}
    default_backend be
backend be
    balance roundrobin
{servers}
""")
    return subprocess.Popen(["taskset", "-c", "1", "haproxy", "-f", str(work / "haproxy.cfg"), "-db"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_corral(port: int, pythonpath: Path | None = None) -> subprocess.Popen[bytes]:
    """corral's proxy on ``port``; ``pythonpath``: a directory holding another build of the
    ``corral`` package (``--also``), to measure two builds in the same run."""
    env = {**os.environ, "PYTHONPATH": str(pythonpath)} if pythonpath else None
    p = subprocess.Popen(["taskset", "-c", "1", sys.executable, "-c", CORRAL_PROXY, str(port),
                          *map(str, BACKENDS)], stdout=subprocess.PIPE, env=env)
    assert p.stdout is not None and p.stdout.readline().strip() == b"ready"
    return p


def measure(name: str, pid: int | None, port: int, seconds: float, conns: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for shape, close in (("keepalive", False), ("close", True)):
        wrk(port, conns, 1.0, close)  # warm-up
        c0 = cpu_ticks(pid) if pid else 0
        load = wrk(port, conns, seconds, close)
        cpu_s = (cpu_ticks(pid) - c0) / TICK if pid else 0.0
        single = wrk(port, 1, seconds, close)
        out[shape] = {"rps": load["rps"], "requests": load["requests"], "errors": load["errors"] + single["errors"],
                      "cpu_us": 1e6 * cpu_s / load["requests"] if pid else 0.0,
                      "p50_us": single["p50_us"], "p99_us": single["p99_us"],
                      "load_p50_us": load["p50_us"], "load_p99_us": load["p99_us"]}
        print(f"  {name:<8} {shape:<9} {load['rps']:>10.0f} req/s  "
              + (f"{out[shape]['cpu_us']:>6.1f} µs CPU/req  " if pid else "")
              + f"p50 {single['p50_us']:.0f} µs  p99 {single['p99_us']:.0f} µs", flush=True)
    return out


def _medians(runs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per shape and measure, the median over rounds (errors: their sum)."""
    out: dict[str, dict[str, float]] = {}
    for shape in runs[0]:
        out[shape] = {k: (sum(r[shape][k] for r in runs) if k == "errors" else
                          statistics.median(r[shape][k] for r in runs)) for k in runs[0][shape]}
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results" / "proxy.json")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure every proxy this many times, in turn, and report medians (the machine is noisy)")
    ap.add_argument("--also", type=Path, default=None,
                    help="a directory holding another build of the corral package (a before/after comparison), "
                         "measured in the same rounds as 'alt'")
    args = ap.parse_args()
    for tool in ("wrk", "haproxy", "taskset"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing (apt-get install wrk haproxy util-linux)")
    if not BACKEND.exists():
        sys.exit(f"{BACKEND} is missing: cargo build --release -p corral-core --example http_backend")
    work = Path(tempfile.mkdtemp(prefix="corral-proxy-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        backends = subprocess.Popen(["taskset", "-c", "1", str(BACKEND), *map(str, BACKENDS)])
        procs.append(backends)
        for p in BACKENDS:
            wait_listening(p)
        haproxy = start_haproxy(work)
        procs.append(haproxy)
        corral = start_corral(FRONT["corral"])
        procs.append(corral)
        proxies = [("haproxy", haproxy.pid, FRONT["haproxy"]), ("corral", corral.pid, FRONT["corral"])]
        if args.also is not None:
            alt = start_corral(FRONT["alt"], args.also)
            procs.append(alt)
            proxies.append(("alt", alt.pid, FRONT["alt"]))
        for _, _, port in proxies:
            wait_listening(port)
        print(f"wrk on CPU 0; proxy + 3 backends on CPU 1; {args.connections} connections for req/s and CPU, "
              f"1 for latency; {args.seconds:g} s a run; {args.rounds} round(s)", flush=True)
        rounds: dict[str, list[dict[str, dict[str, float]]]] = {name: [] for name, _, _ in proxies}
        direct = measure("direct", None, BACKENDS[0], args.seconds, args.connections)
        for _ in range(args.rounds):
            for name, pid, port in proxies:
                rounds[name].append(measure(name, pid, port, args.seconds, args.connections))
        res = {"direct": direct, **{name: _medians(runs) for name, runs in rounds.items()}}
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
    for name in [n for n in res if n != "direct"]:
        for shape in ("keepalive", "close"):
            r = res[name][shape]
            r["p50_added_us"] = r["p50_us"] - res["direct"][shape]["p50_us"]
            r["p99_added_us"] = r["p99_us"] - res["direct"][shape]["p99_us"]
            r["load_p99_added_us"] = r["load_p99_us"] - res["direct"][shape]["load_p99_us"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    alt = "alt" in res
    print(f"\n{'measure':<34}{'HAProxy 2.6 (issue)':>20}{'haproxy now':>13}{'corral':>10}{'ratio':>8}"
          + (f"{'alt':>10}{'ratio':>8}" if alt else ""))
    for shape in ("keepalive", "close"):
        for key, label in (("rps", "req/s"), ("cpu_us", "proxy CPU per request, µs"),
                           ("p50_added_us", "added latency p50, µs"), ("p99_added_us", "added latency p99, µs"),
                           ("load_p99_added_us", f"added p99 at {args.connections} conns, µs")):
            h, c = res["haproxy"][shape][key], res["corral"][shape][key]
            ref = TARGETS.get((shape, key))
            ratio = c / h if h else float("nan")
            line = f"{shape + ' ' + label:<34}{(f'{ref:g}' if ref else '-'):>20}{h:>13.1f}{c:>10.1f}{ratio:>8.2f}"
            if alt:
                a = res["alt"][shape][key]
                line += f"{a:>10.1f}{(a / h if h else float('nan')):>8.2f}"
            print(line)
    if args.rounds > 1:
        print(f"(medians of {args.rounds} rounds, each proxy measured in turn)")
    errors = sum(res[n][s]["errors"] for n in res for s in res[n])
    print(f"(socket errors or non-2xx responses in all runs: {errors})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
