"""The top of ``corral.yaml``: the deployment, its services, and its stack-wide sections
(logs, events, mesh, metrics, tracing, export)."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import (
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

from corral.exceptions import SpecError
from corral.exportspec import ExportSpec
from corral.spec.common import _NAME, Duration, Size, _Model
from corral.spec.service import ServiceSpec
from corral.specfile import Source


class LogSpec(_Model):
    """Where instance output goes: ``<state dir>/logs/<instance>.log``, rotated by size."""

    max_size: Size = 10 << 20
    keep: int = Field(default=3, ge=0, le=100)


class EventsSpec(_Model):
    """How much of the event log is kept: the newest ``max_rows`` events, none older than
    ``max_age``."""

    max_rows: int = Field(default=100_000, ge=100, le=100_000_000)
    max_age: Duration = 7 * 86400.0


class MeshSpec(_Model):
    """The local mesh: on when any service has ``mtls: true``. Every service then gets a
    certificate (``CORRAL_TLS_CERT``/``KEY``/``CA``), renewed after two thirds of its life."""

    cert_lifetime: Duration = 86400.0

    @model_validator(mode="after")
    def _life(self) -> MeshSpec:
        if self.cert_lifetime < 3:
            raise ValueError("cert_lifetime must be at least 3s")
        return self


class TracingSpec(_Model):
    """OpenTelemetry: spans go over OTLP/HTTP to ``otlp`` (the collector's base URL)."""

    otlp: str

    @field_validator("otlp")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.fullmatch(r"https?://[^/\s]+(/\S*)?", v):
            raise ValueError(f"otlp must be an http:// or https:// URL, got {v!r}")
        return v


class MetricsSpec(_Model):
    """Prometheus metrics: the agent serves ``GET /metrics`` on ``listen`` (``host:port``).
    With ``token_file``, every scrape must present ``Authorization: Bearer <its content>``
    (Prometheus' ``authorization`` setting); an address other hosts can reach needs one."""

    listen: str
    token_file: str | None = None

    @field_validator("listen")
    @classmethod
    def _address(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"listen must be host:port (a port from 1 to 65535), got {v!r}")
        return v


_ENTRY = r"^(user|group):[A-Za-z0-9_.][A-Za-z0-9_.-]{0,31}\$?$|^(uid|gid):[0-9]{1,10}$"


class AccessSpec(_Model):
    """Who else may use the stack (see :mod:`corral.access`): for each role, entries
    ``user:NAME``, ``group:NAME``, ``uid:N`` or ``gid:N``. The owner and root are admin."""

    viewer: list[Annotated[str, Field(pattern=_ENTRY)]] = Field(default_factory=list)
    operator: list[Annotated[str, Field(pattern=_ENTRY)]] = Field(default_factory=list)
    admin: list[Annotated[str, Field(pattern=_ENTRY)]] = Field(default_factory=list)


class AuditSpec(_Model):
    """The audit trail (``<state dir>/audit.log``, see :mod:`corral.audit`): rotated past
    ``max_size``, ``keep`` files kept; each record also sent to ``syslog`` when given (a
    Unix datagram socket such as ``/dev/log``, or ``udp://host:port``)."""

    max_size: Size = 4 << 20
    keep: int = Field(default=5, ge=1, le=1000)
    syslog: str | None = None

    @field_validator("syslog")
    @classmethod
    def _sink(cls, v: str | None) -> str | None:
        if v is not None and not (v.startswith("/") or re.fullmatch(r"udp://[^/\s:]+:[0-9]{1,5}", v)):
            raise ValueError(f"syslog must be a socket path (/dev/log) or udp://host:port, got {v!r}")
        return v


class DeploymentSpec(_Model):
    """A whole ``corral.yaml``."""

    name: Annotated[str, Field(pattern=_NAME)]
    logs: LogSpec = LogSpec()
    events: EventsSpec = EventsSpec()
    mesh: MeshSpec = MeshSpec()
    metrics: MetricsSpec | None = None
    tracing: TracingSpec | None = None
    access: AccessSpec = AccessSpec()
    audit: AuditSpec = AuditSpec()
    export: ExportSpec = ExportSpec()
    services: dict[Annotated[str, Field(pattern=_NAME)], ServiceSpec]
    scheduler: Literal["binpack", "spread"] = "binpack"
    port_range: tuple[int, int] = (20000, 32000)
    _source: Source | None = PrivateAttr(default=None)
    _text: str = PrivateAttr(default="")

    @property
    def text(self) -> str:
        """The YAML it was loaded from (empty when built in Python)."""
        return self._text

    def error(self, loc: tuple[str | int, ...], message: str) -> SpecError:
        """A :class:`SpecError` at ``loc`` (e.g. ``("services", "api", "resources")``), with the
        file and line it came from when the spec was loaded from text."""
        if self._source is None:
            return SpecError(message, None, None, ".".join(map(str, loc)))
        return self._source.error(loc, message)

    @model_validator(mode="after")
    def _range(self) -> DeploymentSpec:
        lo, hi = self.port_range
        if not 1 <= lo <= hi <= 65535:
            raise ValueError(f"port_range must be two ports, low to high, got {lo}-{hi}")
        return self
