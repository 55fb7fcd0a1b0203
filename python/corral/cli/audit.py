"""``corral audit``: who did what to the stack, and whether the trail is whole."""

from __future__ import annotations

import calendar
import json
import time
from typing import Annotated, Any

import typer

from corral.cli.common import DEFAULT_SPEC, SpecArg, StateOpt, app, client_of, fail, out, printable
from corral.units import parse_duration


@app.command()
def audit(spec: SpecArg = DEFAULT_SPEC, state_dir: StateOpt = None,
          as_json: Annotated[bool, typer.Option("--json", help="One JSON record per line, as stored.")] = False,
          since: Annotated[str | None, typer.Option("--since", help="Only the last DURATION (10m, 2h, 7d).")] = None,
          user: Annotated[str | None, typer.Option("--user", help="Only this user's operations.")] = None,
          verify: Annotated[bool, typer.Option(
              "--verify", help="Check the hash chain: exit 1 naming the first edited, removed or reordered "
                               "record.")] = False) -> None:
    """Print the audit trail: every operation that changed the stack and every refused
    attempt, with the caller (uid, user, pid, command line) and the outcome."""
    client = client_of(spec, state_dir)
    if verify:
        count, broken = client.verify_audit()
        if broken is not None:
            fail(f"audit trail broken at {broken} ({count} records before it hold)", 1)
        out.print(f"audit trail whole: {count} records", markup=False)
        return
    cutoff = None
    if since is not None:
        try:
            cutoff = time.time() - parse_duration(since)
        except ValueError as e:
            fail(f"--since: {e}", 2)
    for rec in client.audit():
        if user is not None and rec.get("user") != user and str(rec.get("uid")) != user:
            continue
        if cutoff is not None and _when(rec) < cutoff:
            continue
        if as_json:
            print(json.dumps(rec, sort_keys=True), flush=True)
        else:
            out.print(printable(_line(rec)), markup=False)


def _when(rec: dict[str, Any]) -> float:
    try:
        return float(calendar.timegm(time.strptime(str(rec["time"])[:19], "%Y-%m-%dT%H:%M:%S")))
    except (KeyError, ValueError):
        return 0.0


def _line(rec: dict[str, Any]) -> str:
    args = " ".join(f"{k}={v}" for k, v in (rec.get("args") or {}).items())
    reason = f": {rec['reason']}" if rec.get("reason") else ""
    changed = f" changed={','.join(rec['changed'])}" if rec.get("changed") else ""
    cmd = " ".join(rec.get("cmdline") or [])
    return (f"{rec.get('time', '?')}  {rec.get('user', '?')} (uid {rec.get('uid', '?')}, pid {rec.get('pid', '?')})  "
            f"{rec.get('op', '?')}{' ' + args if args else ''}{changed}  {rec.get('outcome', '?')}{reason}  [{cmd}]")
