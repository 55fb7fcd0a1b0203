"""`make bench-survive`: kill -9 of the agent under 200 instances, and what it costs.

The same 200 tiny servers as bench-bringup (readiness tcp every 1 s, restart always) plus a
printer that writes a numbered line every 20 ms, under `corral up -d`. Then `kill -9` of
the agent, measured from outside:
- until the keeper has started a new agent (its pid in keeper.json);
- until every instance is supervised again with its probes resumed (each one's
  `running -> healthy` after the kill, read from the event log);
- how many instances were restarted by it (pids that changed): the target is none;
- lines of the printer lost across the kill (its log must count 1, 2, 3, ... unbroken);
- the keeper's memory (RSS and PSS, /proc/PID/smaps_rollup), total and per instance;
- the new agent's CPU while it supervises the 200 idly.
Results go to bench-results/survive.json and a table with the targets.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bringup import CORRAL, ROOT, SERVER, TICK, cpu_ticks, spec

TARGETS = {"keeper_restart_s": 1.0, "readopted_s": 1.0, "restarted": 0, "lines_lost": 0, "idle_cpu_pct": 1.0}


def smaps(pid: int) -> tuple[float, float]:
    """RSS and PSS, MiB."""
    vals = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if parts and parts[0] in ("Rss:", "Pss:"):
            vals[parts[0]] = int(parts[1]) / 1024
    return vals["Rss:"], vals["Pss:"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=200)
    ap.add_argument("--idle", type=float, default=30.0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results" / "survive.json")
    args = ap.parse_args()
    if not SERVER.exists():
        sys.exit(f"{SERVER} is missing: cargo build --release -p corral-core --example tiny_server")
    work = Path(tempfile.mkdtemp(prefix="corral-survive-"))
    text = spec(args.instances, 50, 24000) + (
        '  printer:\n    command: ["sh", "-c", "i=0; while true; do i=$((i+1)); echo line $i; sleep 0.02; done"]\n')
    (work / "corral.yaml").write_text(text)
    state = work / ".corral"
    env = {**os.environ, "CORRAL_STATE_DIR": str(state)}
    res: dict[str, float] = {}
    try:
        subprocess.run([*CORRAL, "up", "-d"], cwd=work, env=env, check=True, capture_output=True)
        st = json.loads(subprocess.run([*CORRAL, "status", "--json"], cwd=work, env=env, check=True,
                                       capture_output=True, text=True).stdout)
        before = {i["id"]: i["pid"] for insts in st["services"].values() for i in insts}
        n = len(before)
        time.sleep(3.0)
        keeper = json.loads((state / "keeper.json").read_text())
        res["keeper_rss_mib"], res["keeper_pss_mib"] = smaps(int(keeper["pid"]))
        res["keeper_pss_kib_per_instance"] = res["keeper_pss_mib"] * 1024 / n
        killed_at, t0 = time.time(), time.perf_counter()
        os.kill(int(st["agent_pid"]), signal.SIGKILL)
        while True:
            k = json.loads((state / "keeper.json").read_text())
            if k.get("agent_pid") not in (None, st["agent_pid"]):
                res["keeper_restart_s"] = time.perf_counter() - t0
                break
            if time.perf_counter() - t0 > 30:
                sys.exit("the keeper did not restart the agent")
            time.sleep(0.002)
        # Every instance healthy again under the new agent: its running -> healthy after the kill.
        while True:
            with sqlite3.connect(state / "state.db", timeout=5) as c:
                rows = c.execute("SELECT instance, MAX(at) FROM events WHERE at > ? AND old = 'running' AND "
                                 "new = 'healthy' GROUP BY instance", (killed_at,)).fetchall()
            if len(rows) >= n:
                res["readopted_s"] = max(at for _, at in rows) - killed_at
                break
            if time.perf_counter() - t0 > 60:
                sys.exit(f"only {len(rows)} of {n} instances healthy again after 60 s")
            time.sleep(0.05)
        st2 = json.loads(subprocess.run([*CORRAL, "status", "--json"], cwd=work, env=env, check=True,
                                        capture_output=True, text=True).stdout)
        after = {i["id"]: i["pid"] for insts in st2["services"].values() for i in insts}
        res["restarted"] = sum(1 for k_, p in before.items() if after.get(k_) != p)
        agent = int(st2["agent_pid"])
        time.sleep(2.0)
        c0, w0 = cpu_ticks(agent), time.perf_counter()
        time.sleep(args.idle)
        c1, w1 = cpu_ticks(agent), time.perf_counter()
        res["idle_cpu_pct"] = 100.0 * (c1 - c0) / TICK / (w1 - w0)
        lines = [int(x.split()[1]) for x in (state / "logs" / "printer-0.log").read_text().splitlines()
                 if x.startswith("line ")]
        res["printer_lines"] = len(lines)
        res["lines_lost"] = (lines[-1] - lines[0] + 1 - len(lines)) if lines else -1
    finally:
        subprocess.run([*CORRAL, "down"], cwd=work, env=env, capture_output=True, timeout=120)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"instances": n, **res}, indent=2))
    print(f"\nkill -9 of the agent under {n} instances, {os.cpu_count()} CPUs")
    print(f"{'measure':<40}{'target':>10}{'corral':>12}")
    for label, key, unit in (("keeper started a new agent", "keeper_restart_s", "s"),
                             ("all re-adopted, probes resumed", "readopted_s", "s"),
                             ("instances restarted by it", "restarted", ""), ("printer lines lost", "lines_lost", ""),
                             ("new agent's CPU, idle", "idle_cpu_pct", "%")):
        print(f"{label:<40}{TARGETS[key]:>9g}{unit or ' '}{res[key]:>11.3f}{unit}")
    print(f"(keeper RSS {res['keeper_rss_mib']:.1f} MiB, PSS {res['keeper_pss_mib']:.1f} MiB = "
          f"{res['keeper_pss_kib_per_instance']:.0f} KiB per instance; printer lines {res['printer_lines']:.0f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
