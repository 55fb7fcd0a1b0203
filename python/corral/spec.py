"""``corral.yaml``: the deployment spec as pydantic models.

Loading keeps the YAML node marks, so every problem, whether pydantic's or one of the
cross-checks here (unknown dependency, cycle, unknown port name), is reported as
``file:line: field: message``. Durations are ``500ms``, ``10s``, ``5m``, ``1h`` or ``1m30s``
(a bare number is seconds); sizes are ``256Mi``, ``2Gi``, ``512M``, ``100k`` (a bare number
is bytes).
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeAlias

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from corral.exceptions import SpecError
from corral.exportspec import ExportSpec
from corral.identity import credentials
from corral.specfile import Loc, Source, read_document, read_text
from corral.units import parse_duration, parse_size

__all__ = [
    "Dependency",
    "DeploymentSpec",
    "EventsSpec",
    "HealthSpec",
    "HttpCheck",
    "LogSpec",
    "MetricsSpec",
    "Probe",
    "Resources",
    "RestartSpec",
    "ServiceSpec",
    "ShutdownSpec",
    "StorageSpec",
    "TcpCheck",
    "TracingSpec",
    "UpdateSpec",
    "load_spec",
    "parse_duration",
    "parse_size",
]

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
    initial_delay: Duration = 0.0
    period: Duration = 10.0
    timeout: Duration = 1.0
    success_threshold: int = Field(default=1, ge=1, le=1_000_000)
    failure_threshold: int = Field(default=3, ge=1, le=1_000_000)

    @model_validator(mode="after")
    def _one_check(self) -> Probe:
        given = [k for k in ("http", "tcp", "exec") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a probe needs exactly one of http, tcp, exec (got {', '.join(given) or 'none'})")
        if self.exec is not None and not self.exec:
            raise ValueError("exec needs a command")
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
        return self


# --- resources -----------------------------------------------------------------------


class StorageSpec(_Model):
    """A volume: a directory (created if missing) with a quota, inside the project's directory
    unless ``allow_outside`` (never ``/`` or a system directory)."""

    size: Size
    path: str
    allow_outside: bool = False


class Resources(_Model):
    """What one instance needs. ``cpu`` is a fractional share; ``cores`` are exclusive whole cores."""

    cpu: float | None = Field(default=None, ge=0.001, le=65536, allow_inf_nan=False)
    """At least one millicore (0.001): less would round to nothing."""
    cores: int | None = Field(default=None, ge=1, le=65535)
    numa: Literal["none", "prefer", "require"] = "none"
    cache: Literal["any", "prefer-large"] = "any"
    memory: Size | None = None
    memory_max: Size | None = None
    swap: Size | None = None
    storage: StorageSpec | None = None

    @model_validator(mode="after")
    def _coherent(self) -> Resources:
        if self.cpu is not None and self.cores is not None:
            raise ValueError("give either cpu (a shared fraction) or cores (exclusive), not both")
        if self.memory_max is not None and self.memory is not None and self.memory_max < self.memory:
            raise ValueError("memory_max must be at least memory")
        return self


# --- restart and shutdown ------------------------------------------------------------


class RestartSpec(_Model):
    """When and how fast to restart; ``max_restarts`` within ``window`` trips the crash-loop breaker."""

    policy: Literal["no", "on-failure", "always"] = "on-failure"
    backoff: Literal["fixed", "linear", "exponential", "fibonacci", "decorrelated"] = "exponential"
    initial: Duration = 1.0
    max: Duration = 60.0
    max_restarts: int | None = Field(default=5, ge=0, le=1_000_000_000)
    window: Duration = 600.0
    reset_after: Duration = 600.0

    @model_validator(mode="after")
    def _order(self) -> RestartSpec:
        if self.max < self.initial:
            raise ValueError("max backoff must be at least initial")
        return self


_SIGNALS = Literal["SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP", "SIGKILL", "SIGUSR1", "SIGUSR2"]


class ShutdownSpec(_Model):
    """The signal sent to the whole process group, then SIGKILL after ``timeout``.

    ``drain`` (exposed services only): the time between taking the instance out of its
    front and the signal, so connections the front handed it just before are accepted and
    served before the server closes its listener (Kubernetes users put a preStop sleep there).
    """

    signal: _SIGNALS = "SIGTERM"
    timeout: Duration = 10.0
    drain: Duration = 0.2


# --- services ------------------------------------------------------------------------

_NAME = r"^[a-z0-9]([a-z0-9_-]{0,62})$"
Condition: TypeAlias = Literal["started", "healthy", "completed"]


class Dependency(_Model):
    """One entry of ``depends_on``: ``{db: healthy}`` is ``{db: {condition: healthy}}``.

    ``restart: true`` (compose's): after ``db`` is replaced by an apply, this service is
    restarted too, rolling, so it picks up ``db``'s new addresses (``CORRAL_DB_ADDR``)."""

    condition: Condition = "started"
    restart: bool = False


class UpdateSpec(_Model):
    """How an apply replaces the instances of a service (Nomad's ``update`` block).

    ``start-first``: a new instance is placed, started and ready before an old one is
    drained and stopped (Kubernetes' ``maxSurge: 1, maxUnavailable: 0``); when the extra
    instance cannot be placed, the service falls back to ``stop-first``, and the plan says
    so."""

    max_parallel: int = Field(default=1, ge=1, le=10000)
    order: Literal["start-first", "stop-first"] = "start-first"
    min_healthy_time: Duration = 0.0
    """How long a new instance must stay ready before it counts."""
    healthy_deadline: Duration = 300.0
    """How long a new instance may take to count; past it the rollout fails."""
    auto_revert: bool = True
    """On failure, roll the instances already replaced back to the previous version."""


class ServiceSpec(_Model):
    """One service of the deployment."""

    command: list[str] | str
    shell: bool = False
    env: dict[str, str] = Field(default_factory=dict)
    env_file: str | None = None
    working_dir: str | None = None
    replicas: int = Field(default=1, ge=0, le=10000)
    depends_on: dict[str, Dependency] = Field(default_factory=dict)
    ports: dict[str, Annotated[Literal["auto"] | int, BeforeValidator(_port_value)]] = Field(default_factory=dict)
    resources: Resources = Resources()
    health: HealthSpec = HealthSpec()
    restart: RestartSpec = RestartSpec()
    priority: int = Field(default=0, ge=-1_000_000, le=1_000_000)
    shutdown: ShutdownSpec = ShutdownSpec()
    expose: Annotated[int, Field(ge=1, le=65535)] | None = None
    """A front port on 127.0.0.1: a proxy balancing connections over the healthy instances
    (to their first declared port)."""
    balance: Literal["round_robin", "weighted", "least_connections", "ip_hash", "random"] = "least_connections"
    mtls: bool = False
    """The front requires a client certificate from the deployment's CA."""
    allow: list[str] = Field(default_factory=list)
    """With ``mtls``: the services whose SPIFFE IDs may connect (empty: any of the mesh)."""
    start_timeout: Duration = 60.0
    update: UpdateSpec = UpdateSpec()
    user: str | Annotated[int, Field(ge=0, le=4294967294)] | None = None
    """Run as this user (name or uid), as systemd's ``User=``; needs corral to run as root."""
    group: str | Annotated[int, Field(ge=0, le=4294967294)] | None = None
    """Run with this group (default: the user's primary group)."""
    image: str | None = None
    """The container image ``corral export`` gives the engines that run containers."""

    @model_validator(mode="before")
    @classmethod
    def _depends_list(cls, data: Any) -> Any:
        # `depends_on: [db]` is shorthand for `{db: started}`, and `{db: healthy}` for
        # `{db: {condition: healthy}}`, as in compose files.
        deps = data.get("depends_on") if isinstance(data, dict) else None
        if isinstance(deps, list):
            data = {**data, "depends_on": {str(d): {"condition": "started"} for d in deps}}
        elif isinstance(deps, dict):
            data = {**data, "depends_on": {k: {"condition": v} if isinstance(v, str) else v
                                           for k, v in deps.items()}}
        return data

    @field_validator("command")
    @classmethod
    def _command(cls, v: list[str] | str) -> list[str] | str:
        if not (v.strip() if isinstance(v, str) else v):
            raise ValueError("command must not be empty")
        if isinstance(v, list) and not v[0]:
            raise ValueError("the command's first word, the program, must not be empty")
        if any("\0" in a for a in ([v] if isinstance(v, str) else v)):
            raise ValueError("command must not contain NUL")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not key or "=" in key or "\0" in key:
                raise ValueError(f"environment variable name {key!r} must be non-empty, without '=' or NUL")
            if "\0" in value:
                raise ValueError(f"environment variable {key!r}: its value must not contain NUL")
        return v

    @model_validator(mode="after")
    def _ports(self) -> ServiceSpec:
        if (self.mtls or self.allow) and self.expose is None:
            raise ValueError("mtls and allow apply to a front: set expose")
        if self.allow and not self.mtls:
            raise ValueError("allow needs mtls: true")
        if self.expose is not None and not self.ports:
            raise ValueError("expose needs a port on the instances to send connections to (ports: {name: auto})")
        if self.expose is not None and self.expose in self.ports.values():
            raise ValueError(f"expose {self.expose} is also an instance port; the front needs its own")
        if self.replicas > 1:
            fixed = [n for n, p in self.ports.items() if p != "auto"]
            if fixed:
                raise ValueError(f"{self.replicas} replicas cannot share the fixed port {fixed[0]!r}; use auto")
        if isinstance(self.command, str) and not self.shell:
            try:
                shlex.split(self.command)
            except ValueError as e:
                raise ValueError(f"command {self.command!r} cannot be split into words ({e}); "
                                 f"fix the quoting or set shell: true") from None
        return self

    def argv(self) -> list[str]:
        """The command as an argv list: a string goes through ``/bin/sh -c`` with ``shell``."""
        if isinstance(self.command, list):
            return list(self.command)
        return ["/bin/sh", "-c", self.command] if self.shell else shlex.split(self.command)


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
    """Prometheus metrics: the agent serves ``GET /metrics`` on ``listen`` (``host:port``)."""

    listen: str

    @field_validator("listen")
    @classmethod
    def _address(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"listen must be host:port (a port from 1 to 65535), got {v!r}")
        return v


class DeploymentSpec(_Model):
    """A whole ``corral.yaml``."""

    name: Annotated[str, Field(pattern=_NAME)]
    logs: LogSpec = LogSpec()
    events: EventsSpec = EventsSpec()
    mesh: MeshSpec = MeshSpec()
    metrics: MetricsSpec | None = None
    tracing: TracingSpec | None = None
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


def load_spec(path: str | Path) -> DeploymentSpec:
    """Reads and validates a spec file; raises :class:`SpecError` (with ``more``) on any problem."""
    return parse_spec(read_text(path), str(path))


def parse_spec(text: str, file: str = "corral.yaml") -> DeploymentSpec:
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
    problems = list(_cross_check(spec, src, base))
    if problems:
        raise _combine(problems)
    spec._source = src
    spec._text = text
    return spec


def _combine(errors: list[SpecError]) -> SpecError:
    errors.sort(key=lambda e: e.line or 0)
    first = errors[0]
    return SpecError(first.message, first.file, first.line, first.field, more=errors[1:])


_SYSTEM_DIRS = frozenset(Path(p) for p in ("/", "/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64",
                                            "/proc", "/root", "/run", "/sbin", "/sys", "/usr", "/var", "/home",
                                            "/tmp"))
"""Never a volume, even with ``allow_outside``."""
_KERNEL_DIRS = (Path("/proc"), Path("/sys"), Path("/dev"))
"""Nothing below these is a volume either."""


def _cross_check(spec: DeploymentSpec, src: Source, root: Path) -> Iterator[SpecError]:
    """What one model cannot see: references between services and to port names, names that
    collide once they become environment variables, and the files a service names."""
    yield from _env_collisions(spec, src)
    for name, svc in spec.services.items():
        base: Loc = ("services", name)
        yield from _files(svc, base, src, root)
        yield from _identity(svc, base, src)
        for i, other in enumerate(svc.allow):
            if other not in spec.services:
                yield src.error((*base, "allow", i), f"unknown service {other!r}")
        for dep, want in svc.depends_on.items():
            cond = want.condition
            if dep not in spec.services:
                yield src.error((*base, "depends_on", dep), f"unknown service {dep!r}")
            elif dep == name:
                yield src.error((*base, "depends_on", dep), "a service cannot depend on itself")
            elif cond == "completed" and spec.services[dep].restart.policy == "always":
                yield src.error((*base, "depends_on", dep),
                                f"{dep!r} restarts always, so it never completes")
        for kind in ("startup", "readiness", "liveness"):
            probe: Probe | None = getattr(svc.health, kind)
            port = probe.port if probe is not None else None
            if isinstance(port, str) and port not in svc.ports:
                check = "http" if probe is not None and probe.http else "tcp"
                yield src.error((*base, "health", kind, check, "port"),
                                f"unknown port {port!r} (ports: {', '.join(svc.ports) or 'none'})")
        for ref, where in (*_port_refs(svc), *_probe_port_refs(svc)):
            if ref not in svc.ports:
                yield src.error((*base, *where), f"unknown port '${{ports.{ref}}}' "
                                f"(ports: {', '.join(svc.ports) or 'none'})")
    taken: dict[int, str] = {}
    for name, svc in spec.services.items():
        for pname, port in svc.ports.items():
            if isinstance(port, int):
                taken.setdefault(port, f"{name}.ports.{pname}")
    for name, svc in spec.services.items():
        if svc.expose is not None:
            holder = taken.get(svc.expose)
            if holder is not None:
                yield src.error(("services", name, "expose"), f"port {svc.expose} is already taken by {holder}")
            taken[svc.expose] = f"{name}.expose"
    cycle = find_cycle({n: list(s.depends_on) for n, s in spec.services.items()})
    if cycle:
        yield src.error(("services", cycle[0], "depends_on"), "cycle: " + " -> ".join(cycle))


_PORT_REF = re.compile(r"\$\{ports\.([A-Za-z0-9_-]+)\}")


def _probe_port_refs(svc: ServiceSpec) -> Iterator[tuple[str, Loc]]:
    for kind in ("startup", "readiness", "liveness"):
        probe: Probe | None = getattr(svc.health, kind)
        for i, arg in enumerate(probe.exec or [] if probe is not None else []):
            for m in _PORT_REF.finditer(arg):
                yield m.group(1), ("health", kind, "exec", i)


def _env_collisions(spec: DeploymentSpec, src: Source) -> Iterator[SpecError]:
    """``my-svc`` and ``my_svc`` are both ``CORRAL_MY_SVC_ADDR``; ports ``a-b`` and ``a_b``
    both ``CORRAL_PORT_A_B``: one would silently hide the other."""
    seen: dict[str, str] = {}
    for name in spec.services:
        other = seen.setdefault(_env_word(name), name)
        if other != name:
            yield src.error(("services", name), f"services {other!r} and {name!r} collide as environment "
                            f"variables (both CORRAL_{_env_word(name)}_ADDR); rename one")
    for name, svc in spec.services.items():
        ports: dict[str, str] = {}
        for pname in svc.ports:
            other = ports.setdefault(_env_word(pname), pname)
            if other != pname:
                yield src.error(("services", name, "ports", pname), f"ports {other!r} and {pname!r} collide as "
                                f"environment variables (both CORRAL_PORT_{_env_word(pname)}); rename one")


def _identity(svc: ServiceSpec, base: Loc, src: Source) -> Iterator[SpecError]:
    if svc.user is None and svc.group is None:
        return
    field = "user" if svc.user is not None else "group"
    try:
        uid, gid, _, _ = credentials(svc.user, svc.group)
    except KeyError as e:
        yield src.error((*base, field), str(e.args[0]))
        return
    if os.geteuid() != 0 and (uid not in (None, os.geteuid()) or gid not in (None, os.getegid())):
        yield src.error((*base, field), f"running as another {field} needs corral to run as root "
                        f"(it runs as uid {os.geteuid()})")


def _env_word(name: str) -> str:
    return name.upper().replace("-", "_")


def _files(svc: ServiceSpec, base: Loc, src: Source, root: Path) -> Iterator[SpecError]:
    """The files and directories a service names exist and are of the right kind."""
    if svc.env_file is not None:
        p = root / svc.env_file
        if not p.exists():
            yield src.error((*base, "env_file"), f"env_file {svc.env_file!r} not found (looked in {root})")
        elif not p.is_file():
            yield src.error((*base, "env_file"), f"env_file {svc.env_file!r} is not a file")
    if svc.working_dir is not None:
        p = root / svc.working_dir
        if not p.is_dir():
            what = "is not a directory" if p.exists() else "does not exist"
            yield src.error((*base, "working_dir"), f"working_dir {svc.working_dir!r} {what} (in {root})")
    st = svc.resources.storage
    if st is not None:
        p = (root / st.path).resolve()
        loc = (*base, "resources", "storage", "path")
        if p in _SYSTEM_DIRS or any(d in p.parents for d in _KERNEL_DIRS):
            yield src.error(loc, f"storage path {st.path!r} is {p}, a system directory; refusing it")
        elif not st.allow_outside and p != root and root not in p.parents:
            yield src.error(loc, f"storage path {st.path!r} is outside the project directory {root} "
                            f"(set allow_outside: true to allow it)")
        elif p.exists() and not p.is_dir():
            yield src.error(loc, f"storage path {st.path!r} exists and is not a directory")


def _port_refs(svc: ServiceSpec) -> Iterator[tuple[str, Loc]]:
    cmd = svc.command if isinstance(svc.command, list) else [svc.command]
    for i, arg in enumerate(cmd):
        for m in _PORT_REF.finditer(arg):
            yield m.group(1), ("command", i) if isinstance(svc.command, list) else ("command",)
    for k, v in svc.env.items():
        for m in _PORT_REF.finditer(v):
            yield m.group(1), ("env", k)


def substitute_ports(text: str, ports: Mapping[str, int | str]) -> str:
    """Replaces ``${ports.<name>}`` in ``text`` with the port's value (a number, or what an
    exporter stands in for it, such as Nomad's ``${NOMAD_PORT_<name>}``)."""
    return _PORT_REF.sub(lambda m: str(ports[m.group(1)]), text)


def find_cycle(graph: Mapping[str, list[str]]) -> list[str] | None:
    """A dependency cycle as ``[a, b, ..., a]``, or None. Unknown names are ignored."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in graph.get(n, []):
            if d not in graph:
                continue
            if state.get(d) == 1:
                return [*stack[stack.index(d):], d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in graph:
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines; ``#`` comments, blank lines, ``export`` and quotes allowed."""
    out: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").strip()
        key, sep, value = line.partition("=")
        if not sep:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key.strip()] = value
    return out
