"""Every bad spec is refused by validate, before anything starts: exit 2, file:line: field,
no traceback, text printed literally."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from corral.exceptions import SpecError
from corral.spec import load_spec, parse_duration, parse_spec
from tests.e2e import env_without_state

pytestmark = pytest.mark.timeout(60)

BASE = """\
name: hard
services:
  web:
    command: ["sleep", "300"]
    ports: {http: auto}
"""


def _spec(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "corral.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def _refused(tmp_path: Path, text: str | bytes) -> SpecError:
    p = tmp_path / "corral.yaml"
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(textwrap.dedent(text))
    with pytest.raises(SpecError) as e:
        load_spec(p)
    return e.value


def _validate(cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "corral", "validate"], cwd=cwd, capture_output=True, text=True,
                          timeout=30, env=env_without_state())


@pytest.mark.parametrize(("field", "value", "where"), [
    ("health: {readiness: {tcp: {port: http}, period: .nan}}", "period", "health.readiness.period"),
    ("health: {readiness: {tcp: {port: http}, period: .inf}}", "period", "health.readiness.period"),
    ("health: {readiness: {tcp: {port: http}, timeout: .inf}}", "timeout", "health.readiness.timeout"),
    ("restart: {initial: .nan}", "initial", "restart.initial"),
    ("resources: {cpu: .inf}", "cpu", "resources.cpu"),
    ("resources: {cpu: 0.00001}", "cpu", "resources.cpu"),
    ("resources: {memory: 100000000000000000000Ti}", "memory", "resources.memory"),
    ("health: {readiness: {tcp: {port: http}, failure_threshold: 99999999999}}", "threshold",
     "health.readiness.failure_threshold"),
])
def test_every_number_is_finite_and_in_range(tmp_path: Path, field: str, value: str, where: str) -> None:
    e = _refused(tmp_path, BASE + f"    {field}\n")
    assert e.field == f"services.web.{where}" and e.line == 6, str(e)


def test_mesh_lifetime_must_be_finite(tmp_path: Path) -> None:
    e = _refused(tmp_path, BASE + "mesh: {cert_lifetime: .inf}\n")
    assert e.field == "mesh.cert_lifetime"


@pytest.mark.parametrize(("extra", "where", "says"), [
    ('    health: {liveness: {exec: [curl, "localhost:${ports.nope}"]}}\n', "health.liveness.exec.1",
     "unknown port '${ports.nope}'"),
    ("    env_file: missing.env\n", "env_file", "not found"),
    ("    env_file: adir\n", "env_file", "is not a file"),
    ("    working_dir: nowhere\n", "working_dir", "does not exist"),
    ("    env: {'A=B': x}\n", "env", "without '='"),
    ('    env: {A: "x\\0y"}\n', "env", "NUL"),
    ("    resources: {storage: {size: 1Mi, path: /}}\n", "resources.storage.path", "system directory"),
    ("    resources: {storage: {size: 1Mi, path: /etc}}\n", "resources.storage.path", "system directory"),
    ("    resources: {storage: {size: 1Mi, path: ../elsewhere}}\n", "resources.storage.path", "outside the project"),
    ("    resources: {storage: {size: 1Mi, path: afile}}\n", "resources.storage.path", "is not a directory"),
])
def test_what_would_fail_at_spawn_fails_at_validate(tmp_path: Path, extra: str, where: str, says: str) -> None:
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("")
    e = _refused(tmp_path, BASE + extra)
    assert e.field == f"services.web.{where}" and says in e.message, str(e)


def test_commands_that_cannot_run_are_refused(tmp_path: Path) -> None:
    e = _refused(tmp_path, BASE.replace('["sleep", "300"]', "'echo \"unbalanced'"))
    assert e.field == "services.web" and "quoting" in e.message
    e = _refused(tmp_path, BASE.replace('["sleep", "300"]', "['']"))
    assert e.field == "services.web.command" and "program" in e.message


def test_storage_outside_the_project_needs_allow_outside(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    spec = _spec(project, BASE + "    resources: {storage: {size: 1Mi, path: ../data, allow_outside: true}}\n")
    assert load_spec(spec).services["web"].resources.storage is not None


def test_names_that_collide_as_environment_variables(tmp_path: Path) -> None:
    e = _refused(tmp_path, """\
        name: env
        services:
          my-svc: {command: [a]}
          my_svc: {command: [b], ports: {a-b: auto, a_b: auto}}
        """)
    messages = [x.message for x in e.all]
    assert any("'my-svc' and 'my_svc' collide" in m for m in messages), messages
    assert any("'a-b' and 'a_b' collide" in m for m in messages), messages


def test_a_missing_name_comes_from_the_directory(tmp_path: Path) -> None:
    project = tmp_path / "My Shop.v2"
    project.mkdir()
    spec = _spec(project, "services:\n  web: {command: [a]}\n")
    assert load_spec(spec).name == "my-shop-v2"


def test_enum_errors_say_what_they_got(tmp_path: Path) -> None:
    e = _refused(tmp_path, BASE + "    depends_on: {web2: ready}\n")
    assert "got 'ready'" in str(e)


def test_yaml_1_1_booleans_in_every_enum(tmp_path: Path) -> None:
    spec = parse_spec(BASE + "    restart: {policy: no}\n")
    assert spec.services["web"].restart.policy == "no"


@pytest.mark.parametrize(("data", "says"), [
    (b"name: x\nservices: {a: {command: [\xff\xfe]}}\n", "not UTF-8"),
    (b"name: x\nservices:\n  a: {command: [\"a\x00b\"]}\n", "invalid character"),
    (b"name: x\nservices:\n  a: {command: [\"a\x1bb\"]}\n", "invalid character"),
    (b"name: x\nservices: &a {s: *a}\n", "recursive alias"),
    (b"name: x\nservices: " + b"[" * 5000 + b"]" * 5000 + b"\n", "nested deeper"),
])
def test_unreadable_files_are_refused_with_a_line(tmp_path: Path, data: bytes, says: str) -> None:
    e = _refused(tmp_path, data)
    assert says in e.message, str(e)


def test_an_alias_bomb_is_refused_quickly_and_small(tmp_path: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 12):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    text = "\n".join(lines) + "\nname: bomb\nservices: {web: {command: *a11}}\n"
    e = _refused(tmp_path, text)
    assert "aliases expand to more than" in e.message and e.line is not None


def test_a_file_too_large_is_refused(tmp_path: Path) -> None:
    e = _refused(tmp_path, BASE + "#" + "x" * (1 << 20) + "\n")
    assert "too large" in e.message


def test_a_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "corral.yaml"
    os.mkfifo(fifo)
    done = threading.Event()
    result: list[BaseException] = []

    def read() -> None:
        try:
            load_spec(fifo)
        except BaseException as e:  # the SpecError we want, or whatever
            result.append(e)
        done.set()

    threading.Thread(target=read, daemon=True).start()
    assert done.wait(10), "load_spec waited on the FIFO"
    assert isinstance(result[0], SpecError) and "not a regular file" in str(result[0])


def test_run_for_takes_a_bare_number_of_seconds() -> None:
    assert parse_duration("30") == 30.0 and parse_duration("1.5") == 1.5 and parse_duration(30) == 30.0
    with pytest.raises(ValueError):
        parse_duration("30 parsecs")


def test_validate_prints_markup_literally_and_exits_2(tmp_path: Path) -> None:
    _spec(tmp_path, """\
        name: mark
        services:
          web:
            command: [a]
            depends_on: {'[/bold]': healthy}
        """)
    r = _validate(tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "unknown service '[/bold]'" in r.stderr
    _spec(tmp_path, "name: mark\nservices:\n  Bad_Name: {command: [b]}\n")
    r = _validate(tmp_path)
    assert r.returncode == 2 and "[a-z0-9]" in r.stderr, "the name pattern is shown whole: " + r.stderr
    _spec(tmp_path, """\
        name: mark
        services:
          db: {command: [a], ports: {p: auto}, expose: 24201, mtls: true, allow: ['[red]x[/red]']}
        """)
    r = _validate(tmp_path)
    assert r.returncode == 2 and "unknown service '[red]x[/red]'" in r.stderr, r.stderr


def test_validate_checks_that_the_spec_fits(tmp_path: Path) -> None:
    for resources in ("{memory: 100Ti}", "{cores: 4096}"):
        _spec(tmp_path, BASE + f"    resources: {resources}\n")
        r = _validate(tmp_path)
        assert r.returncode == 2 and "does not fit" in r.stderr and "services.web.resources" in r.stderr, r.stderr
    _spec(tmp_path, BASE)
    r = _validate(tmp_path)
    assert r.returncode == 0 and "ok" in r.stdout


@pytest.mark.parametrize("listen", ["0.0.0.0:9464", "[::]:9464", "10.1.2.3:9464"])
def test_validate_refuses_metrics_other_hosts_can_reach_without_a_token(tmp_path: Path, listen: str) -> None:
    (tmp_path / "corral.yaml").write_text(f'name: open\nmetrics: {{listen: "{listen}"}}\n'
                                          'services:\n  w:\n    command: ["true"]\n')
    r = subprocess.run([sys.executable, "-m", "corral", "validate"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2, r
    assert f"error: corral.yaml:2: metrics.listen: {listen} can be reached from other hosts: name a token_file" \
        in r.stderr, r
    token = tmp_path / "scrape.token"
    token.write_text("s3cret\n")
    token.chmod(0o644)
    (tmp_path / "corral.yaml").write_text(f'name: open\nmetrics: {{listen: "{listen}", token_file: scrape.token}}\n'
                                          'services:\n  w:\n    command: ["true"]\n')
    r = subprocess.run([sys.executable, "-m", "corral", "validate"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "metrics.token_file" in r.stderr and "can be read by others" in r.stderr, r
    token.chmod(0o600)
    r = subprocess.run([sys.executable, "-m", "corral", "validate"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "ok" in r.stdout, r


def test_validate_is_quiet_about_loopback_metrics(tmp_path: Path) -> None:
    (tmp_path / "corral.yaml").write_text('name: closed\nmetrics: {listen: "127.0.0.1:9464"}\n'
                                          'services:\n  w:\n    command: ["true"]\n')
    r = subprocess.run([sys.executable, "-m", "corral", "validate"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "warning" not in r.stderr, r
