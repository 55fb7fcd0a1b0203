"""The ``corral`` command line.

Exit codes: 0 success; 1 the deployment failed (and was rolled back) or nothing answered;
2 an invalid spec or invalid usage. Errors are one line each (``file:line: field: message``
for specs), never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from corral.api import ControlClient, run_agent, socket_path
from corral.exceptions import AgentError, CorralError, SpecError
from corral.state import EventRow, InstanceRow, StateStore, default_state_dir

# The engine (and pydantic under the spec) loads only for commands that deploy or validate:
# status, logs, events, restart and down answer without it.
if TYPE_CHECKING:
    from rich.console import Console, Group
    from rich.table import Table

    from corral.engine import Deployment
    from corral.lifecycle import Transition
    from corral.spec import DeploymentSpec

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Orchestrate services on one machine: placement, health, restarts, discovery.")
class _LazyConsole:
    """A rich console created on first use: `up -d` forks its agent before anything is
    printed, and the agent never needs rich, so its import stays off that path."""

    def __init__(self, stderr: bool) -> None:
        self._stderr = stderr
        self._console: Console | None = None

    def get(self) -> Console:
        """The console itself."""
        if self._console is None:
            from rich.console import Console

            # Lines are never wrapped: logs and error messages are read by scripts and grep too.
            self._console = Console(stderr=self._stderr, highlight=False, soft_wrap=True)
        return self._console

    def print(self, *objects: Any, **kwargs: Any) -> None:
        self.get().print(*objects, **kwargs)

    def print_json(self, text: str) -> None:
        self.get().print_json(text)

    @property
    def is_terminal(self) -> bool:
        return self.get().is_terminal


out = _LazyConsole(stderr=False)
err = _LazyConsole(stderr=True)

SpecArg = Annotated[Path, typer.Argument(help="The spec file.", show_default=True)]
StateOpt = Annotated[Path | None, typer.Option("--state-dir", help="State directory (default: .corral/ beside the "
                                                                    "spec, or $CORRAL_STATE_DIR).")]
DEFAULT_SPEC = Path("corral.yaml")


def _fail(message: str, code: int) -> NoReturn:
    err.print(f"[red]error:[/red] {message}", soft_wrap=True)
    raise typer.Exit(code)


def _spec_errors(e: SpecError) -> NoReturn:
    for one in e.all:
        err.print(f"[red]error:[/red] {one}", soft_wrap=True, markup=True)
    raise typer.Exit(2)


def _state_dir(spec: Path, state_dir: Path | None) -> Path:
    return state_dir if state_dir is not None else default_state_dir(spec)


def _deployment(spec: Path, state_dir: Path | None) -> Deployment:
    from corral.engine import Deployment

    try:
        return Deployment.from_file(spec, state_dir=_state_dir(spec, state_dir))
    except SpecError as e:
        _spec_errors(e)


# --- validate and plan ------------------------------------------------------------------


@app.command()
def validate(spec: SpecArg = DEFAULT_SPEC) -> None:
    """Check a spec without placing or starting anything."""
    from corral.spec import load_spec

    try:
        s = load_spec(spec)
    except SpecError as e:
        _spec_errors(e)
    instances = sum(svc.replicas for svc in s.services.values())
    out.print(f"{spec}: ok ({len(s.services)} services, {instances} instances)")


@app.command()
def plan(spec: SpecArg = DEFAULT_SPEC, state_dir: StateOpt = None,
         as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """Show the phases and where every instance would go, without starting anything."""
    from rich.table import Table

    d = _deployment(spec, state_dir)
    try:
        p = d.make_plan()
    except SpecError as e:
        _spec_errors(e)
    try:
        if as_json:
            out.print_json(json.dumps(p.to_dict()))
            return
        for i, phase in enumerate(p.phases):
            out.print(f"[bold]phase {i}[/bold]: {', '.join(phase)}")
        t = Table("instance", "cores", "node", "cpu", "memory", "ports", box=None)
        for inst in p.instances():
            t.add_row(inst.id, ",".join(map(str, inst.cpus)) or "-",
                      "-" if inst.numa_node is None else str(inst.numa_node),
                      f"{inst.millicores / 1000:g}" if inst.millicores else ("excl" if inst.cpus else "-"),
                      f"{inst.memory_mb}Mi" if inst.memory_mb else "-",
                      ", ".join(f"{k}={v}" for k, v in inst.ports.items()) or "-")
        out.print(t)
        for name, port in p.fronts.items():
            svc = d.spec.services[name]
            mode = f"mTLS, allow {', '.join(svc.allow) or 'any service of the mesh'}" if svc.mtls else "plain TCP"
            out.print(f"front {name}: {d.host}:{port} ({svc.balance}, {mode})")
    finally:
        d.scheduler.release(p)


# --- up and down ------------------------------------------------------------------------


@app.command()
def up(spec: SpecArg = DEFAULT_SPEC, state_dir: StateOpt = None,
       detach: Annotated[bool, typer.Option("-d", "--detach", help="Return once every service meets its "
                                                                     "condition; the agent keeps running.")] = False,
       run_for: Annotated[str | None, typer.Option("--run-for", help="Stop after this long (e.g. 30s); "
                                                                      "for demos and smoke runs.")] = None,
       timeout: Annotated[float, typer.Option(help="With -d: seconds to wait for the agent.")] = 600.0) -> None:
    """Start every service in dependency order and supervise them."""
    seconds = None
    if run_for is not None:
        from corral.spec import parse_duration

        try:
            seconds = parse_duration(run_for)
        except ValueError as e:
            _fail(f"--run-for: {e}", 2)
    from corral.engine import Deployment
    from corral.spec import load_spec

    sd = _state_dir(spec, state_dir)
    try:
        parsed = load_spec(spec)
    except SpecError as e:
        _spec_errors(e)
    client = ControlClient(sd)
    if client.available():
        _fail(f"a corral agent is already running for {sd} (run 'corral down' first)", 1)
    if detach:
        raise typer.Exit(_up_detached(spec, parsed, sd, timeout))
    d = Deployment(parsed, file=spec, state_dir=sd)
    raise typer.Exit(_up_foreground(d, seconds))


def _up_detached(spec: Path, parsed: DeploymentSpec, sd: Path, timeout: float) -> int:
    sd.mkdir(parents=True, exist_ok=True)
    log = sd / "agent.log"
    sock = socket_path(sd)
    if sock.exists():
        sock.unlink()
    # The agent is this process, forked: everything is imported already, which saves a
    # second interpreter start-up on the way to the first process. Nothing has started a
    # thread yet (the native runtime starts in the child), so forking is safe.
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _become_agent(spec, parsed, sd, log)
    client = ControlClient(sd)
    deadline = time.monotonic() + timeout
    while not sock.exists():
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            _print_log_tail(log)
            return os.waitstatus_to_exitcode(status) or 1
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            _fail(f"the agent did not start within {timeout:g}s (log: {log})", 1)
        time.sleep(0.002)
    try:
        res = client.request("GET", "/v1/up", timeout=timeout)
    except CorralError:
        _print_log_tail(log)
        return 1
    if not res.get("ok"):
        err.print(f"[red]error:[/red] {res.get('error')}")
        return 1
    st = res["status"]
    n = sum(len(v) for v in st["services"].values())
    out.print(f"{st['name']}: up ({n} instances, agent pid {pid}); 'corral status' to look, "
              f"'corral down' to stop")
    return 0


def _become_agent(spec: Path, parsed: DeploymentSpec, sd: Path, log: Path) -> NoReturn:
    """The forked child: a new session, output to the agent log, then the agent until down."""
    from corral.engine import Deployment

    code = 1
    try:
        os.setsid()
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        os.close(null)
        d = Deployment(parsed, file=spec, state_dir=sd)
        code = asyncio.run(run_agent(d))
    except SpecError as e:
        for one in e.all:
            print(f"error: {one}", file=sys.stderr)
        code = 2
    except BaseException as e:  # the agent must never return into the CLI's code
        print(f"error: {e}", file=sys.stderr)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _print_log_tail(log: Path) -> None:
    try:
        lines = log.read_text(errors="replace").splitlines()[-20:]
    except OSError:
        return
    for line in lines:
        err.print(line, markup=False, highlight=False)


def _up_foreground(d: Deployment, run_for: float | None) -> int:
    live = out.is_terminal
    view = _LiveView(d) if live else None

    def on_up(dep: Deployment) -> None:
        n = sum(len(v) for v in dep.status().services.values())
        msg = f"{dep.name}: up ({n} instances); Ctrl-C stops everything"
        if view is not None:
            view.note = msg
        else:
            out.print(msg)

    async def main() -> int:
        printer = asyncio.create_task(view.run() if view is not None else _print_transitions(d))
        try:
            code = await run_agent(d, run_for=run_for, on_up=on_up)
        finally:
            printer.cancel()
            await asyncio.gather(printer, return_exceptions=True)
        return code

    try:
        code = asyncio.run(main())
    except SpecError as e:
        _spec_errors(e)
    except CorralError as e:
        _fail(str(e), 1)
    if view is not None:
        view.final()
    if code != 0:
        err.print(f"[red]error:[/red] {d.status().message or 'up failed'}; everything it started was stopped",
                  soft_wrap=True)
    else:
        out.print(f"{d.name}: down")
    return code


async def _print_transitions(d: Deployment) -> None:
    async for t in d.watch():
        out.print(_transition_line(t), markup=False)


def _transition_line(t: Transition) -> str:
    return f"{time.strftime('%H:%M:%S', time.localtime(t.at))} {t.instance:<16} {t.old.value:>10} -> " \
           f"{t.new.value:<10} {t.reason}"


class _LiveView:
    """The live table and progress bar of a foreground ``up``."""

    def __init__(self, d: Deployment) -> None:
        from rich.live import Live
        from rich.progress import BarColumn, Progress, TextColumn

        self.d = d
        self.note = ""
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 TextColumn("{task.completed}/{task.total}"))
        self.task = self.progress.add_task("services up", total=len(d.spec.services))
        self.live = Live(self.render(), console=out.get(), refresh_per_second=4, transient=False)

    def render(self) -> Group:
        from rich.console import Group

        st = self.d.status()
        done = sum(1 for insts in st.services.values() if all(i.state in ("healthy", "completed") for i in insts))
        self.progress.update(self.task, completed=done)
        return Group(self.progress, _status_table(st.services.values()), self.note)

    async def run(self) -> None:
        with self.live:
            while True:
                self.live.update(self.render())
                await asyncio.sleep(0.25)

    def final(self) -> None:
        out.print(_status_table(self.d.status().services.values()))


_STATE_STYLE = {"healthy": "green", "completed": "cyan", "running": "yellow", "starting": "yellow",
                "unhealthy": "red", "failed": "bold red", "restarting": "magenta", "stopped": "dim"}


def _status_table(services: Any) -> Table:
    from rich.table import Table

    t = Table("instance", "state", "pid", "ports", "cpus", "restarts", "reason", box=None)
    for insts in services:
        for i in insts:
            style = _STATE_STYLE.get(i.state, "")
            cpus = ",".join(map(str, i.cpus)) + (" (excl)" if i.exclusive else "") if i.cpus else "-"
            t.add_row(i.id, f"[{style}]{i.state}[/]" if style else i.state, str(i.pid or "-"),
                      ", ".join(f"{k}={v}" for k, v in i.ports.items()) or "-", cpus, str(i.restarts),
                      i.reason[:60])
    return t


@app.command(hidden=True)
def agent(spec: SpecArg = DEFAULT_SPEC, state_dir: StateOpt = None) -> None:
    """Run the agent in this process (what `up -d` starts in the background)."""
    d = _deployment(spec, state_dir)

    async def main() -> int:
        return await run_agent(d)

    try:
        code = asyncio.run(main())
    except SpecError as e:
        _spec_errors(e)
    except CorralError as e:
        _fail(str(e), 1)
    raise typer.Exit(code)


@app.command()
def down(spec: SpecArg = DEFAULT_SPEC, state_dir: StateOpt = None) -> None:
    """Stop every service (reverse dependency order) and the agent."""
    sd = _state_dir(spec, state_dir)
    client = ControlClient(sd)
    rows = _deployments(sd, required=False)
    agent_pid = rows[-1].agent_pid if rows else None
    try:
        client.request("POST", "/v1/down", timeout=600)
    except AgentError:
        # No agent: stop what a dead agent left behind, by process group and start time.
        n = _kill_leftovers(sd)
        out.print(f"no agent running; stopped {n} leftover process groups" if n else "nothing running")
        return
    if agent_pid:
        deadline = time.monotonic() + 10
        while _alive(agent_pid) and time.monotonic() < deadline:
            time.sleep(0.01)
    out.print("down")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kill_leftovers(sd: Path) -> int:
    from corral._core import signal_group

    db = sd / "state.db"
    if not db.exists():
        return 0
    n = 0
    for d in StateStore.read_deployments(db):
        for r in StateStore.read_instances(db, d.name):
            if r.pid is not None and r.is_running():
                signal_group(r.pid, signal.SIGTERM)
                deadline = time.monotonic() + 5
                while r.is_running() and time.monotonic() < deadline:
                    time.sleep(0.02)
                signal_group(r.pid, signal.SIGKILL)
                n += 1
        if d.status not in ("down", "failed"):
            store = StateStore(db)
            d.status, d.message = "down", "stopped by 'corral down' without an agent"
            store.put_deployment(d)
            store.close()
    return n


# --- status, events, logs, restart -------------------------------------------------------


def _deployments(sd: Path, required: bool = True) -> list[Any]:
    db = sd / "state.db"
    rows = StateStore.read_deployments(db) if db.exists() else []
    if not rows and required:
        _fail(f"no deployment in {sd}", 1)
    return rows


@app.command()
def status(spec: SpecArg = DEFAULT_SPEC, state_dir: StateOpt = None,
           as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """Show services and instances (answers from the state database, even without the agent)."""
    sd = _state_dir(spec, state_dir)
    rows = _deployments(sd)
    if not rows:
        _fail(f"no deployment in {sd}", 1)
    d = rows[-1]
    insts = StateStore.read_instances(sd / "state.db", d.name)
    # A killed agent may linger as a zombie with its start time intact: _alive tells it apart.
    agent_up = d.agent_running() and _alive(d.agent_pid or 0) and socket_path(sd).exists()
    services: dict[str, list[InstanceRow]] = {}
    for s in [n for phase in d.phases for n in phase]:
        services[s] = []
    for i in insts:
        services.setdefault(i.service, []).append(i)
    # Front counters live in the agent's memory: asked for when it runs, absent otherwise.
    fronts: dict[str, Any] = {}
    if agent_up:
        try:
            fronts = ControlClient(sd).request("GET", "/v1/status", timeout=5).get("fronts", {})
        except CorralError:
            fronts = {}
    if as_json:
        doc = {"name": d.name, "status": d.status, "message": d.message, "agent_pid": d.agent_pid,
               "agent_running": agent_up,
               "services": {s: [i.to_dict() for i in v] for s, v in services.items()}, "fronts": fronts}
        print(json.dumps(doc, indent=2))
        return
    agent_txt = f"agent pid {d.agent_pid}" if agent_up else "agent not running"
    out.print(f"[bold]{d.name}[/bold]: {d.status} ({agent_txt})" + (f": {d.message}" if d.message else ""))
    out.print(_status_table(services.values()))
    for name, f in fronts.items():
        ejected = [u["id"] for u in f.get("upstreams", []) if u.get("ejected")]
        out.print(f"front [bold]{name}[/bold] {f['address']}: {len(f.get('upstreams', []))} upstreams, "
                  f"{f['active']} active, {f['connections']} connections, {f['errors']} errors, "
                  f"{f['refused']} refused" + (f", {f['tls_refused']} refused at TLS" if f.get("tls_refused") else "")
                  + (f", ejected: {', '.join(ejected)}" if ejected else ""))


@app.command()
def events(spec: SpecArg = DEFAULT_SPEC, state_dir: StateOpt = None,
           follow: Annotated[bool, typer.Option("-f", "--follow", help="Keep printing new events.")] = False,
           lines: Annotated[int, typer.Option("-n", help="How many past events.")] = 100) -> None:
    """Print the event log (every transition, with time and reason)."""
    sd = _state_dir(spec, state_dir)
    _deployments(sd)
    db = sd / "state.db"
    last = StateStore.last_seq(db)
    for e in StateStore.iter_tail(db, lines):
        _print_event(e)
        last = e.seq
    while follow:
        try:
            time.sleep(0.2)
        except KeyboardInterrupt:
            return
        for e in StateStore.read_events(db, last):
            _print_event(e)
            last = e.seq


def _print_event(e: EventRow) -> None:
    when = time.strftime("%H:%M:%S", time.localtime(e.at)) + f".{int(e.at * 1000) % 1000:03d}"
    who = e.instance or e.deployment
    change = f"{e.old or '':>10} -> {e.new:<10}" if e.new else " " * 24
    out.print(f"{when} {who:<16} {change} {e.reason}", markup=False)


@app.command()
def logs(service: Annotated[str, typer.Argument(help="Service name.")], spec: SpecArg = DEFAULT_SPEC,
         state_dir: StateOpt = None,
         follow: Annotated[bool, typer.Option("-f", "--follow", help="Keep printing new output.")] = False,
         lines: Annotated[int, typer.Option("-n", help="Lines from the end of each instance's log.")] = 50) -> None:
    """Print the output of a service's instances."""
    sd = _state_dir(spec, state_dir)
    rows = _deployments(sd)
    insts = [i for i in StateStore.read_instances(sd / "state.db", rows[-1].name) if i.service == service]
    if not insts:
        known = sorted({s for phase in rows[-1].phases for s in phase})
        _fail(f"unknown service {service!r} (services: {', '.join(known)})", 2)
    files = [(i.id, Path(i.log) if i.log else sd / "logs" / f"{i.id}.log") for i in insts]
    prefix = len(files) > 1
    for iid, f in files:
        for line in _tail(f, lines):
            _print_log(iid, line, prefix)
    if follow:
        _follow(files, prefix)


def _tail(path: Path, n: int) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 256 * 1024))
            data = f.read().decode(errors="replace")
    except FileNotFoundError:
        return []
    return data.splitlines()[-n:] if n > 0 else []


def _print_log(iid: str, line: str, prefix: bool) -> None:
    sys.stdout.write(f"{iid} | {line}\n" if prefix else f"{line}\n")
    sys.stdout.flush()


def _follow(files: list[tuple[str, Path]], prefix: bool) -> None:
    pos: dict[Path, tuple[int, int]] = {}
    for _, f in files:
        try:
            st = f.stat()
            pos[f] = (st.st_ino, st.st_size)
        except FileNotFoundError:
            pos[f] = (0, 0)
    try:
        while True:
            for iid, f in files:
                for line in _new_lines(f, pos):
                    _print_log(iid, line, prefix)
            time.sleep(0.2)
    except KeyboardInterrupt:
        return


def _new_lines(f: Path, pos: dict[Path, tuple[int, int]]) -> Iterator[str]:
    try:
        st = f.stat()
    except FileNotFoundError:
        return
    ino, off = pos[f]
    if st.st_ino != ino or st.st_size < off:
        off = 0  # rotated: the live file is new
    if st.st_size == off:
        pos[f] = (st.st_ino, off)
        return
    with open(f, "rb") as fh:
        fh.seek(off)
        data = fh.read()
    # Only whole lines; the rest waits for its newline.
    cut = data.rfind(b"\n") + 1
    pos[f] = (st.st_ino, off + cut)
    yield from data[:cut].decode(errors="replace").splitlines()


@app.command()
def restart(service: Annotated[str, typer.Argument(help="Service name.")], spec: SpecArg = DEFAULT_SPEC,
            state_dir: StateOpt = None) -> None:
    """Restart a service's replicas one after the other (needs the agent)."""
    sd = _state_dir(spec, state_dir)
    try:
        ControlClient(sd).request("POST", f"/v1/restart?service={service}", timeout=600)
    except AgentError:
        _fail(f"no agent running for {sd}; 'corral up' first", 1)
    except CorralError as e:
        _fail(str(e), 2 if "unknown service" in str(e) else 1)
    out.print(f"{service}: restarted")


def main() -> None:
    """Entry point: errors are one line (``CORRAL_DEBUG=1`` shows the traceback of a bug)."""
    try:
        app()
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except SpecError as e:
        for one in e.all:
            err.print(f"[red]error:[/red] {one}")
        raise SystemExit(2) from None
    except (CorralError, OSError) as e:
        if os.environ.get("CORRAL_DEBUG"):
            raise
        err.print(f"[red]error:[/red] {e}")
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
