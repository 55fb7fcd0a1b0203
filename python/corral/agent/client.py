"""AgentClient: the one way anything outside the agent talks to a deployment.

It asks the agent over its socket when one runs, and reads the state directory when none
does (status, events and logs answer either way; ``down`` without an agent stops what a dead
agent left). The CLI and discovery use nothing else. Errors come back typed: the agent sends
the exception's class and arguments, and the client raises the same class.

The agent counts as running when its recorded pid still has its recorded start time (a
recycled pid or a zombie does not count), not merely because its socket exists.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from corral._core import process_alive, process_start_time
from corral.access import Role
from corral.agent.logs import Cursor, follow_lines, lines_after, tail_and_cursor, tail_lines
from corral.agent.wire import from_wire
from corral.exceptions import AccessDenied, AgentUnavailable, ConfigError, CorralError, UnknownService
from corral.leftovers import live_agent
from corral.state import DeploymentRow, DeploymentStatus, EventRow, StateStore, default_state_dir

if TYPE_CHECKING:
    from corral.spec import DeploymentSpec

__all__ = ["AgentClient", "DeploymentStatus", "EventRow", "default_state_dir", "socket_path"]

log = logging.getLogger("corral")


def socket_path(state_dir: Path) -> Path:
    """Where the agent of a state directory listens."""
    return state_dir / "agent.sock"


def _exchange(path: Path, method: str, target: str, body: bytes, timeout: float) -> tuple[int, bytes]:
    """One HTTP/1.1 request over the agent's Unix socket, one response (the agent always
    answers with Content-Length and closes). Written out here rather than through
    http.client, whose import (email, ssl) cost every command ~30 ms."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        head = (f"{method} {target} HTTP/1.1\r\nHost: corral\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
        s.sendall(head.encode("ascii") + body)
        data = bytearray()
        while chunk := s.recv(65536):
            data += chunk
    head_end = data.find(b"\r\n\r\n")
    if head_end < 0 or not data.startswith(b"HTTP/1."):
        raise ValueError("the answer is not HTTP")
    lines = bytes(data[:head_end]).decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    payload = bytes(data[head_end + 4:])
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length" and len(payload) < int(value):
            raise ValueError(f"the answer was cut short ({len(payload)} of {int(value)} bytes)")
    return status, payload


class AgentClient:
    """The agent of a state directory (or the one at ``socket``)."""

    def __init__(self, state_dir: Path | None = None, *, socket: Path | None = None) -> None:
        if state_dir is not None:
            self.state_dir = state_dir
        elif socket is not None:
            self.state_dir = socket.parent
        else:
            raise ConfigError("AgentClient needs a state directory or a socket path")
        self.path = socket if socket is not None else socket_path(self.state_dir)

    @property
    def db(self) -> Path:
        """The state directory's SQLite file."""
        return self.state_dir / "state.db"

    # --- the wire ---------------------------------------------------------------------

    def request(self, method: str, target: str, timeout: float = 30.0, body: Any = None) -> Any:
        """A JSON request (``body``, when given, is sent as JSON). Raises
        :class:`AgentUnavailable` when no agent answers, and the agent's own error class when
        it answers with one."""
        data = b"" if body is None else json.dumps(body).encode()
        try:
            status, payload = _exchange(self.path, method, target, data, timeout)
            body = json.loads(payload or b"null")
        except PermissionError:
            raise self._no_entry(method, target) from None
        except (OSError, ValueError, IndexError) as e:
            raise AgentUnavailable(f"no agent at {self.path} ({e.__class__.__name__}: {e})") from None
        if status >= 400:
            err = body.get("error") if isinstance(body, dict) else body
            raise from_wire(err) if isinstance(err, dict) else CorralError(str(err))
        return body

    def _no_entry(self, method: str, target: str) -> AccessDenied:
        """The refusal of a caller the kernel keeps out (no ACL lets it reach the socket):
        the same words the agent uses, since nothing reached it to say them."""
        from corral.access import Caller, denied_message
        from corral.agent.wire import ROUTES

        op, needs = ROUTES.get((method, target.split("?")[0]), ("status", Role.viewer))
        me = Caller.of(os.getpid(), os.getuid(), os.getgid())
        return AccessDenied(denied_message(me.describe(), op, needs.name, f"in {self.state_dir}", "its corral.yaml")
                            + " (the kernel refused the connection: nothing reached the agent)",
                            me.user, me.uid, op, needs.name)

    @property
    def guest(self) -> bool:
        """Whether this process may not read the state directory (it is not the stack's
        owner): then everything goes through the agent, which checks its role."""
        return os.geteuid() != 0 and self.state_dir.exists() and not os.access(self.state_dir, os.R_OK | os.W_OK)

    def guest_unavailable(self) -> AgentUnavailable:
        """The error of a guest who finds no agent (it may not read the state itself)."""
        return AgentUnavailable(f"no agent answers for {self.state_dir}, and without one its state can be read by "
                                f"its owner only")

    def available(self) -> bool:
        """Whether an agent answers on the socket."""
        try:
            self.request("GET", "/v1/status", timeout=2.0)
            return True
        except AgentUnavailable:
            return False

    # --- what the state directory knows ------------------------------------------------

    def deployment(self) -> DeploymentRow | None:
        """The newest deployment recorded in the state directory."""
        rows = StateStore.read_deployments(self.db) if self.db.exists() else []
        return rows[-1] if rows else None

    def running(self) -> DeploymentRow | None:
        """The deployment whose agent runs now (pid and start time), if any (None for a
        guest, who cannot read the store: it asks the agent)."""
        return None if self.guest else live_agent(self.db)

    def left_running(self) -> DeploymentRow | None:
        """The deployment whose agent is gone while some of its instances still run (they
        can be re-adopted), or None."""
        row = None if self.guest else self.deployment()
        if row is None or row.status in ("down", "failed") or self.running() is not None:
            return None
        return row if any(r.is_running() for r in StateStore.read_instances(self.db, row.name)) else None

    def keeper(self) -> dict[str, object] | None:
        """What the keeper of ``up -d`` last recorded, when it still runs (pid and start)."""
        from corral.agent.keeper import read_keeper

        if self.guest:
            return None
        doc = read_keeper(self.state_dir)
        kpid = doc.get("pid") if doc else None
        if doc is None or not isinstance(kpid, int):
            return None
        return doc if process_start_time(kpid) == doc.get("start") and process_alive(kpid) else None

    def keeper_restarting(self) -> bool:
        """Whether a live keeper is bringing a dead agent back."""
        doc = self.keeper()
        return doc is not None and doc.get("agent") == "running"

    def wait_running(self, timeout: float) -> DeploymentRow | None:
        """The running agent, waiting up to ``timeout`` seconds for one to answer."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            row = self.running()
            if row is not None and self.available():
                return row
            time.sleep(0.05)
        return self.running()

    def _required(self) -> DeploymentRow:
        row = self.deployment()
        if row is None:
            raise AgentUnavailable(f"no deployment in {self.state_dir}")
        return row

    # --- what a user asks -------------------------------------------------------------

    def status(self) -> DeploymentStatus:
        """The deployment now: from the agent when it answers (front counters included; the
        store is not read, so a broken state.db does not hide a running stack), else as the
        store last recorded it."""
        if self.guest or self.path.exists():
            try:
                return DeploymentStatus.from_dict(self.request("GET", "/v1/status", timeout=5))
            except AgentUnavailable:
                if self.guest:
                    raise self.guest_unavailable() from None
        row = self._required()
        # An agent that does not answer (stopped, or busy) still runs: by pid and start time.
        return DeploymentStatus.from_rows(row, StateStore.read_instances(self.db, row.name),
                                          agent_running=self.running() is not None)

    def events(self, after: int = 0, limit: int = 1000) -> list[EventRow]:
        """Event log entries with a sequence number above ``after``, oldest first."""
        if self.guest:
            doc = self.request("GET", f"/v1/events?after={after}&limit={limit}")
            return [EventRow.from_dict(e) for e in doc["events"]]
        self._required()
        return StateStore.read_events(self.db, after, limit)

    def last_events(self, n: int) -> list[EventRow]:
        """The last ``n`` entries of the event log, oldest first."""
        if self.guest:
            rows: list[EventRow] = []
            while page := self.events(rows[-1].seq if rows else 0, 10000):
                rows = (rows + page)[-n:] if n > 0 else []
                if len(page) < 10000:
                    break
            return rows
        self._required()
        return list(StateStore.iter_tail(self.db, n))

    def follow_events(self, after: int, poll: float = 0.2) -> Iterator[EventRow]:
        """Entries as they are written, forever (stop iterating to stop)."""
        while True:
            page = self.events(after) if self.guest else StateStore.read_events(self.db, after)
            for e in page:
                after = e.seq
                yield e
            if not page:
                time.sleep(poll)

    def log_files(self, service: str) -> list[tuple[str, Path]]:
        """``(instance id, log file)`` of a service's instances; :class:`UnknownService` when
        the deployment has no such service."""
        row = self._required()
        insts = [i for i in StateStore.read_instances(self.db, row.name) if i.service == service]
        if not insts:
            known = sorted({s for phase in row.phases for s in phase})
            raise UnknownService(f"unknown service {service!r} (services: {', '.join(known)})", service)
        return [(i.id, Path(i.log) if i.log else self.state_dir / "logs" / f"{i.id}.log") for i in insts]

    def instances_of(self, service: str) -> list[str]:
        """The ids of a service's instances (from the agent for a guest)."""
        if self.guest:
            doc = self.request("GET", f"/v1/logs?service={quote(service)}&lines=0")
            return [str(i) for i in doc["instances"]]
        return [iid for iid, _ in self.log_files(service)]

    def logs(self, service: str, lines: int = 50) -> Iterator[tuple[str, str]]:
        """The last ``lines`` lines of each instance's log, instance by instance (through the
        agent for a guest, who may not read the files)."""
        if self.guest:
            doc = self.request("GET", f"/v1/logs?service={quote(service)}&lines={lines}")
            for iid, line in doc["lines"]:
                yield str(iid), str(line)
            return
        for iid, f in self.log_files(service):
            for line in tail_lines(f, lines):
                yield iid, line

    def follow_logs(self, service: str, lines: int = 0) -> Iterator[tuple[str, str]]:
        """The last ``lines`` lines of each instance's log, then new lines as they are
        written, forever (rotation followed; none lost in between). A guest (a viewer or
        operator under ``access:``) follows through the agent's API: the files are the owner's."""
        if self.guest:
            return self._follow_through_agent(service, lines)
        return follow_lines(self.log_files(service), last=lines)

    def instance_log(self, service: str, instance: str, lines: int = 200,
                     cursor: Cursor | None = None, path: Path | None = None) -> tuple[list[str], Cursor]:
        """One instance's log in steps, as ``top`` shows it: with no ``cursor``, its last
        ``lines`` lines and where they end; with one, the whole lines written after it (a
        rotated file starts over). Returns the lines and the cursor to pass next time. A
        guest reads through the agent; the owner reads the file (``path``, when the caller
        knows it, saves reading the store for it)."""
        if self.guest:
            target = f"/v1/logs?service={quote(service)}&instance={quote(instance)}"
            target += f"&lines={lines}" if cursor is None else f"&cursor={quote(json.dumps(cursor))}"
            doc = self.request("GET", target)
            got = {str(k): (int(v[0]), int(v[1])) for k, v in doc["cursor"].items()}
            return [str(line) for iid, line in doc["lines"] if iid == instance], got
        # The owner reads the file: the one given (from a status read already), else the store's.
        files = ([(instance, path)] if path is not None
                 else [(iid, f) for iid, f in self.log_files(service) if iid == instance])
        found = tail_and_cursor(files, lines) if cursor is None else lines_after(files, cursor)
        return [line for _, line in found[0]], found[1]

    def _follow_through_agent(self, service: str, lines: int, poll: float = 0.2) -> Iterator[tuple[str, str]]:
        doc = self.request("GET", f"/v1/logs?service={quote(service)}&lines={lines}")
        cursor = doc["cursor"]
        for iid, line in doc["lines"]:
            yield str(iid), str(line)
        while True:
            doc = self.request("GET", f"/v1/logs?service={quote(service)}&cursor={quote(json.dumps(cursor))}")
            cursor = doc["cursor"]
            for iid, line in doc["lines"]:
                yield str(iid), str(line)
            if not doc["lines"]:
                time.sleep(poll)

    def audit(self) -> Iterator[dict[str, Any]]:
        """The audit trail's records, oldest first (the owner's and root's to read)."""
        from corral.audit import read_records

        self._owner_only("read the audit trail of")
        return read_records(self.state_dir)

    def verify_audit(self) -> tuple[int, Any]:
        """How many records of the audit trail hold, and the first place the chain breaks
        (a :class:`corral.audit.Broken`, or None when it is whole)."""
        from corral.audit import verify

        self._owner_only("verify the audit trail of")
        return verify(self.state_dir)

    def _owner_only(self, what: str, op: str = "audit") -> None:
        if self.guest:
            from corral.access import Caller

            me = Caller.of(os.getpid(), os.getuid(), os.getgid())
            raise AccessDenied(f"{me.describe()} may not {what} the stack in {self.state_dir}: only its owner and root "
                               f"may", me.user, me.uid, op, "owner")

    def restart(self, service: str) -> None:
        """A rolling restart (needs the agent)."""
        self.request("POST", f"/v1/restart?service={quote(service)}", timeout=600)

    def run(self, service: str) -> str:
        """Runs a scheduled (or one-shot) service now; the id of the instance that runs."""
        res = self.request("POST", f"/v1/run?service={quote(service)}", timeout=600)
        return str(res["instance"])

    def signal(self, service: str, name: str | None = None) -> list[str]:
        """Signal ``name`` (None: a reload, its ``reload_signal``) to each live instance's main
        process; the instances signalled."""
        path = f"/v1/kill?service={quote(service)}&signal={quote(name)}" if name else \
            f"/v1/reload?service={quote(service)}"
        return [str(i) for i in self.request("POST", path)["instances"]]

    def scale(self, service: str, replicas: int) -> None:
        """Runs ``replicas`` instances of ``service`` (needs the agent)."""
        self.request("POST", f"/v1/scale?service={quote(service)}&replicas={replicas}", timeout=600)

    def stop_services(self, services: list[str]) -> dict[str, list[str]]:
        """Stops these services, keeping them in the stack; returns each one's dependents,
        which keep running."""
        query = "&".join(f"service={quote(s)}" for s in services)
        res = self.request("POST", f"/v1/stop?{query}", timeout=600)
        return dict(res.get("dependents", {}))

    def start_services(self, services: list[str]) -> None:
        """Starts these (stopped) services again."""
        query = "&".join(f"service={quote(s)}" for s in services)
        self.request("POST", f"/v1/start?{query}", timeout=600)

    def plan_changes(self, spec: Path) -> dict[str, Any]:
        """What applying ``spec`` to the running stack would do: ``{"diff": ..., "lines": [...]}``
        (the agent reads and checks the file; a bad one raises its SpecError)."""
        res: dict[str, Any] = self.request("POST", "/v1/plan", timeout=60, body=_spec_body(spec))
        return res

    def apply(self, spec: Path, timeout: float = 24 * 3600.0, text: str | None = None) -> dict[str, Any]:
        """Applies ``spec`` to the running stack and returns once the rollout has finished:
        ``{"ok": true, "diff": ..., "lines": [...], "version": N}``. Raises the SpecError of a
        bad spec (nothing changed) or the RolloutError of a rollout that failed. ``text``:
        the spec to apply when it is not the file's (part of it, :mod:`corral.spec.select`)."""
        body = _spec_body(spec) if text is None else {"file": str(spec.resolve()), "text": text}
        res: dict[str, Any] = self.request("POST", "/v1/apply", timeout=timeout, body=body)
        return res

    def down(self, waiting: Callable[[str], None] | None = None) -> int | None:
        """Stops the deployment, whatever moment it arrives at (the agent starting, dying,
        being restarted by the keeper, re-adopting), and returns only once the keeper, the
        agent and every instance are gone:

        1. the keeper is told to restart no agent (and answers with any agent it started);
        2. a live agent is asked to go down (one still starting is waited for, up to 15 s);
           without one, what a dead agent left is stopped (SIGTERM, its service's timeout,
           SIGKILL, by process group) and its claims on the machine go back;
        3. whatever still carries the stack's marker is killed, and the agent and the
           keeper are waited for.

        First of all it takes the state directory's lock, which a starting ``up -d`` holds
        until its agent reported (``waiting`` hears who holds it, when someone does).

        Returns None when an agent took it down, else how many process groups were stopped.
        Raises :class:`AgentUnavailable` when the agent runs but does not answer: then the
        stack is left alone, and the keeper restarts agents again."""
        from corral.agent.downing import StackDown

        return StackDown(self).run(waiting)

    def volume_images(self) -> list[tuple[Path, int, int]]:
        """The stack's volume images (``enforce: volume``): each with its size and the bytes
        it takes on disk. :class:`AccessDenied` for anyone but the owner: they are files of
        the state directory."""
        from corral.volumes import images

        self._owner_only("remove the volume images of", "down --volumes")
        return [(p, st.st_size, st.st_blocks * 512) for p in images(self.state_dir) for st in [p.stat()]]

    def remove_volumes(self) -> list[Path]:
        """Removes the stack's volume images once nothing mounts them (after :meth:`down`);
        returns what it removed. An image still mounted is left, and named in
        :class:`~corral.exceptions.CorralError`."""
        from corral.volumes import images, mounts_of

        busy = {image for _, image in mounts_of(self.state_dir)}
        removed, kept = [], []
        for image in images(self.state_dir):
            if image.resolve() in busy:
                kept.append(image)
                continue
            image.unlink()
            removed.append(image)
        if kept:
            raise CorralError(f"still mounted, not removed: {', '.join(map(str, kept))}")
        return removed

    def applied_spec(self) -> tuple[DeploymentSpec, str] | None:
        """The spec the stack last applied and its file: the text the store keeps (the file
        may have changed since), else the file itself; None when the store records no
        deployment. Raises :class:`~corral.exceptions.SpecError` when it does not parse."""
        from corral.spec import load_spec, parse_spec

        row = self.deployment()
        if row is None:
            return None
        running = StateStore.running_spec(self.db, row)
        if running is not None and running.text:
            return parse_spec(running.text, row.spec), row.spec
        return load_spec(row.spec), row.spec

def _spec_body(spec: Path) -> dict[str, str]:
    """A spec file as a plan or apply request carries it: its absolute path and its text."""
    try:
        text = spec.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read {spec}: {e.strerror or e}") from None
    return {"file": str(spec.resolve()), "text": text}
