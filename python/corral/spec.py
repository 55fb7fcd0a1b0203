"""``corral.yaml``: the deployment spec as pydantic models.

Loading keeps the YAML node marks, so every problem, whether pydantic's or one of the
cross-checks here (unknown dependency, cycle, unknown port name), is reported as
``file:line: field: message``. Durations are ``500ms``, ``10s``, ``5m``, ``1h`` or ``1m30s``
(a bare number is seconds); sizes are ``256Mi``, ``2Gi``, ``512M``, ``100k`` (a bare number
is bytes).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeAlias

import yaml
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

__all__ = [
    "DeploymentSpec",
    "HealthSpec",
    "HttpCheck",
    "LogSpec",
    "Probe",
    "Resources",
    "RestartSpec",
    "ServiceSpec",
    "ShutdownSpec",
    "StorageSpec",
    "TcpCheck",
    "load_spec",
    "parse_duration",
    "parse_size",
]

# --- scalar syntaxes -----------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|us|s|m|h)")
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?|[kmgt]|B)?B?\s*$")
_SIZE_UNITS = {
    None: 1, "B": 1,
    "K": 1000, "k": 1000, "M": 1000**2, "m": 1000**2, "G": 1000**3, "g": 1000**3, "T": 1000**4, "t": 1000**4,
    "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40,
}


def parse_duration(value: object) -> float:
    """Seconds from ``500ms``, ``10s``, ``5m``, ``1h``, ``1m30s`` or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as 500ms, 10s or 5m, got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"duration must not be negative, got {value}")
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        pos, total = 0, 0.0
        for m in _DURATION_PART.finditer(text):
            if m.start() != pos:
                break
            total += float(m.group(1)) * _UNITS[m.group(2)]
            pos = m.end()
        if text and pos == len(text):
            return total
    raise ValueError(f"expected a duration such as 500ms, 10s or 5m, got {value!r}")


def parse_size(value: object) -> int:
    """Bytes from ``256Mi``, ``2Gi``, ``512M``, ``100k`` or a number of bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"size must not be negative, got {value}")
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])
    raise ValueError(f"expected a size such as 256Mi or 2Gi, got {value!r}")


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
    success_threshold: int = Field(default=1, ge=1)
    failure_threshold: int = Field(default=3, ge=1)

    @model_validator(mode="after")
    def _one_check(self) -> Probe:
        given = [k for k in ("http", "tcp", "exec") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a probe needs exactly one of http, tcp, exec (got {', '.join(given) or 'none'})")
        if self.exec is not None and not self.exec:
            raise ValueError("exec needs a command")
        if self.period <= 0:
            raise ValueError("period must be positive")
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
    """A volume: a directory (created if missing) with a quota."""

    size: Size
    path: str


class Resources(_Model):
    """What one instance needs. ``cpu`` is a fractional share; ``cores`` are exclusive whole cores."""

    cpu: float | None = Field(default=None, gt=0)
    cores: int | None = Field(default=None, ge=1)
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
    max_restarts: int | None = Field(default=5, ge=0)
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


class ServiceSpec(_Model):
    """One service of the deployment."""

    command: list[str] | str
    shell: bool = False
    env: dict[str, str] = Field(default_factory=dict)
    env_file: str | None = None
    working_dir: str | None = None
    replicas: int = Field(default=1, ge=0, le=10000)
    depends_on: dict[str, Condition] = Field(default_factory=dict)
    ports: dict[str, Annotated[Literal["auto"] | int, BeforeValidator(_port_value)]] = Field(default_factory=dict)
    resources: Resources = Resources()
    health: HealthSpec = HealthSpec()
    restart: RestartSpec = RestartSpec()
    priority: int = 0
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

    @model_validator(mode="before")
    @classmethod
    def _depends_list(cls, data: Any) -> Any:
        # `depends_on: [db]` is shorthand for `{db: started}`, as in compose files.
        if isinstance(data, dict) and isinstance(data.get("depends_on"), list):
            data = {**data, "depends_on": {str(d): "started" for d in data["depends_on"]}}
        return data

    @field_validator("command")
    @classmethod
    def _command(cls, v: list[str] | str) -> list[str] | str:
        if not (v.strip() if isinstance(v, str) else v):
            raise ValueError("command must not be empty")
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


class MeshSpec(_Model):
    """The local mesh: on when any service has ``mtls: true``. Every service then gets a
    certificate (``CORRAL_TLS_CERT``/``KEY``/``CA``), renewed after two thirds of its life."""

    cert_lifetime: Duration = 86400.0

    @model_validator(mode="after")
    def _life(self) -> MeshSpec:
        if self.cert_lifetime < 3:
            raise ValueError("cert_lifetime must be at least 3s")
        return self


class DeploymentSpec(_Model):
    """A whole ``corral.yaml``."""

    name: Annotated[str, Field(pattern=_NAME)]
    logs: LogSpec = LogSpec()
    mesh: MeshSpec = MeshSpec()
    services: dict[Annotated[str, Field(pattern=_NAME)], ServiceSpec]
    scheduler: Literal["binpack", "spread"] = "binpack"
    port_range: tuple[int, int] = (20000, 32000)
    _source: _Source | None = PrivateAttr(default=None)

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

Loc: TypeAlias = tuple[str | int, ...]


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2's booleans: only true and false are booleans. YAML 1.1 (what
    PyYAML implements) also reads yes, no, on and off as booleans, so `policy: no`, the
    spelling the spec documents, became False, and `env: {DEBUG: yes}` was not a string."""


_BOOL = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _walk(node: yaml.Node, path: Loc, lines: dict[Loc, int], dups: list[tuple[Loc, int]]) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for k, v in node.value:
            key = k.value if isinstance(k, yaml.ScalarNode) else str(k.value)
            if key in seen:
                dups.append(((*path, key), k.start_mark.line + 1))
            seen.add(key)
            lines[(*path, key)] = k.start_mark.line + 1
            _walk(v, (*path, key), lines, dups)
            # Keep the key's own line for the key path: values of block mappings start below.
            lines[(*path, key)] = k.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, (*path, i), lines, dups)


class _Source:
    """A parsed file with the line of every key, to place errors."""

    def __init__(self, file: str, lines: dict[Loc, int]) -> None:
        self.file = file
        self.lines = lines

    def error(self, loc: Loc, message: str) -> SpecError:
        clean = [p for p in loc if _is_field(p)]
        line = None
        for n in range(len(clean), -1, -1):
            line = self.lines.get(tuple(clean[:n]))
            if line is not None:
                break
        field = ".".join(str(p) for p in clean) or None
        return SpecError(message, self.file, line, field)


_PYDANTIC_TAGS = re.compile(r"^(int|str|float|bool|list\[.*\]|dict\[.*\]|literal\[.*\]|function-.*|.*\[.*\])$")


def _is_field(part: str | int) -> bool:
    return isinstance(part, int) or not _PYDANTIC_TAGS.match(part)


def _message(err: Mapping[str, Any]) -> str:
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "required field missing"
    msg = str(err.get("msg", "invalid"))
    return msg.removeprefix("Value error, ")


def load_spec(path: str | Path) -> DeploymentSpec:
    """Reads and validates a spec file; raises :class:`SpecError` (with ``more``) on any problem."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise SpecError("file not found", str(p)) from None
    except OSError as e:
        raise SpecError(f"cannot read: {e.strerror}", str(p)) from None
    return parse_spec(text, str(p))


def parse_spec(text: str, file: str = "corral.yaml") -> DeploymentSpec:
    """Validates spec text; ``file`` names it in errors."""
    try:
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            lines: dict[Loc, int] = {}
            dups: list[tuple[Loc, int]] = []
            if node is not None:
                _walk(node, (), lines, dups)
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark is not None else None
        raise SpecError(f"invalid YAML: {e.problem or e}", file, line) from None
    src = _Source(file, lines)
    if dups:
        errs = [src.error(loc, "duplicate key") for loc, _ in dups]
        raise _combine(errs)
    if not isinstance(data, dict):
        raise SpecError("expected a mapping with 'name' and 'services'", file, 1)
    try:
        spec = DeploymentSpec.model_validate(data)
    except ValidationError as e:
        raise _combine([src.error(tuple(err["loc"]), _message(err)) for err in e.errors()]) from None
    problems = list(_cross_check(spec, src))
    if problems:
        raise _combine(problems)
    spec._source = src
    return spec


def _combine(errors: list[SpecError]) -> SpecError:
    errors.sort(key=lambda e: e.line or 0)
    first = errors[0]
    return SpecError(first.message, first.file, first.line, first.field, more=errors[1:])


def _cross_check(spec: DeploymentSpec, src: _Source) -> Iterator[SpecError]:
    """What one model cannot see: references between services and to port names."""
    for name, svc in spec.services.items():
        base: Loc = ("services", name)
        for i, other in enumerate(svc.allow):
            if other not in spec.services:
                yield src.error((*base, "allow", i), f"unknown service {other!r}")
        for dep, cond in svc.depends_on.items():
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
        for ref, where in _port_refs(svc):
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


def _port_refs(svc: ServiceSpec) -> Iterator[tuple[str, Loc]]:
    cmd = svc.command if isinstance(svc.command, list) else [svc.command]
    for i, arg in enumerate(cmd):
        for m in _PORT_REF.finditer(arg):
            yield m.group(1), ("command", i) if isinstance(svc.command, list) else ("command",)
    for k, v in svc.env.items():
        for m in _PORT_REF.finditer(v):
            yield m.group(1), ("env", k)


def substitute_ports(text: str, ports: Mapping[str, int]) -> str:
    """Replaces ``${ports.<name>}`` in ``text``."""
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
