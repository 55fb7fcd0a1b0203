"""Part of a stack: ``corral up SERVICE...`` starts those and what they depend on,
``--profile`` adds a profile's services, ``down SERVICE...`` takes services out; the spec
version, the store and the machine ledger say what really runs, and an agent that takes
over after a crash runs the same part."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral import SpecError, UnknownService
from corral._core import find_by_env
from corral.engine.environment import STACK
from corral.machine import Machine
from corral.spec import parse_spec
from corral.spec.select import chosen, select
from corral.statedir import stack_id
from tests.e2e import env_without_state, kill_groups, wait_until, write_spec

SPEC = """
name: part
services:
  db:
    command: ["sleep", "300"]
    restart: {policy: no}
    resources: {memory: 64Mi}
  api:
    command: ["sleep", "300"]
    depends_on: [db]
    resources: {memory: 32Mi}
  debug:
    command: ["sleep", "300"]
    profiles: [debug]
    depends_on: [api]
  tools:
    command: ["sleep", "300"]
    profiles: [ops, debug]
  other:
    command: ["sleep", "300"]
"""


def test_what_is_chosen_with_services_profiles_and_neither(tmp_path: Path) -> None:
    spec = parse_spec(SPEC, str(tmp_path / "corral.yaml"))
    assert chosen(spec) == ["db", "api", "other"]
    assert chosen(spec, profiles=["debug"]) == ["db", "api", "debug", "tools", "other"]
    assert chosen(spec, profiles=["ops"]) == ["db", "api", "tools", "other"]
    assert chosen(spec, ["api"]) == ["db", "api"]
    assert chosen(spec, ["debug"]) == ["db", "api", "debug"], "naming a service is asking for it"
    with pytest.raises(UnknownService, match="unknown service 'nope'"):
        chosen(spec, ["nope"])


def test_a_dependency_left_out_by_its_profile_is_an_error_naming_it(tmp_path: Path) -> None:
    spec = parse_spec(SPEC.replace("    command: [\"sleep\", \"300\"]\n    depends_on: [db]",
                                   "    command: [\"sleep\", \"300\"]\n    depends_on: [db, tools]"),
                      str(tmp_path / "corral.yaml"))
    with pytest.raises(SpecError, match=r"api depends on tools, which is only in profile\(s\) ops, debug: give "
                                        r"--profile ops"):
        chosen(spec)
    assert chosen(spec, ["api"]) == ["db", "api", "tools"]


def test_the_chosen_spec_reads_back_as_itself(tmp_path: Path) -> None:
    spec = parse_spec(SPEC.replace("  other:\n", "  other:\n    allow: [db, debug]\n    mtls: true\n    expose: 24411\n"
                                   "    ports: {http: auto}\n"), str(tmp_path / "corral.yaml"))
    part = select(spec, ["db", "other"])
    assert list(part.services) == ["db", "other"]
    assert part.services["db"].restart.policy == "no", "YAML 1.2: no is a word, also after the round trip"
    assert part.services["other"].allow == ["db"], "allow keeps only what runs"
    again = parse_spec(part.text, str(tmp_path / "corral.yaml"))
    assert again.model_dump() == part.model_dump() and again.text == part.text
    assert select(spec, profiles=["debug", "ops"]) is spec, "all of it: the spec itself"


def corral(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "corral", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=env_without_state())


def status(cwd: Path) -> dict:  # type: ignore[type-arg]
    return json.loads(corral("status", "--json", cwd=cwd).stdout)  # type: ignore[no-any-return]


def running(cwd: Path) -> list[str]:
    return [s for s, insts in status(cwd)["services"].items() if any(i["state"] == "healthy" for i in insts)]


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Path]:
    write_spec(tmp_path, SPEC)
    yield tmp_path
    corral("down", cwd=tmp_path)
    kill_groups(find_by_env(f"{STACK}={stack_id(tmp_path / '.corral')}"))


def test_up_some_then_more_then_down_some_and_the_ledger_follows(stack: Path) -> None:
    r = corral("up", "-d", "db", cwd=stack)
    assert r.returncode == 0 and "(1 instances" in r.stdout, r
    assert running(stack) == ["db"] and status(stack)["version"] == 1
    held = {c.instance for c in Machine().view().claims}
    assert held == {"db-0"}, held
    r = corral("up", "api", cwd=stack)
    assert r.returncode == 0 and "+ api (new, 1 instance)" in r.stdout, r
    assert running(stack) == ["db", "api"] and status(stack)["version"] == 2
    r = corral("up", "--profile", "ops", cwd=stack)
    assert r.returncode == 0, r
    assert sorted(running(stack)) == ["api", "db", "other", "tools"], "the default set, ops, and what ran"
    r = corral("down", "db", cwd=stack)
    assert r.returncode == 2 and "api depends on db: name it too" in r.stderr, r
    assert sorted(running(stack)) == ["api", "db", "other", "tools"], "refused: nothing changed"
    r = corral("down", "api", "db", cwd=stack)
    assert r.returncode == 0 and "- api (removed" in r.stdout and "- db (removed" in r.stdout, r
    assert sorted(running(stack)) == ["other", "tools"]
    assert {c.instance for c in Machine().view().claims} == {"other-0", "tools-0"}
    r = corral("down", "nope", cwd=stack)
    assert r.returncode == 2 and "'nope' does not run here" in r.stderr, r


def test_a_new_agent_runs_the_same_part(stack: Path) -> None:
    assert corral("up", "-d", "-f", "corral.yaml", "api", cwd=stack).returncode == 0
    first = status(stack)
    os.kill(first["agent_pid"], signal.SIGKILL)
    wait_until(lambda: (lambda s: s["agent_running"] and s["agent_pid"] != first["agent_pid"]
                        and s["status"] == "up")(status(stack)), 20, "the keeper's new agent, up")
    assert running(stack) == ["db", "api"], status(stack)["services"]
    assert list(status(stack)["services"]) == ["db", "api"], "nothing else placed"
