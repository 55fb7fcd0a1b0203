"""End-to-end through the Python API: real processes, probes, restarts, rollback, cgroups."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from corral import Deployment
from corral.exceptions import DeploymentError
from corral.lifecycle import State
from corral.state import StateStore
from tests.e2e import alive, await_until, cpus_allowed, listening, read_json, write_spec

pytestmark = pytest.mark.timeout(90)


def _state(d: Deployment, service: str, index: int = 0) -> str | None:
    insts = d.status().services.get(service, [])
    return insts[index].state if len(insts) > index else None


def _pids(d: Deployment) -> list[int]:
    return [i.pid for insts in d.status().services.values() for i in insts if i.pid]


async def test_bring_up_in_order_with_a_readiness_gate_and_discovery(tmp_path: Path,
                                                                     deployments: list[Deployment]) -> None:
    ready = tmp_path / "kv-ready"
    spec = write_spec(tmp_path, f"""
        name: gate
        services:
          kv:
            command: ["{{py}}", "{{server}}"]
            env: {{READY_FILE: "{ready}"}}
            ports: {{http: auto}}
            health:
              readiness: {{http: {{port: http, path: /health}}, period: 100ms, failure_threshold: 1}}
          api:
            replicas: 2
            command: ["{{py}}", "{{server}}", "--listen=${{ports.http}}"]
            env: {{DUMP_ENV: "{tmp_path}/api-${{ports.http}}.json", SELF: "http://127.0.0.1:${{ports.http}}"}}
            depends_on: {{kv: healthy}}
            ports: {{http: auto}}
            health:
              readiness: {{tcp: {{port: http}}, period: 100ms}}
        """)
    d = Deployment.from_file(spec)
    deployments.append(d)
    up = asyncio.create_task(d.up())
    await await_until(lambda: _state(d, "kv") == "running", what="kv running")
    # The gate holds: kv answers 503, so api stays placed for as long as that lasts.
    await asyncio.sleep(1.0)
    st = d.status().services
    assert st["kv"][0].state == "running" and not st["kv"][0].healthy
    assert [i.state for i in st["api"]] == ["placed", "placed"]
    assert not up.done()
    ready.touch()
    await asyncio.wait_for(up, 20)
    st = d.status().services
    assert [i.state for i in st["api"]] == ["healthy", "healthy"]
    events = [(t.instance, t.new) for t in d.events()]
    assert events.index(("kv-0", State.HEALTHY)) < events.index(("api-0", State.STARTING))
    kv_port = st["kv"][0].ports["http"]
    for inst in st["api"]:
        port = inst.ports["http"]
        seen = read_json(tmp_path / f"api-{port}.json")
        env = seen["env"]
        assert env["PORT"] == env["CORRAL_PORT_HTTP"] == str(port)
        assert seen["argv"][-1] == f"--listen={port}"
        assert env["SELF"] == f"http://127.0.0.1:{port}"
        assert env["CORRAL_KV_ADDR"] == f"127.0.0.1:{kv_port}"
        assert env["CORRAL_KV_ADDRS"] == f"127.0.0.1:{kv_port}"
        assert env["CORRAL_INSTANCE"] == inst.id and env["CORRAL_SERVICE"] == "api"
        assert seen["cwd"] == str(tmp_path)
    healthy = sorted(i.id for i in d.registry.instances("api", healthy_only=True))
    assert healthy == ["api-0", "api-1"]
    assert {i.port for i in d.registry.instances("api")} == {i.ports["http"] for i in st["api"]}


async def test_kill_9_restarts_after_the_backoff(tmp_path: Path, deployments: list[Deployment]) -> None:
    spec = write_spec(tmp_path, """
        name: kill
        services:
          web:
            command: ["{py}", "{server}"]
            ports: {http: auto}
            health:
              readiness: {tcp: {port: http}, period: 50ms}
            restart: {policy: on-failure, backoff: fixed, initial: 600ms, max_restarts: 5}
        """)
    d = Deployment.from_file(spec)
    deployments.append(d)
    await d.up()
    before = d.status().services["web"][0]
    assert before.pid is not None and listening(before.ports["http"])
    killed_at = time.monotonic()
    os.kill(before.pid, signal.SIGKILL)
    await await_until(lambda: _state(d, "web") == "restarting", what="restarting")
    await await_until(lambda: d.status().services["web"][0].state == "healthy"
                      and d.status().services["web"][0].pid != before.pid, what="healthy again")
    after = d.status().services["web"][0]
    starting = [t for t in d.events() if t.new is State.STARTING and t.instance == "web-0"][-1]
    restarting = [t for t in d.events() if t.new is State.RESTARTING][-1]
    assert starting.at - restarting.at >= 0.55, "the backoff was not waited for"
    assert time.monotonic() - killed_at >= 0.55
    assert "killed by signal 9" in restarting.reason
    assert after.restarts == 1 and after.ports == before.ports and listening(after.ports["http"])
    assert not alive(before.pid)


async def test_a_crash_loop_ends_failed_after_max_restarts(tmp_path: Path, deployments: list[Deployment]) -> None:
    spec = write_spec(tmp_path, """
        name: loop
        services:
          flaky:
            command: ["sh", "-c", "sleep 0.2; exit 3"]
            restart: {policy: always, backoff: fixed, initial: 50ms, max_restarts: 3, window: 1m}
        """)
    d = Deployment.from_file(spec)
    deployments.append(d)
    await d.up()
    await await_until(lambda: _state(d, "flaky") == "failed", what="failed")
    inst = d.status().services["flaky"][0]
    assert inst.restarts == 3
    assert "crash loop: 3 restarts within 1m" in inst.reason and "exit status 3" in inst.reason
    assert inst.exit_code == 3
    assert not alive(inst.pid or 0)


async def test_liveness_failure_restarts_the_instance(tmp_path: Path, deployments: list[Deployment]) -> None:
    dead = tmp_path / "dead"
    spec = write_spec(tmp_path, f"""
        name: live
        services:
          web:
            command: ["{{py}}", "{{server}}"]
            env: {{DEAD_FILE: "{dead}"}}
            ports: {{http: auto}}
            health:
              # Without the startup gate, liveness would start probing before the server
              # listens and, on a slow machine, kill it for "Connection refused" first.
              startup: {{tcp: {{port: http}}, period: 50ms, failure_threshold: 200}}
              liveness: {{http: {{port: http, path: /live}}, period: 100ms, failure_threshold: 2}}
            restart: {{policy: on-failure, backoff: fixed, initial: 100ms}}
            shutdown: {{timeout: 2s}}
        """)
    d = Deployment.from_file(spec)
    deployments.append(d)
    await d.up()
    first = d.status().services["web"][0].pid
    dead.touch()
    await await_until(lambda: any(t.new is State.RESTARTING for t in d.events()), what="a restart")
    dead.unlink()
    await await_until(lambda: d.status().services["web"][0].state == "healthy"
                      and d.status().services["web"][0].pid != first, what="restarted")
    reason = next(t.reason for t in d.events() if t.new is State.RESTARTING)
    assert reason.startswith("liveness probe failed: HTTP 500")
    assert d.status().services["web"][0].restarts == 1


async def test_a_failing_up_rolls_back_and_leaves_nothing(tmp_path: Path, deployments: list[Deployment]) -> None:
    spec = write_spec(tmp_path, f"""
        name: rollback
        services:
          base:
            command: ["{{py}}", "{{server}}"]
            env: {{SPAWN_CHILD: "1"}}
            ports: {{http: auto}}
            resources: {{cores: 1}}
          db:
            command: ["{{py}}", "{{server}}"]
            env: {{READY_FILE: "{tmp_path}/never"}}
            ports: {{http: auto}}
            depends_on: {{base: started}}
            start_timeout: 1500ms
            health:
              readiness: {{http: {{port: http, path: /health}}, period: 100ms}}
          api:
            command: ["{{py}}", "{{server}}"]
            ports: {{http: auto}}
            depends_on: {{db: healthy}}
        """)
    d = Deployment.from_file(spec)
    deployments.append(d)
    with pytest.raises(DeploymentError, match=r"db not up within 1.5s: db-0 running"):
        await d.up()
    st = d.status().services
    assert st["api"][0].state == "stopped" and st["api"][0].pid is None
    pids = _pids(d)
    assert len(pids) == 2
    for pid in pids:
        assert not alive(pid)
    assert d.ports.in_use == 0 and d.resources.usage().grants == 0
    row = StateStore.read_deployments(d.state_db)[-1]
    assert row.status == "failed" and "db not up within" in row.message
    stops = [t.instance for t in d.events() if t.new is State.STOPPING]
    assert stops == ["db-0", "base-0"], "dependents stop first"


async def test_down_stops_every_process_of_every_group(tmp_path: Path, deployments: list[Deployment]) -> None:
    spec = write_spec(tmp_path, """
        name: groups
        services:
          a:
            replicas: 2
            command: ["{py}", "{server}"]
            env: {SPAWN_CHILD: "1"}
            ports: {http: auto}
            health:
              readiness: {tcp: {port: http}, period: 50ms}
          b:
            command: ["sh", "-c", "trap '' TERM; sleep 300 & wait"]
            depends_on: {a: healthy}
            shutdown: {timeout: 300ms}
        """)
    d = Deployment.from_file(spec)
    deployments.append(d)
    await d.up()
    from corral._core import group_members

    groups = _pids(d)
    await await_until(lambda: all(len(group_members(g)) >= 2 for g in groups), what="grandchildren")
    members = [m for g in groups for m in group_members(g)]
    t0 = time.monotonic()
    await d.down()
    assert time.monotonic() - t0 < 5
    for m in members:
        assert not alive(m), f"pid {m} survived down"
    stopped = [t.instance for t in d.events() if t.new is State.STOPPING]
    assert stopped[0] == "b-0", "reverse dependency order"
    assert d.ports.in_use == 0 and d.resources.usage().grants == 0


async def test_status_cpus_and_ports_match_the_processes(tmp_path: Path, deployments: list[Deployment]) -> None:
    spec = write_spec(tmp_path, f"""
        name: pin
        services:
          worker:
            command: ["{{py}}", "{{server}}"]
            env: {{DUMP_ENV: "{tmp_path}/worker.json"}}
            ports: {{http: auto}}
            resources: {{cores: 1, numa: prefer}}
          web:
            command: ["{{py}}", "{{server}}"]
            ports: {{http: 23456}}
            resources: {{cpu: 0.5}}
        """)
    d = Deployment.from_file(spec)
    deployments.append(d)
    await d.up()
    st = d.status().services
    worker, web = st["worker"][0], st["web"][0]
    assert worker.pid is not None and web.pid is not None
    assert worker.exclusive and len(worker.cpus) == 1 and 0 not in worker.cpus
    assert cpus_allowed(worker.pid) == worker.cpus
    assert read_json(tmp_path / "worker.json")["cpus"] == worker.cpus, "threads inherit the affinity set before exec"
    assert cpus_allowed(web.pid) == web.cpus and not set(web.cpus) & set(worker.cpus)
    assert web.ports == {"http": 23456}
    await await_until(lambda: listening(23456) and listening(worker.ports["http"]), what="listening")


def _fake_cgroup_v2(root: Path) -> Path:
    # A fake cgroupfs: this machine mounts cgroup v1, so v2 is checked against plain files.
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (root / "cgroup.subtree_control").write_text("")
    return root


async def test_memory_limits_through_a_fake_cgroup_v2_tree(tmp_path: Path, deployments: list[Deployment]) -> None:
    root = _fake_cgroup_v2(tmp_path / "cgroupfs")
    spec = write_spec(tmp_path, """
        name: mem
        services:
          web:
            command: ["{py}", "{server}"]
            ports: {http: auto}
            resources: {cpu: 0.1, memory: 64Mi, memory_max: 96Mi, swap: 0}
        """)
    d = Deployment.from_file(spec, cgroup_root=root)
    deployments.append(d)
    await d.up()
    cg = root / "corral" / "mem" / "web-0"
    assert (cg / "memory.max").read_text() == str(96 << 20)
    assert (cg / "memory.low").read_text() == str(64 << 20)
    assert (cg / "memory.swap.max").read_text() == "0"
    assert (cg / "cgroup.procs").read_text() == str(d.status().services["web"][0].pid)
    assert "+memory" in (root / "cgroup.subtree_control").read_text()
    assert d.warnings == []


async def test_no_memory_controller_warns_once_and_still_runs(tmp_path: Path, deployments: list[Deployment]) -> None:
    spec = write_spec(tmp_path, """
        name: nomem
        services:
          a: {command: ["sleep", "60"], resources: {memory: 32Mi}, replicas: 2}
          b: {command: ["sleep", "60"], resources: {memory: 32Mi}}
        """)
    d = Deployment.from_file(spec, cgroup_root=tmp_path / "empty")
    deployments.append(d)
    await d.up()
    assert len(d.warnings) == 1
    assert "memory limits not enforced" in d.warnings[0] and "a, b run without them" in d.warnings[0]
    assert all(i.state == "healthy" for insts in d.status().services.values() for i in insts)


V1 = Path("/sys/fs/cgroup/memory")


def _v1_writable() -> bool:
    probe = V1 / "corral-test-probe"
    try:
        probe.mkdir()
        probe.rmdir()
        return (V1 / "memory.limit_in_bytes").exists()
    except OSError:
        return False


@pytest.mark.skipif(not _v1_writable(), reason="no writable cgroup v1 memory hierarchy on this machine")
async def test_memory_limits_through_real_cgroup_v1(tmp_path: Path, deployments: list[Deployment]) -> None:
    spec = write_spec(tmp_path, """
        name: memv1
        services:
          web: {command: ["sleep", "60"], resources: {memory: 48Mi}}
        """)
    d = Deployment.from_file(spec, cgroup_root="/sys/fs/cgroup")
    deployments.append(d)
    await d.up()
    pid = d.status().services["web"][0].pid
    cgroups = Path(f"/proc/{pid}/cgroup").read_text()
    line = next(x for x in cgroups.splitlines() if ":memory:" in x)
    rel = line.split(":", 2)[2]
    assert rel.endswith("/corral/memv1/web-0"), line
    assert int((V1 / rel.lstrip("/") / "memory.limit_in_bytes").read_text()) == 48 << 20
    await d.down()
    assert not (V1 / rel.lstrip("/")).exists(), "the instance cgroup is removed on down"


@pytest.mark.skipif(not _v1_writable(), reason="no writable cgroup v1 memory hierarchy on this machine")
async def test_a_stop_ends_through_the_real_cgroup_what_shed_its_group_and_its_marker(
        tmp_path: Path, deployments: list[Deployment]) -> None:
    # The child leaves the session and clears its environment: neither the process group nor
    # the CORRAL_UNIT marker finds it; its cgroup does (v1 here: SIGKILL to cgroup.procs).
    spec = write_spec(tmp_path, f"""
        name: escape
        services:
          web:
            command: ["sh", "-c", "setsid env -i sh -c 'echo $$ > {tmp_path}/child; exec sleep 300' & exec sleep 300"]
            resources: {{memory: 48Mi}}
        """)
    d = Deployment.from_file(spec, cgroup_root="/sys/fs/cgroup")
    deployments.append(d)
    await d.up()
    await await_until(lambda: (tmp_path / "child").exists() and (tmp_path / "child").read_text().strip() != "",
                      what="the escaped child")
    child = int((tmp_path / "child").read_text())
    assert alive(child)
    await d.stop_service("web")
    await await_until(lambda: not alive(child), 5, "the escaped child ended with its instance")
    await d.start_service("web")
    await await_until(lambda: (tmp_path / "child").read_text().strip() not in ("", str(child)), what="again")
    again = int((tmp_path / "child").read_text())
    await d.down()
    await await_until(lambda: not alive(again), 5, "and with down")


async def test_rolling_restart_and_async_context_manager(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, """
        name: roll
        services:
          web:
            replicas: 2
            command: ["{py}", "{server}"]
            ports: {http: auto}
            health:
              readiness: {tcp: {port: http}, period: 50ms}
        """)
    async with Deployment.from_file(spec) as d:
        await d.up()
        old = _pids(d)
        seen: list[str] = []

        async def watch() -> None:
            async for t in d.watch():
                seen.append(f"{t.instance}:{t.new.value}")

        w = asyncio.create_task(watch())
        await d.restart("web")
        w.cancel()
        new = _pids(d)
        assert set(old).isdisjoint(new) and len(new) == 2
        # One replica at a time: web-0 is healthy again before web-1 stops.
        assert seen.index("web-0:healthy") < seen.index("web-1:stopping")
        assert [i.restarts for i in d.status().services["web"]] == [1, 1]
    for pid in new:
        assert not alive(pid)


async def test_env_file_working_dir_shell_volume_and_log_rotation(tmp_path: Path,
                                                                   deployments: list[Deployment]) -> None:
    (tmp_path / "app.env").write_text("# settings\nexport GREETING='hello there'\nLEVEL=debug\n")
    (tmp_path / "sub").mkdir()
    spec = write_spec(tmp_path, """
        name: misc
        logs: {max_size: 2Ki, keep: 2}
        services:
          job:
            command: 'echo "$GREETING/$LEVEL/$OVERRIDE" > out.txt; pwd >> out.txt; echo $CORRAL_VOLUME >> out.txt;
              i=0; while [ $i -lt 200 ]; do echo "line $i of some log output"; i=$((i+1)); done'
            shell: true
            env_file: app.env
            env: {LEVEL: info, OVERRIDE: "x"}
            working_dir: sub
            resources: {storage: {size: 1Mi, path: ./vol}}
            restart: {policy: "no"}
        """)
    d = Deployment.from_file(spec)
    deployments.append(d)
    await d.up()
    await await_until(lambda: _state(d, "job") == "completed", what="job completed")
    lines = (tmp_path / "sub" / "out.txt").read_text().splitlines()
    assert lines == ["hello there/info/x", str(tmp_path / "sub"), str(tmp_path / "vol")]
    assert (tmp_path / "vol").is_dir(), "the volume directory is created before start"
    logs = d.state_dir / "logs"
    await await_until(lambda: (logs / "job-0.log.2").exists(), 5, "rotation")
    assert not (logs / "job-0.log.3").exists()
    for f in ("job-0.log", "job-0.log.1", "job-0.log.2"):
        assert (logs / f).stat().st_size <= 2048
    assert "line 199 of some log output" in (logs / "job-0.log").read_text()


async def test_a_cgroup_that_cannot_be_joined_runs_the_instance_without_its_limit(
        tmp_path: Path, deployments: list[Deployment]) -> None:
    root = _fake_cgroup_v2(tmp_path / "cgroupfs")
    # Fake: cgroup.procs as a directory, so joining fails the way a container that lets
    # us create cgroups but not move processes would.
    (root / "corral" / "stuck" / "web-0" / "cgroup.procs").mkdir(parents=True)
    spec = write_spec(tmp_path, """
        name: stuck
        services:
          web: {command: ["sleep", "60"], resources: {memory: 32Mi}}
        """)
    d = Deployment.from_file(spec, cgroup_root=root)
    deployments.append(d)
    await d.up()
    assert _state(d, "web") == "healthy"
    assert len(d.warnings) == 1 and "memory limit of web-0 not enforced: cannot join" in d.warnings[0]


async def test_a_rollback_leaves_no_port_held_even_when_others_held_some(tmp_path: Path,
                                                                          deployments: list[Deployment]) -> None:
    """The race seen on a busy machine: a previous test's dying processes still held ports
    of the range when this plan was made, the bind check skipped them, and after the
    rollback they were counted as still in use. Here other sockets hold them on purpose."""
    import socket

    holders = []
    for port in (24100, 24101):
        s = socket.socket()
        s.bind(("127.0.0.1", port))
        s.listen()
        holders.append(s)
    try:
        spec = write_spec(tmp_path, """
            name: held
            port_range: [24100, 24110]
            services:
              db:
                command: ["{py}", "{server}"]
                env: {READY_FILE: "never"}
                ports: {http: auto}
                start_timeout: 500ms
                health:
                  readiness: {http: {port: http, path: /health}, period: 100ms}
            """)
        d = Deployment.from_file(spec)
        deployments.append(d)
        with pytest.raises(DeploymentError, match="db not up"):
            await d.up()
        assert d.ports.held_elsewhere == 2, "the bind check skipped the two held ports"
        assert d.ports.in_use == 0 and d.resources.usage().grants == 0
    finally:
        for s in holders:
            s.close()


async def test_spawn_retries_wait_on_the_event_loop(tmp_path: Path, deployments: list[Deployment],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A transient spawn failure (EAGAIN) is retried on the loop's timer: other tasks run
    between the attempts (a time.sleep in the callback would freeze them)."""
    import errno

    import corral.engine.deployment as deployment_module
    from corral._core import Supervisor

    ticks = 0
    seen: list[int] = []

    class Flaky:
        """The real supervisor, whose first two spawns of web-0 fail with EAGAIN."""

        def __init__(self, **kwargs: object) -> None:
            self.real = Supervisor(**kwargs)  # type: ignore[arg-type]
            self.failures = 2

        def spawn_many(self, items, threads=2):  # type: ignore[no-untyped-def]
            seen.append(ticks)
            if self.failures and items[0][0] == "web-0":
                self.failures -= 1
                return [BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")]
            return self.real.spawn_many(items, threads=threads)

        def __getattr__(self, name: str) -> object:
            return getattr(self.real, name)

    monkeypatch.setattr(deployment_module, "Supervisor", Flaky)

    async def heartbeat() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.005)

    spec = write_spec(tmp_path, """
        name: flaky
        services:
          web:
            command: ["{py}", "{server}"]
            ports: {http: auto}
            health:
              readiness: {tcp: {port: http}, period: 100ms}
        """)
    d = Deployment.from_file(spec)
    deployments.append(d)
    beat = asyncio.create_task(heartbeat())
    try:
        await d.up()
    finally:
        beat.cancel()
    assert len(seen) == 3, "two failed attempts, then the one that worked"
    assert seen[0] < seen[1] < seen[2], f"the loop ran between attempts: {seen}"
    assert d.status().services["web"][0].state == "healthy"


async def test_a_rolling_restart_stops_at_the_first_replica_that_does_not_come_back(
        tmp_path: Path, deployments: list[Deployment]) -> None:
    broken = tmp_path / "broken"
    spec = write_spec(tmp_path, f"""
        name: rollout
        services:
          web:
            replicas: 3
            command: ["sh", "-c", "test -e {broken} && exit 3; exec {{py}} {{server}}"]
            ports: {{http: auto}}
            start_timeout: 5s
            restart: {{policy: "no"}}
            health:
              readiness: {{http: {{port: http, path: /health}}, period: 100ms}}
        """)
    d = Deployment.from_file(spec)
    deployments.append(d)
    await d.up()
    before = {i.id: i.pid for i in d.status().services["web"]}
    broken.touch()  # processes started from now on exit at once
    with pytest.raises(DeploymentError, match=r"restart of web stopped at web-0: it is failed \(.*status 3.*\); "
                                              r"0 of 3 replicas restarted"):
        await d.restart("web")
    after = {i.id: (i.pid, i.state) for i in d.status().services["web"]}
    assert after["web-0"][0] != before["web-0"] and after["web-0"][1] == "failed"
    for iid in ("web-1", "web-2"):
        assert after[iid] == (before[iid], "healthy"), f"{iid} was left as it was"


async def test_an_error_preparing_one_replica_orphans_none(tmp_path: Path, deployments: list[Deployment]) -> None:
    """Validation catches a missing env_file, but one can vanish between validate and the
    spawn: the batch then spawns the replicas it can, and the rollback stops them all."""
    (tmp_path / "app.env").write_text("A=1\n")
    spec = write_spec(tmp_path, """
        name: vanish
        services:
          base:
            replicas: 3
            command: ["sleep", "300"]
          web:
            replicas: 3
            command: ["sleep", "300"]
            env_file: app.env
            depends_on: {base: started}
            restart: {policy: "no"}
        """)
    d = Deployment.from_file(spec)
    deployments.append(d)
    (tmp_path / "app.env").unlink()
    with pytest.raises(DeploymentError, match="web-0 failed: could not start"):
        await d.up()
    pids = _pids(d)
    assert len(pids) == 3, "the three base replicas had started"
    for pid in pids:
        assert not alive(pid), f"pid {pid} outlived the rollback"
