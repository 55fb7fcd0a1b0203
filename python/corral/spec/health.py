"""The ``health`` section of a service: startup, readiness and liveness probes."""

from __future__ import annotations

from typing import Annotated, TypeAlias

from pydantic import (
    BeforeValidator,
    Field,
    model_validator,
)

from corral.spec.common import Duration, _Model, _port_ref

# --- health --------------------------------------------------------------------------

PortRef: TypeAlias = Annotated[str | int, BeforeValidator(_port_ref)]


class HttpCheck(_Model):
    """``GET path`` on a port of the instance; 200-399 is healthy."""

    port: PortRef
    path: str = "/"
    host: str = "127.0.0.1"


class TcpCheck(_Model):
    """A TCP connect to a port of the instance."""

    port: PortRef
    host: str = "127.0.0.1"


class Probe(_Model):
    """One probe with Kubernetes' timing fields and defaults."""

    http: HttpCheck | None = None
    tcp: TcpCheck | None = None
    exec: list[str] | None = None
    log: str | None = None
    """A regular expression (the ``regex`` crate's syntax) matched on each line the
    instance prints, stdout and stderr: it passes once a line matches, and stays passed."""
    initial_delay: Duration = 0.0
    period: Duration = 10.0
    timeout: Duration = 1.0
    success_threshold: int = Field(default=1, ge=1, le=1_000_000)
    failure_threshold: int = Field(default=3, ge=1, le=1_000_000)

    @model_validator(mode="after")
    def _one_check(self) -> Probe:
        given = [k for k in ("http", "tcp", "exec", "log") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a probe needs exactly one of http, tcp, exec, log (got {', '.join(given) or 'none'})")
        if self.exec is not None and not self.exec:
            raise ValueError("exec needs a command")
        if self.log is not None:
            from corral._core import ProbeSpec
            from corral.exceptions import ConfigError

            try:
                ProbeSpec("log", path="/dev/null", pattern=self.log)
            except ConfigError as e:
                raise ValueError(str(e)) from None
        if self.period <= 0:
            raise ValueError("period must be positive")
        if self.timeout <= 0:
            raise ValueError("timeout must be positive")
        return self

    @property
    def port(self) -> PortRef | None:
        """The port the check targets, by name or number."""
        check = self.http or self.tcp
        return check.port if check is not None else None


class HealthSpec(_Model):
    """Startup gates the other two; readiness gates dependents and registration; liveness restarts."""

    startup: Probe | None = None
    readiness: Probe | None = None
    liveness: Probe | None = None

    @model_validator(mode="after")
    def _thresholds(self) -> HealthSpec:
        for name in ("startup", "liveness"):
            p: Probe | None = getattr(self, name)
            if p is not None and p.success_threshold != 1:
                raise ValueError(f"{name}.success_threshold must be 1 (as in Kubernetes)")
        if self.liveness is not None and self.liveness.log is not None:
            raise ValueError("liveness: a log line says a service is ready, never that it stopped being alive; "
                             "use http, tcp or exec (log fits startup and readiness)")
        return self
