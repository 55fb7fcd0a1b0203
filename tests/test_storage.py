"""Measuring a volume (``corral._core.disk_usage``) on real trees: the same figure as
``du -sx``, hard links once, links never followed, and hostile trees (a link loop, a
directory swapped for a link to ``/``, files removed mid-walk) neither escape nor crash."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from corral import ConfigError
from corral._core import disk_usage


def du(path: Path) -> int:
    """``du -sx``'s allocated bytes for ``path``."""
    out = subprocess.run(["du", "-s", "-x", "-B1", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def test_the_figure_is_dus_with_hard_links_once_and_links_not_followed(tmp_path: Path) -> None:
    vol = tmp_path / "vol"
    (vol / "a" / "b").mkdir(parents=True)
    (vol / "a" / "big").write_bytes(os.urandom(256 * 1024))
    for i in range(20):
        (vol / "a" / "b" / f"small{i}").write_text("x" * i)
    before = disk_usage(vol)
    assert before.bytes == du(vol) and not before.truncated and before.skipped == 0, before
    os.link(vol / "a" / "big", vol / "again")
    (vol / "root").symlink_to("/")
    (vol / "a" / "b" / "up").symlink_to("../..")
    (vol / "loop").symlink_to("loop")
    after = disk_usage(vol)
    assert after.bytes == du(vol), (after, du(vol))
    assert after.bytes < before.bytes + 256 * 1024  # the second name adds no data
    assert after.inodes == before.inodes + 3  # three links are three inodes; the hard link none
    assert after.skipped == 0


def test_a_volume_that_is_a_link_is_refused(tmp_path: Path) -> None:
    (tmp_path / "vol").symlink_to("/")
    with pytest.raises(ConfigError, match="is a symbolic link"):
        disk_usage(tmp_path / "vol")
    with pytest.raises(NotADirectoryError):
        (tmp_path / "file").write_text("x")
        disk_usage(tmp_path / "file")
    with pytest.raises(FileNotFoundError):
        disk_usage(tmp_path / "missing")


def test_a_hostile_tree_changing_under_the_walk_is_never_escaped(tmp_path: Path) -> None:
    """Directories swapped for links to / and files removed while walks run: every walk
    ends, none counts more than the tree ever held (/ is far larger), none raises."""
    vol = tmp_path / "vol"
    vol.mkdir()
    for d in range(20):
        sub = vol / f"d{d}"
        sub.mkdir()
        for f in range(50):
            (sub / f"f{f}").write_bytes(b"y" * 4096)
    most = du(vol)
    stop = threading.Event()

    def vandal() -> None:
        n = 0
        while not stop.is_set():
            sub = vol / f"d{n % 20}"
            aside = vol / f"aside{n % 20}"
            try:
                sub.rename(aside)
                sub.symlink_to("/")
                for f in list(aside.iterdir())[:5]:
                    f.unlink()
                sub.unlink()
                aside.rename(sub)
            except OSError:
                pass
            n += 1

    t = threading.Thread(target=vandal)
    t.start()
    try:
        for _ in range(200):
            u = disk_usage(vol)
            assert u.bytes <= most and not u.truncated, u
    finally:
        stop.set()
        t.join()
    shutil.rmtree(vol)


def test_the_walk_is_bounded(tmp_path: Path) -> None:
    for i in range(100):
        (tmp_path / f"f{i}").write_text("z")
    cut = disk_usage(tmp_path, max_entries=10)
    assert cut.truncated and cut.inodes <= 11, cut
    assert not disk_usage(tmp_path).truncated
