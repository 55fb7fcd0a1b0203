"""`make bench-bringup`: N instances (200 unless `N=`) of a tiny TCP server under `corral up -d`.

Measured from outside, the way a user sees it:
- from starting `corral up -d` until every port accepts (polled by this script);
- until `up -d` returns with everything healthy;
- from `kill -9` of an instance until its port accepts again (backoff 0), median of several;
- the agent's CPU time per minute while it supervises the 200 idly, probes included;
- the agent's memory (RSS, and its peak);
- from starting `corral down` until no process of the stack is left;
- day 2, against the running stack: `corral plan` of a spec that changes one service of 3
  replicas (an env var), and `corral up -d` applying it (a rolling replace, start-first),
  less the new instances' own readiness waits (read from the event log).

Each instance has a fixed or an auto port, `readiness: tcp` every 1 s and `restart: always`.
Results go to bench-results/bringup.json and a table with the targets (by N: 200 and 1000).

`--linear M` also brings up M instances in the same run and reports the cost at N against the
cost at M (1000 against 200: at most 5.5 times); `--ls SxN` brings up S stacks of N at once
and times `corral ls`. Every stack uses a private machine ledger (CORRAL_MACHINE_DIR).

With `--baseline` (or `--peers circus`), supervisord and circus (`pip install supervisor circus`) run the same 200
servers in the same run, without health probes (they have none), and the table gains their
columns: this machine is shared and noisy, so the ratios are the figures to trust.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / "target" / "release" / "examples" / "tiny_server"
CORRAL = [sys.executable, "-m", "corral"]
TICK = os.sysconf("SC_CLK_TCK")

# Targets by stack size: the figures for the smallest size at or above N (past the last,
# the last's, scaled by N for the times that grow with it).
TARGETS_BY_N = {
    200: {"all_listening_s": 0.5, "up_returns_s": 1.5, "restart_listening_s": 0.1, "down_s": 0.5,
          "idle_cpu_pct": 1.0, "agent_rss_mib": 64.0, "plan_s": 0.3, "apply_overhead_s": 1.0},
    1000: {"all_listening_s": 1.5, "up_returns_s": 3.0, "restart_listening_s": 0.1, "down_s": 1.5,
           "idle_cpu_pct": 2.0, "agent_rss_mib": 64.0, "plan_s": 1.0, "apply_overhead_s": 2.0},
}
# The cost of bring-up at N against its cost at the smaller size of --linear: at most this
# multiple of the ratio of the sizes (1000 against 200: 5.5, for a ratio of 5).
LINEAR_SLACK = 1.1
LS_TARGET_S = 0.3


def targets(n: int) -> dict[str, float]:
    for size in sorted(TARGETS_BY_N):
        if n <= size:
            return TARGETS_BY_N[size]
    last = max(TARGETS_BY_N)
    grows = {"all_listening_s", "up_returns_s", "down_s", "idle_cpu_pct", "plan_s", "apply_overhead_s"}
    return {k: v * n / last if k in grows else v for k, v in TARGETS_BY_N[last].items()}


def spec(n: int, fixed: int, base_port: int, day2: bool = True) -> str:
    lines = ["name: bringup", "port_range: [20000, 31999]", "services:"]
    for i in range(fixed):
        lines += [f"  fixed{i}:", f"    command: [\"{SERVER}\"]", f"    ports: {{tcp: {base_port + i}}}",
                  "    health: {readiness: {tcp: {port: tcp}, period: 1s}}",
                  "    restart: {policy: always, initial: 0s}"]
    lines += ["  auto:", f"    replicas: {n - fixed}", f"    command: [\"{SERVER}\"]", "    ports: {tcp: auto}",
              "    health: {readiness: {tcp: {port: tcp}, period: 1s}}",
              "    restart: {policy: always, initial: 0s}"]
    # What day 2 changes (one env var): 3 replicas probed like the rest (the first probe
    # comes at once), no drain pause.
    if not day2:
        return "\n".join(lines) + "\n"
    lines += ["  changed:", "    replicas: 3", f"    command: [\"{SERVER}\"]", "    ports: {tcp: auto}",
              "    env: {VERSION: \"1\"}", "    health: {readiness: {tcp: {port: tcp}, period: 1s}}",
              "    shutdown: {drain: 0s}"]
    return "\n".join(lines) + "\n"


def accepts(port: int, timeout: float = 0.2) -> bool:
    with socket.socket() as s:
        s.settimeout(timeout)
        return s.connect_ex(("127.0.0.1", port)) == 0


def ports_from_state(db: Path) -> list[int]:
    try:
        with sqlite3.connect(db, timeout=5) as c:
            rows = c.execute("SELECT ports FROM instances").fetchall()
    except sqlite3.OperationalError:
        return []
    return [p for (ports,) in rows for p in json.loads(ports).values()]


def instances(db: Path) -> list[tuple[str, int, dict[str, int]]]:
    with sqlite3.connect(db, timeout=5) as c:
        rows = c.execute("SELECT id, pid, ports FROM instances ORDER BY id").fetchall()
    return [(i, p, json.loads(ports)) for i, p, ports in rows]


def readiness_waits(db: Path, suffix: str) -> float:
    """Seconds the new instances (ids ending in ``suffix``) spent from running to healthy,
    summed: a rolling replace with max_parallel 1 waits for each in turn."""
    with sqlite3.connect(db, timeout=5) as c:
        rows = c.execute("SELECT instance, new, at FROM events WHERE instance LIKE ? AND new IN "
                         "('running', 'healthy') ORDER BY seq", (f"%{suffix}",)).fetchall()
    running: dict[str, float] = {}
    total = 0.0
    for iid, state, at in rows:
        if state == "running":
            running[iid] = at
        elif iid in running:
            total += at - running.pop(iid)
    return total


def cpu_ticks(pid: int) -> int:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])  # utime + stime (fields 14, 15)


def rss_mib(pid: int) -> tuple[float, float]:
    vals = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            vals[k] = int(v.split()[0]) / 1024
    return vals["VmRSS"], vals["VmHWM"]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def supervisord_config(work: Path, n: int, base: int) -> list[str]:
    """supervisord running the n servers: its command line (the config goes to ``work``)."""
    conf = ["[supervisord]", f"logfile={work}/supervisord.log", f"pidfile={work}/supervisord.pid", "nodaemon=true",
            "[unix_http_server]", f"file={work}/supervisor.sock",
            "[rpcinterface:supervisor]",
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
            "[supervisorctl]", f"serverurl=unix://{work}/supervisor.sock"]
    for i in range(n):
        conf += [f"[program:s{i}]", f"command={SERVER}", f"environment=PORT={base + i}", "startsecs=0",
                 "autorestart=true", "stdout_logfile=NONE", "stderr_logfile=NONE", "stopwaitsecs=10"]
    (work / "supervisord.conf").write_text("\n".join(conf) + "\n")
    return [str(Path(sys.executable).parent / "supervisord"), "-c", str(work / "supervisord.conf")]


def circus_config(work: Path, n: int, base: int) -> list[str]:
    """circusd running the n servers (its endpoints on Unix sockets in ``work``, not TCP)."""
    conf = ["[circus]", f"endpoint = ipc://{work}/endpoint", f"pubsub_endpoint = ipc://{work}/pubsub",
            "statsd = False", "check_delay = 1"]
    for i in range(n):
        conf += [f"[watcher:s{i}]", f"cmd = {SERVER}", "numprocesses = 1", "respawn = True",
                 "copy_env = False", "graceful_timeout = 10", f"[env:s{i}]", f"PORT = {base + i}"]
    (work / "circus.ini").write_text("\n".join(conf) + "\n")
    return [str(Path(sys.executable).parent / "circusd"), str(work / "circus.ini")]


PEERS = {"supervisord": (supervisord_config, 26000), "circus": (circus_config, 27000)}


def peer_baseline(peer: str, n: int, idle: float, kills: int) -> dict[str, float]:
    """The same workload under a peer supervisor: every port listening, back after kill -9,
    stopped, idle CPU, memory. Ports are fixed (the peers allocate none) and there are no
    health probes (they have none)."""
    make, base = PEERS[peer]
    work = Path(tempfile.mkdtemp(prefix=f"corral-{peer}-"))
    cmd = make(work, n, base)
    res: dict[str, float] = {}
    ports = set(range(base, base + n))
    t0 = time.perf_counter()
    sd = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while ports:
            ports = {p for p in ports if not accepts(p, 0.01)}
            time.sleep(0.002)
            if time.perf_counter() - t0 > 120:
                raise RuntimeError(f"{peer}: ports not listening after 120 s")
        res["all_listening_s"] = time.perf_counter() - t0
        times = []
        for i in range(kills):
            port = base + i
            pid = next(int(p) for p in os.listdir("/proc") if p.isdigit() and _environ_port(int(p)) == port)
            t = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            while accepts(port, 0.01) and time.perf_counter() - t < 5:
                pass
            while not accepts(port, 0.01):
                if time.perf_counter() - t > 10:
                    raise RuntimeError(f"{peer}: no restart")
                time.sleep(0.0005)
            times.append(time.perf_counter() - t)
        res["restart_listening_s"] = statistics.median(times)
        time.sleep(2.0)
        c0, w0 = cpu_ticks(sd.pid), time.perf_counter()
        time.sleep(idle)
        res["idle_cpu_pct"] = 100.0 * (cpu_ticks(sd.pid) - c0) / TICK / (time.perf_counter() - w0)
        res["agent_rss_mib"], _ = rss_mib(sd.pid)
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit() and _environ_port(int(p)) in range(base, base + n)]
        t = time.perf_counter()
        sd.send_signal(signal.SIGTERM)  # both stop every program, then exit
        while any(alive(p) for p in pids):
            time.sleep(0.001)
        res["down_s"] = time.perf_counter() - t
    finally:
        if sd.poll() is None:
            sd.send_signal(signal.SIGTERM)
        sd.wait(timeout=60)
    return res


def _environ_port(pid: int) -> int | None:
    try:
        if os.readlink(f"/proc/{pid}/exe") != str(SERVER):
            return None
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for kv in env:
        if kv.startswith(b"PORT="):
            return int(kv[5:])
    return None


def run_corral(n: int, fixed: int, idle: float, kills: int, machine: Path, full: bool = True) -> dict[str, float]:
    """corral under n instances: bring-up and down, and with ``full`` the rest (restart after
    kill -9, idle supervision, day 2, the interpreter's floor)."""
    res: dict[str, float] = {}
    work = Path(tempfile.mkdtemp(prefix="corral-bringup-"))
    (work / "corral.yaml").write_text(spec(n, fixed, 24000))
    state = work / ".corral"
    db = state / "state.db"
    env = {**os.environ, "CORRAL_STATE_DIR": str(state), "CORRAL_MACHINE_DIR": str(machine)}
    res: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        up = subprocess.Popen([*CORRAL, "up", "-d"], cwd=work, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
        pending: set[int] = set(range(24000, 24000 + fixed))
        known = False
        while pending or not known:
            if not known:
                ports = ports_from_state(db) if db.exists() else []
                if len(ports) == n + 3:
                    pending |= set(ports)
                    known = True
            pending = {p for p in pending if not accepts(p)}
            # Poll gently: this script shares the two CPUs with what it measures.
            time.sleep(0.002)
            if up.poll() is not None and up.returncode != 0:
                sys.exit(f"up -d failed: {up.stderr.read()}")
            if time.perf_counter() - t0 > 60:
                sys.exit(f"{len(pending)} ports still not listening after 60 s")
        res["all_listening_s"] = time.perf_counter() - t0
        _, err = up.communicate(timeout=120)
        res["up_returns_s"] = time.perf_counter() - t0
        if up.returncode != 0:
            sys.exit(f"up -d failed: {err}")
        agent = int(json.loads(subprocess.run([*CORRAL, "status", "--json"], cwd=work, env=env, capture_output=True,
                                              text=True, check=True).stdout)["agent_pid"])

        if not full:
            return _down(db, work, env, res)
        # Restart after kill -9, backoff 0: until the port accepts again.
        times = []
        for iid, pid, ports in instances(db)[: kills]:
            port = next(iter(ports.values()))
            t = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            while accepts(port, 0.01):  # the old listener may linger for a moment
                if time.perf_counter() - t > 5:
                    break
            while not accepts(port, 0.01):
                if time.perf_counter() - t > 10:
                    sys.exit(f"{iid} did not come back")
                time.sleep(0.0005)
            times.append(time.perf_counter() - t)
        res["restart_listening_s"] = statistics.median(times)
        res["restart_listening_max_s"] = max(times)

        # Idle supervision: agent CPU over the window, probes included.
        time.sleep(2.0)
        c0, w0 = cpu_ticks(agent), time.perf_counter()
        time.sleep(idle)
        c1, w1 = cpu_ticks(agent), time.perf_counter()
        res["idle_cpu_pct"] = 100.0 * (c1 - c0) / TICK / (w1 - w0)
        res["idle_cpu_s_per_min"] = 60.0 * (c1 - c0) / TICK / (w1 - w0)
        res["agent_rss_mib"], res["agent_peak_rss_mib"] = rss_mib(agent)

        # Day 2: plan, then apply, one changed service among the 200.
        spec_file = work / "corral.yaml"
        spec_file.write_text(spec_file.read_text().replace('VERSION: "1"', 'VERSION: "2"'))
        plans = []
        for _ in range(5):
            t = time.perf_counter()
            p = subprocess.run([*CORRAL, "plan"], cwd=work, env=env, capture_output=True, text=True)
            plans.append(time.perf_counter() - t)
            if p.returncode != 0 or "~ changed: env.VERSION" not in p.stdout:
                sys.exit(f"plan failed: {p.stdout} {p.stderr}")
        res["plan_s"] = statistics.median(plans)
        t = time.perf_counter()
        a = subprocess.run([*CORRAL, "up", "-d"], cwd=work, env=env, capture_output=True, text=True)
        res["apply_s"] = time.perf_counter() - t
        if a.returncode != 0:
            sys.exit(f"apply failed: {a.stdout} {a.stderr}")
        res["apply_readiness_s"] = readiness_waits(db, "-v2")
        res["apply_overhead_s"] = res["apply_s"] - res["apply_readiness_s"]

        _down(db, work, env, res)
        # The floor under the first two figures, measured now: a Python interpreter that
        # starts and imports the CLI and the engine, doing nothing else.
        for key, code in (("python_import_floor_s", "import corral.cli, corral.engine.deployment"),
                          ("import_cli_s", "import corral.cli"),
                          ("import_cli_spec_s", "import corral.cli, corral.spec"), ("python_bare_s", "pass")):
            runs = []
            for _ in range(5):
                t = time.perf_counter()
                subprocess.run([sys.executable, "-c", code], check=True)
                runs.append(time.perf_counter() - t)
            res[key] = statistics.median(runs)
    finally:
        subprocess.run([*CORRAL, "down"], cwd=work, env=env, capture_output=True, timeout=120)
    return res


def _down(db: Path, work: Path, env: dict[str, str], res: dict[str, float]) -> dict[str, float]:
    # down: until no process of the stack is left (polled here), and until the command
    # returns (it also waits for the agent itself to exit).
    pids = [pid for _, pid, _ in instances(db)]
    t = time.perf_counter()
    down = subprocess.Popen([*CORRAL, "down"], cwd=work, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    while any(alive(p) for p in pids):
        time.sleep(0.001)
    res["down_s"] = time.perf_counter() - t
    down.wait(timeout=120)
    res["down_command_s"] = time.perf_counter() - t
    return res


def ls_bench(stacks: int, per: int, machine: Path) -> dict[str, float]:
    """``stacks`` stacks of ``per`` instances each, brought up at once against one ledger:
    the median of five ``corral ls`` answers."""
    works = []
    for k in range(stacks):
        work = Path(tempfile.mkdtemp(prefix=f"corral-ls{k}-"))
        text = spec(per, 0, 0, day2=False).replace("name: bringup", f"name: ls{k}", 1)
        (work / "corral.yaml").write_text(text)
        works.append(work)
    env = {**os.environ, "CORRAL_MACHINE_DIR": str(machine)}
    try:
        ups = [subprocess.Popen([*CORRAL, "up", "-d"], cwd=w, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True) for w in works]
        for u in ups:
            _, err = u.communicate(timeout=300)
            if u.returncode != 0:
                sys.exit(f"ls bench: up -d failed: {err}")
        runs = []
        for _ in range(5):
            t = time.perf_counter()
            out = subprocess.run([*CORRAL, "ls", "--json"], env=env, capture_output=True, text=True, check=True)
            runs.append(time.perf_counter() - t)
            listed = json.loads(out.stdout)
            if len(listed) != stacks:
                sys.exit(f"ls bench: {len(listed)} stacks listed, {stacks} up")
        return {"ls_s": statistics.median(runs), "ls_stacks": stacks, "ls_instances_each": per}
    finally:
        downs = [subprocess.Popen([*CORRAL, "down"], cwd=w, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL) for w in works]
        for d in downs:
            d.wait(timeout=300)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=200)
    ap.add_argument("--fixed", type=int, default=50, help="how many get a fixed port (the rest: auto)")
    ap.add_argument("--idle", type=float, default=60.0, help="seconds of idle supervision to measure")
    ap.add_argument("--kills", type=int, default=9)
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results" / "bringup.json")
    ap.add_argument("--baseline", action="store_true", help="also run supervisord and circus on the same workload")
    ap.add_argument("--peers", default="", help="comma-separated peers to run beside (supervisord, circus)")
    ap.add_argument("--linear", type=int, default=0, metavar="M",
                    help="also bring up M instances in the same run: the cost at N against the cost at M")
    ap.add_argument("--ls", default="", metavar="STACKSxN", help="time `corral ls` with STACKS stacks of N at once")
    args = ap.parse_args()
    if not SERVER.exists():
        sys.exit(f"{SERVER} is missing: cargo build --release -p corral-core --example tiny_server")
    peer_names = list(PEERS) if args.baseline else [p for p in args.peers.split(",") if p]
    for p in peer_names:
        if p not in PEERS:
            sys.exit(f"--peers: unknown peer {p!r} (known: {', '.join(PEERS)})")
    # A private machine ledger: the bench neither sees nor disturbs the machine's stacks.
    machine = Path(tempfile.mkdtemp(prefix="corral-bench-machine-"))
    small: dict[str, float] = {}
    if args.linear:
        small = run_corral(args.linear, min(args.fixed, args.linear), 0, 0, machine, full=False)
    res = run_corral(args.instances, args.fixed, args.idle, args.kills, machine)
    ls: dict[str, float] = {}
    if args.ls:
        stacks, _, per = args.ls.partition("x")
        ls = ls_bench(int(stacks), int(per), machine)
    peers = {p: peer_baseline(p, args.instances, args.idle, args.kills) for p in peer_names}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"instances": args.instances, "idle_window_s": args.idle, **res, **ls,
                                    **({f"at_{args.linear}": small} if small else {}), **peers}, indent=2))
    tg = targets(args.instances)
    print(f"\n{args.instances} instances of tiny_server (readiness tcp 1s, restart always), {os.cpu_count()} CPUs")
    print(f"{'measure':<28}{'target':>10}{'corral':>12}" + "".join(f"{p:>14}" for p in peers))
    rows = [("every port listening", "all_listening_s", "s"), ("up -d returned", "up_returns_s", "s"),
            ("listening again after kill", "restart_listening_s", "s"), ("down, no process left", "down_s", "s"),
            ("agent CPU, idle", "idle_cpu_pct", "%"), ("agent memory (RSS)", "agent_rss_mib", "MiB"),
            ("plan against the stack", "plan_s", "s"), ("apply, less readiness", "apply_overhead_s", "s")]
    for label, key, unit in rows:
        others = "".join(f"{base[key]:>12.3f}{unit}" if key in base else f"{'-':>13}" for base in peers.values())
        print(f"{label:<28}{tg[key]:>9g}{unit}{res[key]:>11.3f}{unit}{others}")
    if small:
        ratio = res["all_listening_s"] / small["all_listening_s"]
        bound = LINEAR_SLACK * args.instances / args.linear
        print(f"{'listening, N/' + str(args.linear) + ' ratio':<28}{bound:>9.2f}x{ratio:>11.2f}x"
              f"   ({args.linear}: {small['all_listening_s']:.3f}s listening, down {small['down_s']:.3f}s)")
    if ls:
        print(f"{'corral ls, ' + args.ls + ' stacks':<28}{LS_TARGET_S:>9g}s{ls['ls_s']:>11.3f}s")
    for p, base in peers.items():
        verdict = "before" if res["all_listening_s"] < base["all_listening_s"] else "after"
        print(f"(every port listening {verdict} {p}: {res['all_listening_s'] / base['all_listening_s']:.2f}x its time)")
    print(f"(restart max {res['restart_listening_max_s']:.3f}s over {args.kills}; down command "
          f"{res['down_command_s']:.3f}s; agent peak RSS {res['agent_peak_rss_mib']:.1f}MiB; "
          f"python start + imports alone {res['python_import_floor_s']:.3f}s; apply {res['apply_s']:.3f}s of which "
          f"readiness waits {res['apply_readiness_s']:.3f}s)")
    print(f"(medians of 5 interpreters: bare {res['python_bare_s']:.3f}s, import corral.cli "
          f"{res['import_cli_s']:.3f}s, + corral.spec {res['import_cli_spec_s']:.3f}s)")
    return 0




if __name__ == "__main__":
    raise SystemExit(main())
