"""corral's mechanisms orchestrating real processes, from Python.

Starts three replicas of a tiny HTTP service, each on a port from the
PortAllocator and a CPU share from the ResourceManager (the worker gets an
exclusive core when the machine has one to spare), registers them once they
answer, balances requests over them with retries and per-replica circuit
breakers, kills one replica to show the breaker ejecting it, and stops
everything by process group.

Run: `make demo` (or `python examples/orchestration_demo.py` with corral installed).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from corral import (
    CircuitBreaker,
    CircuitOpenError,
    Instance,
    InsufficientResources,
    LoadBalancer,
    PortAllocator,
    ResourceManager,
    ResourceRequest,
    RetryPolicy,
    ServiceRegistry,
    Topology,
    retry,
)

SERVER = """
import http.server, os, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"{os.environ['NAME']} pid={os.getpid()} cpus={sorted(os.sched_getaffinity(0))}".encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def wait_listening(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise TimeoutError(f"port {port} never opened")


def main() -> int:
    topo = Topology.detect()
    print(f"topology: CPUs {topo.cpus}, {len(topo.numa_nodes)} NUMA node(s), {topo.memory_mb} MiB")
    resources = ResourceManager(topo, memory_mb=1024)
    ports = PortAllocator(20000, 32000, check_bind="127.0.0.1")
    registry = ServiceRegistry()
    procs: dict[str, subprocess.Popen[bytes]] = {}
    grants = []
    allocated_ports: list[int] = []
    try:
        for i in range(3):
            name = f"api-{i}"
            try:
                grant = resources.allocate(ResourceRequest(cores=1, memory_mb=64) if i == 0
                                           else ResourceRequest(cpu=0.25, memory_mb=64))
            except InsufficientResources as e:
                print(f"{name}: no exclusive core ({e}); using a shared share")
                grant = resources.allocate(ResourceRequest(cpu=0.25, memory_mb=64))
            grants.append(grant)
            port = ports.allocate()
            allocated_ports.append(port)
            cpus = set(grant.cpus) or set(topo.cpus)
            proc = subprocess.Popen(
                [sys.executable, "-c", SERVER, str(port)],
                env={**os.environ, "NAME": name},
                start_new_session=True,  # its own process group, so stopping it stops all it started
                preexec_fn=lambda c=cpus: os.sched_setaffinity(0, c),
            )
            procs[name] = proc
            wait_listening(port)
            registry.register(Instance(service="api", id=name, host="127.0.0.1", port=port,
                                       meta={"cpus": ",".join(map(str, sorted(cpus)))}))
            print(f"{name}: pid {proc.pid}, port {port}, cpus {sorted(cpus)}, grant {grant.id}")

        replicas = registry.instances("api", healthy_only=True)
        lb = LoadBalancer([r.address for r in replicas], strategy="least_connections")
        breakers = {r.address: CircuitBreaker(failure_threshold=2, reset_timeout=30, name=r.id) for r in replicas}

        @retry(RetryPolicy.exponential(0.01, max_attempts=4), on=(OSError, CircuitOpenError))
        def request() -> str:
            with lb.connection() as addr:
                try:
                    return str(breakers[addr].call(fetch, addr))
                except CircuitOpenError:
                    lb.mark_down(addr)  # ejected until its breaker lets a trial through
                    raise

        def fetch(addr: str) -> str:
            with urllib.request.urlopen(f"http://{addr}/", timeout=2) as r:
                return r.read().decode()

        for _ in range(6):
            print("  ->", request())

        victim = replicas[1]
        print(f"killing {victim.id} (pid {procs[victim.id].pid}) with SIGKILL")
        os.killpg(procs[victim.id].pid, signal.SIGKILL)
        procs[victim.id].wait()
        registry.set_health(victim.id, False)
        for _ in range(6):
            print("  ->", request())
        b = breakers[victim.address]
        print(f"breaker for {victim.id}: {b.state}, stats {b.stats()}")
        print(f"healthy now: {[i.id for i in registry.instances('api', healthy_only=True)]}")
        return 0
    finally:
        for name, proc in procs.items():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            print(f"{name}: stopped (exit {proc.returncode})")
        for g in grants:
            resources.release(g)
        for p in allocated_ports:
            ports.release(p)
        print(f"released: {resources.usage().grants} grants outstanding, {ports.in_use} ports in use")


if __name__ == "__main__":
    raise SystemExit(main())
