"""corral: orchestrate services on one machine, with a Rust core.

The mechanisms (registry, ports, circuit breaker, retries, load balancing,
topology and resource ledgers) are native; this package is their typed face.
"""

from __future__ import annotations

from corral._core import (
    BreakerStats,
    ConnectionGuard,
    Grant,
    Instance,
    L3Domain,
    LoadBalancer,
    NumaNode,
    PortAllocator,
    RegistryEvent,
    ResourceManager,
    ResourceRequest,
    RetryBudget,
    RetryPolicy,
    RetrySchedule,
    ServiceRegistry,
    Topology,
    __version__,
)
from corral.breaker import CircuitBreaker
from corral.exceptions import (
    CircuitOpenError,
    ConfigError,
    CorralError,
    InsufficientResources,
    NoBackendError,
    PortError,
    PortInUse,
    PortsExhausted,
    ResourceError,
    RetryExhausted,
    SpecError,
    TopologyError,
)
from corral.retry import retry

__all__ = [
    "BreakerStats",
    "CircuitBreaker",
    "CircuitOpenError",
    "ConfigError",
    "ConnectionGuard",
    "CorralError",
    "Grant",
    "Instance",
    "InsufficientResources",
    "L3Domain",
    "LoadBalancer",
    "NoBackendError",
    "NumaNode",
    "PortAllocator",
    "PortError",
    "PortInUse",
    "PortsExhausted",
    "RegistryEvent",
    "ResourceError",
    "ResourceManager",
    "ResourceRequest",
    "RetryBudget",
    "RetryExhausted",
    "RetryPolicy",
    "RetrySchedule",
    "ServiceRegistry",
    "SpecError",
    "Topology",
    "TopologyError",
    "__version__",
    "retry",
]
