"""`make bench-metrics`: the cost of Prometheus metrics under 200 instances.

The same 200 tiny servers as bench-bringup (readiness tcp every 1 s) under `corral up -d
--metrics`, then:
- 50 scrapes of `/metrics` back to back, each timed from outside (connect to last byte):
  the median is the figure (target <= 10 ms);
- the agent's CPU over a window in which a client scrapes once a second, as Prometheus
  would (target: the idle agent with a scrape a second stays under 1 % of a core), beside
  the same window without scrapes, in the same run.
Results go to bench-results/metrics.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bringup import CORRAL, ROOT, SERVER, TICK, cpu_ticks, spec

PORT = 23099


def scrape() -> tuple[float, int]:
    t = time.perf_counter()
    c = http.client.HTTPConnection("127.0.0.1", PORT, timeout=10)
    c.request("GET", "/metrics")
    body = c.getresponse().read()
    c.close()
    return time.perf_counter() - t, len(body)


def agent_cpu(agent: int, seconds: float, scraping: bool) -> float:
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(1.0):
            scrape()

    t = threading.Thread(target=loop, daemon=True)
    if scraping:
        t.start()
    c0, w0 = cpu_ticks(agent), time.perf_counter()
    time.sleep(seconds)
    c1, w1 = cpu_ticks(agent), time.perf_counter()
    stop.set()
    return 100.0 * (c1 - c0) / TICK / (w1 - w0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=200)
    ap.add_argument("--idle", type=float, default=30.0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results" / "metrics.json")
    args = ap.parse_args()
    if not SERVER.exists():
        sys.exit(f"{SERVER} is missing: cargo build --release -p corral-core --example tiny_server")
    work = Path(tempfile.mkdtemp(prefix="corral-metrics-"))
    (work / "corral.yaml").write_text(spec(args.instances, 50, 24000))
    env = {**os.environ, "CORRAL_STATE_DIR": str(work / ".corral")}
    res: dict[str, float] = {}
    try:
        subprocess.run([*CORRAL, "up", "-d", "--metrics", f"127.0.0.1:{PORT}"], cwd=work, env=env, check=True,
                       capture_output=True)
        st = json.loads(subprocess.run([*CORRAL, "status", "--json"], cwd=work, env=env, check=True,
                                       capture_output=True, text=True).stdout)
        agent = int(st["agent_pid"])
        time.sleep(2.0)
        runs = [scrape() for _ in range(50)]
        res["scrape_median_ms"] = statistics.median(t for t, _ in runs) * 1000
        res["scrape_bytes"] = runs[-1][1]
        time.sleep(1.0)
        res["idle_cpu_pct"] = agent_cpu(agent, args.idle, scraping=False)
        res["idle_scraped_cpu_pct"] = agent_cpu(agent, args.idle, scraping=True)
    finally:
        subprocess.run([*CORRAL, "down"], cwd=work, env=env, capture_output=True, timeout=120)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"instances": args.instances, **res}, indent=2))
    print(f"\nPrometheus metrics under {args.instances} instances, {os.cpu_count()} CPUs")
    print(f"{'measure':<46}{'target':>10}{'corral':>12}")
    print(f"{'one scrape, median of 50':<46}{'10ms':>10}{res['scrape_median_ms']:>10.2f}ms")
    print(f"{'agent CPU, idle, a scrape every second':<46}{'1%':>10}{res['idle_scraped_cpu_pct']:>11.2f}%")
    print(f"(the same window without scrapes: {res['idle_cpu_pct']:.2f}%; a scrape is {res['scrape_bytes']:.0f} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
