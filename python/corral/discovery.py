"""Discovery from any process on the machine: a service's instances and a client-side
balancer over them, kept current by a long poll on the agent's control socket.

::

    svc = corral.discover("api")            # finds the agent: see :func:`agent_socket`
    with svc.balancer.connection() as addr:  # "127.0.0.1:20001", least busy healthy instance
        ...
    svc.front                               # the service's front address, when it is exposed
    svc.close()                             # stops following changes
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import corral._core as _core
from corral.agent.client import AgentClient
from corral.engine.environment import AGENT_SOCKET, STATE_DIR
from corral.exceptions import CorralError

if TYPE_CHECKING:
    from corral._core import _Strategy

__all__ = ["Discovered", "agent_socket", "discover"]


def agent_socket(state_dir: str | Path | None = None) -> Path:
    """Where the agent listens: ``state_dir/agent.sock``, else ``$CORRAL_AGENT_SOCKET`` (set
    for every instance corral starts), else ``$CORRAL_STATE_DIR/agent.sock``, else
    ``./.corral/agent.sock``."""
    if state_dir is not None:
        return Path(state_dir) / "agent.sock"
    if os.environ.get(AGENT_SOCKET):
        return Path(os.environ[AGENT_SOCKET])
    if os.environ.get(STATE_DIR):
        return Path(os.environ[STATE_DIR]) / "agent.sock"
    return Path(".corral") / "agent.sock"


class Discovered:
    """One service as discovery sees it; ``balancer`` holds the healthy instances' addresses."""

    def __init__(self, name: str, client: AgentClient, strategy: _Strategy, follow: bool) -> None:
        self.name = name
        self._client = client
        self._lock = threading.Lock()
        self.balancer = _core.LoadBalancer([], strategy)
        self.instances: list[_core.Instance] = []
        self.front: str | None = None
        self.generation = -1
        self._closed = threading.Event()
        self._apply(client.request("GET", f"/v1/services/{name}"))
        self._thread: threading.Thread | None = None
        if follow:
            self._thread = threading.Thread(target=self._follow, name=f"corral-discover-{name}", daemon=True)
            self._thread.start()

    def addresses(self, healthy_only: bool = True) -> list[str]:
        """``host:port`` of the instances."""
        with self._lock:
            return [i.address for i in self.instances if i.healthy or not healthy_only]

    def pick(self) -> str:
        """One healthy instance's address, by the balancer (raises ``NoBackendError`` if none)."""
        return str(self.balancer.pick())

    @contextmanager
    def connection(self) -> Iterator[str]:
        """A healthy instance's address, counted as in use (least-connections) while held."""
        with self.balancer.connection() as addr:
            yield str(addr)

    def refresh(self) -> None:
        """Asks the agent now."""
        self._apply(self._client.request("GET", f"/v1/services/{self.name}"))

    def close(self) -> None:
        """Stops following changes."""
        self._closed.set()

    def __enter__(self) -> Discovered:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _apply(self, doc: dict[str, Any]) -> None:
        instances = [_core.Instance(service=self.name, id=i["id"], host=i["host"], port=i["port"], healthy=i["healthy"],
                              meta={f"port.{k}": str(v) for k, v in i["ports"].items()})
                     for i in doc["instances"]]
        wanted = {i.address for i in instances if i.healthy}
        with self._lock:
            have = {str(b) for b in self.balancer.backends}
            for gone in have - wanted:
                self.balancer.remove(gone)
            for new in sorted(wanted - have):
                self.balancer.add(new)
            self.instances = instances
            self.front = doc.get("front")
            self.generation = int(doc["generation"])

    def _follow(self) -> None:
        while not self._closed.is_set():
            try:
                doc = self._client.request("GET", f"/v1/services/{self.name}?wait={self.generation}&timeout=20",
                                           timeout=30)
            except CorralError:
                # The agent is gone or restarting: keep what we know and try again shortly.
                self._closed.wait(1.0)
                continue
            self._apply(doc)


def discover(name: str, *, state_dir: str | Path | None = None, strategy: _Strategy = "least_connections",
             follow: bool = True) -> Discovered:
    """The instances of ``name`` and a balancer over the healthy ones, from the agent of
    ``state_dir`` (see :func:`agent_socket`); with ``follow``, a background thread keeps
    them current. Raises :class:`~corral.exceptions.AgentUnavailable` when no agent answers
    and :class:`~corral.exceptions.UnknownService` for a name the deployment does not have."""
    return Discovered(name, AgentClient(socket=agent_socket(state_dir)), strategy, follow)
