"""Loading: YAML text to a validated :class:`~corral.spec.deployment.DeploymentSpec`, every
problem as ``file:line: field: message``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import (
    ValidationError,
)

from corral.exceptions import SpecError
from corral.spec.checks import cross_check
from corral.spec.deployment import DeploymentSpec
from corral.specfile import read_document, read_text

# --- loading -------------------------------------------------------------------------


def _message(err: Mapping[str, Any]) -> str:
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "required field missing"
    msg = str(err.get("msg", "invalid"))
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    got = err.get("input")
    if isinstance(got, str | int | float | bool) or got is None:
        msg = f"{msg}, got {got!r}"
    return msg


def project_name(directory: Path) -> str:
    """A deployment name from a directory's, as docker compose derives a project's: lower
    case, anything but letters, digits, ``-`` and ``_`` replaced by ``-``."""
    name = re.sub(r"[^a-z0-9_-]", "-", directory.name.lower()).lstrip("-_")[:63]
    return name or "corral"


def load_spec(path: str | Path, *, machine: bool = True) -> DeploymentSpec:
    """Reads and validates a spec file; raises :class:`SpecError` (with ``more``) on any problem.
    ``machine=False`` (export) leaves out what only running on this machine makes wrong."""
    return parse_spec(read_text(path), str(path), machine=machine)


def parse_spec(text: str, file: str = "corral.yaml", *, machine: bool = True) -> DeploymentSpec:
    """Validates spec text; ``file`` names it in errors."""
    data, src, dups = read_document(text, file)
    if dups:
        errs = [src.error(loc, "duplicate key") for loc, _ in dups]
        raise _combine(errs)
    if not isinstance(data, dict):
        raise SpecError("expected a mapping with 'name' and 'services'", file, 1)
    base = Path(file).resolve().parent
    if "name" not in data:
        data = {"name": project_name(base), **data}
    try:
        spec = DeploymentSpec.model_validate(data)
    except ValidationError as e:
        raise _combine([src.error(tuple(err["loc"]), _message(err)) for err in e.errors()]) from None
    problems = list(cross_check(spec, src, base, machine=machine))
    if problems:
        raise _combine(problems)
    spec._source = src
    spec._text = text
    return spec


def _combine(errors: list[SpecError]) -> SpecError:
    errors.sort(key=lambda e: e.line or 0)
    first = errors[0]
    return SpecError(first.message, first.file, first.line, first.field, more=errors[1:])
