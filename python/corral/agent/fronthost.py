"""The fronts of ``up -d``, held by the keeper: the listening sockets and the relays live
in the process that outlives the agent, so that an agent killed with ``-9`` refuses no
connection and cuts none in flight (HAProxy's seamless reload and Envoy's hot restart keep
the listeners across a restart; a proxy in its own process keeps the connections too).

The agent configures them over ``fronts.sock`` in the state directory (owner-only, and
only a peer of the keeper's own uid is served, checked on the kernel's ``SO_PEERCRED``):
one JSON object per line, ``{"op": ..., "name": SERVICE, ...}``, answered with
``{"ok": true, "value": ...}`` or ``{"ok": false, "error": ..., "errno": ...}``.

- ``open``: the front of a service on ``host:port`` (strategy, hold, TLS). A front of that
  name already on that address is kept, with its upstreams and connections (the next agent
  re-adopting the stack gets it back; its strategy, hold, protocol and TLS become what was asked); on
  another address it is replaced.
- ``keep``: closes every front not named (what a dead agent's unfinished change left).
- ``release``: closes every front (a new keeper takes the stack over: :func:`release_fronts`).
- ``set_upstreams``, ``set_strategy``, ``set_hold``, ``set_protocol``, ``set_tls``, ``set_certificate``, ``close``,
  ``active``, ``held``, ``stats``: :class:`corral._core.Proxy`'s own, by service.

Between agents the fronts go on with the last upstreams they were given. Imports the native
core and the standard library only (it runs in the keeper).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
from typing import Any

from corral._core import Proxy, ProxyStats

__all__ = ["FrontHost", "front_listen", "release_fronts", "stats_wire"]

_UPSTREAM_FIELDS = ("id", "address", "ejected", "connections", "active", "bytes_in", "bytes_out", "errors",
                    "ejections", "connect_buckets", "connect_sum", "connect_count")
_FRONT_FIELDS = ("address", "connections", "active", "bytes_in", "bytes_out", "errors", "ejections", "refused",
                 "tls_refused")


def front_listen(path: str | os.PathLike[str]) -> socket.socket:
    """The keeper's front socket at ``path``, listening, mode 0600 from its creation (an
    old file there is replaced)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(os.fspath(path))
    finally:
        os.umask(old)
    sock.listen(8)
    return sock


def release_fronts(path: str | os.PathLike[str], timeout: float = 5.0) -> bool:
    """Asks the keeper listening at ``path`` (one that gave up on its agent, its instances
    unsupervised) to close its fronts, so that a new ``up -d`` can listen on their ports;
    their open connections finish there. False when no keeper answers."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(os.fspath(path))
            s.sendall(b'{"op": "release"}\n')
            return s.makefile("rb").readline().startswith(b'{"ok": true')
    except OSError:
        return False


def stats_wire(stats: ProxyStats) -> dict[str, Any]:
    """Every counter of a front, upstreams' connect histograms included."""
    doc: dict[str, Any] = {f: getattr(stats, f) for f in _FRONT_FIELDS}
    doc["upstreams"] = [{f: getattr(u, f) for f in _UPSTREAM_FIELDS} for u in stats.upstreams]
    return doc


class FrontHost:
    """Serves the fronts on a listening unix socket, a thread per agent connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fronts: dict[str, Proxy] = {}
        self.closed: dict[str, Proxy] = {}
        """The last closed front of each name: asked about while its connections drain."""
        self._lock = threading.Lock()
        self._uid = os.getuid()
        threading.Thread(target=self._accept, name="corral-fronts", daemon=True).start()

    def close(self) -> None:
        """Closes every front (open connections finish) and stops serving."""
        with self._lock:
            for front in self.fronts.values():
                front.close()
            self.fronts.clear()
        self.sock.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                struct.calcsize("3i")))
            if uid != self._uid:
                conn.close()  # only the keeper's own user configures its fronts
                continue
            threading.Thread(target=self._serve, args=(conn,), name="corral-fronts-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as f:
            for line in f:
                try:
                    reply = {"ok": True, "value": self.handle(json.loads(line))}
                except OSError as e:
                    reply = {"ok": False, "error": e.strerror or str(e), "errno": e.errno or 0}
                except Exception as e:
                    reply = {"ok": False, "error": f"{type(e).__name__}: {e}", "errno": 0}
                try:
                    f.write(json.dumps(reply).encode() + b"\n")
                    f.flush()
                except OSError:
                    return

    def handle(self, req: dict[str, Any]) -> Any:
        """One request (see the module docs); returns its value."""
        op, name = req["op"], str(req.get("name", ""))
        with self._lock:
            if op == "open":
                return self._open(name, req)
            if op == "keep":
                for gone in set(self.fronts) - set(req["names"]):
                    self._close(gone)
                return None
            if op == "release":
                for gone in list(self.fronts):
                    self._close(gone)
                return None
            if op == "close":
                self._close(name)
                return None
            # A closed front still answers (its connections drain), as a Proxy does.
            front = self.fronts.get(name) or self.closed[name]
        if op == "set_upstreams":
            front.set_upstreams([tuple(u) for u in req["upstreams"]])
        elif op == "set_strategy":
            front.set_strategy(req["strategy"])
        elif op == "set_protocol":
            front.set_protocol(req["protocol"])
        elif op == "set_hold":
            front.set_hold(float(req["hold"]))
        elif op == "set_tls":
            front.set_tls(**req["tls"])
        elif op == "set_certificate":
            front.set_certificate(req["cert_pem"], req["key_pem"])
        elif op == "active":
            return front.active(req["id"])
        elif op == "held":
            return front.held
        elif op == "stats":
            return stats_wire(front.stats())
        else:
            raise ValueError(f"unknown op {op!r}")
        return None

    def _close(self, name: str) -> None:
        front = self.fronts.pop(name, None)
        if front is not None:
            front.close()
            self.closed[name] = front

    def _open(self, name: str, req: dict[str, Any]) -> dict[str, Any]:
        host, port, tls = req["host"], int(req["port"]), req.get("tls") or {}
        old = self.fronts.get(name)
        if old is not None and old.address == f"{host}:{port}":
            old.set_strategy(req["strategy"])
            old.set_hold(float(req["hold"]))
            old.set_protocol(req.get("protocol", "tcp"))
            old.set_tls(**tls)
            return {"port": old.port, "address": old.address, "kept": True}
        front = Proxy(host, port, strategy=req["strategy"], hold=float(req["hold"]),
                      protocol=req.get("protocol", "tcp"), **tls)
        if old is not None:
            old.close()  # moved: once the new one listens
            self.closed[name] = old
        self.fronts[name] = front
        return {"port": front.port, "address": front.address, "kept": False}
