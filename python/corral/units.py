"""The scalar syntaxes of ``corral.yaml``: durations (``500ms``, ``10s``, ``5m``, ``1h``,
``1m30s``; a bare number is seconds) and sizes (``256Mi``, ``2Gi``, ``512M``, ``100k``; a bare
number is bytes). Imports nothing heavy: the CLI parses ``--run-for`` with it.
"""

from __future__ import annotations

import math
import re

__all__ = ["MAX_DURATION", "MAX_SIZE", "format_bytes", "format_mib", "parse_duration", "parse_size"]

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|us|s|m|h)")
_BARE_NUMBER = re.compile(r"^\d+(?:\.\d+)?$")
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?|[kmgt]|B)?B?\s*$")
_SIZE_UNITS = {
    None: 1, "B": 1,
    "K": 1000, "k": 1000, "M": 1000**2, "m": 1000**2, "G": 1000**3, "g": 1000**3, "T": 1000**4, "t": 1000**4,
    "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40,
}


MAX_DURATION = 10 * 365 * 86400.0
"""Ten years: the longest duration anywhere in a spec (timers past it overflow somewhere)."""
MAX_SIZE = 1 << 60
"""One EiB: the largest size anywhere in a spec (cgroup and ledger arithmetic is 64-bit)."""


def parse_duration(value: object) -> float:
    """Seconds from ``500ms``, ``10s``, ``5m``, ``1h``, ``1m30s`` or a number of seconds (also
    as a string: ``"30"``); finite, not negative, at most ten years."""
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text) if _BARE_NUMBER.match(text) else None
        except ValueError:
            seconds = None
        pos, total = 0, 0.0
        for m in _DURATION_PART.finditer(text):
            if m.start() != pos:
                break
            total += float(m.group(1)) * _UNITS[m.group(2)]
            pos = m.end()
        if seconds is None and text and pos == len(text):
            seconds = total
    if seconds is None:
        raise ValueError(f"expected a duration such as 500ms, 10s or 5m, got {value!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"duration must be a finite number of seconds, not negative, got {value!r}")
    if seconds > MAX_DURATION:
        raise ValueError(f"duration {value!r} is longer than ten years")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from ``256Mi``, ``2Gi``, ``512M``, ``100k`` or a number of bytes; at most 1 EiB."""
    size: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            amount = float(m.group(1)) * _SIZE_UNITS[m.group(2)]
            size = int(amount) if math.isfinite(amount) and amount <= MAX_SIZE else MAX_SIZE + 1
    if size is None:
        raise ValueError(f"expected a size such as 256Mi or 2Gi, got {value!r}")
    if size < 0:
        raise ValueError(f"size must not be negative, got {value!r}")
    if size > MAX_SIZE:
        raise ValueError(f"size {value!r} is larger than 1 EiB")
    return size


def format_mib(mib: float) -> str:
    """A size in MiB as the spec writes sizes: ``512Mi``, ``13Gi``, ``9.6Gi``, ``1.5Ti``."""
    for unit, scale in (("Ti", 1 << 20), ("Gi", 1 << 10)):
        if mib >= scale:
            return f"{mib / scale:.1f}".removesuffix(".0") + unit
    return f"{mib:.0f}Mi"


def format_bytes(n: float) -> str:
    """A size in bytes as ``status`` shows usage: ``312Mi``, ``1.03Gi``, ``4.5Ki``, ``0``."""
    for unit, scale in (("Ti", 1 << 40), ("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if n >= scale:
            v = n / scale
            text = f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:.0f}"
            return (text.rstrip("0").rstrip(".") if "." in text else text) + unit
    return f"{n:.0f}"
