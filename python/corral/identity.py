"""Who a service runs as: its ``user:`` and ``group:`` resolved through the system's user
and group databases (names or numbers), as systemd's ``User=``/``Group=`` are."""

from __future__ import annotations

import grp
import pwd
from typing import TypeAlias

__all__ = ["Credentials", "credentials"]

Credentials: TypeAlias = tuple[int | None, int | None, str | None, str | None]
"""``(uid, gid, user name, home)``; all None when the service runs as corral does."""


def credentials(user: str | int | None, group: str | int | None) -> Credentials:
    """What ``user`` and ``group`` name; the group defaults to the user's primary group.
    Raises ``KeyError`` naming an unknown user or group."""
    if user is None and group is None:
        return None, None, None, None
    uid = gid = None
    name = home = None
    if user is not None:
        try:
            pw = pwd.getpwuid(user) if isinstance(user, int) else pwd.getpwnam(user)
        except KeyError:
            raise KeyError(f"unknown user {user!r}") from None
        uid, gid, name, home = pw.pw_uid, pw.pw_gid, pw.pw_name, pw.pw_dir
    if group is not None:
        try:
            gid = (grp.getgrgid(group) if isinstance(group, int) else grp.getgrnam(group)).gr_gid
        except KeyError:
            raise KeyError(f"unknown group {group!r}") from None
    return uid, gid, name, home
