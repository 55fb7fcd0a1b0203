"""``corral export kubernetes``: the spec as Kubernetes objects (validated in the tests
against the 1.37 schemas, strict).

- long-running services are Deployments, services with ``storage`` StatefulSets (a
  ``volumeClaimTemplates`` entry of its size, mounted at the volume's path), one-shot ones
  Jobs; storage with ``on_full: restart`` (scratch a service cleans on start) and a job's
  storage are an ``emptyDir`` of the size with ``ephemeral-storage`` requests and limits
  instead (the kubelet evicts the pod past it); labels ``app.kubernetes.io/name``,
  ``part-of`` (the stack), ``managed-by: corral``;
- a Service per service with ports (its DNS name is what ``CORRAL_<DEP>_ADDR`` becomes);
  ``expose:`` sets that Service's first port, ``balance: ip_hash`` its ``sessionAffinity``;
- ``env_file`` is a ConfigMap (``envFrom``); probes map one to one (durations rounded up
  to whole seconds, at least one where the API says so); ``cpu`` is ``requests.cpu``,
  ``cores: N`` requests equal to limits in whole CPUs (Guaranteed QoS: the static CPU
  manager's exclusive cores);
- each dependency is an init container that waits for it (a TCP connect to its Service, or
  the Job's completion, read through the API: the pod's service account needs ``get`` on
  jobs, given by a Role and RoleBinding the export adds when a dependency is a Job);
- a scheduled service is a CronJob; ``${instance.dir}`` an ``emptyDir`` of the pod's own;
- a service with the mesh's front (``mtls``/``allow``) gets a default-deny NetworkPolicy
  and one admitting only the allowed services' pods on its ports (:func:`network_policies`);
  a dependent it does not admit waits for a ready EndpointSlice through the API;
- what corral does beyond this is in the ``corral.dev/beyond`` annotation and the header.
"""

from __future__ import annotations

import math
import signal
from typing import Any

from corral.engine.environment import env_name
from corral.exceptions import ConfigError
from corral.export.model import INSTANCE_DIR, INSTANCE_REF, Check, StackModel, Workload, every_as_cron
from corral.spec import substitute_ports

__all__ = ["network_policies", "objects", "render"]



def _secs(v: float, minimum: int = 1) -> int:
    return max(minimum, math.ceil(v - 1e-9))


def _fill(text: str, numbers: dict[str, int | str]) -> str:
    """corral's ``${ports.x}`` and ``${instance.dir}`` as the container sees them."""
    return substitute_ports(text, numbers).replace(INSTANCE_REF, INSTANCE_DIR)


def _labels(model: StackModel, w: Workload | None) -> dict[str, str]:
    out = dict(model.options.kubernetes.labels)
    out.update({"app.kubernetes.io/part-of": model.dns, "app.kubernetes.io/managed-by": "corral"})
    if w is not None:
        out["app.kubernetes.io/name"] = w.dns
    return out


def _meta(model: StackModel, name: str, w: Workload | None,
          annotations: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": _labels(model, w)}
    if model.options.kubernetes.namespace:
        meta["namespace"] = model.options.kubernetes.namespace
    if annotations:
        meta["annotations"] = annotations
    return meta


def _probe(c: Check, numbers: dict[str, int | str]) -> dict[str, Any]:
    out: dict[str, Any]
    if c.kind in ("http", "tcp"):
        assert c.port is not None
        port: str | int = c.port.name or c.port.number  # a number the spec did not name stays a number
        out = {"httpGet": {"path": c.path, "port": port}} if c.kind == "http" else {"tcpSocket": {"port": port}}
    else:
        # The kubelet expands no ``$(VAR)`` in a probe's command (only in a container's
        # command, args and env): corral's ``${ports.x}`` become the numbers, the rest stays.
        out = {"exec": {"command": [_fill(a, numbers) for a in c.argv]}}
    out["initialDelaySeconds"] = _secs(c.initial_delay, 0)
    out["periodSeconds"] = _secs(c.period)
    out["timeoutSeconds"] = _secs(c.timeout)
    out["successThreshold"] = c.success_threshold
    out["failureThreshold"] = c.failure_threshold
    return out


def _rounded(w: Workload) -> list[str]:
    """Probe timings the API's whole seconds cannot hold."""
    out = []
    for kind, c in w.probes.items():
        for f in ("initial_delay", "period", "timeout"):
            v = getattr(c, f)
            if v and v != _secs(v, 0):
                out.append(f"{kind}.{f} {v:g}s rounded up to {_secs(v)}s")
    return out


def _service_port(w: Workload) -> int | None:
    p = w.first_port
    if p is None:
        return None
    return w.spec.expose or p.number


def _dep_env(model: StackModel, w: Workload) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = []
    for dep in w.depends:
        d = model.workloads[dep]
        port = _service_port(d)
        if port is not None:
            addr = f"{d.dns}:{port}"
            key = env_name(dep)
            env += [{"name": f"CORRAL_{key}_ADDR", "value": addr}, {"name": f"CORRAL_{key}_ADDRS", "value": addr}]
    return env


def _literal(text: str) -> str:
    """``text`` as Kubernetes passes it on: the kubelet expands ``$(VAR)`` in a container's
    command, args and env values and reduces ``$$`` to ``$``, so every ``$`` is written
    ``$$`` (corral passes them as written: ``$$`` stays the shell's pid, ``$(PORT)`` a
    command substitution)."""
    return text.replace("$", "$$")


def _container(model: StackModel, w: Workload) -> dict[str, Any]:
    svc = w.spec
    c: dict[str, Any] = {"name": w.dns, "image": w.image}
    numbers: dict[str, int | str] = {p.name: p.number for p in w.ports}
    argv = [_literal(_fill(a, numbers)) for a in w.argv]
    if svc.shell:
        c["command"] = argv[:2]
        c["args"] = argv[2:]
    else:
        c["command"] = argv[:1]
        if argv[1:]:
            c["args"] = argv[1:]
    env: list[dict[str, Any]] = [{"name": k, "value": _literal(_fill(v, numbers))}
                                 for k, v in w.env.items()]
    if len(w.ports) == 1:
        env.append({"name": "PORT", "value": str(w.ports[0].number)})
    env += [{"name": f"CORRAL_PORT_{env_name(p.name)}", "value": str(p.number)} for p in w.ports]
    env += [{"name": "CORRAL_SERVICE", "value": w.name}, {"name": "CORRAL_DEPLOYMENT", "value": model.name},
            {"name": "CORRAL_INSTANCE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    if w.kind == "stateful":
        env.append({"name": "CORRAL_REPLICA", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}}})
    if w.volume:
        env.append({"name": "CORRAL_VOLUME", "value": _mount(w)})
    env += _dep_env(model, w)
    c["env"] = env
    if w.env_file is not None:
        c["envFrom"] = [{"configMapRef": {"name": f"{w.dns}-env"}}]
    if w.ports:
        c["ports"] = [{"name": p.name, "containerPort": p.number, "protocol": "TCP"} for p in w.ports]
    for kind in ("startup", "readiness", "liveness"):
        if kind in w.probes:
            c[f"{kind}Probe"] = _probe(w.probes[kind], numbers)
    res = _resources(w)
    if res:
        c["resources"] = res
    mounts = [{"name": "data", "mountPath": _mount(w)}] if w.volume else []
    if w.uses_instance_dir:
        mounts.append({"name": "instance", "mountPath": INSTANCE_DIR})
    if mounts:
        c["volumeMounts"] = mounts
    if svc.shutdown.signal != "SIGTERM":
        # The kubelet always sends SIGTERM; the preStop hook sends the service's own signal first.
        number = signal.Signals[svc.shutdown.signal].value
        c["lifecycle"] = {"preStop": {"exec": {"command": [
            "/bin/sh", "-c", f"kill -{number} 1; sleep {_secs(svc.shutdown.drain)}"]}}}
    elif svc.expose and svc.shutdown.drain > 0:
        c["lifecycle"] = {"preStop": {"sleep": {"seconds": _secs(svc.shutdown.drain)}}}
    return c


def _mount(w: Workload) -> str:
    path = w.volume or "data"
    return path if path.startswith("/") else "/" + path.lstrip("./")


def _quantity(n: int) -> str:
    """Bytes as a Kubernetes quantity, in the largest binary unit that divides them."""
    for unit, size in (("Ti", 1 << 40), ("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def _note(w: Workload, text: str) -> None:
    if text not in w.beyond:
        w.beyond.append(text)


def _resources(w: Workload) -> dict[str, Any]:
    r = w.spec.resources
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if r.cores:
        # Guaranteed QoS with integer CPUs: the static CPU manager pins exclusive cores.
        requests["cpu"] = limits["cpu"] = str(r.cores)
        mem = r.memory_max or r.memory
        if mem is None:
            _note(w, "cores without memory: Guaranteed QoS needs a memory request; set resources.memory")
        else:
            requests["memory"] = limits["memory"] = _quantity(int(mem))
    else:
        if r.cpu is not None:
            requests["cpu"] = f"{max(1, round(r.cpu * 1000))}m"
        if r.memory is not None:
            requests["memory"] = _quantity(int(r.memory))
        if (r.memory_max or r.memory) is not None:
            limits["memory"] = _quantity(int(r.memory_max or r.memory or 0))
    if r.storage is not None and w.kind != "stateful":
        # Scratch space (an emptyDir of the size): the kubelet evicts a pod past it.
        requests["ephemeral-storage"] = limits["ephemeral-storage"] = _quantity(int(r.storage.size))
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _waits_for_jobs(model: StackModel, w: Workload) -> list[str]:
    """The dependencies ``w`` waits on to complete (a Job): its init containers read them
    through the API, as the waiter service account."""
    return [d for d, cond in w.depends.items() if cond == "completed" or model.workloads[d].kind == "job"]


def _fenced(model: StackModel, w: Workload) -> list[str]:
    """The long-running dependencies whose NetworkPolicy does not admit ``w``: a connect
    cannot tell that they are ready, so the init container asks the API for a ready endpoint."""
    return [d for d in w.depends if d not in _waits_for_jobs(model, w) and not model.admits(w.name, d)]


def _api_waits(model: StackModel, w: Workload) -> list[str]:
    return _waits_for_jobs(model, w) + _fenced(model, w)


def _api_wait(model: StackModel, d: Workload, path: str, found: str) -> dict[str, Any]:
    ns = model.options.kubernetes.namespace or "$(POD_NAMESPACE)"
    script = (f"until wget -q -O- --header \"Authorization: Bearer $(cat /var/run/secrets/kubernetes.io/"
              f"serviceaccount/token)\" --no-check-certificate https://kubernetes.default.svc/{path.format(ns=ns)}"
              f" | grep -q '{found}'; do sleep 2; done")
    return {"name": f"wait-{d.dns}", "image": model.options.kubernetes.wait_image,
            "command": ["/bin/sh", "-c", script],
            "env": [{"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}]}


def _waits(model: StackModel, w: Workload) -> list[dict[str, Any]]:
    image = model.options.kubernetes.wait_image
    out = []
    jobs = _waits_for_jobs(model, w)
    fenced = _fenced(model, w)
    for dep, cond in w.depends.items():
        d = model.workloads[dep]
        if dep in jobs:
            out.append(_api_wait(model, d, f"apis/batch/v1/namespaces/{{ns}}/jobs/{d.dns}",
                                 '\"succeeded\": *[1-9]'))
        elif dep in fenced and _service_port(d) is not None:
            out.append(_api_wait(model, d, f"apis/discovery.k8s.io/v1/namespaces/{{ns}}/endpointslices"
                                           f"?labelSelector=kubernetes.io/service-name%3D{d.dns}",
                                 '\"ready\": *true'))
        else:
            port = _service_port(d)
            if port is None:
                _note(w, f"depends_on {dep}: {cond} has no port to wait on; it starts without waiting")
                continue
            # A connect through the Service succeeds only once it has a ready endpoint.
            out.append({"name": f"wait-{d.dns}", "image": image,
                        "command": ["/bin/sh", "-c", f"until nc -z -w 2 {d.dns} {port}; do sleep 1; done"]})
    return out


def _pod(model: StackModel, w: Workload) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [_container(model, w)],
                            "terminationGracePeriodSeconds": _secs(w.spec.shutdown.timeout, 0)}
    st = w.spec.resources.storage
    volumes: list[dict[str, Any]] = []
    if w.volume and st is not None and w.kind != "stateful":
        volumes.append({"name": "data", "emptyDir": {"sizeLimit": _quantity(int(st.size))}})
    if w.uses_instance_dir:
        # ${instance.dir}: the instance's own directory, as corral gives each instance one.
        volumes.append({"name": "instance", "emptyDir": {}})
    if volumes:
        spec["volumes"] = volumes
    waits = _waits(model, w)
    if waits:
        spec["initContainers"] = waits
    if _api_waits(model, w):
        spec["serviceAccountName"] = f"{model.dns}-waiter"
    if w.kind == "job":
        spec["restartPolicy"] = "Never" if w.spec.restart.policy == "no" else "OnFailure"
    return {"metadata": {"labels": _labels(model, w)}, "spec": spec}


def _annotations(model: StackModel, w: Workload) -> dict[str, str]:
    out = {"corral.dev/service": w.name}
    autos = [f"{p.name}={p.number}" for p in w.ports if p.auto]
    if autos:
        out["corral.dev/auto-ports"] = ",".join(autos)
    beyond = w.beyond + _rounded(w)
    if beyond:
        out["corral.dev/beyond"] = "; ".join(beyond)
    return out


def _workload(model: StackModel, w: Workload) -> dict[str, Any]:
    pod = _pod(model, w)
    selector = _selector(model, w)
    if w.kind == "job":
        job = {"backoffLimit": 0 if w.spec.restart.policy == "no" else (w.spec.restart.max_restarts or 6),
               "template": pod}
        if w.schedule is not None:
            return _cron_job(model, w, job)
        return {"apiVersion": "batch/v1", "kind": "Job", "metadata": _meta(model, w.dns, w, _annotations(model, w)),
                "spec": job}
    upd = w.spec.update
    if w.kind == "stateful":
        storage = w.spec.resources.storage
        assert storage is not None
        claim: dict[str, Any] = {"metadata": {"name": "data"}, "spec": {
            "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": _quantity(int(storage.size))}}}}
        if model.options.kubernetes.storage_class:
            claim["spec"]["storageClassName"] = model.options.kubernetes.storage_class
        return {"apiVersion": "apps/v1", "kind": "StatefulSet",
                "metadata": _meta(model, w.dns, w, _annotations(model, w)),
                "spec": {"replicas": w.replicas, "serviceName": w.dns, "selector": selector, "template": pod,
                         "podManagementPolicy": "Parallel",
                         "updateStrategy": {"type": "RollingUpdate",
                                            "rollingUpdate": {"maxUnavailable": upd.max_parallel}},
                         "volumeClaimTemplates": [claim]}}
    strategy = ({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": upd.max_parallel, "maxUnavailable": 0}}
                if upd.order == "start-first" else
                {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": upd.max_parallel}})
    spec: dict[str, Any] = {"replicas": w.replicas, "selector": selector, "template": pod, "strategy": strategy,
                            "progressDeadlineSeconds": _secs(upd.healthy_deadline)}
    if upd.min_healthy_time:
        spec["minReadySeconds"] = _secs(upd.min_healthy_time, 0)
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(model, w.dns, w, _annotations(model, w)),
            "spec": spec}


def _cron_job(model: StackModel, w: Workload, job: dict[str, Any]) -> dict[str, Any]:
    sch = w.schedule
    assert sch is not None
    cron: str | None = sch.cron
    zone = sch.timezone or "UTC"
    if cron is None:
        assert sch.every is not None
        cron = every_as_cron(sch.every, with_seconds=False)
        if cron is None:
            raise ConfigError(f"{w.name}: schedule.every {sch.every:g}s cannot be a CronJob's schedule (whole "
                              f"minutes or hours that divide an hour or a day); write it as schedule.cron")
    spec: dict[str, Any] = {"schedule": cron, "timeZone": zone, "concurrencyPolicy": sch.concurrency.capitalize(),
                            "successfulJobsHistoryLimit": sch.history, "failedJobsHistoryLimit": sch.history,
                            "jobTemplate": {"metadata": {"labels": _labels(model, w)}, "spec": job}}
    return {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": _meta(model, w.dns, w, _annotations(model, w)),
            "spec": spec}


def _selector(model: StackModel, w: Workload | None) -> dict[str, Any]:
    labels = {"app.kubernetes.io/part-of": model.dns}
    if w is not None:
        labels["app.kubernetes.io/name"] = w.dns
    return {"matchLabels": labels}


def network_policies(model: StackModel) -> list[dict[str, Any]]:
    """For each service with the mesh's ``allow`` (``mtls``): a default deny of its pods'
    ingress, and a policy admitting the allowed services' pods on its ports (every pod of
    the stack for an empty ``allow``: any of the mesh). Others stay open, as they are
    under corral (the header names them)."""
    out: list[dict[str, Any]] = []
    for w in model.workloads.values():
        if w.allowed is None or not w.ports:
            continue
        target = _selector(model, w)
        out.append({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                    "metadata": _meta(model, f"{w.dns}-default-deny", w),
                    "spec": {"podSelector": target, "policyTypes": ["Ingress"]}})
        sources = ([{"podSelector": _selector(model, None)}] if not w.spec.allow else
                   [{"podSelector": _selector(model, model.workloads[a])} for a in w.allowed])
        ports = [{"protocol": "TCP", "port": p.number} for p in w.ports]
        out.append({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                    "metadata": _meta(model, f"{w.dns}-allow", w),
                    "spec": {"podSelector": target, "policyTypes": ["Ingress"],
                             "ingress": [{"from": sources, "ports": ports}]}})
    return out


def _service(model: StackModel, w: Workload) -> dict[str, Any] | None:
    if not w.ports:
        return None
    ports = [{"name": p.name, "port": p.number, "targetPort": p.name, "protocol": "TCP"} for p in w.ports]
    spec: dict[str, Any] = {"selector": _selector(model, w)["matchLabels"], "ports": ports}
    if w.spec.expose:
        ports[0]["port"] = w.spec.expose
        spec["type"] = model.options.kubernetes.service_type
        if w.spec.front_protocol == "http":
            ports[0]["appProtocol"] = "http"
    if w.spec.balance == "ip_hash":
        spec["sessionAffinity"] = "ClientIP"
    elif w.spec.expose and w.spec.balance not in ("least_connections", "round_robin", "random"):
        _note(w, f"balance: {w.spec.balance} (kube-proxy balances at random)")
    if w.kind == "stateful":
        spec["publishNotReadyAddresses"] = False
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(model, w.dns, w), "spec": spec}


def _waiter_rbac(model: StackModel) -> list[dict[str, Any]]:
    name = f"{model.dns}-waiter"
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(model, name, None)},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": _meta(model, name, None),
         "rules": [{"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get"]},
                   {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": _meta(model, name, None),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": name}]},
    ]


def objects(model: StackModel) -> list[dict[str, Any]]:
    """Every object, in the order ``kubectl apply`` should see them."""
    out: list[dict[str, Any]] = []
    if any(_api_waits(model, w) for w in model.workloads.values()):
        out += _waiter_rbac(model)
    for w in model.workloads.values():
        if w.env_file is not None:
            out.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(model, f"{w.dns}-env", w),
                        "data": w.env_file})
    for w in model.workloads.values():
        svc = _service(model, w)
        if svc is not None:
            out.append(svc)
    out += [_workload(model, w) for w in model.workloads.values()]
    out += network_policies(model)
    return out


def header(model: StackModel) -> list[str]:
    """The export's comment lines: what does not carry over, stack-wide and per service."""
    lines = [f"corral export kubernetes: {model.name} ({len(model.workloads)} services)"]
    lines += model.notes
    fenced = [w.name for w in model.workloads.values() if w.allowed is not None and w.ports]
    if fenced:
        lines.append(f"NetworkPolicies (default deny, then allow:) for: {', '.join(fenced)}; they need a CNI that "
                     f"enforces them (Calico, Cilium)")
    open_ = model.open_services()
    if open_:
        lines.append(f"no NetworkPolicy (no allow:, open as under corral): {', '.join(open_)}")
    lines += [f"{w.name}: {b}" for w in model.workloads.values() for b in w.beyond + _rounded(w)]
    return lines


def render(model: StackModel) -> list[tuple[str, str]]:
    """``(file name, YAML text)`` per object; the first carries the header."""
    import yaml

    docs = objects(model)
    head = "".join(f"# {line}\n" for line in header(model))
    out = []
    for i, obj in enumerate(docs):
        text = yaml.safe_dump(obj, sort_keys=False, default_flow_style=False)
        out.append((f"{i:02d}-{obj['kind'].lower()}-{obj['metadata']['name']}.yaml", (head if i == 0 else "") + text))
    return out
