"""A state directory (``.corral/``): the names of its files, for whoever reads or writes
them (the agent, the keeper, the CLI), and the identity of the one stack it holds, which
every process of that stack carries in its environment. Imports nothing of corral."""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["AGENT_LOG", "AGENT_SOCKET", "EXITS", "FRONTS_SOCKET", "INSTANCES", "INSTANCE_DIR", "KEEPER_FILE",
           "KEEPER_LOCK", "KEEPER_LOG", "KEEPER_SOCKET", "PID_LOG", "STACK", "STATE_DB", "UNIT", "instance_dir",
           "stack_id"]

STACK = "CORRAL_STACK"
"""The stack's id, inherited by every process of the stack."""
UNIT = "CORRAL_UNIT"
"""``<stack id>/<instance id>``, inherited by every process of one instance."""


def stack_id(state_dir: Path) -> str:
    """A stack's id: a hash of its state directory's real path (one directory, one stack)."""
    return hashlib.sha256(str(Path(state_dir).resolve()).encode()).hexdigest()[:16]


STATE_DB = "state.db"
"""SQLite: deployments, instances, events, spec versions."""
AGENT_SOCKET = "agent.sock"
"""The control API."""
AGENT_LOG = "agent.log"
KEEPER_SOCKET = "keeper.sock"
"""Where agents hand the keeper their instances' output pipes."""
FRONTS_SOCKET = "fronts.sock"
"""Where agents configure the fronts the keeper holds (``up -d``)."""
KEEPER_FILE = "keeper.json"
"""What the keeper last recorded: its pid and start, its agent's, and why it gave up."""
KEEPER_LOG = "keeper.log"
KEEPER_LOCK = "keeper.lock"
"""Held while a keeper writes its record: only the live one's stays."""
PID_LOG = "pids"
"""The supervisor's pid log: ``pid start_time id`` per spawn, before the store has it."""
EXITS = "exits"
"""``pid status`` of each orphan the keeper reaps (an instance of a dead agent): the next
agent reads there how an instance it did not start ended."""

INSTANCES = "instances"
"""Each instance's own directory (its rendered templates), ``instances/ID``."""
INSTANCE_DIR = "${instance.dir}"
"""How a command, an env value or an exec probe names its instance's directory."""


def instance_dir(state_dir: Path, iid: str) -> Path:
    """An instance's own directory."""
    return state_dir / INSTANCES / iid
