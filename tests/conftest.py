"""Shared fixtures."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from corral import Deployment
from tests.e2e import kill_groups

SYSFS = Path(__file__).parent / "fixtures" / "sysfs"

# Every test's processes are marked, and any left after its teardown fails it.
pytest_plugins = ["tests.leftovers", "pytester"]


@pytest.fixture(autouse=True)
def private_machine(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test reserves in a machine ledger of its own (and so do the corrals it starts):
    never in this machine's, and never beside another test's leftovers."""
    d = tmp_path_factory.mktemp("machine")
    monkeypatch.setenv("CORRAL_MACHINE_DIR", str(d))
    monkeypatch.delenv("CORRAL_MACHINE_CONFIG", raising=False)
    return d


@pytest.fixture(scope="session")
def sysfs() -> Path:
    """Fake sysfs trees (fakes on purpose: this machine has none of these topologies)."""
    return SYSFS


@pytest.fixture
async def deployments() -> AsyncIterator[list[Deployment]]:
    """Deployments a test creates; on teardown, down and then kill any group still alive."""
    made: list[Deployment] = []
    yield made
    for d in made:
        pids = [i.pid for insts in d.status().services.values() for i in insts if i.pid]
        try:
            await asyncio.wait_for(d.down(), 30)
        finally:
            kill_groups([p for p in pids if p])
