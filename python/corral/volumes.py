"""Size-limited volumes (``storage: {enforce: volume}``): where each service's image lives,
what this machine can enforce, and what ``down`` undoes without an agent.

A service's image is ``.corral/volumes/SERVICE.img`` in its stack's state directory (0600,
sparse): an ext4 filesystem of the storage's size, loop-mounted at the storage path while
the stack runs (made and mounted by the core, :func:`corral._core.mount_volume_image`).
``down`` unmounts it and keeps it, so the next ``up`` finds the data again; ``down
--volumes`` removes it.
"""

from __future__ import annotations

import os
from pathlib import Path

from corral._core import unmount_volume, volume_mounts, volume_support

__all__ = ["VOLUMES_DIR", "enforce_problem", "image_of", "images", "mounts_of", "owner_ids", "space_of", "unmount_all"]

VOLUMES_DIR = "volumes"


def image_of(state_dir: Path, service: str) -> Path:
    """The image of ``service``'s volume."""
    return state_dir / VOLUMES_DIR / f"{service}.img"


def space_of(enforce: str, path: Path, state_dir: Path) -> Path:
    """Where a volume's space is taken, and so measured and reserved: its image's directory
    for ``enforce: volume`` (the path itself is the mounted image, full or not), else the
    path."""
    return state_dir / VOLUMES_DIR if enforce == "volume" else path


def images(state_dir: Path) -> list[Path]:
    """Every volume image of the stack, by name."""
    d = state_dir / VOLUMES_DIR
    return sorted(d.glob("*.img")) if d.is_dir() else []


def mounts_of(state_dir: Path) -> list[tuple[Path, Path]]:
    """The mounts of the stack's images now: (mount point, image)."""
    d = (state_dir / VOLUMES_DIR).resolve()
    return [(Path(p), Path(i)) for p, i in volume_mounts() if Path(i).parent == d]


def unmount_all(state_dir: Path) -> list[str]:
    """Unmounts every image of the stack still mounted (an agent that died, a failed
    ``down``); returns what it said of each."""
    said = []
    for point, image in reversed(mounts_of(state_dir)):
        try:
            lazy = unmount_volume(point)
        except OSError as e:
            said.append(f"{point}: {e}")
            continue
        said.append(f"unmounted {image.name} from {point}" + (" (busy: detached, it goes when the last file "
                                                               "is closed)" if lazy else ""))
    return said


def _filesystem_of(path: Path) -> tuple[str, str, str]:
    """The mount holding ``path`` (its nearest existing ancestor): its mount point, type and
    options (mount and superblock options together)."""
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    p = p.resolve()
    best = ("/", "?", "")
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return best
    for line in lines:
        f = line.split(" ")
        if "-" not in f:
            continue
        dash = f.index("-")
        point = f[4].replace("\\040", " ")
        if (p == Path(point) or Path(point) in p.parents) and len(point) >= len(best[0]):
            best = (point, f[dash + 1], f"{f[5]},{f[dash + 3] if len(f) > dash + 3 else ''}")
    return best


def enforce_problem(mode: str, path: Path) -> str | None:
    """Why ``enforce: mode`` cannot work for a volume at ``path`` on this machine, or None
    when it can."""
    if mode == "volume":
        return volume_support()
    if mode == "quota":
        point, fstype, options = _filesystem_of(path)
        if not Path("/proc/sys/fs/quota").exists():
            return "the kernel has no quota support"
        opts = set(options.split(","))
        if fstype not in ("ext4", "xfs") or not opts & {"prjquota", "pquota", "pqnoenforce"}:
            return (f"project quotas are off on the filesystem of {path} ({fstype} at {point}, mounted without "
                    f"prjquota)")
        return ("corral does not set project quotas yet; use enforce: volume (as root), or none to measure and "
                "act at the limit")
    return None


def owner_ids(uid: int | None, gid: int | None) -> tuple[int, int]:
    """Who a new image's root belongs to: the service's user, else this process."""
    return (os.geteuid() if uid is None else uid), (os.getegid() if gid is None else gid)
