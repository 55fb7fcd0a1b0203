"""How errors cross the agent's socket: as their class name and ``args``, raised again on
the other side as the same class (every class of :mod:`corral.exceptions` can be rebuilt
from its ``args``)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from corral import exceptions
from corral.access import Role
from corral.exceptions import ConfigError, CorralError, SpecError

__all__ = ["ROUTES", "from_wire", "query_number", "query_one", "query_seconds", "to_wire"]

ROUTES: dict[tuple[str, str], tuple[str, Role]] = {
    ("GET", "/v1/status"): ("status", Role.viewer),
    ("GET", "/v1/up"): ("status", Role.viewer),
    ("GET", "/v1/events"): ("events", Role.viewer),
    ("GET", "/v1/services"): ("discovery", Role.viewer),
    ("GET", "/v1/logs"): ("logs", Role.viewer),
    ("POST", "/v1/plan"): ("plan", Role.viewer),
    ("POST", "/v1/restart"): ("restart", Role.operator),
    ("POST", "/v1/scale"): ("scale", Role.operator),
    ("POST", "/v1/stop"): ("stop", Role.operator),
    ("POST", "/v1/start"): ("start", Role.operator),
    ("POST", "/v1/run"): ("run", Role.operator),
    ("POST", "/v1/kill"): ("kill", Role.operator),
    ("POST", "/v1/reload"): ("reload", Role.operator),
    ("POST", "/v1/apply"): ("apply", Role.admin),
    ("POST", "/v1/down"): ("down", Role.admin),
}
"""What each route is called in a refusal and the audit trail, and the role it needs."""



def to_wire(error: CorralError) -> dict[str, Any]:
    """The JSON form of an error: its class name and ``args`` (and a spec error's others)."""
    doc: dict[str, Any] = {"type": type(error).__name__, "args": list(error.args), "message": str(error)}
    if isinstance(error, SpecError):
        doc["more"] = [list(m.args) for m in error.more]
    return doc


def from_wire(doc: Mapping[str, Any]) -> CorralError:
    """The error :func:`to_wire` described, as the same class; a class this module does not
    define (an older or newer agent) comes back as a plain :class:`CorralError` with the
    message."""
    cls = getattr(exceptions, str(doc.get("type")), None)
    args = doc.get("args") or [doc.get("message", "")]
    if not (isinstance(cls, type) and issubclass(cls, CorralError)):
        return CorralError(str(doc.get("message", args[0] if args else "")))
    if cls is SpecError:
        return SpecError(*args, more=[SpecError(*m) for m in doc.get("more", [])])
    try:
        return cls(*args)
    except TypeError:
        return CorralError(str(doc.get("message", "")))


def query_one(q: dict[str, list[str]], name: str) -> str | None:
    """A query parameter given at most once (None when absent)."""
    values = q.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise ConfigError(f"{name}: given {len(values)} times")
    return values[0]


def query_number(q: dict[str, list[str]], name: str, default: int, lo: int, hi: int) -> int:
    """A query integer, strictly: digits (and a leading minus) only, within ``lo``..``hi``."""
    text = query_one(q, name)
    if text is None:
        return default
    if not re.fullmatch(r"-?[0-9]{1,19}", text) or not lo <= int(text) <= hi:
        raise ConfigError(f"{name}: {text!r} is not a whole number from {lo} to {hi}")
    return int(text)


def query_seconds(q: dict[str, list[str]], name: str, default: float, hi: float) -> float:
    """A query duration in seconds, strictly: finite, from 0 to ``hi``."""
    text = query_one(q, name)
    if text is None:
        return default
    if not re.fullmatch(r"[0-9]{1,6}(\.[0-9]{1,6})?", text) or float(text) > hi:
        raise ConfigError(f"{name}: {text!r} is not a number of seconds from 0 to {hi:g}")
    return float(text)
