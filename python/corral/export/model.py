"""The engine-neutral reading of a spec that every exporter maps from.

What each service means, resolved once: its kind of workload (long-running, with storage,
or one-shot), its command and environment as the spec wrote them (``${ports.x}`` is each
engine's to fill in: a number, or a variable of its own), its ``env_file`` read (literally,
as corral passes it), fixed container ports for ``auto`` ones, probes with their timings,
resources, dependencies, shutdown, update and front. What an engine cannot carry is the exporter's
to say; what corral does that no engine does is listed here, per service, in ``beyond``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from corral.exceptions import ConfigError
from corral.exportspec import ExportSpec
from corral.spec import DeploymentSpec, Probe, ServiceSpec, read_env_file
from corral.spec.service import ScheduleSpec
from corral.statedir import INSTANCE_DIR as INSTANCE_REF

__all__ = ["AUTO_PORT_BASE", "INSTANCE_DIR", "INSTANCE_REF", "Check", "Port", "StackModel", "Workload", "build",
           "dns_name", "every_as_cron"]

AUTO_PORT_BASE = 8080
"""An ``auto`` port becomes this plus its position among the service's auto ports: each
container has its own network namespace, so fixed numbers cannot collide."""

INSTANCE_DIR = "/corral/instance"
"""What ``${instance.dir}`` becomes in a Kubernetes container (an ``emptyDir`` mounted there);
Nomad's is the task's own directory, ``${NOMAD_TASK_DIR}``."""

Kind = Literal["service", "stateful", "job"]


def every_as_cron(seconds: float, *, with_seconds: bool) -> str | None:
    """``schedule.every`` as a cron expression on the clock, when it divides a minute (only
    ``with_seconds``: Nomad's seven fields), an hour or a day evenly; else ``None``."""
    s = round(seconds)
    if s != seconds or s <= 0:
        return None
    if s < 60:
        return f"*/{s} * * * * * *" if with_seconds and 60 % s == 0 else None
    if s % 60 == 0 and s < 3600 and 3600 % s == 0:
        return f"*/{s // 60} * * * *"
    if s % 3600 == 0 and s < 86400 and 86400 % s == 0:
        return f"0 */{s // 3600} * * *"
    return "0 0 * * *" if s == 86400 else None


def dns_name(name: str) -> str:
    """A service name as a DNS-1123 label (``_`` is not allowed there)."""
    return name.replace("_", "-")


@dataclass(frozen=True)
class Port:
    name: str
    """Empty for a probe's port given by a number the service does not name."""
    number: int
    auto: bool
    """Was ``auto`` in the spec (the number is the export's choice)."""


@dataclass(frozen=True)
class Check:
    """One probe: ``kind`` is http, tcp or exec; durations in seconds as the spec gave them."""

    kind: Literal["http", "tcp", "exec"]
    port: Port | None
    path: str
    argv: list[str]
    initial_delay: float
    period: float
    timeout: float
    success_threshold: int
    failure_threshold: int


@dataclass
class Workload:
    """One service, as the engines need it."""

    name: str
    dns: str
    spec: ServiceSpec
    kind: Kind
    image: str | None
    replicas: int
    argv: list[str]
    """The command as an argv, ``${ports.x}`` left in (see :func:`substitute_ports`)."""
    env: dict[str, str]
    """The spec's ``env``, ``${ports.x}`` left in (``env_file`` apart, in ``env_file``)."""
    env_file: dict[str, str] | None
    """What the ``env_file`` holds, as corral passes it: no ports substituted."""
    ports: list[Port]
    probes: dict[str, Check]
    depends: dict[str, str]
    """Dependency -> condition (started, healthy, completed)."""
    volume: str | None
    """Where the storage is mounted (the spec's path as the container sees it)."""
    spiffe_id: str | None
    allowed: list[str] | None = None
    """Who may connect, with the mesh (``mtls``): the ``allow`` list, or every service of
    the stack for an empty one (any of the mesh); ``None`` without it (anyone may)."""
    beyond: list[str] = field(default_factory=list)
    """What corral does for it that the exported objects cannot express."""

    @property
    def first_port(self) -> Port | None:
        return self.ports[0] if self.ports else None

    @property
    def schedule(self) -> ScheduleSpec | None:
        return self.spec.schedule

    @property
    def uses_instance_dir(self) -> bool:
        """Whether its command, env, exec probes or templates need ``${instance.dir}``."""
        return bool(self.spec.templates) or self.spec.mentions_instance_dir()


@dataclass
class StackModel:
    """The whole spec, resolved."""

    name: str
    dns: str
    workloads: dict[str, Workload]
    options: ExportSpec
    notes: list[str] = field(default_factory=list)
    """Stack-wide: what does not carry over."""

    def missing_images(self) -> list[str]:
        return [w.name for w in self.workloads.values() if w.image is None]

    def open_services(self) -> list[str]:
        """The services with ports and no ``allow`` rule: anyone may connect to them."""
        return [w.name for w in self.workloads.values() if w.ports and w.allowed is None]

    def admits(self, source: str, target: str) -> bool:
        """Whether ``source`` may connect to ``target`` (the rule every exporter carries)."""
        allowed = self.workloads[target].allowed
        return allowed is None or source in allowed


def _is_job(name: str, svc: ServiceSpec, spec: DeploymentSpec) -> bool:
    """One-shot: it is not restarted after a clean exit (``policy: no``), or it restarts only
    on failure and something waits for it to complete."""
    if svc.restart.policy == "no" or svc.schedule is not None:
        return True
    waited = any(d.condition == "completed" for s in spec.services.values()
                 for dep, d in s.depends_on.items() if dep == name)
    return svc.restart.policy == "on-failure" and waited


def _check(probe: Probe, ports: dict[str, Port]) -> Check:
    target = probe.port
    port = None
    if target is not None:
        port = ports.get(str(target)) if isinstance(target, str) else next(
            (p for p in ports.values() if p.number == target), Port("", int(target), False))
    kind: Literal["http", "tcp", "exec"] = "http" if probe.http else "tcp" if probe.tcp else "exec"
    return Check(kind, port, probe.http.path if probe.http else "", list(probe.exec or []), probe.initial_delay,
                 probe.period, probe.timeout, probe.success_threshold, probe.failure_threshold)


def build(spec: DeploymentSpec, base: Path) -> StackModel:
    """Resolves ``spec`` (``base``: its directory, for ``env_file``)."""
    model = StackModel(spec.name, dns_name(spec.name), {}, spec.export)
    for name, svc in spec.services.items():
        ports: dict[str, Port] = {}
        auto = 0
        for pname, want in svc.ports.items():
            if want == "auto":
                ports[pname] = Port(pname, AUTO_PORT_BASE + auto, True)
                auto += 1
            else:
                ports[pname] = Port(pname, int(want), False)
        env_file = None
        if svc.env_file is not None:
            try:
                env_file = read_env_file(base / svc.env_file)
            except OSError as e:
                raise ConfigError(f"{name}: env_file {svc.env_file}: {e.strerror or e}") from None
        # Storage that is worth keeping makes a stateful workload; a service that cleans its
        # own space on start (on_full: restart) gets scratch space instead.
        st = svc.resources.storage
        kind: Kind = ("job" if _is_job(name, svc, spec) else
                      "stateful" if st is not None and st.on_full != "restart" else "service")
        probes = {k: _check(p, ports) for k in ("startup", "readiness", "liveness")
                  if (p := getattr(svc.health, k)) is not None and p.log is None}
        logged = [f"{k}: log line /{p.log}/ (no probe reads a log there; write an exec probe)"
                  for k in ("startup", "readiness") if (p := getattr(svc.health, k)) is not None and p.log]
        storage = svc.resources.storage
        w = Workload(name, dns_name(name), svc, kind, svc.image, svc.replicas, svc.argv(), dict(svc.env), env_file,
                     list(ports.values()), probes, {d: dep.condition for d, dep in svc.depends_on.items()},
                     storage.path if storage else None,
                     f"spiffe://{spec.name}.corral/svc/{name}" if svc.mtls or any(
                         name in s.allow for s in spec.services.values()) else None)
        if svc.mtls:
            w.allowed = list(svc.allow) if svc.allow else list(spec.services)
        w.beyond.extend(logged)
        for t in svc.templates:
            w.beyond.append(f"templates: {t.source} -> {t.destination} is rendered by corral from the live "
                            f"instances; ship the file in the image (or a ConfigMap / a Nomad template)")
        if svc.schedule is not None and svc.schedule.every is not None:
            w.beyond.append(f"schedule.every {svc.schedule.every:g}s counts from the stack's start under corral; "
                            f"exported, it runs on the clock (UTC)")
        r = svc.resources
        if r.numa == "require":
            w.beyond.append("numa: require (every core on one NUMA node; Kubernetes needs the topology manager's "
                            "single-numa-node policy)")
        elif r.numa == "prefer":
            w.beyond.append("numa: prefer (cores on one NUMA node when possible; Kubernetes' topology manager "
                            "best-effort policy)")
        if r.cache == "prefer-large":
            w.beyond.append("cache: prefer-large (cores on the largest L3 domain; no engine has an equivalent)")
        if r.cores:
            w.beyond.append(f"cores: {r.cores} chosen SMT- and L3-aware (an engine gives whole cores, "
                            f"not which ones)")
        if r.swap is not None:
            w.beyond.append("swap limit (memory.swap.max; not a pod or task resource)")
        if svc.restart.max_restarts is not None and not w.kind == "job":
            w.beyond.append(f"crash-loop breaker: {svc.restart.max_restarts} restarts in {svc.restart.window:g}s "
                            f"stop the instance")
        if svc.mtls:
            w.beyond.append(f"mtls front (allow: {', '.join(svc.allow) or 'any of the mesh'}): needs a mesh "
                            f"(Linkerd, Istio, Consul Connect) with SPIFFE ID {w.spiffe_id}")
        if svc.user is not None or svc.group is not None:
            w.beyond.append("user/group: set the container's securityContext (or the task's User) yourself")
        if svc.skip_if_exists is not None:
            w.beyond.append(f"skip_if_exists {svc.skip_if_exists}: the engine runs it every time (make the command "
                            f"test for it)")
        if svc.working_dir is not None:
            w.beyond.append(f"working_dir {svc.working_dir}: the image's WORKDIR decides")
        model.workloads[name] = w
    if any(s.mtls for s in spec.services.values()):
        model.notes.append("mtls/allow are corral's mesh: use a service mesh (Linkerd, Istio) and give it these "
                           "SPIFFE IDs: " + ", ".join(f"{w.name}={w.spiffe_id}" for w in model.workloads.values()
                                                       if w.spiffe_id))
    model.notes.append("auto ports are fixed in the export (from 8080, per container): "
                       + (", ".join(f"{w.name}.{p.name}={p.number}" for w in model.workloads.values()
                                    for p in w.ports if p.auto) or "none"))
    return model
