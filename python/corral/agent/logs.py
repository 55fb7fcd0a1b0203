"""Reading instance logs: the last lines of a file, and new lines as they are written,
following rotation (a new inode, or a file shorter than what was read)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["Cursor", "follow_lines", "lines_after", "start_cursor", "tail_and_cursor", "tail_lines"]

Cursor = dict[str, tuple[int, int]]
"""Where a reader is in each file: name -> ``(inode, offset)``; how a follow crosses the agent's API."""

_TAIL_BYTES = 256 * 1024


def tail_lines(path: Path, n: int) -> list[str]:
    """The last ``n`` lines of ``path`` (read from its last 256 KiB); none when it is missing."""
    return _tail(path, n)[0]


def _tail(path: Path, n: int) -> tuple[list[str], tuple[int, int]]:
    """The last ``n`` lines and where they end: ``(inode, offset)``, ``(0, 0)`` when missing."""
    try:
        with open(path, "rb") as f:
            ino = os.fstat(f.fileno()).st_ino
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - _TAIL_BYTES))
            data = f.read(size - f.tell()).decode(errors="replace")
    except FileNotFoundError:
        return [], (0, 0)
    return (_lines(data)[-n:] if n > 0 else []), (ino, size)


def tail_and_cursor(files: list[tuple[str, Path]], n: int) -> tuple[list[tuple[str, str]], Cursor]:
    """The last ``n`` lines of each file and the cursor where they end, from one read: a
    follow from that cursor loses and repeats nothing."""
    out: list[tuple[str, str]] = []
    cursor: Cursor = {}
    for name, f in files:
        lines, cursor[name] = _tail(f, n)
        out += [(name, line) for line in lines]
    return out, cursor


def follow_lines(files: list[tuple[str, Path]], poll: float = 0.2, last: int = 0) -> Iterator[tuple[str, str]]:
    """``(name, line)`` for the last ``last`` lines of each file, then for every whole line
    added to the files from where those ended, forever: none is lost between the two."""
    pos: dict[Path, tuple[int, int]] = {}
    for name, f in files:
        lines, pos[f] = _tail(f, last)
        for line in lines:
            yield name, line
    while True:
        for name, f in files:
            for line in _new_lines(f, pos):
                yield name, line
        time.sleep(poll)


def start_cursor(files: list[tuple[str, Path]]) -> Cursor:
    """The end of each file now: where following begins."""
    out: Cursor = {}
    for name, f in files:
        try:
            st = f.stat()
            out[name] = (st.st_ino, st.st_size)
        except FileNotFoundError:
            out[name] = (0, 0)
    return out


def lines_after(files: list[tuple[str, Path]], cursor: Cursor,
                limit: int = 10000) -> tuple[list[tuple[str, str]], Cursor]:
    """The whole lines written after ``cursor`` (at most ``limit``; rotation followed) and the
    cursor after them. A file the cursor does not name is read from its end."""
    pos: dict[Path, tuple[int, int]] = {}
    start = start_cursor([(n, f) for n, f in files if n not in cursor])
    for name, f in files:
        pos[f] = cursor.get(name) or start[name]
    out: list[tuple[str, str]] = []
    for name, f in files:
        if len(out) >= limit:
            break
        out += [(name, line) for line in _new_lines(f, pos)]
    return out, {name: pos[f] for name, f in files}


def _new_lines(f: Path, pos: dict[Path, tuple[int, int]]) -> Iterator[str]:
    try:
        st = f.stat()
    except FileNotFoundError:
        return
    ino, off = pos[f]
    if st.st_ino != ino or st.st_size < off:
        off = 0  # rotated: the live file is new
    if st.st_size == off:
        pos[f] = (st.st_ino, off)
        return
    with open(f, "rb") as fh:
        fh.seek(off)
        data = fh.read()
    # Only whole lines; the rest waits for its newline.
    cut = data.rfind(b"\n") + 1
    pos[f] = (st.st_ino, off + cut)
    yield from _lines(data[:cut].decode(errors="replace"))


def _lines(text: str) -> list[str]:
    """Lines split at newlines only: a carriage return, a form feed or a C1 control a
    service printed is part of its line (and shown as such), not a line break."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines
