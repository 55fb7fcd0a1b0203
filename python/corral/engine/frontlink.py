"""Where a front lives, and what the engine may ask of one.

A front is a :class:`corral._core.Proxy` in the agent (a foreground ``up``, the library),
or, under ``up -d``, one held by the keeper (:mod:`corral.agent.fronthost`), reached
through a :class:`KeeperFront`: the listening socket and every relay then outlive the
agent, and the next agent takes the front back as it is. Both answer :class:`Front`.

When the keeper dies, its fronts die with it: each :class:`KeeperFront` binds its front
again in the agent (:meth:`KeeperFront.rehome`), with the configuration and the upstreams
it last had, and goes on in-process from there.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from corral._core import Proxy

__all__ = ["Front", "FrontLink", "FrontStats", "KeeperFront", "KeeperGone", "UpstreamCounters", "WireStats"]


class UpstreamCounters(Protocol):
    """One upstream's counters (:class:`corral._core.UpstreamStats`)."""

    @property
    def id(self) -> str: ...
    @property
    def connections(self) -> int: ...
    @property
    def errors(self) -> int: ...
    @property
    def connect_buckets(self) -> list[int]: ...
    @property
    def connect_sum(self) -> float: ...
    @property
    def connect_count(self) -> int: ...


class FrontStats(Protocol):
    """A front's counters (:class:`corral._core.ProxyStats`)."""

    @property
    def active(self) -> int: ...
    @property
    def bytes_in(self) -> int: ...
    @property
    def bytes_out(self) -> int: ...
    @property
    def ejections(self) -> int: ...
    @property
    def refused(self) -> int: ...
    @property
    def upstreams(self) -> Sequence[UpstreamCounters]: ...
    def to_dict(self) -> dict[str, Any]: ...


class Front(Protocol):
    """What the engine asks of a front (:class:`corral._core.Proxy`'s own methods)."""

    @property
    def port(self) -> int: ...
    @property
    def address(self) -> str: ...
    @property
    def held(self) -> int: ...
    def active(self, id: str) -> int: ...
    def set_upstreams(self, upstreams: list[tuple[str, str, int]]) -> None: ...
    def set_strategy(self, strategy: str) -> None: ...
    def set_hold(self, hold: float) -> None: ...
    def set_protocol(self, protocol: str) -> None: ...
    def set_tls(self, ca_pem: str | None = ..., cert_pem: str | None = ..., key_pem: str | None = ...,
                allow: Iterable[str] = ...) -> None: ...
    def set_certificate(self, cert_pem: str, key_pem: str) -> None: ...
    def stats(self) -> FrontStats: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class WireUpstream:
    """An upstream's counters as the keeper sent them."""

    id: str
    address: str
    ejected: bool
    connections: int
    active: int
    bytes_in: int
    bytes_out: int
    errors: int
    ejections: int
    connect_buckets: list[int]
    connect_sum: float
    connect_count: int

    def to_dict(self) -> dict[str, Any]:
        """The shape of :meth:`corral._core.UpstreamStats.to_dict`."""
        return {k: getattr(self, k) for k in ("id", "address", "ejected", "connections", "active", "bytes_in",
                                              "bytes_out", "errors", "ejections")}


@dataclass(frozen=True)
class WireStats:
    """A front's counters as the keeper sent them (:func:`corral.agent.fronthost.stats_wire`)."""

    address: str
    connections: int
    active: int
    bytes_in: int
    bytes_out: int
    errors: int
    ejections: int
    refused: int
    tls_refused: int
    upstreams: list[WireUpstream]

    @classmethod
    def from_wire(cls, doc: Mapping[str, Any]) -> WireStats:
        """From the keeper's answer."""
        return cls(**{**doc, "upstreams": [WireUpstream(**u) for u in doc["upstreams"]]})

    def to_dict(self) -> dict[str, Any]:
        """The shape of :meth:`corral._core.ProxyStats.to_dict`."""
        d = {k: getattr(self, k) for k in ("address", "connections", "active", "bytes_in", "bytes_out", "errors",
                                           "ejections", "refused", "tls_refused")}
        d["upstreams"] = [u.to_dict() for u in self.upstreams]
        return d


class KeeperGone(OSError):
    """The keeper's front socket does not answer: the keeper is gone."""


class FrontLink:
    """The agent's one connection to the keeper's ``fronts.sock``: a request and its answer
    at a time (see :mod:`corral.agent.fronthost` for the wire)."""

    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self.path = path
        self.timeout = timeout
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._buf = b""

    def call(self, op: str, name: str = "", **args: Any) -> Any:
        """The value of one request; :class:`KeeperGone` when the keeper cannot be reached,
        ``OSError`` (with its errno) when the keeper's front failed at it."""
        line = json.dumps({"op": op, "name": name, **args}).encode() + b"\n"
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    self._sock.settimeout(self.timeout)
                    self._sock.connect(str(self.path))
                self._sock.sendall(line)
                while b"\n" not in self._buf:
                    chunk = self._sock.recv(65536)
                    if not chunk:
                        raise ConnectionResetError("the keeper closed its front socket")
                    self._buf += chunk
            except OSError as e:
                self.close_locked()
                raise KeeperGone(e.errno or 0, f"the keeper's fronts ({self.path}): {e.strerror or e}") from None
            reply, _, self._buf = self._buf.partition(b"\n")
        doc = json.loads(reply)
        if not doc["ok"]:
            raise OSError(doc.get("errno") or 0, doc["error"])
        return doc["value"]

    def close_locked(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock, self._buf = None, b""

    def close(self) -> None:
        """Drops the connection (the keeper's fronts stay)."""
        with self._lock:
            self.close_locked()


class KeeperFront:
    """A front held by the keeper, asked through ``link``; it remembers its configuration,
    its upstreams and its certificate, to bind them in the agent should the keeper die."""

    def __init__(self, link: FrontLink, name: str, host: str, port: int, *, strategy: str, hold: float,
                 protocol: str, tls: dict[str, Any]) -> None:
        self.link, self.name, self.host = link, name, host
        self._strategy: Any = strategy  # one of the Proxy's strategy names (checked where the spec is)
        self._hold, self._tls = hold, dict(tls)
        self._protocol: Any = protocol  # tcp or http (checked where the spec is)
        self._upstreams: list[tuple[str, str, int]] = []
        self._local: Proxy | None = None
        self._closed = False
        try:
            got = link.call("open", name, host=host, port=port, strategy=strategy, hold=hold, protocol=protocol,
                            tls=self._tls)
        except KeeperGone:
            self._bind_here(port)
            return
        self._port, self._address = int(got["port"]), str(got["address"])
        self.kept = bool(got["kept"])
        """The keeper had this front already (a re-adopting agent): its upstreams go on."""

    @property
    def local(self) -> bool:
        """Bound in the agent (the keeper is gone)."""
        return self._local is not None

    def _bind_here(self, port: int) -> None:
        self._local = Proxy(self.host, port, strategy=self._strategy, hold=self._hold, protocol=self._protocol,
                            **self._tls)
        self._local.set_upstreams(self._upstreams)
        self._port, self._address, self.kept = self._local.port, self._local.address, False

    def rehome(self) -> bool:
        """Binds the front in the agent, as it was, once the keeper is gone; True when it
        did (False: closed, or in the agent already)."""
        if self._local is not None or self._closed:
            return False
        self._bind_here(self._port)
        return True

    def forget(self) -> None:
        """The keeper's front of this name is another one now (it moved): this one is
        neither closed nor bound again from here."""
        self._closed = True

    def _either(self, op: str, here: Callable[[Proxy], Any], **args: Any) -> Any:
        """``op`` at the keeper; or ``here`` on the front in this process, when it is bound
        here already or the keeper turns out to be gone (then it is bound here first, with
        the configuration as this object holds it now)."""
        if self._local is None:
            try:
                return self.link.call(op, self.name, **args)
            except KeeperGone:
                self.rehome()
        assert self._local is not None
        return here(self._local)

    @property
    def port(self) -> int:
        return self._port

    @property
    def address(self) -> str:
        return self._address

    @property
    def held(self) -> int:
        return int(self._either("held", lambda p: p.held))

    def active(self, id: str) -> int:
        return int(self._either("active", lambda p: p.active(id), id=id))

    def set_upstreams(self, upstreams: list[tuple[str, str, int]]) -> None:
        self._upstreams = list(upstreams)
        self._either("set_upstreams", lambda p: p.set_upstreams(self._upstreams), upstreams=self._upstreams)

    def set_strategy(self, strategy: str) -> None:
        self._strategy = strategy
        self._either("set_strategy", lambda p: p.set_strategy(strategy), strategy=strategy)

    def set_hold(self, hold: float) -> None:
        self._hold = hold
        self._either("set_hold", lambda p: p.set_hold(hold), hold=hold)

    def set_protocol(self, protocol: str) -> None:
        self._protocol = protocol
        self._either("set_protocol", lambda p: p.set_protocol(protocol), protocol=protocol)

    def set_tls(self, ca_pem: str | None = None, cert_pem: str | None = None, key_pem: str | None = None,
                allow: Iterable[str] = ()) -> None:
        self._tls = {"ca_pem": ca_pem, "cert_pem": cert_pem, "key_pem": key_pem, "allow": list(allow)} \
            if ca_pem is not None else {}
        self._either("set_tls", lambda p: p.set_tls(**self._tls), tls=self._tls)

    def set_certificate(self, cert_pem: str, key_pem: str) -> None:
        if self._tls:
            self._tls.update(cert_pem=cert_pem, key_pem=key_pem)
        self._either("set_certificate", lambda p: p.set_certificate(cert_pem, key_pem), cert_pem=cert_pem,
                     key_pem=key_pem)

    def stats(self) -> FrontStats:
        got = self._either("stats", lambda p: p.stats())
        return WireStats.from_wire(got) if isinstance(got, dict) else got

    def close(self) -> None:
        self._closed = True
        if self._local is not None:
            self._local.close()
            return
        try:
            self.link.call("close", self.name)
        except KeeperGone:
            pass  # its fronts went with it
