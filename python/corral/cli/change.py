"""Commands that change a running stack through its agent: ``restart``, ``scale``, ``stop``,
``start``, ``run``, ``kill`` and ``reload``."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from corral.agent.client import AgentClient
from corral.cli.common import (
    DEFAULT_SPEC,
    SpecArg,
    SpecFileOpt,
    StateOpt,
    app,
    client_of,
    err,
    fail,
    out,
    printable,
    state_dir_of,
)
from corral.exceptions import AgentUnavailable, ConfigError

if TYPE_CHECKING:

    pass



@app.command()
def restart(service: Annotated[str, typer.Argument(help="Service name.")], spec: SpecArg = DEFAULT_SPEC,
            state_dir: StateOpt = None) -> None:
    """Restart a service's replicas one after the other (needs the agent)."""
    ask(spec, state_dir, lambda agent: agent.restart(service))
    out.print(f"{service}: restarted", markup=False)


@app.command()
def kill(service: Annotated[str, typer.Argument(help="Service name.")],
         sig: Annotated[str, typer.Option("-s", "--signal", help="SIGHUP, HUP, 1... (default SIGKILL).")] = "SIGKILL",
         spec: SpecArg = DEFAULT_SPEC, state_dir: StateOpt = None) -> None:
    """Send a signal to the main process of each of the service's instances, as
    ``docker compose kill -s`` (audited; what follows is the restart policy's)."""
    from corral.engine.operate import parse_signal

    try:
        parse_signal(sig)
    except ConfigError as e:
        fail(str(e), 2)
    done = ask(spec, state_dir, lambda agent: agent.signal(service, sig))
    out.print(f"{service}: {sig} sent to {', '.join(done) or 'no running instance'}", markup=False)


@app.command()
def reload(service: Annotated[str, typer.Argument(help="Service name.")], spec: SpecArg = DEFAULT_SPEC,
           state_dir: StateOpt = None) -> None:
    """Send the service's reload_signal (default SIGHUP) to each instance's main process, as
    ``systemctl reload`` (audited)."""
    done = ask(spec, state_dir, lambda agent: agent.signal(service))
    out.print(f"{service}: reloaded {', '.join(done) or 'no running instance'}", markup=False)


@app.command()
def run(service: Annotated[str, typer.Argument(help="Service name.")], spec: SpecFileOpt = DEFAULT_SPEC,
        state_dir: StateOpt = None,
        wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait for the run to end and exit as it "
                                                                    "did (0, or 1 when it failed).")] = True) -> None:
    """Run a scheduled service now (by its concurrency rule), or a one-shot service again."""
    iid = ask(spec, state_dir, lambda agent: agent.run(service))
    out.print(f"{service}: running {iid}", markup=False)
    if not wait:
        return
    client = client_of(spec, state_dir)
    while True:
        row = next((i for i in client.status().services.get(service, []) if i.id == iid), None)
        if row is None or row.state in ("completed", "failed", "stopped"):
            break
        time.sleep(0.2)
    if row is None:
        fail(f"{iid} is no longer in the stack", 1)
    out.print(f"{iid}: {row.state}" + (f" ({printable(row.reason)})" if row.reason else ""), markup=False)
    raise typer.Exit(0 if row.state == "completed" and row.exit_code in (0, None) else 1)


T = TypeVar("T")


def ask(spec: Path, state_dir: Path | None, call: Callable[[AgentClient], T]) -> T:
    """What needs the agent: ``call`` on its client, or exit 1 saying none runs."""
    sd = state_dir_of(spec, state_dir)
    try:
        return call(AgentClient(sd))
    except AgentUnavailable:
        fail(f"no agent running for {sd}; 'corral up' first", 1)


@app.command()
def scale(service: Annotated[str, typer.Argument(help="Service name.")],
          replicas: Annotated[int, typer.Argument(help="How many instances.", min=0)],
          spec: SpecArg = DEFAULT_SPEC, state_dir: StateOpt = None) -> None:
    """Run N instances of a service: new ones are placed, started and put behind the front
    (exit 2, nothing changed, when they do not fit); the highest-numbered go first down."""
    ask(spec, state_dir, lambda agent: agent.scale(service, replicas))
    out.print(f"{service}: {replicas} instances", markup=False)


@app.command()
def stop(services: Annotated[list[str], typer.Argument(help="Service names.")], spec: SpecFileOpt = DEFAULT_SPEC,
         state_dir: StateOpt = None) -> None:
    """Stop services by their shutdown rule, keeping them in the stack (start brings them back)."""
    dependents = ask(spec, state_dir, lambda agent: agent.stop_services(services))
    for name, deps in dependents.items():
        out.print(f"{name}: stopped", markup=False)
        if deps:
            err.print(f"warning: {', '.join(deps)} depend on {name} and keep running", markup=False)


@app.command()
def start(services: Annotated[list[str], typer.Argument(help="Service names.")], spec: SpecFileOpt = DEFAULT_SPEC,
          state_dir: StateOpt = None) -> None:
    """Start stopped services again and wait until they meet their condition."""
    ask(spec, state_dir, lambda agent: agent.start_services(services))
    for name in services:
        out.print(f"{name}: started", markup=False)
