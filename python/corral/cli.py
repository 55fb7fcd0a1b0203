"""The ``corral`` command line: typer and rich over :class:`~corral.agent.client.AgentClient`
(status, events, logs, restart, down) and the engine (validate, plan, a foreground up).

Exit codes come from the exception classes (``CorralError.exit_code``): 0 success; 1 the
deployment failed (and was rolled back) or nothing answered; 2 an invalid spec, name or
usage. Errors are one line each (``file:line: field: message`` for specs), never a traceback.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer

from corral.agent.client import AgentClient, default_state_dir
from corral.exceptions import AgentAlreadyRunning, AgentUnavailable, ConfigError, CorralError, SpecError

# The engine (and pydantic under the spec) loads only for commands that deploy or validate:
# status, logs, events, restart and down answer without it.
if TYPE_CHECKING:
    from rich.console import Console, Group
    from rich.table import Table

    from corral.agent.client import EventRow
    from corral.engine import Deployment
    from corral.lifecycle import Transition

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
SpecFileOpt = Annotated[Path, typer.Option("-f", "--file", help="The spec file (after several service names, "
                                                                 "the spec is an option).")]
DEFAULT_SPEC = Path("corral.yaml")


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _printable(text: object) -> str:
    """User and service text for a terminal: control characters (escape sequences, NUL)
    shown as ``\\xNN`` instead of acting."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))


def _error(message: object) -> None:
    """``error: <message>``, the message printed literally (never as markup)."""
    from rich.text import Text

    err.print(Text.assemble(("error: ", "red"), _printable(message)), soft_wrap=True)


def _fail(message: str, code: int) -> NoReturn:
    _error(message)
    raise typer.Exit(code)


def _spec_errors(e: SpecError) -> NoReturn:
    for one in e.all:
        _error(one)
    raise typer.Exit(e.exit_code)


def _client(spec: Path, state_dir: Path | None) -> AgentClient:
    return AgentClient(_state_dir(spec, state_dir))


def _state_dir(spec: Path, state_dir: Path | None) -> Path:
    return state_dir if state_dir is not None else default_state_dir(spec)


def _deployment(spec: Path, state_dir: Path | None) -> Deployment:
    from corral.engine import Deployment

    try:
        return Deployment.from_file(spec, state_dir=_state_dir(spec, state_dir))
    except SpecError as e:
        _spec_errors(e)


def _adopting(spec: Path, state_dir: Path | None) -> Deployment:
    """The deployment a dead agent ran: the last spec version applied, from state.db (the
    file may have changed since), with the keeper of ``up -d`` taking the output."""
    from corral.engine import Deployment
    from corral.spec import parse_spec
    from corral.state import StateStore
    from corral.statedir import KEEPER_SOCKET

    sd = _state_dir(spec, state_dir)
    db = sd / "state.db"
    rows = StateStore.read_deployments(db) if db.exists() else []
    if not rows:
        _fail(f"nothing to adopt in {sd}", 2)
    row = rows[-1]
    running = StateStore.running_spec(db, row)
    try:
        parsed = parse_spec(running.text, row.spec) if running is not None and running.text else None
        if parsed is None:
            from corral.spec import load_spec

            parsed = load_spec(row.spec)
    except SpecError as e:
        _spec_errors(e)
    keeper = sd / KEEPER_SOCKET
    return Deployment(parsed, file=row.spec, state_dir=sd, keeper=keeper if keeper.exists() else None)


# --- validate and plan ------------------------------------------------------------------


@app.command()
def validate(spec: SpecArg = DEFAULT_SPEC) -> None:
    """Check a spec, and that it fits this machine, without starting anything."""
    from corral.scheduler import check_fit
    from corral.spec import load_spec

    try:
        s = load_spec(spec)
        check_fit(s, spec.resolve().parent)
    except SpecError as e:
        _spec_errors(e)
    instances = sum(svc.replicas for svc in s.services.values())
    out.print(f"{spec}: ok ({len(s.services)} services, {instances} instances)", markup=False)


@app.command()
def plan(spec: SpecArg = DEFAULT_SPEC, state_dir: StateOpt = None,
         as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
         show_map: Annotated[bool, typer.Option("--map", help="Draw the machine: where the plan puts every "
                                                              "exclusive core.")] = False) -> None:
    """Show the phases and where every instance would go, without starting anything; with a
    stack running, what 'corral up' would change in it (a diff, nothing changed)."""
    client = _client(spec, state_dir)
    res = None
    if not show_map and (client.path.exists() or client.running() is not None):
        try:
            res = client.plan_changes(spec)
        except AgentUnavailable:
            if client.running() is not None:
                raise  # it runs but does not answer: no plan against it, and none without
    if res is not None:
        # Plain print: rich is not worth its import for lines of text (plan is a hot command).
        print(json.dumps(res["diff"], indent=2) if as_json else "\n".join(_printable(x) for x in res["lines"]))
        return
    from rich.table import Table
    from rich.text import Text

    d = _deployment(spec, state_dir)
    try:
        p = d.make_plan()
    except SpecError as e:
        _spec_errors(e)
    try:
        if show_map:
            from corral.cpumap import machine_map

            holders = {cpu: inst.id for inst in p.instances() for cpu in inst.cpus}
            for line in machine_map(d.topology, holders, set(d.resources.usage().cpus)):
                out.print(_printable(line), markup=False)
            return
        if as_json:
            out.print_json(json.dumps(p.to_dict()))
            return
        for i, phase in enumerate(p.phases):
            out.print(Text.assemble((f"phase {i}", "bold"), f": {', '.join(phase)}"))
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
            out.print(f"front {name}: {d.host}:{port} ({svc.balance}, {mode})", markup=False)
    finally:
        d.scheduler.release(p)


# --- up and down ------------------------------------------------------------------------


@app.command()
def up(spec: SpecArg = DEFAULT_SPEC, state_dir: StateOpt = None,
       detach: Annotated[bool, typer.Option("-d", "--detach", help="Return once every service meets its "
                                                                     "condition; the agent keeps running.")] = False,
       run_for: Annotated[str | None, typer.Option("--run-for", help="Stop after this long (e.g. 30s); "
                                                                      "for demos and smoke runs.")] = None,
       timeout: Annotated[float, typer.Option(help="With -d: seconds to wait for the agent.")] = 600.0,
       metrics: Annotated[str | None, typer.Option(
           "--metrics", help="Serve Prometheus metrics at HOST:PORT/metrics (as the spec's metrics.listen).")] = None,
       ) -> None:
    """Start every service in dependency order and supervise them; with a stack already
    running, apply the spec to it (only what changed changes) and return when done."""
    seconds = None
    if run_for is not None:
        from corral.units import parse_duration

        try:
            seconds = parse_duration(run_for)
        except ValueError as e:
            _fail(f"--run-for: {e}", 2)
    sd = _state_dir(spec, state_dir)
    client = AgentClient(sd)
    # By pid and start time, not by the socket alone: a stopped (SIGSTOP) agent does not
    # answer, and starting a second one beside it would start the stack twice.
    agent = client.running()
    if agent is None and client.keeper_restarting():
        agent = client.wait_running(5.0)  # the keeper restarts a dead agent: that one applies
    if agent is not None or client.available():
        if run_for is not None:
            _fail("--run-for starts a new stack; one runs already (apply without it, or 'corral down' first)", 2)
        try:
            client.request("GET", "/v1/status", timeout=5)
        except AgentUnavailable:
            who = f" (pid {agent.agent_pid})" if agent is not None else ""
            raise AgentAlreadyRunning(f"a corral agent runs for {sd}{who} but does not answer; nothing was "
                                      f"applied", agent.agent_pid if agent is not None else None) from None
        raise typer.Exit(_apply(client, spec))
    from corral.engine import Deployment
    from corral.spec import load_spec

    try:
        parsed = load_spec(spec)
        if metrics is not None:
            from corral.spec import MetricsSpec

            try:
                parsed = parsed.model_copy(update={"metrics": MetricsSpec(listen=metrics)})
            except ValueError as e:
                _fail(f"--metrics: {e.errors()[0]['msg'] if hasattr(e, 'errors') else e}", 2)
    except SpecError as e:
        _spec_errors(e)
    if detach:
        from corral.agent.daemon import start_detached

        st = start_detached(spec, parsed, sd, timeout)
        n = sum(len(v) for v in st.services.values())
        out.print(f"{st.name}: up ({n} instances, agent pid {st.agent_pid}); 'corral status' to look, "
                  f"'corral down' to stop", markup=False)
        raise typer.Exit(0)
    d = Deployment(parsed, file=spec, state_dir=sd)
    raise typer.Exit(_up_foreground(d, seconds))


def _apply(client: AgentClient, spec: Path) -> int:
    """``up`` against a running stack: the agent applies the spec; on a terminal, its events
    print as the rollout goes. 0 when it is done, 1 when it failed (and was reverted)."""
    import threading

    from corral.exceptions import RolloutError

    result: dict[str, Any] = {}

    def call() -> None:
        try:
            result["ok"] = client.apply(spec)
        except BaseException as e:  # handed to the main thread below
            result["error"] = e

    after = max((e.seq for e in client.last_events(1)), default=0) if out.is_terminal else 0
    worker = threading.Thread(target=call, name="corral-apply", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.2)
        if out.is_terminal:
            for ev in client.events(after):
                after = ev.seq
                _print_event(ev)
    failure = result.get("error")
    if isinstance(failure, RolloutError):
        _error(failure)
        return 1
    if isinstance(failure, BaseException):
        raise failure
    res = result["ok"]
    for line in res["lines"]:
        out.print(_printable(line), markup=False)
    if not res["diff"]["empty"]:
        out.print(f"applied: spec version {res['version']} runs", markup=False)
    return 0


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

    import asyncio

    from corral.agent.server import run_agent

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
    if view is not None:
        view.final()
    if code != 0:
        _error(f"{d.status().message or 'up failed'}; everything it started was stopped")
    else:
        out.print(f"{d.name}: down", markup=False)
    return code


async def _print_transitions(d: Deployment) -> None:
    async for t in d.watch():
        out.print(_printable(_transition_line(t)), markup=False)


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
        import asyncio

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
    from rich.text import Text

    t = Table("instance", "version", "state", "pid", "ports", "cpus", "restarts", "reason", box=None)
    for insts in services:
        for i in insts:
            style = _STATE_STYLE.get(i.state, "")
            cpus = ",".join(map(str, i.cpus)) + (" (excl)" if i.exclusive else "") if i.cpus else "-"
            t.add_row(Text(i.id), f"v{i.version}", Text(i.state, style=style), str(i.pid or "-"),
                      ", ".join(f"{k}={v}" for k, v in i.ports.items()) or "-", cpus, str(i.restarts),
                      Text(_printable(i.reason[:60])))
    return t


@app.command(hidden=True)
def agent(spec: SpecArg = DEFAULT_SPEC, state_dir: StateOpt = None,
          adopt: Annotated[bool, typer.Option("--adopt", help="Take over what a dead agent left (the "
                                                             "running spec from state.db).")] = False) -> None:
    """Run the agent in this process (what `up -d`, and the keeper, start in the background)."""
    if adopt:
        d = _adopting(spec, state_dir)
    else:
        d = _deployment(spec, state_dir)
    from corral.agent.jsonlog import log_to

    log_to(d.state_dir / "agent.log", d.spec.logs.max_size, d.spec.logs.keep)

    import asyncio

    from corral.agent.server import run_agent

    async def main() -> int:
        return await run_agent(d, adopt=adopt)

    try:
        code = asyncio.run(main())
    except SpecError as e:
        _spec_errors(e)
    except CorralError:
        raise
    except Exception as e:  # a bug: the keeper restarts an agent that ends so
        from corral.agent.keeper import CRASHED

        _error(f"the agent failed: {type(e).__name__}: {e}")
        raise typer.Exit(CRASHED) from None
    raise typer.Exit(code)


@app.command()
def down(spec: SpecArg = DEFAULT_SPEC, state_dir: StateOpt = None) -> None:
    """Stop every service (reverse dependency order) and the agent."""
    n = _client(spec, state_dir).down()
    if n is None:
        out.print("down")
    else:
        # No agent: what a dead agent left behind was stopped, by process group and start time.
        out.print(f"no agent running; stopped {n} leftover process groups" if n else "nothing running")


# --- status, events, logs, restart -------------------------------------------------------


@app.command()
def status(spec: SpecArg = DEFAULT_SPEC, state_dir: StateOpt = None,
           as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
           show_map: Annotated[bool, typer.Option("--map", help="Draw the machine: which instance holds "
                                                                "each exclusive core.")] = False) -> None:
    """Show services and instances (answers from the state database, even without the agent)."""
    from rich.text import Text

    client = _client(spec, state_dir)
    st = client.status()
    if as_json:
        print(json.dumps(st.to_dict(), indent=2))
        return
    if show_map:
        from corral._core import ResourceManager, Topology
        from corral.cpumap import held_cpus, machine_map

        topology = Topology.detect()
        holders = held_cpus(i for insts in st.services.values() for i in insts)
        for line in machine_map(topology, holders, set(ResourceManager(topology).usage().cpus)):
            out.print(_printable(line), markup=False)
        return
    if st.agent_running:
        agent_txt = f"agent pid {st.agent_pid}"
    else:
        # Said first: what runs now runs unsupervised (no restarts, no probes, no fronts).
        alive = sum(1 for insts in st.services.values() for i in insts if i.is_running())
        agent_txt = f"agent not running; {alive} instances run unsupervised"
        kept = client.keeper()
        if kept is not None and kept.get("reason"):
            agent_txt += f"; {kept['reason']}"
    out.print(Text.assemble((st.name, "bold"), f": {st.status}, spec v{st.version} ({agent_txt})"
                            + (f": {st.message}" if st.message else "")))
    out.print(_status_table(st.services.values()))
    for name, f in st.fronts.items():
        ejected = [u["id"] for u in f.get("upstreams", []) if u.get("ejected")]
        out.print(Text.assemble("front ", (name, "bold"), f" {f['address']}: {len(f.get('upstreams', []))} "
                                f"upstreams, {f['active']} active, {f['connections']} connections, "
                                f"{f['errors']} errors, {f['refused']} refused"
                                + (f", {f['tls_refused']} refused at TLS" if f.get("tls_refused") else "")
                                + (f", ejected: {', '.join(ejected)}" if ejected else "")))


@app.command()
def export(engine: Annotated[str, typer.Argument(help="kubernetes or nomad.")], spec: SpecArg = DEFAULT_SPEC,
           output: Annotated[Path | None, typer.Option("-o", "--output",
                                                       help="Write one file per document into DIR.")] = None) -> None:
    """Print the spec as Kubernetes objects (multi-document YAML) or a Nomad job (JSON API
    shape); what the engine cannot carry is named in the export. Nothing starts."""
    from corral.export import ENGINES, render
    from corral.spec import load_spec

    if engine not in ENGINES:
        _fail(f"unknown engine {engine!r} (engines: {', '.join(ENGINES)})", 2)
    try:
        docs = render(load_spec(spec), spec.resolve().parent, engine)
    except SpecError as e:
        _spec_errors(e)
    except ConfigError as e:
        _fail(f"{spec}: {e}", 2)
    if output is None:
        sep = "---\n" if engine == "kubernetes" else ""
        sys.stdout.write(sep.join(text for _, text in docs))
        return
    # Owner-only, as everything corral writes.
    output.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name, text in docs:
        fd = os.open(output / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(fd, 0o600)
            f.write(text)
    out.print(f"{len(docs)} files in {output}", markup=False)


@app.command()
def top(spec: SpecArg = DEFAULT_SPEC, state_dir: StateOpt = None,
        refresh: Annotated[float, typer.Option("--refresh", help="Seconds between refreshes.", min=0.1)] = 1.0) -> None:
    """A terminal UI for the running stack: instances with CPU% and memory (sorted by any
    column), the selected one's log, keys to restart, stop, start and scale, and the machine."""
    client = _client(spec, state_dir)
    if not sys.stdout.isatty():
        _fail("corral top needs a terminal; 'corral status' prints the same table", 2)
    client.status()  # no state at all: say so here, not inside the UI
    from corral.top import TopApp

    TopApp(client, refresh=refresh).run()


@app.command()
def events(spec: SpecArg = DEFAULT_SPEC, state_dir: StateOpt = None,
           follow: Annotated[bool, typer.Option("-f", "--follow", help="Keep printing new events.")] = False,
           lines: Annotated[int, typer.Option("-n", help="How many past events.")] = 100,
           as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False) -> None:
    """Print the event log (every transition, with time and reason)."""
    client = _client(spec, state_dir)
    show = _print_event_json if as_json else _print_event
    last = 0
    for e in client.last_events(lines):
        show(e)
        last = e.seq
    if not follow:
        return
    if last == 0:
        last = max((e.seq for e in client.last_events(1)), default=0)
    try:
        for e in client.follow_events(last):
            show(e)
    except KeyboardInterrupt:
        return


def _print_event_json(e: EventRow) -> None:
    # print, not rich: one line each, flushed, for jq and log shippers.
    print(json.dumps(e.to_dict()), flush=True)


def _print_event(e: EventRow) -> None:
    when = time.strftime("%H:%M:%S", time.localtime(e.at)) + f".{int(e.at * 1000) % 1000:03d}"
    who = e.instance or e.deployment
    change = f"{e.old or '':>10} -> {e.new:<10}" if e.new else " " * 24
    times = f" (x{e.repeats})" if e.repeats > 1 else ""
    out.print(_printable(f"{when} {who:<16} {change} {e.reason}{times}"), markup=False)


@app.command()
def logs(service: Annotated[str, typer.Argument(help="Service name.")], spec: SpecArg = DEFAULT_SPEC,
         state_dir: StateOpt = None,
         follow: Annotated[bool, typer.Option("-f", "--follow", help="Keep printing new output.")] = False,
         lines: Annotated[int, typer.Option("-n", help="Lines from the end of each instance's log.")] = 50) -> None:
    """Print the output of a service's instances."""
    client = _client(spec, state_dir)
    prefix = len(client.log_files(service)) > 1
    for iid, line in client.logs(service, lines):
        _print_log(iid, line, prefix)
    if follow:
        try:
            for iid, line in client.follow_logs(service):
                _print_log(iid, line, prefix)
        except KeyboardInterrupt:
            return


def _print_log(iid: str, line: str, prefix: bool) -> None:
    sys.stdout.write(f"{iid} | {line}\n" if prefix else f"{line}\n")
    sys.stdout.flush()


@app.command()
def restart(service: Annotated[str, typer.Argument(help="Service name.")], spec: SpecArg = DEFAULT_SPEC,
            state_dir: StateOpt = None) -> None:
    """Restart a service's replicas one after the other (needs the agent)."""
    _ask(spec, state_dir, lambda agent: agent.restart(service))
    out.print(f"{service}: restarted", markup=False)


T = TypeVar("T")


def _ask(spec: Path, state_dir: Path | None, call: Callable[[AgentClient], T]) -> T:
    """What needs the agent: ``call`` on its client, or exit 1 saying none runs."""
    sd = _state_dir(spec, state_dir)
    try:
        return call(AgentClient(sd))
    except AgentUnavailable:
        _fail(f"no agent running for {sd}; 'corral up' first", 1)


@app.command()
def scale(service: Annotated[str, typer.Argument(help="Service name.")],
          replicas: Annotated[int, typer.Argument(help="How many instances.", min=0)],
          spec: SpecArg = DEFAULT_SPEC, state_dir: StateOpt = None) -> None:
    """Run N instances of a service: new ones are placed, started and put behind the front
    (exit 2, nothing changed, when they do not fit); the highest-numbered go first down."""
    _ask(spec, state_dir, lambda agent: agent.scale(service, replicas))
    out.print(f"{service}: {replicas} instances", markup=False)


@app.command()
def stop(services: Annotated[list[str], typer.Argument(help="Service names.")], spec: SpecFileOpt = DEFAULT_SPEC,
         state_dir: StateOpt = None) -> None:
    """Stop services by their shutdown rule, keeping them in the stack (start brings them back)."""
    dependents = _ask(spec, state_dir, lambda agent: agent.stop_services(services))
    for name, deps in dependents.items():
        out.print(f"{name}: stopped", markup=False)
        if deps:
            err.print(f"warning: {', '.join(deps)} depend on {name} and keep running", markup=False)


@app.command()
def start(services: Annotated[list[str], typer.Argument(help="Service names.")], spec: SpecFileOpt = DEFAULT_SPEC,
          state_dir: StateOpt = None) -> None:
    """Start stopped services again and wait until they meet their condition."""
    _ask(spec, state_dir, lambda agent: agent.start_services(services))
    for name in services:
        out.print(f"{name}: started", markup=False)


def main() -> None:
    """Entry point: errors are one line (``CORRAL_DEBUG=1`` shows the traceback of a bug)."""
    try:
        app()
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except SpecError as e:
        for one in e.all:
            _error(one)
        raise SystemExit(e.exit_code) from None
    except CorralError as e:
        if os.environ.get("CORRAL_DEBUG"):
            raise
        _error(e)
        raise SystemExit(e.exit_code) from None
    except OSError as e:
        if os.environ.get("CORRAL_DEBUG"):
            raise
        _error(e)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
