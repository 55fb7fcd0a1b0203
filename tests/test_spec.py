"""corral.yaml: parsing, validation, and errors that name file, line and field."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from corral.exceptions import SpecError
from corral.spec import load_spec, parse_duration, parse_size, parse_spec

EXAMPLE = Path(__file__).parent.parent / "examples" / "stack" / "corral.yaml"

GOOD = """\
name: shop
services:
  db:
    command: ["python", "-m", "kv", "--port", "${ports.http}"]
    ports: {http: auto}
    resources: {cpu: 0.5, memory: 256Mi, storage: {size: 1Gi, path: ./data}}
    health:
      readiness: {http: {port: http, path: /health}, period: 1s, failure_threshold: 3}
  migrate:
    command: ["python", "-m", "migrate"]
    depends_on: {db: healthy}
  api:
    replicas: 3
    command: ["python", "-m", "api"]
    depends_on: {db: healthy, migrate: completed}
    ports: {http: auto}
    resources: {cpu: 0.25, memory: 128Mi}
    health:
      startup: {tcp: {port: http}, period: 200ms, failure_threshold: 50}
      liveness: {http: {port: http, path: /live}, period: 5s}
    restart: {policy: on-failure, backoff: exponential, initial: 1s, max: 60s, max_restarts: 5, window: 10m}
    shutdown: {signal: SIGTERM, timeout: 10s}
  worker:
    command: ["python", "-m", "worker"]
    resources: {cores: 1, numa: prefer, memory: 512Mi}
    priority: 10
"""


def test_the_issue_example_parses_with_units() -> None:
    spec = parse_spec(GOOD)
    api = spec.services["api"]
    assert api.replicas == 3
    assert {d: want.condition for d, want in api.depends_on.items()} == {"db": "healthy", "migrate": "completed"}
    assert not any(want.restart for want in api.depends_on.values())
    assert api.health.startup is not None and api.health.startup.period == pytest.approx(0.2)
    assert api.restart.window == 600.0 and api.restart.max == 60.0
    db = spec.services["db"]
    assert db.resources.memory == 256 << 20
    assert db.resources.storage is not None and db.resources.storage.size == 1 << 30
    assert spec.services["worker"].resources.cores == 1
    assert spec.services["migrate"].restart.policy == "on-failure"


def test_demo_stack_is_valid() -> None:
    spec = load_spec(EXAMPLE)
    assert set(spec.services) == {"kv", "migrate", "api", "worker"}


@pytest.mark.parametrize(("text", "seconds"), [
    ("500ms", 0.5), ("10s", 10), ("5m", 300), ("1h", 3600), ("1m30s", 90), (2, 2.0), ("1.5s", 1.5),
])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["10x", "", "s", "-1s", "1 s s", True, -3])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


@pytest.mark.parametrize(("text", "size"), [
    ("256Mi", 256 << 20), ("2Gi", 2 << 30), ("512M", 512_000_000), ("100k", 100_000), (4096, 4096), ("1Ki", 1024),
])
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["12Q", "Mi", "-1Mi", 1.5])
def test_bad_sizes(bad: object) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(bad)


def _error(text: str) -> SpecError:
    with pytest.raises(SpecError) as info:
        parse_spec(textwrap.dedent(text), "corral.yaml")
    return info.value


BASE = """\
name: shop
services:
  db:
    command: [db]
    ports: {http: auto}
"""

NOPORTS = BASE.replace("    ports: {http: auto}\n", "")

# (spec text, line, field, message fragment): every kind of mistake the issue names.
BAD = [
    (BASE + "  api:\n    command: [api]\n    depends_on: {dbb: healthy}\n",
     8, "services.api.depends_on.dbb", "unknown service 'dbb'"),
    (BASE + "  api:\n    command: [api]\n    depends_on: {db: ready}\n",
     8, "services.api.depends_on.db.condition", "'started', 'healthy' or 'completed'"),
    (BASE + "  api:\n    command: [api]\n    depends_on: {worker: started}\n"
            "  worker:\n    command: [w]\n    depends_on: {api: started}\n",
     8, "services.api.depends_on", "cycle: api -> worker -> api"),
    (BASE + "    bogus: 1\n", 6, "services.db.bogus", "unknown field"),
    (BASE + "  api:\n    replicas: 2\n", 6, "services.api.command", "required field missing"),
    (BASE + "    shutdown: {timeout: 10x}\n", 6, "services.db.shutdown.timeout", "expected a duration"),
    (BASE + "    resources: {memory: lots}\n", 6, "services.db.resources.memory", "expected a size"),
    (BASE + "    resources: {cpu: 0.5, cores: 1}\n", 6, "services.db.resources", "either cpu"),
    (BASE + "    resources: {memory: 1Gi, memory_max: 512Mi}\n", 6, "services.db.resources", "memory_max"),
    (BASE + "    resources: {cores: 1, numa: always}\n", 6, "services.db.resources.numa", "'none', 'prefer'"),
    (BASE + "    health:\n      readiness: {http: {port: web, path: /}}\n",
     7, "services.db.health.readiness.http.port", "unknown port 'web'"),
    (BASE + "    health:\n      liveness: {period: 1s}\n", 7, "services.db.health.liveness",
     "exactly one of http, tcp, exec"),
    (BASE + "    health:\n      liveness: {tcp: {port: http}, success_threshold: 2}\n", 6, "services.db.health",
     "success_threshold must be 1"),
    (BASE + "    restart: {policy: sometimes}\n", 6, "services.db.restart.policy", "'no', 'on-failure'"),
    (BASE + "    restart: {initial: 5s, max: 1s}\n", 6, "services.db.restart", "at least initial"),
    (BASE + "    shutdown: {signal: SIGFOO}\n", 6, "services.db.shutdown.signal", "SIGTERM"),
    (BASE + "    env: {ADDR: '${ports.grpc}'}\n", 6, "services.db.env.ADDR", "unknown port '${ports.grpc}'"),
    (NOPORTS + "    replicas: 2\n    ports: {http: 8080}\n", 6, "services.db.ports.http",
     "cannot share the fixed port"),
    (NOPORTS + "    ports: {http: 70000}\n", 5, "services.db.ports.http",
     "expected 'auto' or a port number 1-65535, got 70000"),
    ("name: shop\nservices:\n  db:\n    command: []\n", 4, "services.db.command", "command must not be empty"),
    (BASE.replace("command: [db]", "command: [db]\n    command: [x]"), 5, "services.db.command", "duplicate key"),
    (BASE + "  Bad_Name:\n    command: [x]\n", 6, "services.Bad_Name", "should match pattern"),
    (NOPORTS + "    expose: 8080\n", 3, "services.db", "expose needs a port on the instances"),
    (BASE + "    expose: 9000\n  web:\n    command: [w]\n    ports: {http: 9000}\n", 6, "services.db.expose",
     "port 9000 is already taken by web.ports.http"),
    (BASE + "    balance: fastest\n", 6, "services.db.balance", "'round_robin', 'weighted'"),
    (BASE + "  job:\n    command: [j]\n    restart: {policy: always}\n  api:\n    command: [a]\n"
            "    depends_on: {job: completed}\n", 11, "services.api.depends_on.job", "never completes"),
]


@pytest.mark.parametrize(("text", "line", "field", "fragment"), BAD, ids=[b[2] + ":" + b[3][:20] for b in BAD])
def test_bad_specs_name_line_and_field(text: str, line: int, field: str, fragment: str) -> None:
    e = _error(text)
    assert (e.file, e.line, e.field) == ("corral.yaml", line, field), str(e)
    assert fragment in e.message, str(e)
    assert str(e).startswith(f"corral.yaml:{line}: {field}: ")


def test_invalid_yaml_names_the_line() -> None:
    e = _error("name: shop\nservices:\n  db: {command: [x]\n")
    assert e.line == 4 and "invalid YAML" in e.message


def test_all_problems_are_reported_in_file_order() -> None:
    e = _error(BASE + "    bogus: 1\n  api:\n    command: [a]\n    replicas: -1\n")
    assert [x.field for x in e.all] == ["services.db.bogus", "services.api.replicas"]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "corral", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize(("text", "line", "field", "fragment"), [BAD[0], BAD[2], BAD[5], BAD[10]],
                         ids=["unknown-dependency", "cycle", "duration", "port-name"])
def test_cli_validate_exits_2_with_one_line_per_problem(tmp_path: Path, text: str, line: int, field: str,
                                                         fragment: str) -> None:
    (tmp_path / "corral.yaml").write_text(text)
    r = _cli("validate", cwd=tmp_path)
    assert r.returncode == 2, r
    assert f"corral.yaml:{line}: {field}: " in r.stderr and fragment in r.stderr, r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_cli_validate_ok_and_missing_file(tmp_path: Path) -> None:
    # validate checks the fit too: shares this 2-CPU machine's shared pool can hold.
    (tmp_path / "corral.yaml").write_text(GOOD.replace("cpu: 0.25", "cpu: 0.1"))
    ok = _cli("validate", cwd=tmp_path)
    assert ok.returncode == 0 and "ok (4 services, 6 instances)" in ok.stdout
    missing = _cli("validate", "nope.yaml", cwd=tmp_path)
    assert missing.returncode == 2 and "nope.yaml: file not found" in missing.stderr


def test_resources_that_never_fit_are_rejected_before_anything_starts(tmp_path: Path) -> None:
    (tmp_path / "corral.yaml").write_text(BASE + "    resources: {cores: 4096}\n")
    for cmd in ("plan", "up"):
        r = _cli(cmd, cwd=tmp_path)
        assert r.returncode == 2, r
        assert "corral.yaml:6: services.db.resources: db-0 does not fit" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    # Nothing was started, so nothing was recorded as running.
    assert not (tmp_path / ".corral" / "agent.sock").exists()


def test_unknown_option_is_a_usage_error(tmp_path: Path) -> None:
    r = _cli("up", "--frobnicate", cwd=tmp_path)
    assert r.returncode == 2 and "No such option" in r.stderr


def test_yaml_1_1_booleans_are_strings_where_the_spec_wants_words() -> None:
    spec = parse_spec(textwrap.dedent("""
        name: words
        services:
          job:
            command: ["true"]
            restart: {policy: no}
            env: {DEBUG: yes, TRACE: off, QUIET: on}
            ports: {http: auto}
            expose: 24001
            mtls: yes
    """))
    svc = spec.services["job"]
    assert svc.restart.policy == "no"
    assert svc.env == {"DEBUG": "yes", "TRACE": "off", "QUIET": "on"}
    assert svc.mtls is True, "a bool field still takes yes"
