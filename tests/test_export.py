"""`corral export kubernetes` and `corral export nomad`.

Kubernetes: every object validates against the Kubernetes 1.37 schemas in strict mode
(`kubernetes-validate`, offline), and each mapping of the spec is checked field by field.
Nomad: no Nomad server can run here, so the job is checked against a golden file and
against the field names and types of Nomad's API structs, transcribed below from
hashicorp/nomad's public source (`api/jobs.go`, `api/tasks.go`, `api/resources.go`,
`api/services.go`): every key the export writes must be a field of its struct, with that
field's JSON type (durations are nanoseconds, as `time.Duration` marshals)."""

from __future__ import annotations

import json
import os
import stat
import textwrap
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from corral.export import render
from corral.export.kubernetes import objects
from corral.export.model import build
from corral.spec import load_spec
from tests.test_cli import corral

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "stack" / "corral.yaml"
GOLDEN = Path(__file__).parent / "golden" / "shop.nomad.json"


def k8s(spec: Path) -> list[dict[str, Any]]:
    return objects(build(load_spec(spec), spec.parent))


def by(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (got,) = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    return got


def container(obj: dict[str, Any]) -> dict[str, Any]:
    spec = obj["spec"]["template"]["spec"]
    return spec["containers"][0]  # type: ignore[no-any-return]


def env(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}


# --- Kubernetes -----------------------------------------------------------------------


def test_the_example_stack_validates_strictly_against_kubernetes_1_37() -> None:
    objs = k8s(EXAMPLE)
    for o in objs:
        kubernetes_validate.validate(o, "1.37.0", strict=True)
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objs}
    assert {("StatefulSet", "kv"), ("Job", "migrate"), ("Deployment", "api"), ("Deployment", "worker"),
            ("Service", "kv"), ("Service", "api")} <= kinds
    for o in objs:
        labels = o["metadata"]["labels"]
        assert labels["app.kubernetes.io/part-of"] == "shop" and labels["app.kubernetes.io/managed-by"] == "corral"


def test_workloads_commands_ports_probes_and_resources_map_one_to_one() -> None:
    objs = k8s(EXAMPLE)
    kv = by(objs, "StatefulSet", "kv")
    claim = kv["spec"]["volumeClaimTemplates"][0]
    assert claim["spec"]["resources"]["requests"]["storage"] == "1Gi"
    assert container(kv)["volumeMounts"] == [{"name": "data", "mountPath": "/data"}]
    assert container(kv)["resources"] == {"requests": {"cpu": "250m", "memory": "256Mi"},
                                          "limits": {"memory": "256Mi"}}
    api = by(objs, "Deployment", "api")
    assert api["spec"]["replicas"] == 3
    c = container(api)
    assert c["command"] == ["python3"] and c["args"] == ["api.py", "--port", "8080"], "${ports.http} substituted"
    assert c["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert api["metadata"]["annotations"]["corral.dev/auto-ports"] == "http=8080"
    assert c["startupProbe"] == {"tcpSocket": {"port": "http"}, "initialDelaySeconds": 0, "periodSeconds": 1,
                                 "timeoutSeconds": 1, "successThreshold": 1, "failureThreshold": 50}
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["livenessProbe"]["periodSeconds"] == 5
    assert "0.2s rounded up to 1s" in api["metadata"]["annotations"]["corral.dev/beyond"]
    e = env(c)
    assert e["CORRAL_KV_ADDR"] == "kv:8080" and e["PORT"] == "8080" and e["CORRAL_SERVICE"] == "api"
    assert e["CORRAL_INSTANCE"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert c["resources"] == {"requests": {"cpu": "200m", "memory": "128Mi"}, "limits": {"memory": "128Mi"}}
    assert api["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 10
    # update: start-first, one at a time.
    assert api["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    # cores: 1 -> Guaranteed QoS with an integer CPU; what corral does beyond in the annotation.
    worker = by(objs, "Deployment", "worker")
    assert container(worker)["resources"] == {"requests": {"cpu": "1", "memory": "128Mi"},
                                              "limits": {"cpu": "1", "memory": "128Mi"}}
    assert "numa: prefer" in worker["metadata"]["annotations"]["corral.dev/beyond"]
    # One-shot with a completed dependent: a Job.
    job = by(objs, "Job", "migrate")
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "OnFailure" and job["spec"]["backoffLimit"] == 3


def test_dependencies_become_init_containers_that_wait() -> None:
    objs = k8s(EXAMPLE)
    api = by(objs, "Deployment", "api")["spec"]["template"]["spec"]
    waits = {w["name"]: w for w in api["initContainers"]}
    assert set(waits) == {"wait-kv", "wait-migrate"}
    assert waits["wait-kv"]["image"] == "busybox:1.36"
    assert "nc -z -w 2 kv 8080" in waits["wait-kv"]["command"][2]
    assert "jobs/migrate" in waits["wait-migrate"]["command"][2] and "succeeded" in waits["wait-migrate"]["command"][2]
    assert api["serviceAccountName"] == "shop-waiter"
    role = by(objs, "Role", "shop-waiter")
    assert role["rules"] == [{"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get"]},
                             {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list"]}]


SPEC = """
name: edge_cases
export:
  kubernetes: {namespace: prod, labels: {team: payments}, service_type: LoadBalancer, wait_image: "alpine:3"}
services:
  db:
    image: postgres:16
    command: "postgres -p ${ports.pg}"
    ports: {pg: 5432}
    env_file: db.env
    health:
      readiness: {exec: ["pg_isready"], period: 2s, timeout: 500ms}
    shutdown: {signal: SIGINT, timeout: 30s}
    resources: {cores: 2, numa: require, cache: prefer-large, memory: 1Gi, memory_max: 2Gi}
  web_front:
    image: nginx:1
    command: ["nginx", "-g", "daemon off;"]
    ports: {http: auto, admin: auto}
    depends_on: {db: healthy}
    expose: 8443
    front_protocol: http
    balance: ip_hash
    mtls: true
    allow: [db]
    update: {max_parallel: 2, order: stop-first, min_healthy_time: 5s}
"""


def test_env_files_fronts_signals_and_the_mesh(tmp_path: Path) -> None:
    (tmp_path / "db.env").write_text("POSTGRES_DB=shop\nPGPORT=${ports.pg}\n")
    spec = tmp_path / "corral.yaml"
    spec.write_text(SPEC)
    objs = k8s(spec)
    for o in objs:
        kubernetes_validate.validate(o, "1.37.0", strict=True)
        assert o["metadata"]["namespace"] == "prod" and o["metadata"]["labels"]["team"] == "payments"
    cm = by(objs, "ConfigMap", "db-env")
    # As corral passes an env_file: its lines literally (only command and env get ports).
    assert cm["data"] == {"POSTGRES_DB": "shop", "PGPORT": "${ports.pg}"}
    db = container(by(objs, "Deployment", "db"))
    assert db["envFrom"] == [{"configMapRef": {"name": "db-env"}}]
    assert db["command"] == ["postgres"] and db["args"] == ["-p", "5432"]
    assert db["readinessProbe"]["exec"] == {"command": ["pg_isready"]} and db["readinessProbe"]["timeoutSeconds"] == 1
    assert db["lifecycle"]["preStop"]["exec"]["command"][2].startswith("kill -2 1")
    assert db["resources"]["requests"] == db["resources"]["limits"] == {"cpu": "2", "memory": "2Gi"}
    beyond = by(objs, "Deployment", "db")["metadata"]["annotations"]["corral.dev/beyond"]
    assert "single-numa-node" in beyond and "cache: prefer-large" in beyond
    # A name with "_" becomes a DNS label; expose: the Service's first port; ip_hash: ClientIP.
    svc = by(objs, "Service", "web-front")
    assert svc["spec"]["type"] == "LoadBalancer" and svc["spec"]["sessionAffinity"] == "ClientIP"
    assert svc["spec"]["ports"][0] == {"name": "http", "port": 8443, "targetPort": "http", "protocol": "TCP",
                                       "appProtocol": "http"}
    assert svc["spec"]["ports"][1]["port"] == 8081
    web = by(objs, "Deployment", "web-front")
    assert web["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 2}
    assert web["spec"]["minReadySeconds"] == 5
    init = web["spec"]["template"]["spec"]["initContainers"]
    assert init[0]["image"] == "alpine:3" and "nc -z -w 2 db 5432" in init[0]["command"][2]
    assert env(container(web))["CORRAL_DB_ADDR"] == "db:5432"
    # Nomad gets the same meaning: the env_file's lines literally, in the task's Env (a
    # `${ports.pg}` there is corral's literal text, and no variable Nomad knows).
    (job,) = nomad(spec)
    db_task = next(t for g in job["Job"]["TaskGroups"] for t in g["Tasks"] if t["Name"] == "db")
    assert db_task["Env"]["PGPORT"] == "${ports.pg}" and db_task["Env"]["POSTGRES_DB"] == "shop"
    assert db_task["Config"]["args"] == ["-p", "5432"]
    text = "".join(t for _, t in render(load_spec(spec), tmp_path, "kubernetes"))
    assert "spiffe://edge_cases.corral/svc/web_front" in text.split("apiVersion")[0], "the header names the SPIFFE IDs"


def test_services_without_an_image_are_refused_all_named_exit_2(tmp_path: Path) -> None:
    (tmp_path / "corral.yaml").write_text("name: x\nservices:\n  a: {command: [sleep, '1']}\n"
                                          "  b: {command: [sleep, '1']}\n"
                                          "  c: {command: [sleep, '1'], image: busybox}\n")
    r = corral("export", "kubernetes", cwd=tmp_path)
    assert r.returncode == 2, r
    assert "give these services an image: a, b" in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""
    # Nomad runs them with its exec driver instead.
    assert corral("export", "nomad", cwd=tmp_path).returncode == 0
    assert corral("export", "swarm", cwd=tmp_path).returncode == 2


def test_the_cli_prints_documents_and_writes_owner_only_files(tmp_path: Path) -> None:
    r = corral("export", "kubernetes", str(EXAMPLE), cwd=tmp_path)
    assert r.returncode == 0, r
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    assert len(docs) == len(k8s(EXAMPLE))
    assert r.stdout.startswith("# corral export kubernetes: shop")
    out = tmp_path / "k8s"
    assert corral("export", "kubernetes", str(EXAMPLE), "-o", str(out), cwd=tmp_path).returncode == 0
    files = sorted(out.iterdir())
    assert len(files) == len(docs) and files[0].name.startswith("00-")
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    assert stat.S_IMODE(out.stat().st_mode) == 0o700


# --- Nomad ----------------------------------------------------------------------------

S, N, B, D = "string", "int", "bool", "duration"
# Field name -> JSON type or nested struct, from hashicorp/nomad api/*.go (the fields the export writes).
PORT = {"Label": S, "Value": N, "To": N, "HostNetwork": S}
CHECK_RESTART = {"Limit": N, "Grace": D, "IgnoreWarnings": B}
SERVICE_CHECK = {"Name": S, "Type": S, "Command": S, "Args": [S], "Path": S, "PortLabel": S, "Interval": D,
                 "Timeout": D, "TaskName": S, "SuccessBeforePassing": N, "FailuresBeforeCritical": N,
                 "CheckRestart": CHECK_RESTART, "Expose": B}
UPSTREAM = {"DestinationName": S, "LocalBindPort": N}
CONNECT = {"SidecarService": {"Proxy": {"Upstreams": [UPSTREAM]}}}
SERVICE = {"Name": S, "Tags": [S], "PortLabel": S, "Provider": S, "Checks": [SERVICE_CHECK], "Connect": CONNECT}
RESOURCES = {"CPU": N, "Cores": N, "MemoryMB": N, "MemoryMaxMB": N}
TEMPLATE = {"EmbeddedTmpl": S, "DestPath": S, "Envvars": B, "ChangeMode": S}
TASK = {"Name": S, "Driver": S, "Config": dict, "Env": {str: S}, "Resources": RESOURCES, "KillTimeout": D,
        "KillSignal": S, "Lifecycle": {"Hook": S, "Sidecar": B}, "Templates": [TEMPLATE],
        "VolumeMounts": [{"Volume": S, "Destination": S, "ReadOnly": B}]}
GROUP = {"Name": S, "Count": N, "Tasks": [TASK],
         "Networks": [{"Mode": S, "DynamicPorts": [PORT], "ReservedPorts": [PORT]}],
         "Constraints": [{"LTarget": S, "RTarget": S, "Operand": S}],
         "Services": [SERVICE], "Meta": {str: S},
         "RestartPolicy": {"Attempts": N, "Interval": D, "Delay": D, "Mode": S},
         "ReschedulePolicy": {"Attempts": N, "Interval": D, "Delay": D, "DelayFunction": S, "MaxDelay": D,
                              "Unlimited": B},
         "Update": {"MaxParallel": N, "MinHealthyTime": D, "HealthyDeadline": D, "AutoRevert": B, "HealthCheck": S},
         "EphemeralDisk": {"SizeMB": N, "Sticky": B, "Migrate": B},
         "Volumes": {str: {"Name": S, "Type": S, "Source": S, "ReadOnly": B}}}
JOB = {"ID": S, "Name": S, "Type": S, "Region": S, "Namespace": S, "Datacenters": [S], "TaskGroups": [GROUP],
       "Meta": {str: S},
       "Periodic": {"Enabled": B, "Spec": S, "SpecType": S, "ProhibitOverlap": B, "TimeZone": S}}
# Consul's api/config_entry_intentions.go: ServiceIntentionsConfigEntry and SourceIntention.
INTENTIONS = {"Kind": S, "Name": S, "Namespace": S, "Partition": S, "Meta": {str: S},
              "Sources": [{"Name": S, "Peer": S, "Namespace": S, "Partition": S, "Action": S, "Type": S,
                           "Description": S}]}


def conforms(value: Any, schema: Any, at: str = "Job") -> None:
    if schema == S:
        assert isinstance(value, str), at
    elif schema in (N, D):
        assert isinstance(value, int) and not isinstance(value, bool), at
    elif schema == B:
        assert isinstance(value, bool), at
    elif schema is dict:
        assert isinstance(value, dict), at
    elif isinstance(schema, list):
        assert isinstance(value, list), at
        for k, v in enumerate(value):
            conforms(v, schema[0], f"{at}[{k}]")
    elif str in schema:
        assert isinstance(value, dict) and all(isinstance(k, str) for k in value), at
        for k, v in value.items():
            conforms(v, schema[str], f"{at}.{k}")
    else:
        assert isinstance(value, dict), at
        unknown = set(value) - set(schema)
        assert not unknown, f"{at}: not fields of the Nomad struct: {unknown}"
        for k, v in value.items():
            conforms(v, schema[k], f"{at}.{k}")


def nomad(spec: Path) -> list[dict[str, Any]]:
    """The jobs (the Consul intentions beside them are tests/test_export_policy.py's)."""
    return [d for _, t in render(load_spec(spec), spec.parent, "nomad") if "Job" in (d := json.loads(t))]


def test_the_nomad_job_matches_the_golden_file_and_nomads_api_structs() -> None:
    (doc,) = nomad(EXAMPLE)
    assert set(doc) == {"Job"}
    conforms(doc["Job"], JOB)
    if os.environ.get("CORRAL_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(doc, indent=2) + "\n")
    assert doc == json.loads(GOLDEN.read_text()), "the export changed: CORRAL_UPDATE_GOLDEN=1 after a review"


def test_nomad_fields_map_from_the_spec() -> None:
    (doc,) = nomad(EXAMPLE)
    job = doc["Job"]
    assert (job["ID"], job["Type"], job["Datacenters"]) == ("shop", "service", ["*"])
    groups = {g["Name"]: g for g in job["TaskGroups"]}
    assert set(groups) == {"kv", "api", "worker"}, "migrate is a prestart task, not a group"
    api = groups["api"]
    assert api["Count"] == 3
    tasks = {t["Name"]: t for t in api["Tasks"]}
    assert tasks["run-migrate"]["Lifecycle"] == {"Hook": "prestart", "Sidecar": False}
    assert tasks["wait-kv"]["Lifecycle"]["Hook"] == "prestart"
    main = tasks["api"]
    assert main["Driver"] == "docker" and main["Config"]["image"] == "example.org/shop/api:1.0"
    assert main["Config"]["args"] == ["api.py", "--port", "${NOMAD_PORT_http}"]
    assert main["Resources"] == {"CPU": 200, "MemoryMB": 128}
    assert main["KillTimeout"] == 10 * 10**9 and main["KillSignal"] == "SIGTERM"
    assert "CORRAL_KV_ADDR=" in main["Templates"][0]["EmbeddedTmpl"] and main["Templates"][0]["Envvars"] is True
    assert api["Networks"] == [{"DynamicPorts": [{"Label": "http", "To": 8080}]}]
    (svc,) = api["Services"]
    assert svc["Provider"] == "nomad" and svc["PortLabel"] == "http"
    checks = {c["Name"]: c for c in svc["Checks"]}
    assert checks["api-readiness"]["Type"] == "http" and checks["api-readiness"]["Path"] == "/health"
    assert checks["api-liveness"]["CheckRestart"]["Limit"] == 3
    assert "CheckRestart" not in checks["api-readiness"]
    assert api["RestartPolicy"] == {"Attempts": 5, "Interval": 600 * 10**9, "Delay": 10**9, "Mode": "fail"}
    assert api["ReschedulePolicy"]["DelayFunction"] == "exponential"
    assert api["ReschedulePolicy"]["MaxDelay"] == 60 * 10**9
    assert api["Update"] == {"MaxParallel": 1, "MinHealthyTime": 0, "HealthyDeadline": 300 * 10**9,
                             "AutoRevert": True, "HealthCheck": "checks"}
    assert "startup probe" in api["Meta"]["corral.beyond"]
    worker = next(t for t in groups["worker"]["Tasks"] if t["Name"] == "worker")
    assert worker["Resources"] == {"Cores": 1, "MemoryMB": 128}
    assert groups["kv"]["EphemeralDisk"] == {"SizeMB": 1024, "Sticky": True, "Migrate": True}


def test_nomad_without_images_uses_the_configured_driver_and_a_batch_job_for_lone_jobs(tmp_path: Path) -> None:
    spec = tmp_path / "corral.yaml"
    spec.write_text("name: plain\nexport: {nomad: {driver: raw_exec, datacenters: [dc1], region: eu}}\nservices:\n"
                    "  web: {command: [srv, '--port', '${ports.http}'], ports: {http: 9000}, restart: {policy: always,"
                    " backoff: fixed, max_restarts: null}}\n"
                    "  backup: {command: [backup.sh], restart: {policy: 'no'}}\n"
                    "  worker: {command: [work], health: {liveness: {exec: [check.sh, -q], period: 5s}}}\n")
    docs = nomad(spec)
    assert [d["Job"]["Type"] for d in docs] == ["service", "batch"]
    for d in docs:
        conforms(d["Job"], JOB)
    web = docs[0]["Job"]["TaskGroups"][0]
    assert docs[0]["Job"]["Region"] == "eu" and docs[0]["Job"]["Datacenters"] == ["dc1"]
    assert web["Tasks"][0]["Driver"] == "raw_exec" and web["Tasks"][0]["Config"]["args"] == ["--port", "9000"]
    assert web["Networks"] == [{"ReservedPorts": [{"Label": "http", "Value": 9000}]}]
    assert web["ReschedulePolicy"]["Unlimited"] is True and web["ReschedulePolicy"]["DelayFunction"] == "constant"
    # Probed without ports: registered all the same, with its script check.
    worker = docs[0]["Job"]["TaskGroups"][1]
    (check,) = worker["Services"][0]["Checks"]
    assert "PortLabel" not in worker["Services"][0]
    assert (check["Type"], check["Command"], check["Args"]) == ("script", "check.sh", ["-q"])
    assert check["TaskName"] == "worker"
    assert check["CheckRestart"]["Limit"] == 3 and check["Interval"] == 5 * 10**9
    backup = docs[1]["Job"]["TaskGroups"][0]
    assert backup["Name"] == "backup" and backup["RestartPolicy"]["Attempts"] == 0
    assert "Update" not in backup


@pytest.mark.parametrize("engine", ["kubernetes", "nomad"])
def test_a_bad_spec_is_refused_with_its_line(tmp_path: Path, engine: str) -> None:
    (tmp_path / "corral.yaml").write_text("name: x\nservices:\n  a:\n    command: [x]\n    image: 3\n    bogus: 1\n")
    r = corral("export", engine, cwd=tmp_path)
    assert r.returncode == 2 and "corral.yaml:" in r.stderr and "Traceback" not in r.stderr


DOLLARS = """
    name: dollars
    services:
      web:
        image: busybox:1
        command: ["sh", "-c", "echo pid=$$ port=$(PORT) home=${HOME} at ${ports.http}"]
        ports: {http: auto}
        env: {D: "${NOMAD_ALLOC_DIR}", M: "$(PORT)", P: "${ports.http}"}
        health:
          readiness: {exec: ["sh", "-c", "test -n ${HOME} && echo $$ $(PORT) ${ports.http}"]}
"""


def k8s_expand(text: str, env: dict[str, str]) -> str:
    """What the kubelet makes of a command, args or env value: `$$` is `$`, `$(VAR)` a
    defined variable's value (an undefined one stays as written)."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("$(", i) and ")" in text[i:]:
            name = text[i + 2:text.index(")", i)]
            out.append(env.get(name, f"$({name})"))
            i += len(name) + 3
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def nomad_expand(text: str, env: dict[str, str]) -> str:
    """What Nomad's client makes of a task's string (helper/args.ReplaceEnv): every
    `${NAME}` it knows is replaced, with no escape; anything else stays."""
    import re

    return re.sub(r"\$\{([a-zA-Z0-9_.-]+)\}", lambda m: env.get(m.group(1), m.group(0)), text)


def test_export_keeps_the_meaning_of_dollar_signs(tmp_path: Path) -> None:
    """corral passes `$$`, `$(PORT)`, `${HOME}` and `${NOMAD_ALLOC_DIR}` to the process as
    written (the shell then reads them); each target is made to pass the same."""
    spec = tmp_path / "corral.yaml"
    spec.write_text(textwrap.dedent(DOLLARS))
    runtime = {"PORT": "8080", "HOME": "/root", "NOMAD_ALLOC_DIR": "/alloc", "NOMAD_PORT_http": "25000"}
    objs = k8s(spec)
    c = container(by(objs, "Deployment", "web"))
    port = next(p["containerPort"] for p in c["ports"])
    want_arg = f"echo pid=$$ port=$(PORT) home=${{HOME}} at {port}"
    assert [k8s_expand(a, runtime) for a in c["args"]] == ["-c", want_arg], c["args"]
    values = {e["name"]: k8s_expand(e["value"], runtime) for e in c["env"] if "value" in e}
    assert values["D"] == "${NOMAD_ALLOC_DIR}" and values["M"] == "$(PORT)" and values["P"] == str(port), values
    # A probe's command is not expanded by the kubelet: as written, but for corral's ports.
    probe = c["readinessProbe"]["exec"]["command"]
    assert probe == ["sh", "-c", f"test -n ${{HOME}} && echo $$ $(PORT) {port}"], probe
    # Nomad fills in every `${NAME}` it knows at run time and a JSON job has no escape for
    # it: export refuses to change the meaning, naming the value (exit 2).
    r = corral("export", "nomad", cwd=tmp_path)
    assert r.returncode == 2 and "web: command: ${HOME} cannot be kept in a Nomad job" in r.stderr, r.stderr
    assert "write it $HOME" in r.stderr and "Traceback" not in r.stderr
    spec.write_text(textwrap.dedent(DOLLARS).replace("home=${HOME}", "home=$HOME").replace('"${NOMAD_ALLOC_DIR}"',
                                                                                            '"$NOMAD_ALLOC_DIR"'))
    r = corral("export", "nomad", cwd=tmp_path)
    assert r.returncode == 2 and "web: health.readiness.exec: ${HOME}" in r.stderr, r.stderr
    spec.write_text(spec.read_text().replace("test -n ${HOME}", "test -n $HOME"))
    (job,) = nomad(spec)
    task = job["Job"]["TaskGroups"][0]["Tasks"][0]
    args = [nomad_expand(a, runtime) for a in task["Config"]["args"]]
    assert args == ["-c", "echo pid=$$ port=$(PORT) home=$HOME at 25000"], task["Config"]["args"]
    env = {k: nomad_expand(v, runtime) for k, v in task["Env"].items()}
    assert env["D"] == "$NOMAD_ALLOC_DIR" and env["M"] == "$(PORT)" and env["P"] == "25000", task["Env"]
    (check,) = [c for svc in task.get("Services") or job["Job"]["TaskGroups"][0].get("Services") or []
                for c in svc.get("Checks") or [] if c["Type"] == "script"]
    got = [nomad_expand(a, runtime) for a in check["Args"]]
    assert got == ["-c", "test -n $HOME && echo $$ $(PORT) 25000"], check["Args"]


STORAGE_SPEC = """
name: disks
services:
  db:
    image: postgres:17
    command: ["postgres"]
    resources: {storage: {size: 2Gi, path: ./pgdata, enforce: none, on_full: stop}}
  cache:
    image: varnish:7
    command: ["varnishd"]
    resources: {storage: {size: 512Mi, path: ./cache, on_full: restart}}
  backup:
    image: postgres:17
    command: ["pg_dumpall"]
    restart: {policy: "no"}
    resources: {storage: {size: 1Gi, path: ./dumps}}
"""


def test_storage_is_a_claim_when_kept_and_sized_scratch_when_not(tmp_path: Path) -> None:
    spec = tmp_path / "corral.yaml"
    spec.write_text(STORAGE_SPEC)
    objs = k8s(spec)
    for o in objs:
        kubernetes_validate.validate(o, "1.37.0", strict=True)
    db = by(objs, "StatefulSet", "db")
    assert db["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"] == {"storage": "2Gi"}
    assert "ephemeral-storage" not in str(container(db).get("resources", {}))
    # on_full: restart is scratch: a Deployment whose emptyDir the kubelet bounds.
    cache = by(objs, "Deployment", "cache")
    pod = cache["spec"]["template"]["spec"]
    assert pod["volumes"] == [{"name": "data", "emptyDir": {"sizeLimit": "512Mi"}}]
    assert container(cache)["volumeMounts"] == [{"name": "data", "mountPath": "/cache"}]
    assert container(cache)["resources"] == {"requests": {"ephemeral-storage": "512Mi"},
                                             "limits": {"ephemeral-storage": "512Mi"}}
    # A Job's storage has a volume to mount too.
    job = by(objs, "Job", "backup")
    assert job["spec"]["template"]["spec"]["volumes"] == [{"name": "data", "emptyDir": {"sizeLimit": "1Gi"}}]
    docs = nomad(spec)
    groups = {g["Name"]: g for d in docs for g in d["Job"]["TaskGroups"]}
    for d in docs:
        conforms(d["Job"], JOB)
    assert groups["db"]["EphemeralDisk"] == {"SizeMB": 2048, "Sticky": True, "Migrate": True}
    assert groups["db"]["Volumes"] == {"data": {"Name": "data", "Type": "host", "Source": "db-data",
                                                "ReadOnly": False}}
    task = next(t for t in groups["db"]["Tasks"] if t["Name"] == "db")
    assert task["VolumeMounts"] == [{"Volume": "data", "Destination": "/pgdata", "ReadOnly": False}]
    assert task["Env"]["CORRAL_VOLUME"] == "/pgdata"
    assert 'host_volume "db-data"' in groups["db"]["Meta"]["corral.beyond"]
    assert groups["cache"]["EphemeralDisk"] == {"SizeMB": 512, "Sticky": False, "Migrate": False}
    assert "Volumes" not in groups["cache"]
