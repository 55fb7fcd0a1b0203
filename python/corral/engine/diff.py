"""What an apply would change: the running spec against a new one, service by service, in
the manner of Nomad's plan diff (``nomad/structs/diff.go``).

Each service gets one kind of change, the strongest that applies:

- ``added`` / ``removed``;
- ``replace``: something its processes see changed (command, environment, ``env_file``
  contents, working directory, resources, ports, health, restart, shutdown, user, the set
  of dependencies): a rolling replace by its ``update:`` block;
- ``scale``: only ``replicas``;
- ``in-place``: only what corral alone reads (the front: ``expose``, ``balance``,
  ``mtls``, ``allow``; ``update``, ``priority``, ``start_timeout``, a dependency's
  condition or ``restart``): nothing restarts;
- ``unchanged``: the same effective configuration, ``env_file`` contents included.

A replace may carry a replicas change and front changes with it. The deployment's own
fields (``logs``, ``events``, ``mesh``, ``scheduler``) apply in place; a different ``name`` or
``port_range`` is refused. This module only compares: the engine annotates the result with
what the machine says (whether a surge fits) and carries it out.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from corral.engine.environment import env_name
from corral.spec import DeploymentSpec, ServiceSpec, read_env_file

__all__ = ["Change", "FieldChange", "ServiceChange", "SpecDiff", "diff_specs", "effective", "spec_hash"]

Change = Literal["added", "removed", "replace", "scale", "in-place", "unchanged"]

FRONT_FIELDS = frozenset({"expose", "balance", "mtls", "allow", "front_hold", "front_protocol"})
"""What the front reads: changed in place on the proxy."""
CORRAL_FIELDS = frozenset({"update", "priority", "start_timeout", "image"})
"""What only corral reads (``image``: only its export): no instance restarts."""
DEPLOYMENT_IN_PLACE = ("logs", "events", "mesh", "scheduler", "metrics", "tracing", "export")
"""Deployment fields an apply takes as they are (for new spawns, the next renewal...)."""


@dataclass(frozen=True)
class FieldChange:
    """One field, dotted (``env.VERSION``), before and after (None: absent)."""

    field: str
    old: Any
    new: Any

    def text(self) -> str:
        """``env.VERSION "1" => "2"``, ``balance round_robin => least_connections``."""
        quote = _top(self.field) in ("env", "env_file", "command")
        return f"{self.field} {_show(self.old, quote)} => {_show(self.new, quote)}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"field": self.field, "old": self.old, "new": self.new}


@dataclass
class ServiceChange:
    """What an apply does to one service."""

    name: str
    change: Change
    fields: list[FieldChange] = field(default_factory=list)
    replicas: tuple[int, int] = (0, 0)
    """Running now, and wanted."""
    front: bool = False
    """Its front changes (in place)."""
    order: str | None = None
    """For a replace: ``start-first`` or ``stop-first``."""
    fallback: str | None = None
    """Why a start-first service falls back to stop-first (the ledger's reason)."""
    restart_after: list[str] = field(default_factory=list)
    """Replaced dependencies after which it restarts (``restart: true``)."""
    stale: list[str] = field(default_factory=list)
    """For a replaced service: dependents left holding its old addresses."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"name": self.name, "change": self.change, "fields": [f.to_dict() for f in self.fields],
                "replicas": list(self.replicas), "front": self.front, "order": self.order,
                "fallback": self.fallback, "restart_after": self.restart_after, "stale_dependents": self.stale}

    def lines(self) -> Iterator[str]:
        """The plan's lines for it (see :meth:`SpecDiff.lines`)."""
        old, new = self.replicas
        if self.change == "added":
            yield f"+ {self.name} (new, {_count(new)})"
        elif self.change == "removed":
            yield f"- {self.name} (removed, {_count(old)} stopped)"
        elif self.change == "scale":
            rest = "".join(f"; {f.text()} (in place)" for f in self.fields if f.field != "replicas")
            yield f"~ {self.name}: replicas {old} => {new}{rest}"
        elif self.change == "in-place":
            yield f"~ {self.name}: {'; '.join(f.text() for f in self.fields)} (in place)"
        elif self.change == "replace":
            what = "; ".join(f.text() for f in self.fields) or "restart after its dependencies"
            yield f"~ {self.name}: {what}; rolling {_count(min(old, new))}, {self.order}"
            if self.fallback:
                yield f"    {self.name} falls back to stop-first: {self.fallback}"
        for dep in self.stale:
            yield (f"    {dep} keeps the old address of {self.name} (CORRAL_{env_name(self.name)}_ADDR); "
                   f"give its depends_on.{self.name} restart: true to restart it after")
        if self.restart_after:
            yield f"    {self.name} restarts after {', '.join(self.restart_after)} (restart: true)"


@dataclass
class SpecDiff:
    """Every service's change, in the new spec's order (removed ones last)."""

    services: list[ServiceChange]
    deployment: list[FieldChange] = field(default_factory=list)
    """Deployment fields that change in place."""
    version: int = 0
    """The running spec version."""
    digest: str = ""
    """The new spec's hash."""

    @property
    def changed(self) -> list[ServiceChange]:
        """The services that change."""
        return [c for c in self.services if c.change != "unchanged"]

    @property
    def empty(self) -> bool:
        """Nothing would change."""
        return not self.changed and not self.deployment

    def get(self, name: str) -> ServiceChange:
        """One service's change."""
        return next(c for c in self.services if c.name == name)

    def lines(self) -> list[str]:
        """The plan, as ``corral plan`` prints it."""
        out = [line for c in self.changed for line in c.lines()]
        out += [f"~ deployment: {f.text()} (in place)" for f in self.deployment]
        same = [c.name for c in self.services if c.change == "unchanged"]
        if same:
            out.append(f"= {len(same)} unchanged: {', '.join(same)}")
        if self.empty:
            out.insert(0, "no changes")
        return out

    def to_dict(self) -> dict[str, Any]:
        """The ``plan --json`` document with an agent running."""
        return {"version": self.version, "digest": self.digest, "empty": self.empty,
                "services": [c.to_dict() for c in self.services],
                "deployment": [f.to_dict() for f in self.deployment]}


def spec_hash(spec: DeploymentSpec) -> str:
    """The hash of a spec's text (of its model when it has none): what the store keeps beside
    each version."""
    text = spec.text or json.dumps(spec.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def effective(svc: ServiceSpec, base: Path) -> dict[str, Any]:
    """A service's configuration as compared: the model, with ``env_file`` replaced by what
    the file holds (a missing file reads as empty: the spec check reports it)."""
    doc: dict[str, Any] = svc.model_dump(mode="json")
    if svc.env_file is not None:
        try:
            doc["env_file"] = {"path": svc.env_file, "contents": read_env_file(base / svc.env_file)}
        except OSError:
            doc["env_file"] = {"path": svc.env_file, "contents": None}
    return doc


def diff_specs(old: DeploymentSpec, old_configs: Mapping[str, dict[str, Any]], new: DeploymentSpec,
               base: Path, running: Mapping[str, int]) -> SpecDiff:
    """Compares ``new`` with the running ``old``. ``old_configs`` are the running services'
    :func:`effective` configurations as of their last start (``env_file`` contents then);
    ``running`` how many instances each runs now (a ``scale`` may have moved it off the
    spec). Raises the new spec's :class:`~corral.exceptions.SpecError` for a change an
    apply cannot make."""
    if new.name != old.name:
        raise new.error(("name",), f"the running deployment is {old.name!r}; another name is another stack "
                        f"(give it its own state directory, or 'corral down' first)")
    if tuple(new.port_range) != tuple(old.port_range):
        raise new.error(("port_range",), f"port_range cannot change while the stack runs "
                        f"({old.port_range[0]}-{old.port_range[1]}); 'corral down' first")
    changes: list[ServiceChange] = []
    for name, svc in new.services.items():
        if name not in old.services:
            changes.append(ServiceChange(name, "added", replicas=(0, svc.replicas)))
            continue
        before, after = old_configs[name], effective(svc, base)
        have = running.get(name, old.services[name].replicas)
        # The running count, not the old spec's, is what a replicas change moves from (a
        # `corral scale` holds until the next apply, where the spec wins, as in compose).
        fields = [f for f in _fields(before, after) if f.field != "replicas"]
        scaled = have != svc.replicas
        c = ServiceChange(name, "unchanged", replicas=(have, svc.replicas),
                          fields=([FieldChange("replicas", have, svc.replicas)] if scaled else []) + fields)
        c.front = any(_top(f.field) in FRONT_FIELDS for f in fields)
        if any(_sees(f.field, before, after) for f in fields):
            c.change, c.order = "replace", svc.update.order
        elif scaled:
            c.change = "scale"
        elif fields:
            c.change = "in-place"
        changes.append(c)
    for name, svc in old.services.items():
        if name not in new.services:
            changes.append(ServiceChange(name, "removed", replicas=(running.get(name, svc.replicas), 0)))
    diff = SpecDiff(changes, list(_deployment_fields(old, new)), digest=spec_hash(new))
    _dependents(diff, new)
    return diff


def _dependents(diff: SpecDiff, new: DeploymentSpec) -> None:
    """``restart: true`` dependents of replaced services restart after them; the others
    keep stale addresses, and the plan names them."""
    replaced = {c.name for c in diff.services if c.change == "replace"}
    for c in diff.services:
        svc = new.services.get(c.name)
        if svc is None or c.change == "removed":
            continue
        for dep, want in svc.depends_on.items():
            if dep not in replaced:
                continue
            if want.restart:
                c.restart_after.append(dep)
                if c.change in ("unchanged", "in-place", "scale"):
                    c.change, c.order = "replace", svc.update.order
            elif c.change != "replace":
                diff.get(dep).stale.append(c.name)


def _sees(path: str, before: Mapping[str, Any], after: Mapping[str, Any]) -> bool:
    """Whether a changed field is one the processes see."""
    top = _top(path)
    if top in FRONT_FIELDS or top in CORRAL_FIELDS or top == "replicas":
        return False
    if top == "depends_on":
        # A new or dropped dependency changes CORRAL_<DEP>_ADDR; a condition does not.
        return set(before.get("depends_on", {})) != set(after.get("depends_on", {}))
    return True


def _deployment_fields(old: DeploymentSpec, new: DeploymentSpec) -> Iterator[FieldChange]:
    for key in DEPLOYMENT_IN_PLACE:
        a, b = getattr(old, key), getattr(new, key)
        if a != b:
            yield from _fields({key: _dump(a)}, {key: _dump(b)})


def _dump(value: Any) -> Any:
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value


def _fields(a: Any, b: Any, prefix: str = "") -> Iterator[FieldChange]:
    """Dotted paths where two JSON documents differ (lists compare whole)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in [*a, *(k for k in b if k not in a)]:
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in b:
                yield FieldChange(path, a[key], None)
            elif key not in a:
                yield FieldChange(path, None, b[key])
            elif a[key] != b[key]:
                yield from _fields(a[key], b[key], path)
    elif a != b:
        yield FieldChange(prefix, a, b)


def _top(path: str) -> str:
    return path.split(".", 1)[0]


def _show(value: Any, quote: bool) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return f"{value:g}"
    if isinstance(value, str) and not quote and value and value.replace("_", "").replace("-", "").isalnum():
        return value
    return json.dumps(value)


def _count(n: int) -> str:
    return f"{n} instance" + ("" if n == 1 else "s")

