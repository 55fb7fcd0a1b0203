"""Must pass `mypy --strict`: the public surface as a user writes against it."""

from __future__ import annotations

import asyncio

import corral
from corral import (
    CircuitBreaker,
    CircuitOpenError,
    Instance,
    LoadBalancer,
    PortAllocator,
    ResourceManager,
    ResourceRequest,
    RetryBudget,
    RetryPolicy,
    ServiceRegistry,
    Topology,
    retry,
)

breaker = CircuitBreaker(failure_threshold=3, reset_timeout=1.0)


@breaker
def fetch(n: int) -> str:
    return str(n)


@breaker
async def fetch_async(n: int) -> str:
    return str(n)


@retry(RetryPolicy.exponential(0.01, max_attempts=4, jitter="full"), on=(OSError,), budget=RetryBudget())
def flaky(x: int) -> int:
    return x * 2


@retry(RetryPolicy.fixed(0.0))
async def flaky_async(x: int) -> int:
    return x


async def main() -> None:
    s: str = fetch(1)
    t: str = await fetch_async(2)
    u: int = flaky(3) + await flaky_async(4)
    v: int = await breaker.call_async(flaky_async, 5)
    reg = ServiceRegistry()
    reg.register(Instance(service="api", id="api-1", host="127.0.0.1", port=8080))
    inst = reg.get("api-1")
    if inst is not None:
        port: int = inst.port
        print(port)
    names: list[str] = [i.id for i in reg.instances("api", healthy_only=True)]
    ports = PortAllocator(20000, 20010)
    p: int = ports.allocate()
    ports.release(p)
    lb = LoadBalancer(["a", "b"], strategy="least_connections")
    with lb.connection() as backend:
        print(backend)
    topo = Topology.detect()
    rm = ResourceManager(topo, memory_mb=1024)
    g = rm.allocate(ResourceRequest(cpu=0.5, memory_mb=64))
    cpus: list[int] = g.cpus
    rm.release(g)
    try:
        breaker.call(fetch, 1)
    except CircuitOpenError as e:
        remaining: float = e.remaining
        print(remaining)
    print(s, t, u, v, names, cpus, corral.__version__)


asyncio.run(main())
