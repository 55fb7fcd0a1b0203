"""Config templates: Jinja2 in its sandbox, strict about names; ``validate`` says a
template's errors with the template's own line; each instance gets its files in its own
directory before it starts; a dependency's healthy set changing re-renders them (atomically)
and restarts, reloads or leaves the service as ``on_change`` says."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from corral import Deployment, SpecError
from corral.spec import load_spec
from corral.statedir import instance_dir
from corral.templates import TemplateError, render, sample_context, write_atomically
from tests.e2e import await_until, env_without_state, write_spec


def tmpl(tmp_path: Path, text: str, name: str = "t.tmpl") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_a_template_sees_its_instance_and_its_dependencies(tmp_path: Path) -> None:
    ctx = sample_context("web", ["http"], {"GREETING": "hi"}, ["api"])
    out = render(tmpl(tmp_path, "{{ instance.id }} {{ ports.http }} {{ env.GREETING }}"
                                "{% for i in deps.api %} {{ i.address }}{% endfor %}\n"), ctx)
    assert out == "web-0 20000 hi 127.0.0.1:21000\n"


@pytest.mark.parametrize(("text", "line", "says"), [
    ("ok\n{{ ports.nope }}\n", 2, "has no attribute 'nope'"),
    ("ok\nok\n{{ missing }}\n", 3, "'missing' is undefined"),
    ("{% for x in deps.api %}\n{{ x.address }\n", 2, "unexpected '}'"),
    ("{{ ''.__class__.__mro__ }}\n", 1, "unsafe"),
    ("{% include 'other' %}\n", 1, "no loader"),
])
def test_errors_name_the_templates_line_and_missing_names_are_never_empty(tmp_path: Path, text: str,
                                                                         line: int, says: str) -> None:
    ctx = sample_context("web", ["http"], {}, ["api"])
    with pytest.raises(TemplateError) as e:
        render(tmpl(tmp_path, text), ctx, "t.tmpl")
    assert e.value.line == line and says in e.value.message, (e.value.line, e.value.message)
    assert str(e.value).startswith(f"t.tmpl:{line}: ")


def test_validate_says_where_in_the_spec_and_in_the_template(tmp_path: Path) -> None:
    tmpl(tmp_path, "listen {{ ports.http }};\nupstream {{ deps.db[0].adress }};\n", "nginx.conf.tmpl")
    write_spec(tmp_path, """
        name: t
        services:
          db:
            command: ["sleep", "300"]
          web:
            command: ["sleep", "300"]
            ports: {http: auto}
            depends_on: [db]
            templates:
              - {source: nginx.conf.tmpl, destination: nginx.conf}
              - {source: absent.tmpl, destination: b.conf}
    """)
    with pytest.raises(SpecError) as e:
        load_spec(tmp_path / "corral.yaml")
    text = "\n".join(str(x) for x in e.value.all)
    assert "corral.yaml:11: services.web.templates.0: nginx.conf.tmpl:2: " in text, text
    assert "has no attribute 'adress'" in text
    assert "corral.yaml:12: services.web.templates.1.source: template 'absent.tmpl' does not exist" in text, text
    r = subprocess.run([sys.executable, "-m", "corral", "validate"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=60, env=env_without_state())
    assert r.returncode == 2 and "nginx.conf.tmpl:2" in r.stderr and "Traceback" not in r.stderr, r


@pytest.mark.parametrize("dest", ["/etc/passwd", "../x", "a/../../x", ""])
def test_a_destination_stays_in_the_instances_directory(tmp_path: Path, dest: str) -> None:
    tmpl(tmp_path, "x", "a.tmpl")
    write_spec(tmp_path, f"""
        name: t
        services:
          web:
            command: ["sleep", "300"]
            templates: [{{source: a.tmpl, destination: "{dest}"}}]
    """)
    with pytest.raises(SpecError, match="destination must be a plain relative path"):
        load_spec(tmp_path / "corral.yaml")


def test_writes_are_atomic_owner_only_and_say_whether_anything_changed(tmp_path: Path) -> None:
    f = tmp_path / "out.conf"
    assert write_atomically(f, "one\n") and not write_atomically(f, "one\n")
    ino = f.stat().st_ino
    assert write_atomically(f, "two\n") and f.read_text() == "two\n"
    assert f.stat().st_ino != ino, "replaced by a rename, never rewritten in place"
    assert oct(f.stat().st_mode & 0o777) == "0o600" and os.listdir(tmp_path) == ["out.conf"]


# A service that prints its rendered file each time it starts and on SIGHUP.
PRINTER = """
import os, signal, sys, time
path = sys.argv[1]
def show(*_):
    print("conf:", open(path).read().strip().replace("\\n", " | "), flush=True)
signal.signal(signal.SIGHUP, show)
show()
while True:
    time.sleep(1)
"""


API = Path(__file__).resolve().parent.parent / "examples" / "nginx" / "api.py"


@pytest.mark.parametrize("on_change", ["reload", "restart", "none"])
async def test_a_dependency_changing_re_renders_and_acts(tmp_path: Path, deployments: list[Deployment],
                                                         on_change: str) -> None:
    (tmp_path / "printer.py").write_text(PRINTER)
    tmpl(tmp_path, "{% for i in deps.api %}{{ i.id }}={{ i.port }}\n{% endfor %}", "up.tmpl")
    spec = write_spec(tmp_path, f"""
        name: rerender
        services:
          api:
            replicas: 2
            command: ["{{py}}", "{API}"]
            ports: {{http: auto}}
            env: {{SICK_FILE: "{tmp_path}/sick-{{instance}}"}}
            health:
              readiness: {{http: {{port: http, path: /health}}, period: 50ms, failure_threshold: 1}}
          web:
            command: ["{{py}}", "printer.py", "${{instance.dir}}/up.conf"]
            depends_on: {{api: healthy}}
            templates: [{{source: up.tmpl, destination: up.conf, on_change: {on_change}}}]
            reload_signal: SIGHUP
    """)
    d = Deployment.from_file(spec)
    deployments.append(d)
    await d.up()
    conf = instance_dir(d.state_dir, "web-0") / "up.conf"
    log = d.state_dir / "logs" / "web-0.log"
    ports = {i.id: i.ports["http"] for i in d.status().services["api"]}
    assert conf.read_text() == f"api-0={ports['api-0']}\napi-1={ports['api-1']}\n", "rendered before it started"
    assert oct(conf.parent.stat().st_mode & 0o777) == "0o700" and oct(conf.stat().st_mode & 0o777) == "0o600"
    await await_until(lambda: "conf: api-0=" in log.read_text(), 10, "the first run's print")
    pid = d.status().services["web"][0].pid
    (tmp_path / "sick-api-1").touch()
    only = f"api-0={ports['api-0']}"
    await await_until(lambda: conf.read_text() == only + "\n", 10, "re-rendered without api-1")
    if on_change == "reload":
        await await_until(lambda: log.read_text().splitlines()[-1] == f"conf: {only}", 10, "the SIGHUP heard")
        assert d.status().services["web"][0].pid == pid and d.status().services["web"][0].restarts == 0
    elif on_change == "restart":
        await await_until(lambda: d.status().services["web"][0].restarts == 1, 10, "restarted")
        assert d.status().services["web"][0].pid != pid
        await await_until(lambda: log.read_text().splitlines()[-1] == f"conf: {only}", 10, "the new run's print")
    else:
        await asyncio.sleep(0.3)
        assert d.status().services["web"][0].pid == pid
        assert [ln for ln in log.read_text().splitlines() if ln.startswith("conf:")] == [
            f"conf: {only} | api-1={ports['api-1']}"], "nothing but the file changed"
    notes = [e.reason for e in d.event_log(0, 1000) if e.instance == "web-0"]
    assert notes.count(f"templates re-rendered ({on_change})") == 1, notes
