"""One machine, several stacks: the machine ledger, end to end through the CLI with real
processes, two or more stacks in temporary directories sharing a private ledger (the
autouse fixture points ``CORRAL_MACHINE_DIR`` at one per test): cross-stack refusals for
cores, memory, a fixed port held by a stopped service and storage, auto ports disjoint,
the race for the last core, reclaim after kill -9, ``ls``, the settings file, and ledger
files that are planted or corrupt."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import corral
from corral._core import Topology
from corral.state import StateStore
from tests.e2e import alive, cpus_allowed, env_without_state, kill_groups, wait_until

pytestmark = pytest.mark.timeout(240)

Stack = Callable[..., Path]


def run(*args: str, cwd: Path, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "corral", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env_without_state())


def _cleanup(d: Path) -> None:
    run("down", cwd=d)
    sd = d / ".corral"
    db = sd / "state.db"
    if db.exists():
        for row in StateStore.read_deployments(db):
            kill_groups([i.pid for i in StateStore.read_instances(db, row.name) if i.pid])
            if row.agent_pid and alive(row.agent_pid):
                os.kill(row.agent_pid, signal.SIGKILL)
    keeper = sd / "keeper.json"
    if keeper.exists():
        pid = json.loads(keeper.read_text()).get("pid")
        if pid and alive(int(pid)):
            os.kill(int(pid), signal.SIGKILL)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """Makes a stack directory ``name`` with ``spec`` (a corral.yaml); each is brought down,
    and whatever it recorded killed by process group, at teardown."""
    made: list[Path] = []

    def make(name: str, spec: str) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "corral.yaml").write_text(textwrap.dedent(spec).replace("{py}", sys.executable))
        made.append(d)
        return d

    yield make
    for d in made:
        _cleanup(d)


def pinned(name: str) -> str:
    return f"""
        name: {name}
        services:
          worker:
            command: ["sleep", "300"]
            resources: {{cores: 1, memory: 64Mi}}
    """


def memory_mb() -> int:
    """What the machine ledger may hand out (the default reserve: 10%, at most 1 GiB)."""
    m = Topology.detect().memory_mb
    return int(m - min(m // 10, 1024))


def test_two_stacks_never_share_an_exclusive_core(stack: Stack) -> None:
    a, b = stack("ingest", pinned("ingest")), stack("shop", pinned("shop"))
    assert run("validate", cwd=b).returncode == 0  # alone, it fits
    r = run("up", "-d", cwd=a)
    assert r.returncode == 0, r.stderr
    held = StateStore.read_instances(a / ".corral" / "state.db", "ingest")[0]
    assert cpus_allowed(held.pid or 0) == held.cpus
    cpu = held.cpus[0]
    for cmd in (("validate",), ("plan",), ("up", "-d")):
        r = run(*cmd, cwd=b)
        assert r.returncode == 2, (cmd, r.stdout, r.stderr)
        assert f"core {cpu} is held by stack 'ingest' ({a}) worker-0" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    # Nothing of the refused stack runs, nothing of it is left in the ledger.
    assert [i for i in StateStore.read_instances(b / ".corral" / "state.db", "shop") if i.is_running()] == [] \
        if (b / ".corral" / "state.db").exists() else True
    names = [h.name for h in corral.Machine().view().holders]
    assert names == ["ingest"]
    # Once the first is down, the core is free again.
    assert run("down", cwd=a).returncode == 0
    assert run("validate", cwd=b).returncode == 0
    assert corral.Machine().view().holders == []


def test_memory_is_committed_against_the_machine(stack: Stack) -> None:
    share = memory_mb() * 6 // 10
    spec = """
        name: {name}
        services:
          big:
            command: ["sleep", "300"]
            resources: {{memory: {mb}Mi}}
    """
    a = stack("ingest", spec.format(name="ingest", mb=share))
    b = stack("shop", spec.format(name="shop", mb=share))
    assert run("up", "-d", cwd=a).returncode == 0
    r = run("up", "-d", cwd=b)
    assert r.returncode == 2, r.stderr
    assert f"memory: asked {share} MiB" in r.stderr
    assert f"stack 'ingest' ({a}) holds" in r.stderr, r.stderr
    view = corral.machine_view()
    assert view.free is not None and view.free.memory_mb == memory_mb() - share


def test_a_fixed_port_stays_held_while_its_service_is_stopped(stack: Stack) -> None:
    spec = """
        name: {name}
        services:
          web:
            command: ["{{py}}", "-m", "http.server", "--bind", "127.0.0.1", "${{ports.http}}"]
            ports: {{http: 24613}}
            health:
              readiness: {{tcp: {{port: http}}, period: 100ms}}
    """
    a = stack("web", spec.format(name="web"))
    b = stack("other", spec.format(name="other"))
    assert run("up", "-d", cwd=a).returncode == 0
    assert run("stop", "web", cwd=a).returncode == 0
    wait_until(lambda: not any(i.is_running() for i in StateStore.read_instances(a / ".corral" / "state.db", "web")),
               what="web stopped")
    for cmd in (("validate",), ("up", "-d")):
        r = run(*cmd, cwd=b)
        assert r.returncode == 2, (cmd, r.stderr)
        assert f"port 24613 is held by stack 'web' ({a}) web-0" in r.stderr, r.stderr
    assert run("down", cwd=a).returncode == 0
    r = run("up", "-d", cwd=b)
    assert r.returncode == 0, r.stderr


def test_storage_is_reserved_per_filesystem_across_stacks(stack: Stack, private_machine: Path) -> None:
    (private_machine / "machine.yaml").write_text("disk_reserve: 0\n")
    probe = corral.Machine().resources(Topology.detect(), {"v": str(private_machine)})
    capacity = probe.usage().filesystems[probe.usage().volumes["v"].filesystem].capacity_mb
    share = capacity * 6 // 10
    spec = """
        name: {name}
        services:
          db:
            command: ["sleep", "300"]
            resources: {{storage: {{size: {mb}Mi, path: ./data}}}}
    """
    a = stack("ingest", spec.format(name="ingest", mb=share))
    b = stack("shop", spec.format(name="shop", mb=share))
    if os.stat(a).st_dev != os.stat(private_machine).st_dev:
        pytest.skip("the stacks' directories are on another filesystem than the ledger's probe")
    assert run("up", "-d", cwd=a).returncode == 0
    r = run("validate", cwd=b)
    assert r.returncode == 2, r.stderr
    assert "storage: asked" in r.stderr and f"stack 'ingest' ({a}) holds" in r.stderr, r.stderr


def test_auto_ports_are_disjoint_across_stacks_and_the_pool_is_one(stack: Stack, private_machine: Path) -> None:
    (private_machine / "machine.yaml").write_text("port_range: [24700, 24739]\n")
    spec = """
        name: {name}
        services:
          web:
            replicas: 15
            command: ["sleep", "300"]
            ports: {{http: auto}}
    """
    a, b, c = (stack(n, spec.format(name=n)) for n in ("one", "two", "three"))
    for d in (a, b):
        r = run("up", "-d", cwd=d)
        assert r.returncode == 0, r.stderr
    ports = [sorted(i.ports["http"] for i in StateStore.read_instances(d / ".corral" / "state.db", n))
             for d, n in ((a, "one"), (b, "two"))]
    assert all(24700 <= p <= 24739 for ps in ports for p in ps)
    assert not set(ports[0]) & set(ports[1])
    r = run("validate", cwd=c)  # 10 left of the machine's 40
    assert r.returncode == 2 and "exhausted" in r.stderr, r.stderr


RACE = """
import sys
from pathlib import Path
from corral import Deployment
from corral.exceptions import CorralError
d = Deployment.from_file(sys.argv[1])
sys.stdin.readline()  # all of them start at once
try:
    d.make_plan()
except CorralError as e:
    print("refused", e, flush=True)
    sys.exit(2)
print("won", d.plan.instances().__next__().cpus, flush=True)
sys.stdin.readline()  # hold it until told
"""


def test_the_race_for_the_last_core_has_one_winner(stack: Stack, tmp_path: Path) -> None:
    dirs = [stack(f"s{k}", pinned(f"s{k}")) for k in range(6)]
    script = tmp_path / "race.py"
    script.write_text(RACE)
    for _ in range(8):
        procs = [subprocess.Popen([sys.executable, str(script), str(d / "corral.yaml")], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_without_state())
                 for d in dirs]
        assert all(p.stdin is not None for p in procs)
        for p in procs:
            p.stdin.write("go\n")  # type: ignore[union-attr]
            p.stdin.flush()  # type: ignore[union-attr]
        lines = [p.stdout.readline() for p in procs]  # type: ignore[union-attr]
        won = [line for line in lines if line.startswith("won")]
        assert len(won) == 1, lines
        assert sum(1 for line in lines if line.startswith("refused") and "is held by stack" in line) == 5, lines
        for p in procs:
            p.stdin.close()  # type: ignore[union-attr]
            p.wait(30)
        # The winner exited without down: its process is gone, so the next round reclaims it.
    # And through the real CLI, twice: exactly one of two racing `up -d` wins.
    for _ in range(2):
        procs = [subprocess.Popen([sys.executable, "-m", "corral", "up", "-d"], cwd=d, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env_without_state()) for d in dirs[:2]]
        codes = sorted(p.wait(90) for p in procs)
        assert codes == [0, 2], [p.stderr.read() for p in procs]  # type: ignore[union-attr]
        for d in dirs[:2]:
            run("down", cwd=d)


def _kill_all(d: Path) -> None:
    sd = d / ".corral"
    keeper = json.loads((sd / "keeper.json").read_text())["pid"]
    rows = StateStore.read_deployments(sd / "state.db")
    pids = [int(keeper), *(r.agent_pid for r in rows if r.agent_pid)]
    for row in rows:
        pids += [i.pid for i in StateStore.read_instances(sd / "state.db", row.name) if i.pid]
    for pid in pids:
        # Gone already is what we want: the keeper's death makes the agent restart its
        # instances, so one read from state.db may have exited before its turn here.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not any(alive(p) for p in pids), what="everything of the stack gone")


def test_a_stack_killed_with_its_agent_and_keeper_loses_its_claims_at_the_next_reservation(stack: Stack) -> None:
    a, b = stack("ingest", pinned("ingest")), stack("shop", pinned("shop"))
    assert run("up", "-d", cwd=a).returncode == 0
    _kill_all(a)
    view = corral.Machine().view()
    assert [(h.name, h.alive) for h in view.holders] == [("ingest", False)]
    r = run("up", "-d", cwd=b)
    assert r.returncode == 0, r.stderr
    events = run("events", cwd=b).stdout
    assert f"machine ledger: reclaimed what stack 'ingest' ({a}) held: its agent, keeper and instances are all " \
           f"gone" in events, events
    assert [h.name for h in corral.Machine().view().holders] == ["shop"]


def test_a_re_adopting_agent_keeps_its_stacks_claims(stack: Stack) -> None:
    a, b = stack("ingest", pinned("ingest")), stack("shop", pinned("shop"))
    assert run("up", "-d", cwd=a).returncode == 0
    row = StateStore.read_deployments(a / ".corral" / "state.db")[-1]
    os.kill(row.agent_pid or 0, signal.SIGKILL)
    # Dead agent, live keeper and instance: the claims hold, before and after the new agent.
    assert run("validate", cwd=b).returncode == 2
    wait_until(lambda: (StateStore.read_deployments(a / ".corral" / "state.db")[-1].agent_pid != row.agent_pid
                        and StateStore.read_deployments(a / ".corral" / "state.db")[-1].agent_running()),
               timeout=30, what="the keeper's new agent")
    wait_until(lambda: any(h.agent_alive for h in corral.Machine().view().holders), timeout=30,
               what="the new agent in the ledger")
    r = run("validate", cwd=b)
    assert r.returncode == 2 and "is held by stack 'ingest'" in r.stderr, r.stderr


def test_ls_lists_every_stack_with_what_it_holds(stack: Stack) -> None:
    a = stack("ingest", pinned("ingest"))
    b = stack("shop", """
        name: shop
        services:
          web:
            replicas: 2
            command: ["sleep", "300"]
            ports: {http: auto}
            resources: {cpu: 0.25, memory: 32Mi}
    """)
    c = stack("empty", """
        name: empty
        services:
          job:
            command: ["true"]
            restart: {policy: "no"}
    """)
    for d in (a, b, c):
        r = run("up", "-d", cwd=d)
        assert r.returncode == 0, r.stderr
    r = run("ls", "--json", cwd=a)
    assert r.returncode == 0, r.stderr
    rows = {x["name"]: x for x in json.loads(r.stdout)}
    assert set(rows) == {"ingest", "shop", "empty"}
    assert rows["ingest"]["directory"] == str(a) and len(rows["ingest"]["cpus"]) == 1
    assert rows["ingest"]["memory_mb"] == 64 and rows["ingest"]["healthy"] == rows["ingest"]["total"] == 1
    assert rows["shop"]["millicores"] == 500 and rows["shop"]["memory_mb"] == 64
    assert len(rows["shop"]["ports"]) == 2 and rows["shop"]["state"] == "up"
    assert rows["empty"]["healthy"] == 1 and rows["empty"]["cpus"] == []
    assert all(x["agent_pid"] for x in rows.values())
    text = run("ls", cwd=a).stdout.splitlines()
    assert text[0].split() == ["NAME", "DIRECTORY", "STATE", "INSTANCES", "CORES", "CPU", "MEMORY", "STORAGE",
                               "PORTS", "AGENT"]
    assert [line.split()[0] for line in text[1:]] == ["empty", "ingest", "shop"]
    assert "2/2" in text[3] and "0.5" in text[3] and "64Mi" in text[3]
    # status --map of one stack draws the others' cores under their names.
    m = run("status", "--map", cwd=b).stdout
    cpu = rows["ingest"]["cpus"][0]
    assert f"cpu {cpu}: ingest:worker-0" in m, m


def test_machine_settings_are_applied_and_shown(stack: Stack, private_machine: Path) -> None:
    settings = "reserved_cpus: []\nmemory_reserve: 2Gi\nport_range: [24800, 24899]\n"
    (private_machine / "machine.yaml").write_text(settings)
    r = run("machine", cwd=private_machine)
    assert r.returncode == 0, r.stderr
    assert f"settings: {private_machine / 'machine.yaml'}" in r.stdout
    assert "reserved_cpus: - [file]" in r.stdout and "port_range: 24800-24899 [file]" in r.stdout
    assert "cpu_overcommit: 1 [default]" in r.stdout
    doc = json.loads(run("machine", "--json", cwd=private_machine).stdout)
    topo = Topology.detect()
    assert doc["free"]["usable_cpus"] == list(topo.cpus)
    assert doc["free"]["memory_capacity_mb"] == topo.memory_mb - 2048
    if len(topo.cpus) < 2:
        return
    # With no CPU kept for the system, as many pinned stacks as CPUs fit, each on its own.
    dirs = [stack(f"p{k}", pinned(f"p{k}")) for k in range(len(topo.cpus))]
    for d in dirs:
        r = run("up", "-d", cwd=d)
        assert r.returncode == 0, r.stderr
    held = [StateStore.read_instances(d / ".corral" / "state.db", f"p{k}")[0].cpus for k, d in enumerate(dirs)]
    assert sorted(c for cpus in held for c in cpus) == list(topo.cpus)


@pytest.mark.parametrize(("text", "where"), [
    ("memory_overcommit: 0.5\n", "machine.yaml:1: memory_overcommit: expected a ratio of at least 1.0"),
    ("reserved: [0]\n", "machine.yaml:1: reserved: unknown setting"),
    ("port_range: [30000, 20000]\n", "machine.yaml:1: port_range: expected two ports"),
    ("disk_reserve: lots\n", "machine.yaml:1: disk_reserve: expected a size"),
    ("cpu_overcommit: 1\n: [\n", "machine.yaml:2: invalid YAML"),
])
def test_a_bad_settings_file_is_an_error_that_says_where(stack: Stack, private_machine: Path, text: str,
                                                         where: str) -> None:
    (private_machine / "machine.yaml").write_text(text)
    a = stack("ingest", pinned("ingest"))
    for cmd in (("validate",), ("up", "-d"), ("machine",)):
        r = run(*cmd, cwd=a)
        assert r.returncode == 2, (cmd, r.stderr)
        assert where in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


def test_planted_ledger_files_are_refused(stack: Stack, private_machine: Path) -> None:
    a = stack("ingest", pinned("ingest"))
    os.chmod(private_machine, 0o777)
    r = run("validate", cwd=a)
    assert r.returncode == 2 and "can be written by others" in r.stderr, r.stderr
    os.chmod(private_machine, 0o700)
    (private_machine / "machine.yaml").write_text("cpu_overcommit: 2\n")
    os.chmod(private_machine / "machine.yaml", 0o666)
    r = run("validate", cwd=a)
    assert r.returncode == 2 and "machine settings" in r.stderr and "written by others" in r.stderr, r.stderr
    (private_machine / "machine.yaml").unlink()
    assert run("validate", cwd=a).returncode == 0
    ledger = private_machine / "ledger.db"
    assert (os.stat(ledger).st_mode & 0o777) == 0o600
    ledger.unlink()
    os.symlink("/etc/passwd", ledger)
    r = run("validate", cwd=a)
    assert r.returncode == 2 and "ledger" in r.stderr and "Traceback" not in r.stderr, r.stderr
    ledger.unlink()
    if os.geteuid() == 0:
        ledger.write_bytes(b"")
        os.chown(ledger, 65534, 65534)
        r = run("validate", cwd=a)
        assert r.returncode == 2 and "owned by uid 65534" in r.stderr, r.stderr


def test_a_corrupt_ledger_is_rebuilt_from_the_live_stacks(stack: Stack, private_machine: Path) -> None:
    a, b = stack("ingest", pinned("ingest")), stack("shop", pinned("shop"))
    assert run("up", "-d", cwd=a).returncode == 0
    ledger = private_machine / "ledger.db"
    ledger.write_bytes(b"this is not a database" * 100)
    r = run("validate", cwd=b)
    assert r.returncode == 2, r.stderr
    assert "is held by stack 'ingest'" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert list(private_machine.glob("ledger.db.corrupt-*"))
    assert [h.name for h in corral.Machine().view().holders] == ["ingest"]


def test_the_python_api_reads_the_machine(stack: Stack) -> None:
    a = stack("ingest", pinned("ingest"))
    assert run("up", "-d", cwd=a).returncode == 0
    view = corral.machine_view()
    assert isinstance(view, corral.MachineView)
    (h,) = view.holders
    assert (h.name, h.directory, h.alive, h.memory_mb) == ("ingest", str(a), True, 64)
    (c,) = view.claims
    assert c.instance == "worker-0" and c.cpus == h.cpus
    assert view.free is not None and not set(view.free.cpus) & set(h.cpus)
