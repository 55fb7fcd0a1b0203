"""The ``CORRAL_*`` contract: what every instance finds in its environment.

Written here (:func:`environment`) and read by discovery (:data:`AGENT_SOCKET`,
:data:`STATE_DIR`): one module says what the names are.

- ``PORT`` (with exactly one port), ``CORRAL_PORT_<NAME>`` for each named port;
- ``CORRAL_SERVICE``, ``CORRAL_INSTANCE``, ``CORRAL_REPLICA``, ``CORRAL_DEPLOYMENT``;
- ``CORRAL_AGENT_SOCKET``: the control API, for discovery;
- ``CORRAL_VOLUME`` with storage;
- ``CORRAL_TLS_CERT``, ``CORRAL_TLS_KEY``, ``CORRAL_TLS_CA``, ``CORRAL_SPIFFE_ID`` with the mesh;
- ``CORRAL_<DEP>_ADDR`` and ``CORRAL_<DEP>_ADDRS``: each dependency's healthy instances;
- ``CORRAL_STACK`` (the stack's id, from its state directory) and ``CORRAL_UNIT``
  (``<stack id>/<instance>``): markers that every process an instance starts inherits, so a
  stop finds the daemons that left its process group or session.

This module imports nothing of the engine, so discovery can read it cheaply.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from corral.statedir import STACK, UNIT

if TYPE_CHECKING:
    from corral._core import Authority, IssuedCert

__all__ = ["AGENT_SOCKET", "STACK", "STATE_DIR", "UNIT", "env_name", "environment"]

AGENT_SOCKET = "CORRAL_AGENT_SOCKET"
"""The agent's control socket, set for every instance."""
STATE_DIR = "CORRAL_STATE_DIR"
"""Overrides where the state directory is (read by the CLI and discovery, never set by corral)."""



def env_name(name: str) -> str:
    """A service or port name as it appears in a variable: upper case, ``-`` as ``_``."""
    return name.upper().replace("-", "_")


def environment(*, service: str, instance: str, replica: int, deployment: str, stack: str,
                ports: Mapping[str, int], agent_socket: Path, volume: str | None, base: Mapping[str, str],
                cert: IssuedCert | None, ca: Authority | None,
                dependencies: Iterable[tuple[str, list[str]]]) -> list[tuple[str, str]]:
    """The environment of one instance: ``base`` (the service's ``env_file`` and ``env``,
    ports substituted) and then the contract above; ``stack`` is the stack's id.
    ``dependencies`` gives each dependency's healthy addresses."""
    env = dict(base)
    if len(ports) == 1:
        env["PORT"] = str(next(iter(ports.values())))
    for name, port in ports.items():
        env[f"CORRAL_PORT_{env_name(name)}"] = str(port)
    env["CORRAL_SERVICE"] = service
    env["CORRAL_INSTANCE"] = instance
    env["CORRAL_REPLICA"] = str(replica)
    env["CORRAL_DEPLOYMENT"] = deployment
    env[AGENT_SOCKET] = str(agent_socket)
    env[STACK] = stack
    env[UNIT] = f"{stack}/{instance}"
    if volume:
        env["CORRAL_VOLUME"] = volume
    if cert is not None and ca is not None:
        env["CORRAL_TLS_CERT"] = str(cert.cert_path)
        env["CORRAL_TLS_KEY"] = str(cert.key_path)
        env["CORRAL_TLS_CA"] = str(ca.ca_path)
        env["CORRAL_SPIFFE_ID"] = cert.spiffe_id
    for dep, addrs in dependencies:
        if addrs:
            env[f"CORRAL_{env_name(dep)}_ADDR"] = addrs[0]
            env[f"CORRAL_{env_name(dep)}_ADDRS"] = ",".join(addrs)
    return list(env.items())
