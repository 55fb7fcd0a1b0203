"""The storage watch on real stacks: usage measured every ``storage.period`` and shown
(status, its JSON, the store, ``ls``, ``top``'s rows, the metrics), events at 80% and at the
size, and ``on_full`` acted on: ``stop`` with its reason and the dependents named,
``restart`` once per passing, ``warn`` only an event. Writers are real processes writing
into their own volume."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from corral import Deployment, SpecError
from corral.cli.machine import _storage
from corral.spec import load_spec
from corral.state import DeploymentStatus, StateStore
from corral.storageusage import StorageUsage
from corral.top import rows_of
from corral.units import format_bytes
from tests.e2e import await_until, env_without_state, write_spec

# The writer waits for the test's go-ahead, then writes 2 MB into its 1 MiB volume.
WRITE = "while [ ! -e go ]; do sleep 0.05; done; head -c 2000000 /dev/zero > data/blob; exec sleep 300"
WRITER = """
    name: watched
    services:
      writer:
        command: ["sh", "-c", "{write}"]
        resources:
          storage: {{size: 1Mi, path: ./data, on_full: {on_full}, period: 200ms}}
      web:
        command: ["sleep", "300"]
        depends_on: [writer]
"""


def notes(d: Deployment) -> list[str]:
    return [e.reason for e in d.event_log(0, 10_000)]


async def test_a_writer_past_its_size_is_stopped_with_the_reason_and_its_dependents_named(
        tmp_path: Path, deployments: list[Deployment]) -> None:
    spec = write_spec(tmp_path, WRITER.format(on_full="stop", write=WRITE))
    d = Deployment.from_file(spec)
    deployments.append(d)
    await d.up()
    st = d.status()
    assert st.storage["writer"].used is not None and st.storage["writer"].used < 64 * 1024
    assert st.storage["writer"].text().endswith("/1Mi") and st.storage["writer"].level == 0
    # 80% first, written by the test into the volume: an event, nothing stopped.
    (tmp_path / "data" / "part").write_bytes(b"\1" * 900 * 1024)
    await await_until(lambda: any(n.startswith("storage at ") for n in notes(d)), 10, "the 80% event")
    assert d.status().services["writer"][0].state == "healthy"
    (tmp_path / "data" / "part").unlink()
    (tmp_path / "go").touch()
    await await_until(lambda: d.status().services["writer"][0].state == "stopped", 15, "the writer stopped")
    writer = d.status().services["writer"][0]
    used = d.status().storage["writer"].used
    assert used is not None and used > 1 << 20
    assert writer.reason == f"storage full: {format_bytes(used)} of 1Mi in ./data", writer
    await await_until(lambda: any("writer stopped; web depend on it" in n for n in notes(d)), 10,
                      "the warning naming its dependents")
    said = notes(d)
    assert any(n.startswith("storage full: ") and n.endswith("of 1Mi in ./data") for n in said), "\n".join(said)
    assert any("writer stopped; web depend on it" in n for n in said), "\n".join(said)
    assert d.status().services["web"][0].state == "healthy", "its dependents keep running, named"
    # Started again while still full: stopped again at the next measurement.
    await d.start_service("writer")
    await await_until(lambda: d.status().services["writer"][0].state == "stopped", 15, "stopped again")


async def test_restart_at_the_limit_happens_once_per_passing(tmp_path: Path,
                                                              deployments: list[Deployment]) -> None:
    # Its first start fills the volume; every later start cleans it (as a cache would).
    script = ("n=$(cat starts 2>/dev/null || echo 0); echo $((n+1)) > starts; rm -f data/blob; "
              "if [ $n = 0 ]; then head -c 2000000 /dev/zero > data/blob; fi; exec sleep 300")
    spec = write_spec(tmp_path, """
        name: cleaner
        services:
          cache:
            command: ["sh", "-c", "SCRIPT"]
            resources:
              storage: {size: 1Mi, path: ./data, on_full: restart, period: 200ms}
    """.replace("SCRIPT", script))
    d = Deployment.from_file(spec)
    deployments.append(d)
    await d.up()
    starts = tmp_path / "starts"
    await await_until(lambda: starts.exists() and starts.read_text().strip() == "2", 15, "the restart at the limit")
    await await_until(lambda: any(n.startswith("storage back under its size") for n in notes(d)), 10,
                      "the volume back under its size")
    inst = d.status().services["cache"][0]
    assert inst.restarts == 1 and inst.state == "healthy", inst
    assert (tmp_path / "starts").read_text().strip() == "2"


async def test_warn_only_records_and_every_view_shows_the_usage(tmp_path: Path,
                                                                 deployments: list[Deployment]) -> None:
    spec = write_spec(tmp_path, WRITER.format(on_full="warn", write=WRITE))
    assert load_spec(spec).services["web"].resources.storage is None
    d = Deployment.from_file(spec)
    deployments.append(d)
    await d.up()
    (tmp_path / "go").touch()
    await await_until(lambda: d.status().storage["writer"].level == 100, 15, "the size passed")
    await await_until(lambda: any(n.startswith("storage full: ") for n in notes(d)), 10, "the event")
    st = d.status()
    assert st.services["writer"][0].state == "healthy", "warn stops nothing"
    u = st.storage["writer"]
    assert u.used is not None and u.used > 1 << 20 and u.inodes == 2 and u.seconds is not None
    # The metrics, as Prometheus parses them.
    fams = {f.name: f for f in text_string_to_metric_families(d.metrics())}
    used = {s.labels["service"]: s.value for s in fams["corral_storage_used_bytes"].samples}
    size = {s.labels["service"]: s.value for s in fams["corral_storage_size_bytes"].samples}
    took = {s.labels["service"]: s.value for s in fams["corral_storage_measure_seconds"].samples}
    assert used == {"writer": u.used} and size == {"writer": 1 << 20} and 0 <= took["writer"] < 5
    # status --json, from the agent's document and back.
    again = DeploymentStatus.from_dict(json.loads(json.dumps(st.to_dict())))
    assert again.storage["writer"].text() == u.text() == f"{format_bytes(u.used)}/1Mi"
    # The store has it for status and ls without an agent.
    await await_until(lambda: StateStore.read_deployments(d.state_db)[-1].storage["writer"].level == 100, 5,
                      "the store's copy")
    # top's row and ls's column.
    rows = rows_of(st, {}, tmp_path)
    assert {r.instance: r.storage for r in rows} == {"writer-0": u.text(), "web-0": ""}
    assert _storage(u.used, 1) == f"{format_bytes(u.used)}/1Mi" and _storage(None, 0) == "-"


async def test_a_volume_already_past_its_size_is_said_at_up(tmp_path: Path, deployments: list[Deployment]) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "old").write_bytes(b"\0" * (3 << 20))
    spec = write_spec(tmp_path, """
        name: full
        services:
          db:
            command: ["sleep", "300"]
            resources:
              storage: {size: 2Mi, path: ./data}
    """)
    d = Deployment.from_file(spec)
    deployments.append(d)
    await d.up()
    said = [w for w in d.warnings if "already holds" in w]
    assert said and said[0].startswith("volume ./data of db already holds 3") and "more than its size 2Mi" in said[0]
    assert d.status().storage["db"].level == 100


def test_ls_and_status_show_usage_from_the_cli(tmp_path: Path) -> None:
    write_spec(tmp_path, """
        name: shown
        services:
          db:
            command: ["sh", "-c", "head -c 300000 /dev/urandom > data/x; exec sleep 300"]
            resources:
              storage: {size: 4Mi, path: ./data, period: 100ms}
    """)

    def corral(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "corral", *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=60, env=env_without_state())

    assert corral("up", "-d").returncode == 0
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            st = json.loads(corral("status", "--json").stdout)
            used = st["storage"]["db"]["used"]
            if used and used >= 300000:
                break
            time.sleep(0.1)
        assert used >= 300000, st["storage"]
        text = corral("status").stdout
        assert f"storage db ./data: {format_bytes(used)}/4Mi" in text, text
        ls = corral("ls").stdout
        assert "/4Mi" in ls.splitlines()[1], ls
    finally:
        corral("down")
    # Down, no agent: status still shows what was last measured, from the store.
    assert f"storage db ./data: {format_bytes(used)}/4Mi" in corral("status").stdout


@pytest.mark.parametrize(("field", "value", "says"), [
    ("size", "512k", "a storage size is at least 1Mi"),
    ("on_full", "evict", "on_full"),
    ("enforce", "quota", "enforce: quota cannot work on this machine"),
    ("period", "0", "period"),
])
def test_bad_storage_settings_are_refused_with_their_line(tmp_path: Path, field: str, value: str,
                                                          says: str) -> None:
    fields = {"size": "1Mi", "path": "./data", field: value}
    spec = write_spec(tmp_path, f"""
        name: bad
        services:
          db:
            command: ["sleep", "1"]
            resources:
              storage: {{{", ".join(f"{k}: {v}" for k, v in fields.items())}}}
    """)
    with pytest.raises(SpecError) as e:
        load_spec(spec)
    assert says in str(e.value) and "corral.yaml:7" in str(e.value), str(e.value)
    r = subprocess.run([sys.executable, "-m", "corral", "validate"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=60, env=env_without_state())
    assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r


def test_the_default_is_warn_and_a_reading_round_trips() -> None:
    u = StorageUsage("db", "./data", 1 << 30, used=int(1.03 * (1 << 30)), inodes=3)
    assert u.full_reason() == "storage full: 1.03Gi of 1Gi in ./data"
    assert StorageUsage.from_dict(u.to_dict()) == u and u.on_full == "warn"
    assert StorageUsage("db", "./data", 1 << 30).text() == "?/1Gi"
