"""What one model cannot see: references between services and to port names, names that
collide as environment variables, the files a service names; and the helpers they share
with the engine (``${ports.x}`` substitution, cycles, env files)."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

from corral.exceptions import SpecError
from corral.identity import credentials
from corral.spec.deployment import DeploymentSpec
from corral.spec.health import Probe
from corral.spec.service import ServiceSpec
from corral.specfile import Loc, Source
from corral.volumes import enforce_problem

_SYSTEM_DIRS = frozenset(Path(p) for p in ("/", "/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64",
                                            "/proc", "/root", "/run", "/sbin", "/sys", "/usr", "/var", "/home",
                                            "/tmp"))
"""Never a volume, even with ``allow_outside``."""
_KERNEL_DIRS = (Path("/proc"), Path("/sys"), Path("/dev"))
"""Nothing below these is a volume either."""


def cross_check(spec: DeploymentSpec, src: Source, root: Path, *, machine: bool = True) -> Iterator[SpecError]:
    """What one model cannot see: references between services and to port names, names that
    collide once they become environment variables, and the files a service names.

    With ``machine`` (to run here, not to export), also what only one machine makes wrong:
    replicas sharing a fixed port, users this machine does not have, a volume mode it
    cannot do. On Kubernetes or Nomad each replica has its own address and its own node."""
    yield from _env_collisions(spec, src)
    if machine:
        yield from _one_machine(spec, src)
    yield from _access(spec, src)
    yield from _metrics(spec, src, root)
    for name, svc in spec.services.items():
        base: Loc = ("services", name)
        for dep in svc.depends_on:
            needed = spec.services.get(dep)
            if needed is not None and needed.schedule is not None:
                yield src.error((*base, "depends_on", dep), f"{name} depends on {dep}, which runs on a schedule: "
                                f"nothing can wait for it (start it with its own dependencies instead)")
        yield from _files(svc, base, src, root, machine)
        if machine:
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


def _access(spec: DeploymentSpec, src: Source) -> Iterator[SpecError]:
    from corral.access import entry_ids

    for role in ("viewer", "operator", "admin"):
        for i, entry in enumerate(getattr(spec.access, role)):
            try:
                entry_ids(entry)
            except KeyError as e:
                yield src.error(("access", role, i), str(e.args[0]))


def _metrics(spec: DeploymentSpec, src: Source, root: Path) -> Iterator[SpecError]:
    m = spec.metrics
    if m is None:
        return
    if m.token_file is None:
        if not m.listen.startswith(_LOOPBACK):
            yield src.error(("metrics", "listen"), f"{m.listen} can be reached from other hosts: name a token_file "
                                                   f"whose bearer token every scrape must present (Prometheus' "
                                                   f"authorization setting), or listen on 127.0.0.1")
        return
    path = token_path(m.token_file, root)
    try:
        st = path.stat()
        token = path.read_text().strip()
    except OSError as e:
        yield src.error(("metrics", "token_file"), f"cannot read {path}: {e.strerror or e}")
        return
    if not token:
        yield src.error(("metrics", "token_file"), f"{path} is empty")
    elif st.st_mode & 0o077:
        yield src.error(("metrics", "token_file"), f"{path} can be read by others (mode {st.st_mode & 0o777:o}); "
                                                   f"chmod 600 it")


def token_path(token_file: str, root: Path) -> Path:
    """Where ``metrics.token_file`` is: relative paths from the spec's directory."""
    path = Path(token_file).expanduser()
    return path if path.is_absolute() else root / path


def _env_word(name: str) -> str:
    return name.upper().replace("-", "_")


def _one_machine(spec: DeploymentSpec, src: Source) -> Iterator[SpecError]:
    for name, svc in spec.services.items():
        if svc.replicas > 1:
            fixed = [n for n, p in svc.ports.items() if p != "auto"]
            if fixed:
                yield src.error(("services", name, "ports", fixed[0]),
                                f"{svc.replicas} replicas cannot share the fixed port {fixed[0]!r} on one machine; "
                                f"use auto (corral export keeps it: each pod or allocation has its own)")


def _files(svc: ServiceSpec, base: Loc, src: Source, root: Path, machine: bool = True) -> Iterator[SpecError]:
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
    yield from _templates(svc, base, src, root)
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
        why = enforce_problem(st.enforce, p) if st.enforce != "none" and machine else None
        if why:
            yield src.error((*base, "resources", "storage", "enforce"),
                            f"enforce: {st.enforce} cannot work on this machine: {why}")


def _templates(svc: ServiceSpec, base: Loc, src: Source, root: Path) -> Iterator[SpecError]:
    """Each template exists and renders for a stand-in of the instance (its real port and
    dependency names, one healthy instance per dependency): a syntax error, a missing name
    or a refused operation is said with the template's own line."""
    if not svc.templates:
        return
    from corral.engine.environment import environment
    from corral.templates import TemplateError, render, sample_context

    name = str(base[-1])
    env_base = dict(svc.env)
    if svc.env_file is not None and (root / svc.env_file).is_file():
        with contextlib.suppress(OSError, ValueError):
            env_base = {**read_env_file(root / svc.env_file), **env_base}
    ports = {p: 20000 + i for i, p in enumerate(svc.ports)}
    env = dict(environment(service=name, instance=f"{name}-0", replica=0, deployment="validate", stack="validate",
                           ports=ports, agent_socket=Path("/run/corral/agent.sock"),
                           volume=svc.resources.storage.path if svc.resources.storage else None,
                           base={k: substitute_ports(v, ports) for k, v in env_base.items()}, cert=None, ca=None,
                           dependencies=[(d, ["127.0.0.1:21000"]) for d in svc.depends_on]))
    context = sample_context(name, list(svc.ports), env, list(svc.depends_on))
    for i, t in enumerate(svc.templates):
        path = root / t.source
        if not path.is_file():
            what = "is not a file" if path.exists() else "does not exist"
            yield src.error((*base, "templates", i, "source"), f"template {t.source!r} {what} (in {root})")
            continue
        try:
            render(path, context, t.source)
        except TemplateError as e:
            yield src.error((*base, "templates", i), str(e))


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


_LOOPBACK = ("127.", "localhost:", "[::1]:")


def warnings(spec: DeploymentSpec) -> list[SpecError]:
    """What is allowed but worth a word (``validate`` and ``up`` print them). None at the
    moment: ``metrics.listen`` beyond loopback, once a warning, is refused without a token."""
    return []
