"""``corral down SERVICE...``: services taken out of a running stack (see
:mod:`corral.spec.select`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import typer

from corral.agent.client import AgentClient
from corral.cli.common import fail, out

__all__ = ["down_some"]


def down_some(client: AgentClient, services: list[str], volumes: bool, apply: Callable[[AgentClient, Path, str], int],
              down_all: Callable[[Path], None]) -> None:
    """``down SERVICE...``: the running spec without them, applied (their instances
    stopped, their claims returned); refused while a service left running depends on one."""
    from corral.exceptions import UnknownService
    from corral.spec.select import select
    from corral.volumes import image_of

    if client.running() is None and not client.available():
        fail(f"no agent runs for {client.state_dir}: nothing to take out (corral down stops what a dead one left)", 1)
    found = client.applied_spec()
    if found is None:
        fail("the store records no running spec", 1)
    running, file = found
    for name in services:
        if name not in running.services:
            raise UnknownService(f"{name!r} does not run here (running: {', '.join(running.services)})", name)
    left = [n for n in running.services if n not in services]
    needing = {n: [d for d in running.services[n].depends_on if d in services] for n in left}
    blocked = [f"{n} depends on {', '.join(d)}" for n, d in needing.items() if d]
    if blocked:
        fail(f"{'; '.join(blocked)}: name it too, or use 'corral stop' (which keeps it in the stack)", 2)
    if not left:
        down_all(Path(file))
        return
    code = apply(client, Path(file), select(running, left, file=file).text)
    if code:
        raise typer.Exit(code)
    if volumes:
        for name in services:
            image = image_of(client.state_dir, name)
            if image.exists():
                image.unlink()
                out.print(f"removed {image}", markup=False)
