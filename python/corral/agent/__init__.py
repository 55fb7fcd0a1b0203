"""The agent: the control API it serves (:mod:`~corral.agent.server`), the one client of it
(:mod:`~corral.agent.client`), and how ``up -d`` makes it a daemon
(:mod:`~corral.agent.daemon`)."""
