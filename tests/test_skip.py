"""``skip_if_exists``: a one-shot whose mark exists completes at once without running
(systemd's ``ConditionPathExists=!``, Ansible's ``creates:``), and what waits for it to
complete goes on."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral import Deployment
from corral.exceptions import SpecError
from corral.spec import parse_spec
from tests.e2e import write_spec

pytestmark = pytest.mark.timeout(90)

SPEC = """
    name: skips
    services:
      init:
        command: ["sh", "-c", "echo ran >> runs.log; mkdir -p data; touch data/VERSION"]
        restart: {policy: "no"}
        skip_if_exists: data/VERSION
      app:
        command: ["sleep", "300"]
        depends_on: {init: completed}
"""


async def test_a_one_shot_is_skipped_once_its_mark_exists_and_dependents_start(
        tmp_path: Path, deployments: list[Deployment]) -> None:
    spec = write_spec(tmp_path, SPEC)
    for _ in range(2):
        d = Deployment.from_file(spec)
        deployments.append(d)
        await d.up()
        st = d.status().services
        assert st["init"][0].state == "completed" and st["init"][0].exit_code == 0
        assert st["app"][0].state in ("running", "healthy")
        reason = st["init"][0].reason
        await d.down()
    assert (tmp_path / "runs.log").read_text() == "ran\n", "the second run never started"
    assert reason == "skipped: data/VERSION exists"


def test_skip_if_exists_is_for_one_shots() -> None:
    with pytest.raises(SpecError, match="skip_if_exists is for a one-shot service"):
        parse_spec("name: x\nservices:\n  a: {command: [a], restart: {policy: always}, skip_if_exists: x}\n")
