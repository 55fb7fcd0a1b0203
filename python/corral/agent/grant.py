"""Just the permissions the users named by ``access:`` need to reach the agent: POSIX ACLs
(``system.posix_acl_access``) that let each of them, or each member of a named group,
enter the state directory (``--x``: not list it) and connect to its socket (``rw-``). Every
other file there stays owner-only (0600, in 0700 folders): state.db, the logs, the CA key,
the keeper's files. A viewer reads logs through the API.

With no ``access:`` (or one that names only the owner and root), the ACLs are removed:
0700 and 0600, as before. On a filesystem without ACLs the directory becomes 0711 and the
socket 0666, so that anyone may connect and the agent, which checks every caller's peer
credentials, refuses those without a role; :func:`grant` says so, for the event log.

The ACL is written as the kernel's xattr format (``posix_acl_xattr.h``: a version word,
then ``(tag, perm, id)`` entries sorted by tag and id), to need no library.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from corral.access import Policy

__all__ = ["grant"]

_XATTR = "system.posix_acl_access"
_VERSION = 2
_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_NONE = 0xFFFFFFFF


def _acl(mode: int, uids: list[int], gids: list[int], perm: int) -> bytes:
    """An access ACL: the owner's, group's and others' bits from ``mode``, plus ``perm`` for
    each named uid and gid (the mask lets exactly that through)."""
    entries = [(_USER_OBJ, (mode >> 6) & 7, _NONE)]
    entries += [(_USER, perm, uid) for uid in sorted(set(uids))]
    entries += [(_GROUP_OBJ, (mode >> 3) & 7, _NONE)]
    entries += [(_GROUP, perm, gid) for gid in sorted(set(gids))]
    entries += [(_MASK, perm | ((mode >> 3) & 7), _NONE), (_OTHER, mode & 7, _NONE)]
    return struct.pack("<I", _VERSION) + b"".join(struct.pack("<HHI", *e) for e in entries)


def _drop(path: Path) -> None:
    try:
        os.removexattr(path, _XATTR, follow_symlinks=False)
    except OSError as e:
        if e.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise


def grant(state_dir: Path, sock: Path, policy: Policy) -> str | None:
    """Sets the directory's and the socket's permissions for ``policy``; returns a warning
    when the filesystem keeps no ACLs (see the module docs), else None."""
    uids = [u for u in policy.uids if u not in (policy.owner, 0)]
    gids = list(policy.gids)
    # 0711 where the mesh opened it to a service's user, else 0700 (a mask shows in the group bits).
    dir_mode = 0o711 if os.lstat(state_dir).st_mode & stat.S_IXOTH else 0o700
    if not uids and not gids:
        for path, mode in ((state_dir, dir_mode), (sock, 0o600)):
            _drop(path)
            os.chmod(path, mode)
        return None
    try:
        os.setxattr(state_dir, _XATTR, _acl(dir_mode, uids, gids, 1), follow_symlinks=False)
        os.setxattr(sock, _XATTR, _acl(0o600, uids, gids, 6), follow_symlinks=False)
    except OSError as e:
        if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        os.chmod(state_dir, 0o711)
        os.chmod(sock, 0o666)
        return (f"{state_dir}: this filesystem keeps no POSIX ACLs, so the agent's socket is open to every local "
                f"user; the agent refuses those without a role in access:")
    return None
