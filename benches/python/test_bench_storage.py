"""pytest-benchmark: measuring a volume of 100,000 small files (``disk_usage``, the walk in
the Rust core) beside ``du -sx`` on the same tree in the same run. Target: at most 100 ms,
and no slower than ``du``. The tree is made once per module (a few seconds) on the
temporary directory's filesystem; both walks run with a warm cache.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corral._core import disk_usage

FILES = 100_000


@pytest.fixture(scope="module")
def tree() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="corral-bench-du-"))
    try:
        for d in range(FILES // 1000):
            sub = root / f"d{d:03}"
            sub.mkdir()
            for f in range(1000):
                fd = os.open(sub / f"f{f}", os.O_WRONLY | os.O_CREAT, 0o600)
                os.write(fd, b"x" * (f % 64))
                os.close(fd)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_disk_usage_100k_files(benchmark: Any, tree: Path) -> None:
    u = benchmark(disk_usage, tree)
    assert u.inodes == FILES + FILES // 1000 + 1 and not u.truncated and u.skipped == 0, u


def test_disk_usage_100k_files_baseline_du(benchmark: Any, tree: Path) -> None:
    out = benchmark(subprocess.run, ["du", "-s", "-x", "-B1", str(tree)], capture_output=True, text=True, check=True)
    assert int(out.stdout.split()[0]) == disk_usage(tree).bytes
