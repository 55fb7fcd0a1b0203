"""The state directory made safe to use: where it is for a spec, refused when others could
write it (or it is a link), narrowed to the owner, and files in it created owner-only under
any umask. :mod:`corral.state` (the store) and every writer of the directory use it."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable
from pathlib import Path

from corral.exceptions import StateDirError

__all__ = ["LOCK_FILE", "StateLock", "default_state_dir", "drop_inherited_locks", "private_file", "secure_state_dir"]


def default_state_dir(spec_file: str | Path) -> Path:
    """``$CORRAL_STATE_DIR``, else ``.corral/`` beside the spec."""
    env = os.environ.get("CORRAL_STATE_DIR")
    return Path(env) if env else Path(spec_file).resolve().parent / ".corral"


def secure_state_dir(path: Path) -> Path:
    """Creates the state directory owner-only (0700, whatever the umask), or checks that an
    existing one is a directory of this user that nobody else can write, and makes it 0700
    (leaving 0711, which lets others enter but not list it, as it is).
    Raises :class:`~corral.exceptions.StateDirError` otherwise: another user could plant
    links in it or read what corral writes there."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(path, 0o700)
    except OSError as e:
        raise StateDirError(f"state directory {path}: cannot create it: {e.strerror}") from None
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise StateDirError(f"state directory {path}: not a directory (a link or a file); refusing to use it")
    if st.st_uid != os.geteuid():
        raise StateDirError(f"state directory {path} is owned by uid {st.st_uid}, not {os.geteuid()}; "
                            f"refusing to use it")
    if st.st_mode & 0o022:
        raise StateDirError(f"state directory {path} can be written by others (mode {stat.S_IMODE(st.st_mode):o}); "
                            f"refusing to use it (chmod 700 it if that is intended to be yours)")
    # 0711 (enter, not list) is what the mesh leaves when a service runs as another user;
    # 0710 is 0700 with an ACL that lets the users of access: enter (corral.agent.grant).
    if stat.S_IMODE(st.st_mode) not in (0o700, 0o710, 0o711):
        os.chmod(path, 0o700)
    return path


def private_file(path: Path) -> None:
    """Creates ``path`` empty with mode 0600 if it is missing (a link there is refused), and
    narrows it to 0600 if it exists: for files that others create for us (SQLite)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


LOCK_FILE = "lock"
"""What a starting ``up`` and a ``down`` hold (``flock``), one at a time."""

_held: list[int] = []
"""Lock descriptors this process holds: a child forked to become the keeper or the agent
closes its copies (the lock stays with the ``up`` that took it, until it returns)."""


class StateLock:
    """The state directory's lock: a starting ``up -d`` holds it from before anything is
    started until the agent reported, and ``down`` takes it first, so a ``down`` never runs
    beside a stack that is coming up (it waits, then stops what came up), and two ``up``
    never start two stacks. ``flock`` on ``lock`` in the directory (owner-only); the pid of
    the holder is written in it for whoever waits."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_FILE
        self.fd: int | None = None

    def acquire(self, *, waiting: Callable[[str], None] | None = None, timeout: float = 3600.0) -> None:
        """Takes the lock, waiting for its holder (``waiting`` hears once who that is).
        Raises :class:`~corral.exceptions.StateDirError` after ``timeout`` seconds."""
        import fcntl
        import time

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            deadline = time.monotonic() + timeout
            told = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise StateDirError(f"{self.path}: still held by {self.holder()} after {timeout:g}s") \
                            from None
                    if waiting is not None and not told:
                        waiting(self.holder())
                        told = True
                    time.sleep(0.02)
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        _held.append(fd)

    def holder(self) -> str:
        """``pid 123`` of the process holding the lock, as it wrote it."""
        try:
            text = self.path.read_text().strip()
        except OSError:
            text = ""
        return f"pid {text}" if text.isdigit() else "another corral"

    def release(self) -> None:
        if self.fd is not None:
            _held.remove(self.fd)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> StateLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def drop_inherited_locks() -> None:
    """In a child just forked: closes its copies of the parent's lock descriptors (the parent
    keeps the lock)."""
    for fd in _held:
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()
