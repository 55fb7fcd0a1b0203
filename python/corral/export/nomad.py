"""``corral export nomad``: the spec as a Nomad job in the JSON API's shape
(``{"Job": {...}}``, as ``nomad job run -json`` and ``POST /v1/jobs`` take it; field names
and types as in hashicorp/nomad's ``api/`` structs, durations in nanoseconds).

- one task group per long-running service (``Count`` = replicas), one task in it: driver
  ``docker`` with an ``image``, else ``export.nomad.driver`` (``exec`` or ``raw_exec``);
- ports are dynamic (``auto``: the task reads ``NOMAD_PORT_<name>``, ``${ports.x}`` becomes
  ``${NOMAD_PORT_x}``) or static; with docker, a dynamic port maps to the container port
  the Kubernetes export fixes;
- a ``Service`` (provider ``nomad``) per service with ports, readiness and liveness as its
  ``Checks`` (http, tcp, script), liveness with ``CheckRestart``; startup probes have no
  Nomad equivalent (its checks' ``initial_status`` and grace are the nearest);
- ``restart`` is ``RestartPolicy`` and ``ReschedulePolicy`` (the backoff kind as
  ``DelayFunction``), ``update:`` the group's ``Update``, ``shutdown`` ``KillSignal`` and
  ``KillTimeout``;
- a dependency on a long-running service is a prestart task that waits for it (a TCP
  connect to the address Nomad's service catalogue gives, rendered by a template) and a
  template that sets ``CORRAL_<DEP>_ADDR(S)``; a one-shot service others depend on runs
  as a prestart task of each dependent's group; one-shot services nothing depends on go
  to a second job of type ``batch``; a scheduled one is a periodic batch job of its own;
- ``allow:`` is Consul Connect (:mod:`corral.export.consul`): sidecars, upstreams and the
  intentions beside the job; a fixed port with replicas a static port on distinct nodes.
"""

from __future__ import annotations

import math
import re
from typing import Any

from corral.engine.environment import env_name
from corral.exceptions import ConfigError
from corral.export import consul
from corral.export.model import INSTANCE_REF, Check, Port, StackModel, Workload, every_as_cron
from corral.spec import substitute_ports

__all__ = ["jobs"]

_NS = 1_000_000_000
_DELAY = {"fixed": "constant", "linear": "constant", "exponential": "exponential", "fibonacci": "fibonacci",
          "decorrelated": "exponential"}


def _ns(seconds: float) -> int:
    return round(seconds * _NS)


def _mib(n: int | None) -> int | None:
    return None if n is None else max(1, math.ceil(n / (1 << 20)))


def _port(p: Port, w: Workload) -> str:
    """A port's value in the task: Nomad's variable for a dynamic one, the number of a static
    one or of one that stays inside the allocation (the mesh's: Connect reaches it)."""
    return f"${{NOMAD_PORT_{p.name}}}" if p.auto and not consul.is_target(w) else str(p.number)


_RUNTIME_VAR = re.compile(r"\$\{([a-zA-Z0-9_.-]+)\}")
"""What Nomad's client replaces at run time in a task's config, env and checks (its
``helper/args.ReplaceEnv``): ``${NAME}`` for any NAME it knows, with no escape."""


def _kept(text: str, w: Workload, field: str, *, ports: bool = True) -> str:
    """``text`` as the task must get it, corral's ``${ports.x}`` filled in (with ``ports``).

    corral passes ``${NAME}`` as written, but Nomad fills it in at run time when it knows
    NAME (its ``NOMAD_*`` variables, the task's env, node attributes, raw_exec's host env),
    and a JSON job has no escape for it (HCL's ``$${`` is undone only when an HCL file is
    parsed). Such a value cannot be kept: :class:`ConfigError` names it (export exits 2)."""
    text = text.replace(INSTANCE_REF, "${NOMAD_TASK_DIR}")  # the task's own directory
    for m in _RUNTIME_VAR.finditer(text):
        if not m.group(1).startswith("ports.") and m.group(1) != "NOMAD_TASK_DIR":
            name = m.group(1)
            raise ConfigError(f"{w.name}: {field}: {m.group(0)} cannot be kept in a Nomad job: corral passes it as "
                              f"written, but Nomad fills in ${{...}} at run time and a JSON job has no escape for "
                              f"it (for the shell to read, write it ${name})")
    return substitute_ports(text, {p.name: _port(p, w) for p in w.ports}) if ports else text


def _env(w: Workload) -> dict[str, str]:
    # The env_file's lines as corral passes them (literally: its `${ports.x}` too, which
    # Nomad does not know either); the spec's env over them, ports filled in.
    env = {**{k: _kept(v, w, f"env_file {k}", ports=False) for k, v in (w.env_file or {}).items()},
           **{k: _kept(v, w, f"env.{k}") for k, v in w.env.items()}}
    if len(w.ports) == 1:
        env["PORT"] = _port(w.ports[0], w)
    for p in w.ports:
        env[f"CORRAL_PORT_{env_name(p.name)}"] = _port(p, w)
    env["CORRAL_SERVICE"] = w.name
    env["CORRAL_INSTANCE"] = "${NOMAD_ALLOC_NAME}"
    env["CORRAL_REPLICA"] = "${NOMAD_ALLOC_INDEX}"
    if w.volume:
        env["CORRAL_VOLUME"] = _destination(w) if _host_volume(w) else "${NOMAD_ALLOC_DIR}/data"
    return env


def _host_volume(w: Workload) -> bool:
    """A container with storage worth keeping: its data goes on a host volume."""
    return bool(w.volume and w.image and w.kind == "stateful")


def _destination(w: Workload) -> str:
    path = w.volume or "data"
    return path if path.startswith("/") else "/" + path.lstrip("./")


def _check(kind: str, c: Check, w: Workload) -> dict[str, Any]:
    out: dict[str, Any] = {"Name": f"{w.dns}-{kind}", "Interval": _ns(c.period), "Timeout": _ns(c.timeout)}
    if c.kind == "exec":
        argv = [_kept(a, w, f"health.{kind}.exec") for a in c.argv]  # a script check's are interpolated too
        out.update({"Type": "script", "Command": argv[0], "Args": argv[1:], "TaskName": w.dns})
    elif c.kind == "tcp" and consul.is_target(w) and c.port is not None:
        # The port stays inside the allocation: the connect is tried from inside it.
        out.update({"Type": "script", "Command": "/bin/sh",
                    "Args": ["-c", f"nc -z 127.0.0.1 {c.port.number}"], "TaskName": w.dns})
    else:
        label = c.port.name if c.port and c.port.name else ""
        if consul.is_target(w) and c.port is not None:
            label = str(c.port.number)
        out.update({"Type": c.kind, "PortLabel": label})
        if c.kind == "http":
            out["Path"] = c.path
            if consul.is_target(w):
                out["Expose"] = True  # through the sidecar, as Connect services' checks must
    if c.success_threshold > 1:
        out["SuccessBeforePassing"] = c.success_threshold
    if kind == "readiness":
        out["FailuresBeforeCritical"] = c.failure_threshold
    if kind == "liveness":
        out["CheckRestart"] = {"Limit": c.failure_threshold, "Grace": _ns(c.initial_delay), "IgnoreWarnings": False}
    return out


def _task(model: StackModel, w: Workload, name: str | None = None) -> dict[str, Any]:
    name = name or w.dns
    argv = [_kept(a, w, "command") for a in w.argv]
    config: dict[str, Any] = {"command": argv[0], "args": argv[1:]}
    driver: str = model.options.nomad.driver
    if w.image:
        config = {"image": w.image, **config}
        if w.ports:
            config["ports"] = [p.name for p in w.ports]
        driver = "docker"
    task: dict[str, Any] = {"Name": name, "Driver": driver, "Config": config, "Env": _env(w),
                            "KillTimeout": _ns(w.spec.shutdown.timeout), "KillSignal": w.spec.shutdown.signal}
    r = w.spec.resources
    res: dict[str, Any] = {}
    if r.cores:
        res["Cores"] = r.cores
    elif r.cpu is not None:
        # Nomad's CPU is MHz of a node's total: 1000 MHz a core is the usual reading.
        res["CPU"] = max(1, round(r.cpu * 1000))
    mem, mem_max = _mib(r.memory), _mib(r.memory_max)
    if mem is not None:
        res["MemoryMB"] = mem
    if mem_max is not None:
        res["MemoryMaxMB"] = mem_max
        res.setdefault("MemoryMB", mem_max)
    if res:
        task["Resources"] = res
    if _host_volume(w) and name == w.dns:
        task["VolumeMounts"] = [{"Volume": "data", "Destination": _destination(w), "ReadOnly": False}]
    ups = consul.upstreams(model, w)
    for dep in _awaited(model, w):
        if dep in ups:
            # Through the sidecar: the mesh's address for it in this allocation.
            addr = f"${{{consul.upstream_var(model.workloads[dep])}}}"
            task["Env"][f"CORRAL_{env_name(dep)}_ADDR"] = task["Env"][f"CORRAL_{env_name(dep)}_ADDRS"] = addr
    templates = [_addr_template(model, dep) for dep in _awaited(model, w) if dep not in ups]
    if templates:
        task["Templates"] = templates
    return task


def _awaited(model: StackModel, w: Workload) -> list[str]:
    """The long-running dependencies with an address: ``w`` waits for each and gets its
    ``CORRAL_<DEP>_ADDR(S)`` from Nomad's service catalogue."""
    return [d for d in w.depends if model.workloads[d].kind != "job" and model.workloads[d].ports]


def _addr_template(model: StackModel, dep: str) -> dict[str, Any]:
    d = model.workloads[dep]
    key = env_name(dep)
    lookup = "service" if consul.is_target(d) else "nomadService"  # registered in Consul, or in Nomad
    data = (f'CORRAL_{key}_ADDR={{{{ with {lookup} "{d.dns}" }}}}{{{{ with index . 0 }}}}'
            f'{{{{ .Address }}}}:{{{{ .Port }}}}{{{{ end }}}}{{{{ end }}}}\n'
            f'CORRAL_{key}_ADDRS={{{{ range $i, $s := {lookup} "{d.dns}" }}}}{{{{ if $i }}}},{{{{ end }}}}'
            f'{{{{ $s.Address }}}}:{{{{ $s.Port }}}}{{{{ end }}}}\n')
    return {"EmbeddedTmpl": data, "DestPath": f"local/{d.dns}.env", "Envvars": True, "ChangeMode": "noop"}


def _wait_task(model: StackModel, dep: str) -> dict[str, Any]:
    d = model.workloads[dep]
    key = env_name(dep)
    if consul.is_target(d):
        # Its port is inside its allocation: wait for a passing instance in Consul's catalogue
        # (a file template follows the catalogue; an env one is read once).
        tmpl = {"EmbeddedTmpl": f'{{{{ range service "{d.dns}" }}}}passing\n{{{{ end }}}}',
                "DestPath": f"local/{d.dns}.passing", "ChangeMode": "noop"}
        script = f"until grep -q passing local/{d.dns}.passing 2>/dev/null; do sleep 1; done"
    else:
        tmpl = _addr_template(model, dep)
        script = (f'until [ -n "$CORRAL_{key}_ADDR" ] && nc -z "${{CORRAL_{key}_ADDR%:*}}" '
                  f'"${{CORRAL_{key}_ADDR##*:}}"; do sleep 1; done')
    return {"Name": f"wait-{d.dns}", "Driver": model.options.nomad.driver,
            "Config": {"command": "/bin/sh", "args": ["-c", script]},
            "Lifecycle": {"Hook": "prestart", "Sidecar": False},
            "Templates": [tmpl],
            "Resources": {"CPU": 20, "MemoryMB": 16}}


def _restart(w: Workload) -> tuple[dict[str, Any], dict[str, Any]]:
    rs = w.spec.restart
    attempts = rs.max_restarts if rs.max_restarts is not None else 1_000_000
    restart = {"Attempts": 0 if rs.policy == "no" else attempts, "Interval": _ns(rs.window),
               "Delay": _ns(max(rs.initial, 0.001)), "Mode": "fail"}
    resched = {"Attempts": 0 if rs.policy == "no" else attempts, "Interval": _ns(rs.window),
               "Delay": _ns(max(rs.initial, 0.001)), "DelayFunction": _DELAY[rs.backoff], "MaxDelay": _ns(rs.max),
               "Unlimited": rs.policy == "always" and rs.max_restarts is None}
    return restart, resched


def _group(model: StackModel, w: Workload) -> dict[str, Any]:
    restart, resched = _restart(w)
    tasks = [_task(model, w)]
    awaited = _awaited(model, w)
    for dep in w.depends:
        d = model.workloads[dep]
        if d.kind == "job":
            pre = _task(model, d, f"run-{d.dns}")
            pre["Lifecycle"] = {"Hook": "prestart", "Sidecar": False}
            tasks.insert(0, pre)
        elif dep in awaited:
            tasks.insert(0, _wait_task(model, dep))
    group: dict[str, Any] = {"Name": w.dns, "Count": w.replicas, "Tasks": tasks, "RestartPolicy": restart,
                             "ReschedulePolicy": resched, "Meta": {"corral.service": w.name}}
    if w.kind != "job":
        u = w.spec.update
        group["Update"] = {"MaxParallel": u.max_parallel, "MinHealthyTime": _ns(u.min_healthy_time),
                           "HealthyDeadline": _ns(u.healthy_deadline), "AutoRevert": u.auto_revert,
                           "HealthCheck": "checks" if w.probes else "task_states"}
    ups = consul.upstreams(model, w)
    meshed = consul.is_target(w) or bool(ups)
    if w.ports and not consul.is_target(w):
        dynamic = [{"Label": p.name, **({"To": p.number} if w.image else {})} for p in w.ports if p.auto]
        static = [{"Label": p.name, "Value": p.number} for p in w.ports if not p.auto]
        net: dict[str, Any] = {"Mode": "bridge"} if meshed else {}
        if dynamic:
            net["DynamicPorts"] = dynamic
        if static:
            net["ReservedPorts"] = static
        group["Networks"] = [net]
        if static and w.replicas > 1:
            # A static port is the node's: each allocation on its own node.
            group["Constraints"] = [{"Operand": "distinct_hosts", "RTarget": "true"}]
    elif meshed:
        group["Networks"] = [{"Mode": "bridge"}]  # the ports stay inside: Connect reaches them
    checks = [_check(k, c, w) for k, c in w.probes.items() if k in ("readiness", "liveness")]
    if w.ports or checks:
        # Every exposed or probed service is registered; one without ports carries only its
        # script checks.
        service: dict[str, Any] = {"Name": w.dns, "Provider": "consul" if meshed else "nomad",
                                   "Tags": [f"corral:{model.dns}"], "Checks": checks}
        if w.ports:
            service["PortLabel"] = str(w.ports[0].number) if consul.is_target(w) else w.ports[0].name
        if meshed:
            proxy = {"Upstreams": [{"DestinationName": model.workloads[u].dns,
                                    "LocalBindPort": consul.local_port(model, w, u)} for u in ups]}
            service["Connect"] = {"SidecarService": {"Proxy": proxy} if ups else {}}
        group["Services"] = [service]
    st = w.spec.resources.storage
    if w.volume and st is not None:
        # Sized, and kept with the allocation where Nomad can; scratch (on_full: restart)
        # starts empty with each new allocation.
        keep = w.kind == "stateful"
        group["EphemeralDisk"] = {"SizeMB": _mib(int(st.size)), "Sticky": keep, "Migrate": keep}
        if _host_volume(w):
            # A container's data outlives its allocation on a host volume of the client's.
            group["Volumes"] = {"data": {"Name": "data", "Type": "host", "Source": f"{w.dns}-data",
                                         "ReadOnly": False}}
            w.beyond.append(f"storage: the Nomad client must define host_volume \"{w.dns}-data\"; Nomad does "
                            f"not limit its size")
    beyond = list(w.beyond)
    if "startup" in w.probes:
        beyond.append("startup probe: Nomad checks have no startup phase")
    if w.spec.expose:
        beyond.append(f"expose {w.spec.expose}: put a load balancer (Traefik, Fabio, nginx) on the "
                      f"'{w.dns}' service" + (" (a Consul ingress gateway: it is in the mesh)"
                                              if consul.is_target(w) else ""))
    if consul.is_target(w) and not w.spec.allow:
        beyond.append("allow: any of the mesh: the intention allows every Connect service of the datacenter, "
                      "not only this stack's")
    if beyond:
        group["Meta"]["corral.beyond"] = "; ".join(beyond)
    return group


def _periodic(w: Workload) -> dict[str, Any]:
    sch = w.schedule
    assert sch is not None
    if sch.cron is not None:
        spec, zone = sch.cron, sch.timezone or "UTC"
    else:
        assert sch.every is not None
        found = every_as_cron(sch.every, with_seconds=True)
        if found is None:
            raise ConfigError(f"{w.name}: schedule.every {sch.every:g}s cannot be a Nomad periodic spec (seconds, "
                              f"minutes or hours that divide a minute, an hour or a day); write it as schedule.cron")
        spec, zone = found, "UTC"
    if sch.concurrency == "replace":
        w.beyond.append("concurrency: replace (a Nomad periodic job can only prohibit overlap: runs may overlap)")
    return {"Enabled": True, "Spec": spec, "SpecType": "cron", "ProhibitOverlap": sch.concurrency == "forbid",
            "TimeZone": zone}


def _job(model: StackModel, name: str, kind: str, groups: list[dict[str, Any]]) -> dict[str, Any]:
    o = model.options.nomad
    job: dict[str, Any] = {"ID": name, "Name": name, "Type": kind, "Datacenters": list(o.datacenters),
                           "TaskGroups": groups, "Meta": {"corral.stack": model.name}}
    if o.region:
        job["Region"] = o.region
    if o.namespace:
        job["Namespace"] = o.namespace
    if model.notes:
        job["Meta"]["corral.notes"] = "; ".join(model.notes)
    return {"Job": job}


def jobs(model: StackModel) -> list[dict[str, Any]]:
    """The service job, and a batch job for one-shot services nothing depends on."""
    consul.check(model, model.options.nomad.driver)
    depended = {d for w in model.workloads.values() for d in w.depends}
    services = [_group(model, w) for w in model.workloads.values() if w.kind != "job"]
    batch = [_group(model, w) for w in model.workloads.values()
             if w.kind == "job" and w.name not in depended and w.schedule is None]
    out = [_job(model, model.dns, "service", services)] if services else []
    if batch:
        out.append(_job(model, f"{model.dns}-jobs", "batch", batch))
    for w in model.workloads.values():
        if w.schedule is not None:
            # A periodic job is a job of its own (Nomad launches the whole job at each time).
            periodic = _periodic(w)
            job = _job(model, f"{model.dns}-{w.dns}", "batch", [_group(model, w)])
            job["Job"]["Periodic"] = periodic
            out.append(job)
    return out
