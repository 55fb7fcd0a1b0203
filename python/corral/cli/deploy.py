"""Commands that deploy: ``validate``, ``plan``, ``up`` (foreground, ``-d``, or an apply to a
running stack), ``down``, and the hidden ``agent`` that ``up -d`` and the keeper start."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from corral.agent.client import AgentClient
from corral.cli.common import (
    DEFAULT_SPEC,
    SpecArg,
    SpecFileOpt0,
    StateOpt,
    app,
    client_of,
    deployment_of,
    error,
    fail,
    out,
    print_event,
    printable,
    spec_and_services,
    spec_errors,
    spec_warnings,
    state_dir_of,
    status_table,
)
from corral.exceptions import AgentAlreadyRunning, AgentUnavailable, CorralError, SpecError

if TYPE_CHECKING:
    from rich.console import Group

    from corral.engine import Deployment
    from corral.lifecycle import Transition
    from corral.spec import DeploymentSpec
    from corral.statesafe import StateLock



def _adopting(spec: Path, state_dir: Path | None) -> tuple[DeploymentSpec, str, Path, Path | None]:
    """What a dead agent ran: the last spec version applied (the client reads it from the
    state directory; the file may have changed since) and its file, the state directory, and
    the keeper's socket of ``up -d`` (None without one), which takes the output."""
    from corral.statedir import KEEPER_SOCKET

    client = client_of(spec, state_dir)
    try:
        found = client.applied_spec()
    except SpecError as e:
        spec_errors(e)
    if found is None:
        fail(f"nothing to adopt in {client.state_dir}", 2)
    keeper = client.state_dir / KEEPER_SOCKET
    return found[0], found[1], client.state_dir, keeper if keeper.exists() else None


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
        spec_errors(e)
    spec_warnings(s)
    instances = sum(svc.replicas for svc in s.services.values())
    out.print(f"{spec}: ok ({len(s.services)} services, {instances} instances)", markup=False)


@app.command()
def plan(spec: SpecArg = DEFAULT_SPEC, state_dir: StateOpt = None,
         as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
         show_map: Annotated[bool, typer.Option("--map", help="Draw the machine: where the plan puts every "
                                                              "exclusive core.")] = False) -> None:
    """Show the phases and where every instance would go, without starting anything; with a
    stack running, what 'corral up' would change in it (a diff, nothing changed)."""
    client = client_of(spec, state_dir)
    res = None
    if not show_map and (client.path.exists() or client.running() is not None):
        try:
            res = client.plan_changes(spec)
        except AgentUnavailable:
            if client.running() is not None:
                raise  # it runs but does not answer: no plan against it, and none without
    if res is not None:
        # Plain print: rich is not worth its import for lines of text (plan is a hot command).
        print(json.dumps(res["diff"], indent=2) if as_json else "\n".join(printable(x) for x in res["lines"]))
        return
    from rich.table import Table
    from rich.text import Text

    d = deployment_of(spec, state_dir)
    try:
        p = d.make_plan(dry=True)
    except SpecError as e:
        spec_errors(e)
    try:
        if show_map:
            from corral.cpumap import machine_map, others_cpus

            holders = {**others_cpus(d.machine.view(), d.claims.holder.stack),
                       **{cpu: inst.id for inst in p.instances() for cpu in inst.cpus}}
            for line in machine_map(d.topology, holders, set(d.resources.usage().cpus)):
                out.print(printable(line), markup=False)
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
def up(args: Annotated[list[str] | None, typer.Argument(help="[SPEC] [SERVICE...]: start only these services "
                                                              "and what they depend on.", show_default=False)] = None,
       spec_file: SpecFileOpt0 = None, state_dir: StateOpt = None,
       profile: Annotated[list[str] | None, typer.Option("--profile", help="Also start the services of this profile "
                                                                           "(repeatable; or CORRAL_PROFILES).")] = None,
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
    spec, services = spec_and_services(args, spec_file)
    profiles = profile or [p for p in os.environ.get("CORRAL_PROFILES", "").split(",") if p]
    seconds = None
    if run_for is not None:
        from corral.units import parse_duration

        try:
            seconds = parse_duration(run_for)
        except ValueError as e:
            fail(f"--run-for: {e}", 2)
    sd = state_dir_of(spec, state_dir)
    client = AgentClient(sd)
    if not detach or client.guest:
        # A guest (not the stack's owner) can only ask the running agent to apply.
        _up(client, spec, sd, detach, seconds, timeout, metrics, choice=(services, profiles))
        return
    # From its first step until its agent reported, up -d holds the stack's lock: a down
    # waits for it (then stops what came up), and a second up finds the first one's agent
    # (and applies to it) instead of racing it for the keeper's socket.
    from corral.statesafe import LOCK_FILE, StateLock, secure_state_dir

    fresh = not sd.exists()
    lock = StateLock(secure_state_dir(sd))
    lock.acquire(waiting=lambda who: error(f"waiting for {who}, which is starting or stopping this stack"))
    try:
        _up(client, spec, sd, True, seconds, timeout, metrics, lock, choice=(services, profiles))
    finally:
        lock.release()
        if fresh and [p.name for p in sd.iterdir()] == [LOCK_FILE]:
            # Refused before anything started: the state directory it made goes again.
            (sd / LOCK_FILE).unlink()
            sd.rmdir()


def _up(client: AgentClient, spec: Path, sd: Path, detach: bool, seconds: float | None, timeout: float,
        metrics: str | None, lock: StateLock | None = None,
        choice: tuple[list[str], list[str]] = ([], [])) -> None:
    run_for = seconds
    # By pid and start time, not by the socket alone: a stopped (SIGSTOP) agent does not
    # answer, and starting a second one beside it would start the stack twice.
    agent = client.running()
    if agent is None and client.keeper_restarting():
        agent = client.wait_running(5.0)  # the keeper restarts a dead agent: that one applies
    if agent is not None or client.available():
        if run_for is not None:
            fail("--run-for starts a new stack; one runs already (apply without it, or 'corral down' first)", 2)
        try:
            client.request("GET", "/v1/status", timeout=5)
        except AgentUnavailable:
            who = f" (pid {agent.agent_pid})" if agent is not None else ""
            raise AgentAlreadyRunning(f"a corral agent runs for {sd}{who} but does not answer; nothing was "
                                      f"applied", agent.agent_pid if agent is not None else None) from None
        if lock is not None:
            lock.release()  # an apply goes through the agent, which a down reaches any time
        raise typer.Exit(_apply(client, spec, _to_apply(client, spec, *choice)))
    from corral.spec import load_spec
    from corral.spec.select import select

    try:
        parsed = select(load_spec(spec), *choice, file=str(spec))
        if metrics is not None:
            from corral.spec import MetricsSpec

            token = parsed.metrics.token_file if parsed.metrics is not None else None
            try:
                parsed = parsed.model_copy(update={"metrics": MetricsSpec(listen=metrics, token_file=token)})
            except ValueError as e:
                fail(f"--metrics: {e.errors()[0]['msg'] if hasattr(e, 'errors') else e}", 2)
            if token is None and not metrics.startswith(("127.", "localhost:", "[::1]:")):
                fail(f"--metrics: {metrics} can be reached from other hosts: name a metrics.token_file in the "
                     f"spec (every scrape must present its bearer token), or listen on 127.0.0.1", 2)
    except SpecError as e:
        spec_errors(e)
    spec_warnings(parsed)
    if detach:
        from corral.agent.daemon import start_detached

        recorded = _left_by_a_dead_agent(client, parsed)
        if recorded is not None:
            # A dead agent's instances run on, from an older spec: a new agent re-adopts them
            # as they are, then the changed spec is applied to them as a rollout (not a
            # restart of everything).
            st = start_detached(spec, recorded, sd, timeout)
            out.print(f"{st.name}: re-adopted what a dead agent left (agent pid {st.agent_pid}); applying "
                      f"{spec.name} to it", markup=False)
            if lock is not None:
                lock.release()
            raise typer.Exit(_apply(client, spec, parsed.text if parsed.text else None))
        st = start_detached(spec, parsed, sd, timeout)
        n = sum(len(v) for v in st.services.values())
        out.print(f"{st.name}: up ({n} instances, agent pid {st.agent_pid}); 'corral status' to look, "
                  f"'corral down' to stop", markup=False)
        raise typer.Exit(0)
    from corral.engine import Deployment

    d = Deployment(parsed, file=spec, state_dir=sd)
    raise typer.Exit(_up_foreground(d, seconds))


def _left_by_a_dead_agent(client: AgentClient, parsed: DeploymentSpec) -> DeploymentSpec | None:
    """The spec a dead agent last applied, when instances of it still run and ``parsed`` is
    another version of the same deployment; None otherwise."""
    from corral.engine.diff import spec_hash

    left = client.left_running()
    if left is None or left.name != parsed.name:
        return None
    try:
        found = client.applied_spec()
    except CorralError:
        return None
    if found is None or spec_hash(found[0]) == spec_hash(parsed):
        return None  # the same spec: the new agent re-adopts it by itself
    return found[0]


def _to_apply(client: AgentClient, spec: Path, services: list[str], profiles: list[str]) -> str | None:
    """What ``up`` applies to a running stack: the file's default services (or those named
    and what they need), and whatever runs now that the file still has (as compose leaves
    running what a narrower up does not name); None: the whole file."""
    from corral.spec import load_spec
    from corral.spec.select import chosen, select

    try:
        full = load_spec(spec)
        if not services and not any(s.profiles for s in full.services.values()):
            return None  # the whole file, as the agent reads it
        want = set(chosen(full, services, profiles))
        running: set[str] = set()
        if not client.guest:  # a guest may not read the store: what it names, and the defaults
            found = client.applied_spec()
            running = set(found[0].services) if found is not None else set()
        names = [n for n in full.services if n in want or n in running]
        picked = select(full, names, file=str(spec))
    except SpecError as e:
        spec_errors(e)
    return None if picked is full else picked.text


def _apply(client: AgentClient, spec: Path, text: str | None = None) -> int:
    """``up`` against a running stack: the agent applies the spec; on a terminal, its events
    print as the rollout goes. 0 when it is done, 1 when it failed (and was reverted)."""
    import threading

    from corral.exceptions import RolloutError

    result: dict[str, Any] = {}

    def call() -> None:
        try:
            result["ok"] = client.apply(spec, text=text)
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
                print_event(ev)
    failure = result.get("error")
    if isinstance(failure, RolloutError):
        error(failure)
        return 1
    if isinstance(failure, BaseException):
        raise failure
    res = result["ok"]
    for line in res["lines"]:
        out.print(printable(line), markup=False)
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
        spec_errors(e)
    if view is not None:
        view.final()
    if code != 0:
        error(f"{d.status().message or 'up failed'}; everything it started was stopped")
    else:
        out.print(f"{d.name}: down", markup=False)
    return code


async def _print_transitions(d: Deployment) -> None:
    async for t in d.watch():
        out.print(printable(_transition_line(t)), markup=False)


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
        return Group(self.progress, status_table(st.services.values()), self.note)

    async def run(self) -> None:
        import asyncio

        with self.live:
            while True:
                self.live.update(self.render())
                await asyncio.sleep(0.25)

    def final(self) -> None:
        out.print(status_table(self.d.status().services.values()))


@app.command(hidden=True)
def agent(spec: SpecArg = DEFAULT_SPEC, state_dir: StateOpt = None,
          adopt: Annotated[bool, typer.Option("--adopt", help="Take over what a dead agent left (the "
                                                             "running spec from state.db).")] = False) -> None:
    """Run the agent in this process (what `up -d`, and the keeper, start in the background)."""
    if adopt:
        parsed, file, sd, keeper = _adopting(spec, state_dir)
        from corral.engine import Deployment

        d = Deployment(parsed, file=file, state_dir=sd, keeper=keeper)
    else:
        d = deployment_of(spec, state_dir)
    from corral.agent.jsonlog import log_to

    log_to(d.state_dir / "agent.log", d.spec.logs.max_size, d.spec.logs.keep)

    import asyncio

    from corral.agent.server import run_agent

    async def main() -> int:
        return await run_agent(d, adopt=adopt)

    try:
        code = asyncio.run(main())
    except SpecError as e:
        spec_errors(e)
    except CorralError:
        raise
    except Exception as e:  # a bug: the keeper restarts an agent that ends so
        from corral.agent.keeper import CRASHED

        error(f"the agent failed: {type(e).__name__}: {e}")
        raise typer.Exit(CRASHED) from None
    raise typer.Exit(code)


_VOLUMES_HELP = ("Also remove the volume images of 'enforce: volume' services, and so their data (as docker "
                 "compose down --volumes); plain storage directories are kept.")


@app.command()
def down(args: Annotated[list[str] | None, typer.Argument(help="[SPEC] [SERVICE...]: take only these services out "
                                                                "of the running stack.", show_default=False)] = None,
         spec_file: SpecFileOpt0 = None, state_dir: StateOpt = None,
         volumes: Annotated[bool, typer.Option("--volumes", "-v", help=_VOLUMES_HELP)] = False) -> None:
    """Stop every service (reverse dependency order) and the agent; with services named,
    take only those out of the running stack."""
    from corral.units import format_bytes

    spec, services = spec_and_services(args, spec_file)
    client = client_of(spec, state_dir)
    if services:
        from corral.cli.part import down_some

        down_some(client, services, volumes, _apply, lambda f: down(None, f, client.state_dir, volumes))
        return
    images = client.volume_images() if volumes else []
    if volumes:
        # Said before anything is touched, as compose names the volumes it removes.
        out.print(f"will remove {len(images)} volume images after down" + (":" if images else ""), markup=False)
        for path, size, held in images:
            out.print(f"  {path.stem}: {path} ({format_bytes(size)}, {format_bytes(held)} on disk)", markup=False)
    n = client.down(
        waiting=lambda who: error(f"waiting for {who}, which is starting or stopping this stack"))
    if n is None:
        out.print("down")
    else:
        # No agent: what a dead agent left behind was stopped, by process group and start time.
        out.print(f"no agent running; stopped {n} leftover process groups" if n else "nothing running")
    if volumes:
        for path in client.remove_volumes():
            out.print(f"removed {path}", markup=False)

