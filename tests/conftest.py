"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

SYSFS = Path(__file__).parent / "fixtures" / "sysfs"


@pytest.fixture(scope="session")
def sysfs() -> Path:
    """Fake sysfs trees (fakes on purpose: this machine has none of these topologies)."""
    return SYSFS
