"""A service: its command, resources, restart and shutdown rules, dependencies, updates."""

from __future__ import annotations

import shlex
from typing import Annotated, Any, Literal, TypeAlias

from pydantic import (
    BeforeValidator,
    Field,
    field_validator,
    model_validator,
)

from corral.spec.common import Duration, Size, _Model, _port_value
from corral.spec.health import HealthSpec

# --- resources -----------------------------------------------------------------------


class StorageSpec(_Model):
    """A volume: a directory (created if missing) with a quota, inside the project's directory
    unless ``allow_outside`` (never ``/`` or a system directory)."""

    size: Size
    path: str
    allow_outside: bool = False
    on_full: Literal["stop", "restart", "warn"] = "warn"
    """What happens once the measured usage passes ``size``: ``stop`` the service (until
    ``corral start``), ``restart`` it (for services that clean their own space on start), or
    ``warn`` (an event, nothing else)."""
    enforce: Literal["none", "quota", "volume"] = "none"
    """``volume``: an ext4 image of ``size`` loop-mounted at the path (root only), so a write
    past it fails with ENOSPC; ``quota``: a project quota (a filesystem mounted with
    ``prjquota``); ``none``: measured and acted on, not enforced."""
    period: Duration = Field(default=10.0, ge=0.1, le=86400)
    """How often the usage is measured."""

    @field_validator("size")
    @classmethod
    def _size(cls, v: int) -> int:
        if v < 1 << 20:
            raise ValueError(f"a storage size is at least 1Mi, got {v} bytes")
        return v


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


# --- templates -----------------------------------------------------------------------


class TemplateSpec(_Model):
    """A config file rendered per instance (Jinja2, sandboxed) from ``source`` (relative to
    the spec's directory) into ``destination`` in the instance's own directory
    (``${instance.dir}``), before it starts and whenever the text would change."""

    source: str
    destination: str
    on_change: Literal["restart", "reload", "none"] = "restart"
    """``restart``: a rolling restart of the service; ``reload``: its ``reload_signal`` to
    each instance's main process; ``none``: only the file changes."""

    @field_validator("destination")
    @classmethod
    def _inside(cls, v: str) -> str:
        parts = v.split("/")
        if not v or v.startswith("/") or ".." in parts or any(p in ("", ".") for p in parts):
            raise ValueError(f"destination must be a plain relative path in the instance's directory, got {v!r}")
        return v


# --- schedules -----------------------------------------------------------------------


class ScheduleSpec(_Model):
    """When a one-shot service runs: ``cron`` (five fields, in ``timezone``, which must be
    given) or ``every`` (a duration from the stack's start). Each run is a new instance."""

    cron: str | None = None
    every: Duration | None = Field(default=None, ge=0.1, le=366 * 86400)
    timezone: str | None = None
    concurrency: Literal["forbid", "allow", "replace"] = "forbid"
    """A run due while the last still runs: ``forbid`` skips it, ``allow`` starts it beside
    the last, ``replace`` stops the last first (Kubernetes' ``concurrencyPolicy``)."""
    history: int = Field(default=3, ge=1, le=100)
    """Finished runs kept in ``status`` (their logs and events stay)."""

    @model_validator(mode="after")
    def _one(self) -> ScheduleSpec:
        from corral.cron import Cron, zone

        if (self.cron is None) == (self.every is None):
            raise ValueError("a schedule needs exactly one of cron and every")
        if self.cron is not None:
            if self.timezone is None:
                raise ValueError("a cron schedule names its timezone (UTC, Europe/Paris...): it is never guessed")
            zone(self.timezone)
            Cron.parse(self.cron)
        elif self.timezone is not None:
            raise ValueError("timezone is for cron; every counts from the stack's start")
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
    """The signal sent to the whole process group (or the main process: ``kill_mode``),
    then SIGKILL to the group after ``timeout``.

    ``drain`` (exposed services only): once the instance is out of its front, how long its
    open connections through the front may go on before the signal: it goes out when they
    have all closed (after at least a moment, up to 200 ms, for what the front handed it just
    before), or when ``drain`` has passed. Kubernetes' terminationGracePeriod, HAProxy's and
    Envoy's drain.
    """

    signal: _SIGNALS = "SIGTERM"
    timeout: Duration = 10.0
    drain: Duration = 30.0
    kill_mode: Literal["group", "main"] = "group"
    """``group``: the signal goes to the whole process group; ``main`` (systemd's
    ``KillMode=mixed``): to the main process only, which stops its own children (PostgreSQL
    wants exactly this), and SIGKILL to the group at the timeout."""


# --- services ------------------------------------------------------------------------

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
    front_hold: Duration = Field(default=5.0, ge=0, le=3600)
    """How long a connection to the front waits for a healthy instance while there is none
    (the only replica restarting, an agent re-adopting), rather than being refused; 0
    refuses at once (HAProxy's ``timeout queue``)."""
    front_protocol: Literal["tcp", "http"] = "tcp"
    """``http``: the front frames HTTP/1, so a draining instance's keep-alive connections
    end at a message boundary (``Connection: close`` on the next response, closed after a
    second quiet between messages) rather than at ``shutdown.drain`` (Consul's service
    ``protocol``)."""
    balance: Literal["round_robin", "weighted", "least_connections", "ip_hash", "random"] = "least_connections"
    mtls: bool = False
    """The front requires a client certificate from the deployment's CA."""
    allow: list[str] = Field(default_factory=list)
    """With ``mtls``: the services whose SPIFFE IDs may connect (empty: any of the mesh)."""
    skip_if_exists: str | None = None
    """A path (from the spec's directory): while it exists, a run completes at once without
    starting (``skipped``), as systemd's ``ConditionPathExists=!`` or Ansible's ``creates:``:
    an ``initdb`` that ran once."""
    start_timeout: Duration = 60.0
    update: UpdateSpec = UpdateSpec()
    schedule: ScheduleSpec | None = None
    """Runs on a schedule (``corral run`` runs it now); a scheduled service has no replicas
    of its own: each run is an instance."""
    profiles: list[Annotated[str, Field(pattern=r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$")]] = Field(
        default_factory=list, max_length=64)
    """Left out unless one of these is given (``--profile NAME``), or it is named
    (``corral up NAME``), as compose's profiles."""
    templates: list[TemplateSpec] = Field(default_factory=list, max_length=64)
    reload_signal: _SIGNALS = "SIGHUP"
    """What ``on_change: reload`` sends (nginx, HAProxy and PostgreSQL reload on SIGHUP)."""
    user: str | Annotated[int, Field(ge=0, le=4294967294)] | None = None
    """Run as this user (name or uid), as systemd's ``User=``; needs corral to run as root."""
    group: str | Annotated[int, Field(ge=0, le=4294967294)] | None = None
    """Run with this group (default: the user's primary group)."""
    image: str | None = None
    """The container image ``corral export`` gives the engines that run containers."""

    @model_validator(mode="before")
    @classmethod
    def _scheduled(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("schedule") is not None:
            if data.get("replicas", 0) != 0:
                raise ValueError("a scheduled service has no replicas: each run is an instance (leave replicas out)")
            data = {**data, "replicas": 0}
        return data

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
        if self.skip_if_exists is not None and self.restart.policy == "always":
            raise ValueError("skip_if_exists is for a one-shot service (restart.policy no or on-failure): a skipped "
                             "run completes, which restart.policy always would start again")
        if self.schedule is not None:
            if self.expose is not None:
                raise ValueError("a scheduled service runs and ends: it cannot be exposed")
            if self.restart.policy == "always":
                raise ValueError("a scheduled service runs and ends: restart.policy always would never let a run end "
                                 "(use no or on-failure)")
        if isinstance(self.command, str) and not self.shell:
            try:
                shlex.split(self.command)
            except ValueError as e:
                raise ValueError(f"command {self.command!r} cannot be split into words ({e}); "
                                 f"fix the quoting or set shell: true") from None
        return self

    def mentions_instance_dir(self) -> bool:
        """Whether its command, env or exec probes name ``${instance.dir}``."""
        from corral.statedir import INSTANCE_DIR

        h = self.health
        probes = [a for p in (h.startup, h.readiness, h.liveness) if p is not None for a in p.exec or []]
        return any(INSTANCE_DIR in a for a in [*self.argv(), *self.env.values(), *probes])

    def argv(self) -> list[str]:
        """The command as an argv list: a string goes through ``/bin/sh -c`` with ``shell``."""
        if isinstance(self.command, list):
            return list(self.command)
        return ["/bin/sh", "-c", self.command] if self.shell else shlex.split(self.command)
