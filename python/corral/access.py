"""Who may do what to a stack: three roles, each including the one before, given by the
spec's ``access:`` to users and groups, and the caller's identity as the kernel tells it.

- ``viewer``: status, logs, events, plan, discovery (and ``top`` without its actions);
- ``operator``: adds restart, scale, stop and start;
- ``admin``: adds up and apply, down, and so changing ``access:`` itself.

The stack's owner (the uid its agent runs as) and root are always ``admin``. Anyone else
has the highest role an entry of ``access:`` gives them: ``user:NAME`` and ``uid:N`` by
their uid, ``group:NAME`` and ``gid:N`` by their primary group (from the kernel) or a
supplementary one (from the user database). What a client says about itself is never
read: the identity is the socket's peer credentials (``SO_PEERCRED``).
"""

from __future__ import annotations

import contextvars
import enum
import grp
import os
import pwd
import socket
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from corral.exceptions import AccessDenied

if TYPE_CHECKING:
    from corral.spec.deployment import AccessSpec

__all__ = ["CALLER", "Caller", "Policy", "Role", "entry_ids", "peer_caller"]


class Role(enum.IntEnum):
    """A role; a higher one includes every lower one."""

    viewer = 1
    operator = 2
    admin = 3


@dataclass(frozen=True)
class Caller:
    """Who asks: as the kernel says (``uid``, ``gid``, ``pid``), with the name, the
    supplementary groups and the command line looked up from those."""

    uid: int
    gid: int
    pid: int
    user: str
    groups: frozenset[int] = field(default_factory=frozenset)
    cmdline: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, pid: int, uid: int, gid: int) -> Caller:
        """The caller with these credentials (name and groups from the user database, the
        command line from ``/proc``, read now: the process may be gone a moment later)."""
        try:
            pw = pwd.getpwuid(uid)
            name = pw.pw_name
            groups = frozenset(os.getgrouplist(name, gid))
        except KeyError:
            name, groups = f"uid {uid}", frozenset({gid})
        return cls(uid=uid, gid=gid, pid=pid, user=name, groups=groups | {gid}, cmdline=_cmdline(pid))

    @classmethod
    def this_process(cls) -> Caller:
        """This process itself (the Python API, a foreground ``up``, the keeper)."""
        return cls.of(os.getpid(), os.getuid(), os.getgid())

    def describe(self) -> str:
        """``alice (uid 1001)``."""
        return f"{self.user} (uid {self.uid})" if not self.user.startswith("uid ") else self.user


CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("corral_caller", default=None)
"""The caller an operation runs for: set by the control server for each request; None in
the Python API, where the caller is this process."""


def peer_caller(sock: socket.socket) -> Caller:
    """The process at the other end of a Unix socket, from the kernel (``SO_PEERCRED``)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Caller.of(pid, uid, gid)


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read(8192)
    except OSError:
        return []
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]


def entry_ids(entry: str) -> tuple[str, int]:
    """``("uid", N)`` or ``("gid", N)`` for one ``access:`` entry. Raises ``KeyError``
    naming an unknown user or group."""
    kind, _, name = entry.partition(":")
    if kind == "uid" or kind == "gid":
        return kind, int(name)
    if kind == "user":
        try:
            return "uid", pwd.getpwnam(name).pw_uid
        except KeyError:
            raise KeyError(f"unknown user {name!r}") from None
    try:
        return "gid", grp.getgrnam(name).gr_gid
    except KeyError:
        raise KeyError(f"unknown group {name!r}") from None


@dataclass(frozen=True)
class Policy:
    """``access:`` resolved to numbers: for each role, the uids and gids it names."""

    owner: int
    uids: dict[int, Role] = field(default_factory=dict)
    gids: dict[int, Role] = field(default_factory=dict)

    @classmethod
    def of(cls, access: AccessSpec | None, owner: int | None = None) -> Policy:
        """The policy of a spec's ``access:`` for a stack owned by ``owner`` (default: this
        process's uid). An entry whose user or group has gone from the database since the
        spec was checked gives nobody anything."""
        uids: dict[int, Role] = {}
        gids: dict[int, Role] = {}
        for role in Role:
            for entry in getattr(access, role.name, None) or []:
                try:
                    kind, num = entry_ids(entry)
                except (KeyError, ValueError):
                    continue
                into = uids if kind == "uid" else gids
                into[num] = max(role, into.get(num, role))
        return cls(owner=os.getuid() if owner is None else owner, uids=uids, gids=gids)

    @property
    def shared(self) -> bool:
        """Whether anyone but the owner and root has a role."""
        return bool(self.gids) or any(uid not in (self.owner, 0) for uid in self.uids)

    def role_of(self, caller: Caller) -> Role | None:
        """The caller's role, or None when it has none."""
        if caller.uid in (0, self.owner):
            return Role.admin
        found = [self.uids[caller.uid]] if caller.uid in self.uids else []
        found += [self.gids[g] for g in caller.groups if g in self.gids]
        return max(found, default=None)

    def check(self, caller: Caller, op: str, needs: Role, stack: str, spec_file: str) -> None:
        """Raises :class:`~corral.exceptions.AccessDenied` when ``caller`` may not ``op``."""
        has = self.role_of(caller)
        if has is not None and has >= needs:
            return
        raise AccessDenied(denied_message(caller.describe(), op, needs.name, stack, spec_file),
                           caller.user, caller.uid, op, needs.name)


def denied_message(who: str, op: str, needs: str, stack: str, spec_file: str) -> str:
    """``alice (uid 1001) may not `down` stack shop: needs admin; grant it under
    access.admin in corral.yaml``."""
    return f"{who} may not `{op}` stack {stack}: needs {needs}; grant it under access.{needs} in {spec_file}"
