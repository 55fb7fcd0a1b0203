"""The mesh's ``allow:`` rules for Nomad: Consul service intentions, and who calls whom
through Consul Connect.

corral's front admits, with ``mtls``, only the services in ``allow`` (any of the mesh for
an empty list). On Nomad that is Consul Connect: the service registers in Consul with a
sidecar proxy, its port stays inside the allocation's network namespace, and a
``service-intentions`` config entry (``consul config write FILE``) allows the named
sources and denies the rest. Each caller gets a sidecar with an upstream to it (the
services in ``allow``; for an empty ``allow``, the services that depend on it).

What Connect cannot carry is refused (:class:`ConfigError`, export exits 2): a caller
without a port (Nomad gives a sidecar only to a service with one), a one-shot caller (a
prestart or batch task has no sidecar before it runs), a participant on ``raw_exec`` (no
network namespace for bridge mode).
"""

from __future__ import annotations

import re
from typing import Any

from corral.exceptions import ConfigError
from corral.export.model import StackModel, Workload

__all__ = ["UPSTREAM_BASE", "callers", "check", "intentions", "is_target", "local_port", "upstream_var",
           "upstreams"]

UPSTREAM_BASE = 21000
"""A caller's sidecar listens for its first upstream here, inside the allocation's network
namespace (the next on the next port, skipping the caller's own)."""


def is_target(w: Workload) -> bool:
    """It has the mesh's front: it registers with Connect and its port is not published."""
    return w.allowed is not None and bool(w.ports)


def callers(model: StackModel, target: Workload) -> list[str]:
    """The services that connect to ``target`` through the mesh (itself left out)."""
    if not is_target(target):
        return []
    names = target.spec.allow or [w.name for w in model.workloads.values() if target.name in w.depends]
    return [n for n in names if n != target.name]


def upstreams(model: StackModel, w: Workload) -> list[str]:
    """The targets ``w`` calls through its sidecar, in the stack's order."""
    return [t.name for t in model.workloads.values() if w.name in callers(model, t)]


def local_port(model: StackModel, w: Workload, target: str) -> int:
    """Where ``w``'s sidecar listens for ``target``."""
    own = {p.number for p in w.ports}
    port = UPSTREAM_BASE
    for name in upstreams(model, w):
        while port in own:
            port += 1
        if name == target:
            return port
        port += 1
    raise KeyError(target)


def upstream_var(target: Workload) -> str:
    """The variable Nomad sets in the caller's task to the upstream's local address."""
    return "NOMAD_UPSTREAM_ADDR_" + re.sub(r"[^A-Za-z0-9_]", "_", target.dns)


def check(model: StackModel, driver: str) -> None:
    """Raises :class:`ConfigError` naming every rule Connect cannot carry."""
    problems: list[str] = []
    for t in model.workloads.values():
        for name in callers(model, t):
            c = model.workloads[name]
            if not c.ports:
                problems.append(f"{c.name} calls {t.name} through Consul Connect (allow:), and Nomad gives a "
                                f"sidecar only to a service with a port: give {c.name} one (ports: {{x: auto}})")
            elif c.kind == "job":
                problems.append(f"{c.name} is one-shot and calls {t.name} through Consul Connect (allow:): a "
                                f"prestart or batch task has no sidecar before it runs")
    participants = {n for t in model.workloads.values() if is_target(t) for n in [t.name, *callers(model, t)]}
    for name in sorted(participants):
        if model.workloads[name].image is None and driver == "raw_exec":
            problems.append(f"{name} takes part in the mesh (allow:), and Consul Connect needs bridge networking, "
                            f"which raw_exec has not: give it an image or use export.nomad.driver: exec")
    if problems:
        raise ConfigError("nomad: " + "; ".join(problems))


def intentions(model: StackModel) -> list[dict[str, Any]]:
    """One ``service-intentions`` config entry per service with the mesh's front: its
    ``allow`` list allowed by name, everyone else denied (an empty ``allow``: every Connect
    service, Consul's nearest to "any of the mesh")."""
    out = []
    for w in model.workloads.values():
        if not is_target(w):
            continue
        if w.spec.allow:
            sources = [{"Name": model.workloads[a].dns, "Action": "allow", "Type": "consul",
                        "Description": f"corral: {w.name} allows {a}"} for a in w.spec.allow]
            sources.append({"Name": "*", "Action": "deny", "Type": "consul",
                            "Description": f"corral: no one else may connect to {w.name}"})
        else:
            sources = [{"Name": "*", "Action": "allow", "Type": "consul",
                        "Description": f"corral: {w.name} allows any of the mesh"}]
        out.append({"Kind": "service-intentions", "Name": w.dns, "Sources": sources,
                    "Meta": {"corral.stack": model.name, "corral.service": w.name}})
    return out
