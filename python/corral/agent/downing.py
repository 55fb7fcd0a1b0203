"""StackDown: how ``corral down`` stops a stack, whatever moment it arrives at.

A part of the agent client, handed what it asks through (:class:`StackAccess`: the agent's
socket, the keeper's record, the store); it touches nothing else, and it knows the client
only by that shape (no import back).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from corral._core import process_alive, process_start_time
from corral.exceptions import AgentUnavailable, CorralError
from corral.leftovers import stop_leftovers

if TYPE_CHECKING:
    from corral.spec import DeploymentSpec
    from corral.state import DeploymentRow

__all__ = ["StackAccess", "StackDown"]

log = logging.getLogger("corral")


class StackAccess(Protocol):
    """What a down may use of the client (:class:`~corral.agent.client.AgentClient` is one)."""

    state_dir: Path
    path: Path

    @property
    def db(self) -> Path: ...

    @property
    def guest(self) -> bool: ...

    def request(self, method: str, target: str, timeout: float = 30.0, body: Any = None) -> Any: ...

    def guest_unavailable(self) -> AgentUnavailable: ...

    def keeper(self) -> dict[str, object] | None: ...

    def running(self) -> DeploymentRow | None: ...

    def applied_spec(self) -> tuple[DeploymentSpec, str] | None: ...


class StackDown:
    """One ``down`` of the stack the client names."""

    def __init__(self, client: StackAccess) -> None:
        self.client = client
        self.unmounted: list[str] = []
        """What became of the volumes a dead agent left mounted."""

    def run(self, waiting: Callable[[str], None] | None = None) -> int | None:
        """See :meth:`AgentClient.down`."""
        from corral.statesafe import StateLock

        if not self.client.state_dir.is_dir():
            return 0  # nothing ever ran here
        if self.client.guest:
            self._as_guest()
            return None
        # A starting up -d holds the lock until its agent reported: wait for it, then stop
        # what it started (never report a stack down that is about to run).
        with contextlib.ExitStack() as held:
            lock = StateLock(self.client.state_dir)
            lock.acquire(waiting=waiting)
            held.callback(lock.release)
            return self._all()

    def _as_guest(self) -> None:
        """A down asked by someone else than the owner (the agent checks the role): through
        the agent alone, which stops its stack and exits, and its keeper with it."""
        try:
            st = self.client.request("GET", "/v1/status", timeout=5)
        except AgentUnavailable:
            raise self.client.guest_unavailable() from None
        pid = st.get("agent_pid") if isinstance(st, dict) else None
        start = process_start_time(pid) if isinstance(pid, int) else None
        self.client.request("POST", "/v1/down", timeout=600)
        deadline = time.monotonic() + 15
        while isinstance(pid, int) and start and _alive(pid, start) and time.monotonic() < deadline:
            time.sleep(0.01)

    def _all(self) -> int | None:
        from corral.leftovers import sweep_stack
        from corral.volumes import unmount_all

        keeper = self._hold_keeper()
        try:
            n, agent = self._by_agent_or_leftovers(keeper)
        except AgentUnavailable:
            if keeper is not None:
                _signal(keeper, signal.SIGUSR2)  # left alone: the keeper goes on as before
            raise
        deadline = time.monotonic() + 15
        while agent and _alive(*agent) and time.monotonic() < deadline:
            time.sleep(0.01)
        sweep_stack(self.client.state_dir)
        # A dead agent's volumes stay mounted (a live one unmounts its own): nothing runs on
        # them any more.
        self.unmounted = unmount_all(self.client.state_dir)
        if keeper is not None:
            while _alive(*keeper) and time.monotonic() < deadline:
                time.sleep(0.01)
        return n

    def _by_agent_or_leftovers(self, keeper: tuple[int, int] | None) -> tuple[int | None, tuple[int, int] | None]:
        """Down by the agent (None), or of what a dead one left (how many groups); with the
        agent to wait for, if one may still run."""
        # The agent first: a running stack must be stoppable whatever state.db looks like.
        # A quick question before the long one: a stopped agent accepts connections (the
        # kernel queues them) but would leave down waiting for ten minutes.
        deadline = time.monotonic() + 15
        listened = False
        while True:
            try:
                st = self.client.request("GET", "/v1/status", timeout=5)
            except AgentUnavailable:
                agent = self._agent_pid(keeper)
                if agent is None or not _alive(*agent):
                    break
                if time.monotonic() >= deadline:
                    raise
                if self._listening():
                    # Listening and not answering: alive but stopped or stuck, and its stack
                    # is left alone. Unless it only began to listen since the question (a
                    # new agent of the keeper's opened its socket just now): ask it again.
                    if listened:
                        raise
                    listened = True
                    continue
                time.sleep(0.05)  # starting (not listening yet): it answers soon, or dies
                continue
            pid = st.get("agent_pid") if isinstance(st, dict) else None
            start = process_start_time(pid) if isinstance(pid, int) else None
            try:
                self.client.request("POST", "/v1/down", timeout=600)
            except AgentUnavailable:
                # It answered, then went away before the down (an adoption of a stack that
                # had not come up ends so): look again, it may have left instances.
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)
                continue
            return None, (pid, start) if isinstance(pid, int) and start else None
        n = stop_leftovers(self.client.db, grace=5.0, mark_down="stopped by 'corral down' without an agent",
                           rules=self._shutdown_rules())
        self._forget_claims()
        return n, None

    def _listening(self) -> bool:
        """Whether something accepts connections on the agent's socket."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            try:
                sock.connect(str(self.client.path))
            except OSError:
                return False
        return True

    def _hold_keeper(self) -> tuple[int, int] | None:
        """Tells the live keeper (SIGUSR1) to restart no agent, and waits (up to 5 s) for its
        answer in ``keeper.json``; returns its ``(pid, start)``, or None without a keeper."""
        doc = self.client.keeper()
        if doc is None:
            return None
        pid, start = int(str(doc["pid"])), int(str(doc["start"]))
        if not _signal((pid, start), signal.SIGUSR1):
            return None
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _alive(pid, start):
            doc = self.client.keeper()
            if doc is not None and doc.get("down") is True:
                break
            time.sleep(0.01)
        return pid, start

    def _agent_pid(self, keeper: tuple[int, int] | None) -> tuple[int, int] | None:
        """The agent that may still run: the one the store records when it runs, else the
        one the keeper started last (not in the store yet while it starts)."""
        row = self.client.running()
        if row is not None and row.agent_pid and row.agent_start:
            return row.agent_pid, row.agent_start
        doc = self.client.keeper() if keeper is not None else None
        apid = doc.get("agent_pid") if doc is not None else None
        if isinstance(apid, int) and process_alive(apid):
            start = process_start_time(apid)
            return (apid, start) if start else None
        return None

    def _forget_claims(self) -> None:
        """What the stack held on the machine goes back, now that nothing of it runs; a
        ledger that cannot be written does not stop a down."""
        from corral.machine import Machine
        from corral.statedir import stack_id

        try:
            Machine().forget(stack_id(self.client.state_dir))
        except CorralError as e:
            log.warning("corral: %s", e)

    def _shutdown_rules(self) -> dict[str, tuple[int, float, bool]]:
        """Each service's shutdown signal and timeout, from the running spec in the store (so
        a stop without an agent follows the spec as the agent's own down does)."""
        try:
            found = self.client.applied_spec()
        except (CorralError, OSError):
            return {}
        if found is None:
            return {}
        return {name: (getattr(signal, svc.shutdown.signal), svc.shutdown.timeout, svc.shutdown.kill_mode == "main")
                for name, svc in found[0].services.items()}




def _alive(pid: int, start: int) -> bool:
    """Whether the process with that pid and start time runs (a zombie does not)."""
    return process_start_time(pid) == start and process_alive(pid)


def _signal(proc: tuple[int, int], sig: int) -> bool:
    """Sends ``sig`` to that process if it is still the one (pid and start time)."""
    if not _alive(*proc):
        return False
    try:
        os.kill(proc[0], sig)
    except OSError:
        return False
    return True
