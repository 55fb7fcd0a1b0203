"""Prints one table of every benchmark: operation, target, median.

Reads Criterion's estimates (target/criterion/<id>/new/estimates.json) and a
pytest-benchmark JSON file; exits non-zero when a result is missing, so a
silently skipped bench cannot pass for a measured one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (label, source, id, target in ns or None when the row is informative only)
ROWS: list[tuple[str, str, str, float | None]] = [
    ("Rust: breaker check, closed", "rust", "breaker_check_closed", 5),
    ("Rust: breaker guarded call, closed", "rust", "breaker_call_closed", None),
    ("Rust: register one service", "rust", "registry_register", 500),
    ("Rust: 1000 registrations from 8 threads", "rust", "registry_1000_from_8_threads", 500_000),
    ("Rust: lookup by service", "rust", "registry_lookup_by_service", 100),
    ("Rust: get by instance id", "rust", "registry_get_by_id", None),
    ("Rust: port allocate + release", "rust", "ports_allocate_release", 100),
    ("Rust: exclusive CPU allocation (4 cores, 7950X3D)", "rust", "resources_exclusive_4_cores_7950x3d", 2_000),
    ("Rust: CPU + memory + storage allocation", "rust", "resources_cpu_memory_storage", 3_000),
    ("Rust: place 2 cores against 1000 claims (+ set_elsewhere)", "rust", "resources_place_against_1000_claims",
     None),
    ("Rust: auto port against 1000 claims (+ set_claimed)", "rust", "ports_allocate_against_1000_claims", None),
    ("Rust: round-robin pick", "rust", "balance_round_robin", None),
    ("Rust: least-connections pick, 16", "rust", "balance_least_connections_16", None),
    ("Python: loop + call of a no-op function (floor)", "py", "test_loop_overhead_noop_call", None),
    ("Python: guarded call breaker.call(f), closed", "py", "test_breaker_call_closed", 130),
    ("Python: rejected call, open", "py", "test_breaker_rejected_open", 350),
    ("  baseline: Python raise + catch of KeyError", "py", "test_python_raise_catch_baseline", None),
    ("Python: @retry success path", "py", "test_retry_success", 300),
    ("Python: @retry, two failures then success", "py", "test_retry_two_failures_then_success", 1_500),
    ("Python: registry lookup", "py", "test_registry_lookup", 120),
    ("  baseline: dict + lock", "py", "test_registry_lookup_baseline_dict_lock", None),
    ("Python: registry register", "py", "test_registry_register", None),
    ("Python: round-robin pick", "py", "test_round_robin_pick", 80),
    ("  baseline: Python round robin + lock", "py", "test_round_robin_baseline_python", None),
    ("Python: least-connections pick, 16 backends", "py", "test_least_connections_pick_16", 100),
    ("Python: one reservation, ledger of 1000 claims, others changed", "py",
     "test_reservation_against_1000_claims_changed", 1_000_000),
    ("Python: one reservation, ledger of 1000 claims, unchanged", "py",
     "test_reservation_against_1000_claims_unchanged", 1_000_000),
    ("  baseline: Python min() scan + lock", "py", "test_least_connections_baseline_python_16", None),
    ("Python: measure a volume of 100,000 files (disk_usage)", "py", "test_disk_usage_100k_files", 100_000_000),
    ("  peer: du -sx on the same tree", "py", "test_disk_usage_100k_files_baseline_du", None),
]


def fmt(ns: float) -> str:
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.2f} µs"
    return f"{ns:.1f} ns"


def main() -> int:
    py_json = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "bench-results" / "python.json"
    py: dict[str, float] = {}
    if py_json.exists():
        for b in json.loads(py_json.read_text())["benchmarks"]:
            # Each round runs extra_info["ops"] operations (see benches/python).
            py[b["name"]] = b["stats"]["median"] * 1e9 / b.get("extra_info", {}).get("ops", 1)
    missing = 0
    print(f"{'operation':<52} {'target':>10} {'median':>10}  verdict")
    print("-" * 86)
    for label, src, key, target in ROWS:
        if src == "rust":
            est = ROOT / "target" / "criterion" / key / "new" / "estimates.json"
            median = json.loads(est.read_text())["median"]["point_estimate"] if est.exists() else None
        else:
            median = py.get(key)
        if median is None:
            missing += 1
            print(f"{label:<52} {'':>10} {'MISSING':>10}")
            continue
        verdict = "" if target is None else ("met" if median <= target else f"missed x{median / target:.2f}")
        print(f"{label:<52} {fmt(target) if target else '-':>10} {fmt(median):>10}  {verdict}")
    return 1 if missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
