"""The names of the files in a state directory (``.corral/``), for whoever reads or writes
them: the agent, the keeper, the CLI. Imports nothing."""

from __future__ import annotations

__all__ = ["AGENT_LOG", "AGENT_SOCKET", "EXITS", "KEEPER_FILE", "KEEPER_LOG", "KEEPER_SOCKET", "PID_LOG", "STATE_DB"]

STATE_DB = "state.db"
"""SQLite: deployments, instances, events, spec versions."""
AGENT_SOCKET = "agent.sock"
"""The control API."""
AGENT_LOG = "agent.log"
KEEPER_SOCKET = "keeper.sock"
"""Where agents hand the keeper their instances' output pipes."""
KEEPER_FILE = "keeper.json"
"""What the keeper last recorded: its pid and start, its agent's, and why it gave up."""
KEEPER_LOG = "keeper.log"
PID_LOG = "pids"
"""The supervisor's pid log: ``pid start_time id`` per spawn, before the store has it."""
EXITS = "exits"
"""``pid status`` of each orphan the keeper reaps (an instance of a dead agent): the next
agent reads there how an instance it did not start ended."""
