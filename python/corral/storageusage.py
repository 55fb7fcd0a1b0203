"""What one service's storage volume holds, as last measured: the record the storage watch
keeps (:mod:`corral.engine.storage`), the store saves with the deployment, and ``status``,
``top``, ``ls`` and the metrics show."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from corral.units import format_bytes

__all__ = ["StorageUsage"]


@dataclass
class StorageUsage:
    """One service's volume: its size, and what the last measurement found in it."""

    service: str
    path: str
    """As the spec writes it (``./data``)."""
    size: int
    """Bytes the spec gives it."""
    enforce: str = "none"
    on_full: str = "warn"
    used: int | None = None
    """Bytes held (None: not measured yet)."""
    inodes: int | None = None
    measured_at: float | None = None
    seconds: float | None = None
    """How long the last measurement took."""
    truncated: bool = False
    """The walk stopped at its bound: ``used`` is a lower bound."""
    level: int = 0
    """The last threshold passed: 0, 80 (percent of ``size``) or 100 (more than ``size``)."""

    @property
    def percent(self) -> float | None:
        """Used, in percent of the size."""
        return None if self.used is None else 100.0 * self.used / self.size

    def text(self) -> str:
        """``312Mi/1Gi`` (``?/1Gi`` before the first measurement; ``>=`` when truncated)."""
        used = "?" if self.used is None else (">=" if self.truncated else "") + format_bytes(self.used)
        return f"{used}/{format_bytes(self.size)}"

    def full_reason(self) -> str:
        """What a stop at the limit says: ``storage full: 1.03Gi of 1Gi in ./data``."""
        return f"storage full: {format_bytes(self.used or 0)} of {format_bytes(self.size)} in {self.path}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``status --json``, the store)."""
        return {**asdict(self), "percent": self.percent, "text": self.text()}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> StorageUsage:
        """Back from :meth:`to_dict` (unknown keys ignored)."""
        fields = cls.__dataclass_fields__
        return cls(**{k: v for k, v in doc.items() if k in fields})
