"""What every section of the spec shares: durations, sizes, port values, names, the base model."""

from __future__ import annotations

from typing import Annotated, TypeAlias

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
)

from corral.units import parse_duration, parse_size

# --- scalar syntaxes: corral.units -----------------------------------------------------

def _is_port_number(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535


def _port_value(value: object) -> object:
    if value == "auto" or _is_port_number(value):
        return value
    raise ValueError(f"expected 'auto' or a port number 1-65535, got {value!r}")


def _port_ref(value: object) -> object:
    if (isinstance(value, str) and value != "auto") or _is_port_number(value):
        return value
    raise ValueError(f"expected a port name or a number 1-65535, got {value!r}")


Duration: TypeAlias = Annotated[float, BeforeValidator(parse_duration)]
Size: TypeAlias = Annotated[int, BeforeValidator(parse_size)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_NAME = r"^[a-z0-9]([a-z0-9_-]{0,62})$"
"""A deployment's or a service's name."""
