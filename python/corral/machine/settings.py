"""The machine's settings, and where the machine ledger lives.

Like the kubelet's ``system-reserved`` and ``reserved-cpus``: the CPUs kept for the system,
the memory and disk kept free, the overcommit ratios and the auto-port range, from one
small YAML file. Every value has a default, so a fresh machine needs no file. The file is
``$CORRAL_MACHINE_CONFIG``, else ``machine.yaml`` in the ledger's directory, else
``/etc/corral/machine.yaml``: whoever shares a ledger shares its settings.

The ledger's directory is ``$CORRAL_MACHINE_DIR``, else ``/run/corral`` for root (empty
after a reboot, as the processes are), else ``$XDG_RUNTIME_DIR/corral``, else a per-user
directory under the system's temporary directory. Stacks of different users see each
other's claims only when they share a ledger (the variable names one for a group).
"""

from __future__ import annotations

import math
import os
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.exceptions import MachineError, SpecError
from corral.specfile import read_document, read_text
from corral.units import parse_size

__all__ = ["CONFIG_ENV", "DIR_ENV", "Settings", "ledger_dir", "load_settings", "settings_file", "trusted"]

DIR_ENV = "CORRAL_MACHINE_DIR"
"""Names the machine ledger's directory (a group of users may share one)."""
CONFIG_ENV = "CORRAL_MACHINE_CONFIG"
"""Names the machine settings file."""
SYSTEM_CONFIG = Path("/etc/corral/machine.yaml")

_KEYS = ("reserved_cpus", "memory_reserve", "disk_reserve", "cpu_overcommit", "memory_overcommit", "port_range")


@dataclass(frozen=True)
class Settings:
    """The machine's settings; ``None`` is the documented default."""

    reserved_cpus: tuple[int, ...] | None = None
    """CPUs kept for the system (default: CPU 0 when there is more than one)."""
    memory_reserve_mb: int | None = None
    """Memory kept free (default: 10% of the machine's, at most 1 GiB)."""
    disk_reserve_mb: int | None = None
    """Space kept free on each filesystem volumes use (default: 5% of it, at most 10 GiB)."""
    cpu_overcommit: float = 1.0
    """Shared-CPU overcommit (1.0: none)."""
    memory_overcommit: float = 1.0
    """Memory overcommit (1.0: none)."""
    port_range: tuple[int, int] = (20000, 32000)
    """The auto-port pool of a spec that does not name its own."""
    source: Path | None = None
    """The file they come from (None: every value is the default)."""
    given: frozenset[str] = field(default_factory=frozenset)
    """The keys the file set."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with where each value comes from."""
        values = {"reserved_cpus": list(self.reserved_cpus) if self.reserved_cpus is not None else None,
                  "memory_reserve_mb": self.memory_reserve_mb, "disk_reserve_mb": self.disk_reserve_mb,
                  "cpu_overcommit": self.cpu_overcommit, "memory_overcommit": self.memory_overcommit,
                  "port_range": list(self.port_range)}
        return {"file": str(self.source) if self.source else None, "values": values,
                "from_file": sorted(self.given)}


def ledger_dir() -> Path:
    """Where the machine ledger lives (see the module docs)."""
    env = os.environ.get(DIR_ENV)
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/corral")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        try:
            st = os.stat(xdg)
        except OSError:
            st = None
        if st is not None and st.st_uid == os.geteuid() and stat.S_ISDIR(st.st_mode) and not st.st_mode & 0o077:
            return Path(xdg) / "corral"
    return Path(tempfile.gettempdir()) / f"corral-{os.geteuid()}"


def trusted(path: Path, what: str, *, directory: bool) -> os.stat_result:
    """Refuses ``path`` unless it is a ``directory`` (or a regular file) that is not a link,
    owned by this user or root, and not writable by others: a planted ledger or settings
    file could hand out what is held, or hold everything. Raises :class:`MachineError`."""
    try:
        st = os.lstat(path)
    except OSError as e:
        raise MachineError(f"{what} {path}: {e.strerror}") from None
    kind_ok = stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)
    if stat.S_ISLNK(st.st_mode) or not kind_ok:
        raise MachineError(f"{what} {path} is not a {'directory' if directory else 'regular file'} (a link or "
                           f"something else); refusing to use it")
    if st.st_uid not in (os.geteuid(), 0):
        raise MachineError(f"{what} {path} is owned by uid {st.st_uid}, neither this user ({os.geteuid()}) nor "
                           f"root; refusing to use it")
    if st.st_mode & stat.S_IWOTH:
        raise MachineError(f"{what} {path} can be written by others (mode {stat.S_IMODE(st.st_mode):o}); refusing "
                           f"to use it")
    return st


def settings_file(directory: Path) -> Path | None:
    """The settings file that applies to the ledger in ``directory``, if any."""
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    for candidate in (directory / "machine.yaml", SYSTEM_CONFIG):
        if os.path.lexists(candidate):
            return candidate
    return None


def load_settings(path: Path | None) -> Settings:
    """The settings in ``path`` (the defaults when None). Raises :class:`SpecError` with
    file, line and field for a bad value, :class:`MachineError` for a file not to trust."""
    if path is None:
        return Settings()
    trusted(path, "machine settings", directory=False)
    data, src, dups = read_document(read_text(path), str(path))
    if dups:
        loc, line = dups[0]
        raise SpecError(f"duplicate key {loc[-1]!r}", str(path), line, ".".join(map(str, loc)))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError("expected a mapping of settings", str(path), 1)
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in _KEYS:
            raise src.error((str(key),), f"unknown setting (known: {', '.join(_KEYS)})")
        try:
            values[key] = _value(key, value)
        except ValueError as e:
            raise src.error((str(key),), str(e)) from None
    return Settings(reserved_cpus=values.get("reserved_cpus"), memory_reserve_mb=values.get("memory_reserve"),
                    disk_reserve_mb=values.get("disk_reserve"), cpu_overcommit=values.get("cpu_overcommit", 1.0),
                    memory_overcommit=values.get("memory_overcommit", 1.0),
                    port_range=values.get("port_range", (20000, 32000)), source=path, given=frozenset(values))


def _value(key: str, value: object) -> Any:
    if key == "reserved_cpus":
        if not isinstance(value, list) or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0
                                                  for c in value):
            raise ValueError("expected a list of CPU numbers, such as [0] or [0, 1] ([] keeps none)")
        return tuple(sorted(set(value)))
    if key in ("memory_reserve", "disk_reserve"):
        return math.ceil(parse_size(value) / (1 << 20))
    if key in ("cpu_overcommit", "memory_overcommit"):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 1:
            raise ValueError(f"expected a ratio of at least 1.0 (1.0: no overcommit), got {value!r}")
        return float(value)
    ports = isinstance(value, list) and len(value) == 2 and all(isinstance(p, int) and not isinstance(p, bool)
                                                                 for p in value)
    if not (ports and isinstance(value, list) and 1 <= value[0] <= value[1] <= 65535):
        raise ValueError(f"expected two ports, low to high, such as [20000, 32000], got {value!r}")
    return (value[0], value[1])
