"""pytest-benchmark: one reservation in the machine ledger from Python, end to end.

The ledger holds 1000 claims (each with an auto port) of two other stacks; the bench places
one instance of a third stack (exclusive cores, memory, a port) through its Scheduler in
one reservation of its own (BEGIN IMMEDIATE, reap, read the others, place, write, COMMIT)
and gives it back. ``changed``: another stack wrote to the ledger just before each
reservation (so all 1000 claims are read again), the worst case; ``unchanged``: nothing
did. Target: at most 1 ms.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from corral import Machine, PortAllocator, Topology
from corral.machine import Holder
from corral.scheduler import Scheduler
from corral.spec import parse_spec

SPEC = """
name: bench
services:
  worker:
    command: ["true"]
    ports: {http: auto}
    resources: {cores: 1, memory: 64Mi}
  filler:
    replicas: 500
    command: ["true"]
    ports: {http: auto}
    resources: {cpu: 0.001, memory: 1Mi}
"""


def _stack(m: Machine, name: str, tmp: Path) -> Scheduler:
    topo = Topology.detect()
    rm = m.resources(topo)
    ports = PortAllocator(20000, 32000)
    holder = Holder.of(name, name, tmp, tmp / name)
    return Scheduler(topo, rm, ports, bind_check=False, claims=m.claims(holder, rm, ports))


def _bench(benchmark: Any, tmp_path: Path, changed: bool) -> None:
    m = Machine(tmp_path / "ledger")
    spec = parse_spec(SPEC, "bench.yaml")
    for other in ("a", "b"):
        s = _stack(m, other, tmp_path)
        s.plan(spec.model_copy(update={"services": {"filler": spec.services["filler"]}}))
    assert sum(1 for c in m.view().claims if c.stack in ("a", "b") and c.ports) == 1000
    me = _stack(m, "me", tmp_path)
    poke = _stack(m, "c", tmp_path)
    worker = spec.services["worker"]
    benchmark.extra_info["ops"] = 1

    def reserve() -> None:
        p = me.place_one("worker", 0, worker, None)
        me.release_one(p)

    def setup() -> None:
        if changed:
            poke.release_port(poke.front_port(25000, "x.front"))

    benchmark.pedantic(reserve, setup=setup, rounds=200, warmup_rounds=5)
    assert os.path.exists(m.store.path)


def test_reservation_against_1000_claims_changed(benchmark: Any, tmp_path: Path) -> None:
    _bench(benchmark, tmp_path, changed=True)


def test_reservation_against_1000_claims_unchanged(benchmark: Any, tmp_path: Path) -> None:
    _bench(benchmark, tmp_path, changed=False)
