"""Export keeps the mesh's rules and leaves one machine's rules behind.

- Kubernetes: a service with the mesh's front (``mtls``, ``allow``) gets a default-deny
  NetworkPolicy and one admitting exactly its allowed services' pods on its ports. Who
  may reach whom is computed here from the objects (selectors against pod labels), as a
  CNI would, never from the spec; every object validates strictly (1.37 schemas).
- Nomad: Consul ``service-intentions`` config entries beside the job, Connect sidecars
  with upstreams for the callers, refusals (exit 2) for what Connect cannot carry.
- A fixed port with replicas is refused to run here, and exported (a containerPort on each
  pod; a static port on distinct Nomad nodes).
- Schedules export as a CronJob and as a periodic Nomad job; ``${instance.dir}`` as a
  per-pod directory and Nomad's task directory.
- A round trip of examples/stack and the real examples: dependency order, probes,
  Guaranteed QoS, policies.
No Kubernetes API server or Nomad/Consul agent can run here: the objects are checked
against the schemas and the API structs (see tests/test_export.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from corral.export import render
from corral.export.kubernetes import objects
from corral.export.model import build
from corral.spec import load_spec
from tests.test_cli import corral
from tests.test_export import INTENTIONS, JOB, conforms

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ["stack", "postgres", "redis", "nginx"]

MESH = """name: mesh
services:
  db:
    command: [db, --port, "${ports.pg}"]
    image: example.org/db:1
    ports: {pg: 5432}
    replicas: 3
    expose: 6432
    mtls: true
    allow: [api, admin]
    health:
      readiness: {tcp: {port: pg}}
  api:
    command: [api]
    image: example.org/api:1
    ports: {http: auto}
    depends_on: {db: healthy}
    expose: 8000
    mtls: true
    health:
      readiness: {http: {port: http, path: /health}}
  admin:
    command: [admin]
    image: example.org/admin:1
    ports: {http: auto}
  worker:
    command: [w]
    image: example.org/w:1
    ports: {metrics: auto}
    depends_on: {db: healthy, api: healthy}
"""


def write(tmp: Path, text: str) -> Path:
    spec = tmp / "corral.yaml"
    spec.write_text(text)
    return spec


def k8s(spec: Path) -> list[dict[str, Any]]:
    return objects(build(load_spec(spec, machine=False), spec.parent))


def nomad_docs(spec: Path) -> dict[str, dict[str, Any]]:
    return {name: json.loads(text) for name, text in render(load_spec(spec, machine=False), spec.parent, "nomad")}


def pod_templates(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each workload's pod template (a CronJob's through its job template)."""
    out = {}
    for o in objs:
        spec = o["spec"]["jobTemplate"]["spec"] if o["kind"] == "CronJob" else o.get("spec", {})
        if "template" in spec:
            out[o["metadata"]["name"]] = spec["template"]
    return out


def pods(objs: list[dict[str, Any]]) -> dict[str, tuple[dict[str, str], set[int]]]:
    """Each workload's pod labels and container ports, from the objects."""
    return {name: (pod["metadata"]["labels"],
                   {p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", [])})
            for name, pod in pod_templates(objs).items()}


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) == {"matchLabels"}, "only matchLabels are read here"
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


def admitted(objs: list[dict[str, Any]]) -> dict[str, set[str] | None]:
    """For each pod: the pods that may open a connection to every one of its ports, as
    NetworkPolicy defines it (``None``: no policy selects it, so anyone may)."""
    workloads = pods(objs)
    policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
    out: dict[str, set[str] | None] = {}
    for target, (labels, ports) in workloads.items():
        selecting = [p for p in policies if matches(p["spec"]["podSelector"], labels)]
        if not selecting:
            out[target] = None
            continue
        assert all(p["spec"]["policyTypes"] == ["Ingress"] for p in selecting)
        allowed = set()
        for source, (src_labels, _) in workloads.items():
            for pol in selecting:
                for rule in pol["spec"].get("ingress", []):
                    opened = {p["port"] for p in rule.get("ports", [])}
                    if ports <= opened and any(matches(f["podSelector"], src_labels) for f in rule["from"]):
                        allowed.add(source)
        out[target] = allowed
    return out


def expected(spec: Path) -> dict[str, set[str] | None]:
    """What corral's front admits, from the spec: ``allow``, any of the stack for an empty
    one with ``mtls``, anyone without (services with ports only: the rest have no pods to
    reach... they still have pods, but nothing listens)."""
    s = load_spec(spec, machine=False)
    out: dict[str, set[str] | None] = {}
    for name, svc in s.services.items():
        dns = name.replace("_", "-")
        if svc.mtls and svc.ports:
            out[dns] = {a.replace("_", "-") for a in (svc.allow or s.services)}
        else:
            out[dns] = None
    return out


# --- Kubernetes NetworkPolicies ---------------------------------------------------------


def test_network_policies_admit_exactly_the_allowed_pairs(tmp_path: Path) -> None:
    spec = write(tmp_path, MESH)
    objs = k8s(spec)
    for o in objs:
        kubernetes_validate.validate(o, "1.37.0", strict=True)
    got = admitted(objs)
    assert got == {"db": {"api", "admin"}, "api": {"db", "api", "admin", "worker"}, "admin": None, "worker": None}
    assert got == {k: v for k, v in expected(spec).items() if k in got}
    # A default deny of its own, and the allow on the service's container ports only.
    deny = next(o for o in objs if o["metadata"]["name"] == "db-default-deny")
    assert deny["spec"] == {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "db",
                                                            "app.kubernetes.io/part-of": "mesh"}},
                            "policyTypes": ["Ingress"]}
    allow = next(o for o in objs if o["metadata"]["name"] == "db-allow")
    assert allow["spec"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 5432}]


def test_open_services_are_named_and_a_fenced_dependency_is_awaited_through_the_api(tmp_path: Path) -> None:
    spec = write(tmp_path, MESH)
    r = corral("export", "kubernetes", str(spec), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "# no NetworkPolicy (no allow:, open as under corral): admin, worker" in r.stdout
    assert "# NetworkPolicies (default deny, then allow:) for: db, api" in r.stdout
    objs = k8s(spec)
    worker = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "worker")
    waits = {c["name"]: c["command"][2] for c in worker["spec"]["template"]["spec"]["initContainers"]}
    # db does not admit worker: a TCP connect would never succeed, so it reads db's endpoints.
    assert "endpointslices?labelSelector=kubernetes.io/service-name%3Ddb" in waits["wait-db"]
    assert waits["wait-api"].startswith("until nc -z -w 2 api 8000")
    assert worker["spec"]["template"]["spec"]["serviceAccountName"] == "mesh-waiter"
    role = next(o for o in objs if o["kind"] == "Role")
    assert {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list"]} in role["rules"]


# --- Nomad and Consul -------------------------------------------------------------------


def test_consul_intentions_and_connect_sidecars(tmp_path: Path) -> None:
    docs = nomad_docs(write(tmp_path, MESH))
    assert set(docs) == {"mesh.nomad.json", "db.service-intentions.json", "api.service-intentions.json"}
    db_i = docs["db.service-intentions.json"]
    conforms(db_i, INTENTIONS, "db intentions")
    assert db_i["Kind"] == "service-intentions" and db_i["Name"] == "db"
    assert [(s["Name"], s["Action"]) for s in db_i["Sources"]] == [("api", "allow"), ("admin", "allow"),
                                                                   ("*", "deny")]
    api_i = docs["api.service-intentions.json"]
    assert [(s["Name"], s["Action"]) for s in api_i["Sources"]] == [("*", "allow")]
    job = docs["mesh.nomad.json"]["Job"]
    conforms(job, JOB)
    groups = {g["Name"]: g for g in job["TaskGroups"]}
    db = groups["db"]
    # The target: in Consul with a sidecar, its port inside the allocation (no static port,
    # so three replicas need no distinct nodes), its TCP check run from inside.
    assert db["Networks"] == [{"Mode": "bridge"}] and "Constraints" not in db
    (svc,) = db["Services"]
    assert (svc["Provider"], svc["PortLabel"], svc["Connect"]) == ("consul", "5432", {"SidecarService": {}})
    assert svc["Checks"][0]["Type"] == "script" and "nc -z 127.0.0.1 5432" in svc["Checks"][0]["Args"][1]
    # A caller: an upstream per target it may call, its address from the sidecar.
    api = groups["api"]
    (asvc,) = api["Services"]
    assert asvc["Connect"]["SidecarService"]["Proxy"]["Upstreams"] == [{"DestinationName": "db",
                                                                        "LocalBindPort": 21000}]
    assert asvc["Checks"][0]["Expose"] is True
    main = next(t for t in api["Tasks"] if t["Name"] == "api")
    assert main["Env"]["CORRAL_DB_ADDR"] == "${NOMAD_UPSTREAM_ADDR_db}"
    admin = groups["admin"]["Services"][0]
    assert admin["Connect"]["SidecarService"]["Proxy"]["Upstreams"][0]["DestinationName"] == "db"
    # worker depends on api (any of the mesh) and on db (which does not allow it).
    worker = groups["worker"]
    ups = worker["Services"][0]["Connect"]["SidecarService"]["Proxy"]["Upstreams"]
    assert [u["DestinationName"] for u in ups] == ["api"]
    wait_db = next(t for t in worker["Tasks"] if t["Name"] == "wait-db")
    assert 'service "db"' in wait_db["Templates"][0]["EmbeddedTmpl"]


@pytest.mark.parametrize(("extra", "said"), [
    ("  batch:\n    command: [b]\n    restart: {policy: 'no'}\n",
     "batch calls db through Consul Connect (allow:), and Nomad gives a sidecar only to a service with a port"),
    ("export: {nomad: {driver: raw_exec}}\n", "which raw_exec has not"),
])
def test_what_connect_cannot_carry_is_refused_naming_it(tmp_path: Path, extra: str, said: str) -> None:
    text = MESH.replace("allow: [api, admin]", "allow: [api, admin, batch]") if "batch" in extra else MESH
    text = text + extra if extra.startswith("  ") else extra + text
    if "raw_exec" in extra:
        text = text.replace("    image: example.org/admin:1\n", "")
    spec = write(tmp_path, text)
    r = corral("export", "nomad", str(spec), cwd=tmp_path)
    assert r.returncode == 2 and said in r.stderr and "Traceback" not in r.stderr, r.stderr


# --- one machine's rules stay local -----------------------------------------------------

FIXED = """name: web
services:
  web:
    command: [srv, --port, "${ports.http}"]
    image: example.org/web:1
    replicas: 3
    ports: {http: 8000}
"""


def test_a_fixed_port_with_replicas_is_refused_here_and_exported(tmp_path: Path) -> None:
    spec = write(tmp_path, FIXED)
    for cmd in ("validate", "up"):
        r = corral(cmd, str(spec), cwd=tmp_path)
        assert r.returncode == 2, (cmd, r.stdout, r.stderr)
        assert "corral.yaml:7: services.web.ports.http: 3 replicas cannot share the fixed port 'http'" in r.stderr
    assert not (tmp_path / ".corral" / "state.db").exists() or "running" not in corral(
        "status", str(spec), cwd=tmp_path).stdout
    objs = k8s(spec)
    for o in objs:
        kubernetes_validate.validate(o, "1.37.0", strict=True)
    dep = next(o for o in objs if o["kind"] == "Deployment")
    assert dep["spec"]["replicas"] == 3
    assert dep["spec"]["template"]["spec"]["containers"][0]["ports"] == [
        {"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert dep["spec"]["template"]["spec"]["containers"][0]["args"] == ["--port", "8000"]
    svc = next(o for o in objs if o["kind"] == "Service")
    assert svc["spec"]["ports"][0]["port"] == 8000
    job = nomad_docs(spec)["web.nomad.json"]["Job"]
    conforms(job, JOB)
    (group,) = job["TaskGroups"]
    assert group["Count"] == 3
    assert group["Networks"] == [{"ReservedPorts": [{"Label": "http", "Value": 8000}]}]
    assert group["Constraints"] == [{"Operand": "distinct_hosts", "RTarget": "true"}]


# --- schedules and the instance's directory ---------------------------------------------

SCHEDULED = """name: jobs
services:
  db:
    command: [db, --dir, "${instance.dir}"]
    image: example.org/db:1
    ports: {pg: auto}
  nightly:
    command: [dump]
    image: example.org/dump:1
    depends_on: {db: healthy}
    restart: {policy: 'no'}
    schedule: {cron: "0 3 * * *", timezone: Europe/Paris, concurrency: replace, history: 5}
  often:
    command: [warm]
    image: example.org/warm:1
    restart: {policy: 'no'}
    schedule: {every: EVERY}
"""


def test_schedules_export_as_cron_jobs_and_periodic_nomad_jobs(tmp_path: Path) -> None:
    spec = write(tmp_path, SCHEDULED.replace("EVERY", "15m"))
    objs = k8s(spec)
    for o in objs:
        kubernetes_validate.validate(o, "1.37.0", strict=True)
    crons = {o["metadata"]["name"]: o["spec"] for o in objs if o["kind"] == "CronJob"}
    assert set(crons) == {"nightly", "often"} and not [o for o in objs if o["kind"] == "Job"]
    n = crons["nightly"]
    assert (n["schedule"], n["timeZone"], n["concurrencyPolicy"]) == ("0 3 * * *", "Europe/Paris", "Replace")
    assert n["successfulJobsHistoryLimit"] == n["failedJobsHistoryLimit"] == 5
    pod = n["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["initContainers"][0]["name"] == "wait-db"
    assert (crons["often"]["schedule"], crons["often"]["timeZone"]) == ("*/15 * * * *", "UTC")
    docs = nomad_docs(spec)
    assert set(docs) == {"jobs.nomad.json", "jobs-nightly.nomad.json", "jobs-often.nomad.json"}
    nightly = docs["jobs-nightly.nomad.json"]["Job"]
    conforms(nightly, JOB)
    assert nightly["Type"] == "batch"
    assert nightly["Periodic"] == {"Enabled": True, "Spec": "0 3 * * *", "SpecType": "cron",
                                   "ProhibitOverlap": False, "TimeZone": "Europe/Paris"}
    assert "concurrency: replace" in nightly["TaskGroups"][0]["Meta"]["corral.beyond"]
    assert docs["jobs-often.nomad.json"]["Job"]["Periodic"]["Spec"] == "*/15 * * * *"
    # Nomad's cron has seconds; a CronJob's has not.
    spec = write(tmp_path, SCHEDULED.replace("EVERY", "30s"))
    assert nomad_docs(spec)["jobs-often.nomad.json"]["Job"]["Periodic"]["Spec"] == "*/30 * * * * * *"
    r = corral("export", "kubernetes", str(spec), cwd=tmp_path)
    assert r.returncode == 2 and "often: schedule.every 30s cannot be a CronJob's schedule" in r.stderr, r.stderr
    spec = write(tmp_path, SCHEDULED.replace("EVERY", "7m"))
    r = corral("export", "nomad", str(spec), cwd=tmp_path)
    assert r.returncode == 2 and "schedule.every 420s cannot be a Nomad periodic spec" in r.stderr, r.stderr


def test_the_instance_directory_is_the_pods_own_and_nomads_task_dir(tmp_path: Path) -> None:
    spec = write(tmp_path, SCHEDULED.replace("EVERY", "1h"))
    db = next(o for o in k8s(spec) if o["kind"] == "Deployment")
    pod = db["spec"]["template"]["spec"]
    assert pod["containers"][0]["args"] == ["--dir", "/corral/instance"]
    assert {"name": "instance", "mountPath": "/corral/instance"} in pod["containers"][0]["volumeMounts"]
    assert {"name": "instance", "emptyDir": {}} in pod["volumes"]
    task = nomad_docs(spec)["jobs.nomad.json"]["Job"]["TaskGroups"][0]["Tasks"][0]
    assert task["Config"]["args"] == ["--dir", "${NOMAD_TASK_DIR}"]


# --- round trip of the examples ---------------------------------------------------------


def _init_order(objs: list[dict[str, Any]]) -> dict[str, list[str]]:
    return {name: [c["name"] for c in pod["spec"].get("initContainers", [])]
            for name, pod in pod_templates(objs).items()}


@pytest.mark.parametrize("example", EXAMPLES)
def test_the_examples_round_trip(example: str) -> None:
    spec = ROOT / "examples" / example / "corral.yaml"
    s = load_spec(spec, machine=False)
    objs = k8s(spec)
    for o in objs:
        kubernetes_validate.validate(o, "1.37.0", strict=True)
    # Dependency order: each dependency is an init container of the dependent's pods, and a
    # prestart task (or a wait for it) in the dependent's Nomad group.
    inits = _init_order(objs)
    for name, svc in s.services.items():
        assert inits[name] == [f"wait-{d}" for d in svc.depends_on], name
    docs = nomad_docs(spec)
    groups = {g["Name"]: g for d in docs.values() if "Job" in d for g in d["Job"]["TaskGroups"]}
    for d in docs.values():
        if "Job" in d:
            conforms(d["Job"], JOB)
    for name, g in groups.items():
        pre = [t["Name"] for t in g["Tasks"] if t.get("Lifecycle", {}).get("Hook") == "prestart"]
        want = s.services[name].depends_on
        assert sorted(p.split("-", 1)[1] for p in pre) == sorted(want), (name, pre)
    # Probes: each http/tcp/exec probe is the container's; a log probe is named as not carried.
    by_name = {o["metadata"]["name"]: o for o in objs if o["kind"] in ("Deployment", "StatefulSet")}
    for name, svc in s.services.items():
        if name not in by_name:
            continue
        c = by_name[name]["spec"]["template"]["spec"]["containers"][0]
        for kind in ("startup", "readiness", "liveness"):
            probe = getattr(svc.health, kind)
            if probe is None:
                assert f"{kind}Probe" not in c
            elif probe.log:
                assert f"{kind}Probe" not in c
                assert f"{kind}: log line" in by_name[name]["metadata"]["annotations"]["corral.dev/beyond"]
            else:
                want = "httpGet" if probe.http else "tcpSocket" if probe.tcp else "exec"
                assert want in c[f"{kind}Probe"], (name, kind)
        # Exclusive cores: Guaranteed QoS (requests equal limits, whole CPUs, memory too).
        res = c.get("resources", {})
        if svc.resources.cores:
            assert res["requests"] == res["limits"] and res["limits"]["cpu"] == str(svc.resources.cores)
            assert "memory" in res["limits"]
        else:
            assert "cpu" not in res.get("limits", {}), "no CPU limit without exclusive cores (no throttling)"
    # Policies: computed from the objects, exactly what the spec's fronts admit.
    got = admitted(objs)
    assert got == {k: v for k, v in expected(spec).items() if k in got}
    intentions = {d["Name"] for d in docs.values() if d.get("Kind") == "service-intentions"}
    assert intentions == {k for k, v in expected(spec).items() if v is not None}
