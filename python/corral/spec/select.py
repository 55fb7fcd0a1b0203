"""Part of a stack, as ``docker compose up SERVICE...`` and compose's profiles choose it.

:func:`select` makes the spec that runs: a spec of only the chosen services, so that the
spec version, the store and the machine ledger all say what really runs (an agent that
takes over later reads that spec, not the file).

- With services named: those and everything they depend on (a named service's profiles
  count as given, and so do its dependencies': naming it says what is wanted).
- Without: every service without ``profiles``, those with a given profile, and what they
  depend on; a dependency that is only in profiles not given is an error naming them.

``allow:`` lists keep only the services that run.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import yaml

from corral.exceptions import SpecError, UnknownService
from corral.spec.deployment import DeploymentSpec
from corral.spec.load import parse_spec
from corral.specfile import read_document

__all__ = ["chosen", "select"]


def chosen(spec: DeploymentSpec, services: Iterable[str] = (), profiles: Iterable[str] = ()) -> list[str]:
    """The names :func:`select` keeps, in the spec's order. Raises
    :class:`~corral.exceptions.UnknownService` for a name the spec lacks and
    :class:`~corral.exceptions.SpecError` for a dependency left out by its profiles."""
    named = list(dict.fromkeys(services))
    for n in named:
        if n not in spec.services:
            raise UnknownService(f"unknown service {n!r} (the spec has {', '.join(spec.services)})", n)
    active = set(profiles)
    roots = named or [n for n, s in spec.services.items() if not s.profiles or active & set(s.profiles)]
    keep: set[str] = set()
    todo = list(roots)
    while todo:
        n = todo.pop()
        if n in keep:
            continue
        keep.add(n)
        for dep in spec.services[n].depends_on:
            svc = spec.services[dep]
            if not named and svc.profiles and not active & set(svc.profiles):
                raise spec.error(("services", n, "depends_on", dep),
                                 f"{n} depends on {dep}, which is only in profile(s) {', '.join(svc.profiles)}: "
                                 f"give --profile {svc.profiles[0]}, or name {n} (corral up {n})")
            todo.append(dep)
    return [n for n in spec.services if n in keep]


def select(spec: DeploymentSpec, services: Iterable[str] = (), profiles: Iterable[str] = (),
           file: str | None = None) -> DeploymentSpec:
    """The spec of only the services :func:`chosen` keeps (``spec`` itself when that is
    all of them and none has profiles): its text is the file's document with the others
    left out, so it reads back the same (``file`` names it in errors)."""
    keep = chosen(spec, services, profiles)
    if len(keep) == len(spec.services):
        return spec
    if not keep:
        raise SpecError("no service to start: every service is in a profile not given (--profile NAME)",
                        file, None)
    # Read as the spec was read (YAML 1.2: only true and false are booleans).
    doc: dict[str, Any] = read_document(spec.text, file or "corral.yaml")[0] if spec.text else \
        spec.model_dump(mode="json")
    if "name" not in doc:
        doc = {"name": spec.name, **doc}
    doc["services"] = {n: _without(doc["services"][n], keep) for n in keep}
    text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    return parse_spec(text, file or "corral.yaml")


def _without(svc: dict[str, Any], keep: list[str]) -> dict[str, Any]:
    if isinstance(svc, dict) and isinstance(svc.get("allow"), list):
        svc = {**svc, "allow": [a for a in svc["allow"] if a in keep]}
    return svc
