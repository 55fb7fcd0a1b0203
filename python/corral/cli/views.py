"""Commands that look: ``status``, ``events``, ``logs``, ``top``, and ``export``."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from corral.cli.common import (
    DEFAULT_SPEC,
    SpecArg,
    StateOpt,
    app,
    client_of,
    fail,
    out,
    print_event,
    printable,
    spec_errors,
    status_table,
)
from corral.exceptions import ConfigError, SpecError

if TYPE_CHECKING:

    from corral.agent.client import EventRow


# --- status, events, logs, restart -------------------------------------------------------


@app.command()
def status(spec: SpecArg = DEFAULT_SPEC, state_dir: StateOpt = None,
           as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
           show_map: Annotated[bool, typer.Option("--map", help="Draw the machine: which instance holds "
                                                                "each exclusive core.")] = False) -> None:
    """Show services and instances (answers from the state database, even without the agent)."""
    from rich.text import Text

    client = client_of(spec, state_dir)
    st = client.status()
    if as_json:
        print(json.dumps(st.to_dict(), indent=2))
        return
    if show_map:
        from corral._core import Topology
        from corral.cpumap import held_cpus, machine_map, others_cpus
        from corral.machine import Machine
        from corral.statedir import stack_id

        topology = Topology.detect()
        m = Machine()
        holders = {**others_cpus(m.view(), stack_id(client.state_dir)),
                   **held_cpus(i for insts in st.services.values() for i in insts)}
        for line in machine_map(topology, holders, set(m.resources(topology).usage().cpus)):
            out.print(printable(line), markup=False)
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
    out.print(status_table(st.services.values()))
    for name, f in st.fronts.items():
        ejected = [u["id"] for u in f.get("upstreams", []) if u.get("ejected")]
        out.print(Text.assemble("front ", (name, "bold"), f" {f['address']}: {len(f.get('upstreams', []))} "
                                f"upstreams, {f['active']} active, {f['connections']} connections, "
                                f"{f['errors']} errors, {f['refused']} refused"
                                + (f", {f['tls_refused']} refused at TLS" if f.get("tls_refused") else "")
                                + (f", ejected: {', '.join(ejected)}" if ejected else "")))
    for name, sc in st.schedules.items():
        nxt = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(sc["next"])) if sc.get("next") else "-"
        out.print(Text.assemble("schedule ", (name, "bold"), f": next run {nxt}; {sc.get('runs', 0)} runs, "
                                f"{sc.get('skipped', 0)} skipped, {sc.get('missed', 0)} missed while no agent ran"))
    for name, u in st.storage.items():
        pct = "" if u.percent is None else f" ({u.percent:.0f}%)"
        when = "" if u.measured_at is None else f", measured {max(0.0, time.time() - u.measured_at):.0f}s ago"
        out.print(Text.assemble("storage ", (name, "bold"), f" {u.path}: {u.text()}{pct}, "
                                f"{u.inodes if u.inodes is not None else '?'} inodes, enforce: {u.enforce}, "
                                f"on_full: {u.on_full}{when}"))


@app.command()
def export(engine: Annotated[str, typer.Argument(help="kubernetes or nomad.")], spec: SpecArg = DEFAULT_SPEC,
           output: Annotated[Path | None, typer.Option("-o", "--output",
                                                       help="Write one file per document into DIR.")] = None) -> None:
    """Print the spec as Kubernetes objects (multi-document YAML) or a Nomad job (JSON API
    shape); what the engine cannot carry is named in the export. Nothing starts."""
    from corral.export import ENGINES, render
    from corral.spec import load_spec

    if engine not in ENGINES:
        fail(f"unknown engine {engine!r} (engines: {', '.join(ENGINES)})", 2)
    try:
        docs = render(load_spec(spec, machine=False), spec.resolve().parent, engine)
    except SpecError as e:
        spec_errors(e)
    except ConfigError as e:
        fail(f"{spec}: {e}", 2)
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
    client = client_of(spec, state_dir)
    if not sys.stdout.isatty():
        fail("corral top needs a terminal; 'corral status' prints the same table", 2)
    client.status()  # no state at all: say so here, not inside the UI
    from corral.top import TopApp

    TopApp(client, refresh=refresh).run()


@app.command()
def events(spec: SpecArg = DEFAULT_SPEC, state_dir: StateOpt = None,
           follow: Annotated[bool, typer.Option("-f", "--follow", help="Keep printing new events.")] = False,
           lines: Annotated[int, typer.Option("-n", help="How many past events.")] = 100,
           as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False) -> None:
    """Print the event log (every transition, with time and reason)."""
    client = client_of(spec, state_dir)
    show = _print_event_json if as_json else print_event
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


@app.command()
def logs(service: Annotated[str, typer.Argument(help="Service name.")], spec: SpecArg = DEFAULT_SPEC,
         state_dir: StateOpt = None,
         follow: Annotated[bool, typer.Option("-f", "--follow", help="Keep printing new output.")] = False,
         lines: Annotated[int, typer.Option("-n", help="Lines from the end of each instance's log.")] = 50,
         raw: Annotated[bool, typer.Option("--raw", help="Control characters as the service wrote them, even "
                                                         "to a terminal.")] = False,
         escape: Annotated[bool, typer.Option("--escape", help="Control characters as visible escapes (\\x1b), "
                                                               "even to a pipe.")] = False) -> None:
    """Print the output of a service's instances. To a terminal, escape sequences and other
    control characters a service printed are shown as visible escapes (\\x1b), never acted
    on; to a pipe they are kept as they are."""
    if raw and escape:
        fail("--raw and --escape contradict each other", 2)
    safe = escape or (not raw and sys.stdout.isatty())
    client = client_of(spec, state_dir)
    prefix = len(client.instances_of(service)) > 1
    if not follow:
        for iid, line in client.logs(service, lines):
            _print_log(iid, line, prefix, safe)
        return
    try:
        # The tail and what follows it from one position: no line lost or repeated between.
        for iid, line in client.follow_logs(service, lines):
            _print_log(iid, line, prefix, safe)
    except KeyboardInterrupt:
        return


def _print_log(iid: str, line: str, prefix: bool, safe: bool) -> None:
    if safe:
        line = printable(line)
    sys.stdout.write(f"{iid} | {line}\n" if prefix else f"{line}\n")
    sys.stdout.flush()
