"""corral: orchestrate services on one machine, with a Rust core.

The mechanisms (registry, ports, circuit breaker, retries, load balancing,
topology and resource ledgers, process supervision, probes, cgroups) are
native; this package is their typed face, plus the engine that deploys a
``corral.yaml`` (:class:`Deployment`). The engine's modules (and pydantic) load
on first use, so ``import corral`` for the mechanisms alone stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from corral._core import (
    Authority,
    BreakerStats,
    Cgroups,
    ConnectionGuard,
    FilesystemUsage,
    Grant,
    Instance,
    IssuedCert,
    L3Domain,
    LoadBalancer,
    NodeMemory,
    NumaNode,
    PortAllocator,
    ProbeSpec,
    ProbeVerdict,
    ProcessExited,
    ProcessSpec,
    Proxy,
    ProxyStats,
    RegistryEvent,
    ResourceManager,
    ResourceRequest,
    RetryAttempts,
    RetryBudget,
    RetryPolicy,
    RetrySchedule,
    ServiceRegistry,
    Supervisor,
    Topology,
    UpstreamStats,
    Usage,
    VolumeUsage,
    __version__,
)
from corral.exceptions import (
    AccessDenied,
    AgentAlreadyRunning,
    AgentError,
    AgentUnavailable,
    CircuitOpenError,
    ConfigError,
    CorralError,
    DeploymentError,
    InsufficientResources,
    LifecycleError,
    MachineError,
    MeshError,
    NoBackendError,
    PortError,
    PortInUse,
    PortsExhausted,
    ProxyError,
    ResourceError,
    RetryExhausted,
    RolloutError,
    SpecError,
    StateDirError,
    TopologyError,
    UnknownService,
)

if TYPE_CHECKING:
    from corral.breaker import CircuitBreaker
    from corral.discovery import Discovered, discover
    from corral.engine import Deployment, DeploymentStatus, InstanceStatus
    from corral.lifecycle import Lifecycle, State, Transition
    from corral.machine import Machine, MachineView, machine_view
    from corral.recovery import BackoffRestart, RestartStrategy, RollbackStrategy
    from corral.retry import retry
    from corral.scheduler import Plan, Scheduler
    from corral.spec import DeploymentSpec, load_spec

# Loaded on first use: the engine and pydantic, and asyncio under retry and the breaker, so
# that `import corral` (and the CLI that starts with it) stays cheap.
_LAZY = {
    "CircuitBreaker": "corral.breaker", "retry": "corral.retry",
    "Deployment": "corral.engine", "DeploymentStatus": "corral.engine", "InstanceStatus": "corral.engine",
    "Lifecycle": "corral.lifecycle", "State": "corral.lifecycle", "Transition": "corral.lifecycle",
    "BackoffRestart": "corral.recovery", "RestartStrategy": "corral.recovery", "RollbackStrategy": "corral.recovery",
    "Plan": "corral.scheduler", "Scheduler": "corral.scheduler",
    "DeploymentSpec": "corral.spec", "load_spec": "corral.spec",
    "Discovered": "corral.discovery", "discover": "corral.discovery",
    "Machine": "corral.machine", "MachineView": "corral.machine", "machine_view": "corral.machine",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'corral' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value

__all__ = [
    "AccessDenied",
    "AgentAlreadyRunning",
    "AgentError",
    "AgentUnavailable",
    "Authority",
    "BackoffRestart",
    "BreakerStats",
    "Cgroups",
    "CircuitBreaker",
    "CircuitOpenError",
    "ConfigError",
    "ConnectionGuard",
    "CorralError",
    "Deployment",
    "DeploymentError",
    "DeploymentSpec",
    "DeploymentStatus",
    "Discovered",
    "FilesystemUsage",
    "Grant",
    "Instance",
    "InstanceStatus",
    "InsufficientResources",
    "IssuedCert",
    "L3Domain",
    "Lifecycle",
    "LifecycleError",
    "LoadBalancer",
    "Machine",
    "MachineError",
    "MachineView",
    "MeshError",
    "NoBackendError",
    "NodeMemory",
    "NumaNode",
    "Plan",
    "PortAllocator",
    "PortError",
    "PortInUse",
    "PortsExhausted",
    "ProbeSpec",
    "ProbeVerdict",
    "ProcessExited",
    "ProcessSpec",
    "Proxy",
    "ProxyError",
    "ProxyStats",
    "RegistryEvent",
    "ResourceError",
    "ResourceManager",
    "ResourceRequest",
    "RestartStrategy",
    "RetryAttempts",
    "RetryBudget",
    "RetryExhausted",
    "RetryPolicy",
    "RetrySchedule",
    "RollbackStrategy",
    "RolloutError",
    "Scheduler",
    "ServiceRegistry",
    "SpecError",
    "State",
    "StateDirError",
    "Supervisor",
    "Topology",
    "TopologyError",
    "Transition",
    "UnknownService",
    "UpstreamStats",
    "Usage",
    "VolumeUsage",
    "__version__",
    "discover",
    "load_spec",
    "machine_view",
    "retry",
]
