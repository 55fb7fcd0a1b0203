"""The exception tree of corral, rooted at :class:`CorralError`.

The native core raises these classes directly (they are imported once by
``corral._core``), so every error from corral, native or Python, is a
``CorralError``. Argument errors are also ``ValueError`` (``ConfigError``) and
I/O errors stay the builtin ``OSError`` subclasses.

Exceptions raised on hot paths are created by CPython from their ``args``
tuple alone; their attributes are properties over ``args`` so that raising
one costs no Python-level ``__init__``. For the same reason every class can be
rebuilt from its ``args``: that is how errors cross the agent's socket
(see :mod:`corral.agent.wire`) and are raised again as the same class.

Each class carries the exit code the CLI uses for it (``exit_code``): 2 for a
bad spec, argument or name, 77 for an operation the caller's role does not allow
(:class:`AccessDenied`; ``EX_NOPERM`` of sysexits.h), 1 for everything else.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

__all__ = [
    "AccessDenied",
    "AgentAlreadyRunning",
    "AgentError",
    "AgentUnavailable",
    "CircuitOpenError",
    "ConfigError",
    "CorralError",
    "DeploymentError",
    "InsufficientResources",
    "LifecycleError",
    "MachineError",
    "MeshError",
    "NoBackendError",
    "PortError",
    "PortInUse",
    "PortsExhausted",
    "ProxyError",
    "ResourceError",
    "RetryExhausted",
    "SpecError",
    "StateDirError",
    "TopologyError",
    "UnknownService",
]


class CorralError(Exception):
    """Base class of every error corral raises on purpose."""

    exit_code: ClassVar[int] = 1
    """What the ``corral`` command exits with when this error ends it."""

    @property
    def message(self) -> str:
        """The human-readable message."""
        return str(self.args[0]) if self.args else ""

    def __str__(self) -> str:
        return self.message


class ConfigError(CorralError, ValueError):
    """An argument or configuration value is out of its domain."""

    exit_code: ClassVar[int] = 2


class StateDirError(ConfigError):
    """The state directory cannot be trusted (another owner, writable by others, a link) or
    made owner-only."""


class MachineError(ConfigError):
    """The machine ledger or its settings cannot be trusted (another owner, writable by
    others, a link) or read (corrupt beyond a safe rebuild)."""


class UnknownService(ConfigError, KeyError):
    """A service name that the deployment does not have (``args == (message, name)``)."""

    @property
    def service(self) -> str | None:
        """The name asked for."""
        return str(self.args[1]) if len(self.args) > 1 else None

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message


class SpecError(ConfigError):
    """A ``corral.yaml`` is invalid; says where: file, line and field."""

    def __init__(self, message: str, file: str | None = None, line: int | None = None,
                 field: str | None = None, *, more: Sequence[SpecError] = ()) -> None:
        super().__init__(message, file, line, field)
        self.more: tuple[SpecError, ...] = tuple(more)
        """Further problems found in the same file, in file order."""


    @property
    def all(self) -> tuple[SpecError, ...]:
        """This problem and the others found with it."""
        return (self, *self.more)

    @property
    def file(self) -> str | None:
        """The spec file."""
        value: str | None = self.args[1]
        return value

    @property
    def line(self) -> int | None:
        """1-based line in the file, when known."""
        value: int | None = self.args[2]
        return value

    @property
    def field(self) -> str | None:
        """Dotted path of the offending field, e.g. ``services.api.depends_on``."""
        value: str | None = self.args[3]
        return value

    def __str__(self) -> str:
        where = self.file or "<spec>"
        if self.line is not None:
            where = f"{where}:{self.line}"
        field = f" {self.field}:" if self.field else ""
        return f"{where}:{field} {self.message}"


class LifecycleError(CorralError):
    """An instance was asked for a transition its state machine does not allow (a bug)."""


class DeploymentError(CorralError):
    """``up`` could not bring the deployment to its conditions; what it started was rolled back."""


class RolloutError(DeploymentError):
    """An apply stopped: a new instance did not become ready in time, exited before it
    counted, or crash-looped (``args == (message, service, instance, reason, reverted)``).
    With ``auto_revert`` the instances already replaced run the previous version again
    (``reverted``) and the running spec stays the previous one."""

    @property
    def service(self) -> str:
        """The service whose rollout failed."""
        return str(self.args[1])

    @property
    def instance(self) -> str:
        """The new instance that failed it."""
        return str(self.args[2])

    @property
    def reason(self) -> str:
        """Why: the last probe message, the exit status, or the deadline."""
        return str(self.args[3])

    @property
    def reverted(self) -> bool:
        """Whether what this apply changed was rolled back."""
        return bool(self.args[4])


class AgentError(CorralError):
    """About the background agent of a deployment: :class:`AgentUnavailable` or
    :class:`AgentAlreadyRunning`."""


class AgentUnavailable(AgentError):
    """No agent answers for the state directory (none runs, or its socket is gone)."""


class AgentAlreadyRunning(AgentError):
    """An agent already runs for the state directory (``args == (message, pid)``)."""

    @property
    def pid(self) -> int | None:
        """The running agent's pid, when known."""
        return int(self.args[1]) if len(self.args) > 1 and self.args[1] is not None else None


class AccessDenied(CorralError):
    """The caller's role does not allow the operation; nothing was touched
    (``args == (message, user, uid, operation, role needed)``). HTTP 403 on the agent's API."""

    exit_code: ClassVar[int] = 77

    @property
    def user(self) -> str:
        """The caller's user name."""
        return str(self.args[1]) if len(self.args) > 1 else ""

    @property
    def uid(self) -> int | None:
        """The caller's uid."""
        return int(self.args[2]) if len(self.args) > 2 and self.args[2] is not None else None

    @property
    def operation(self) -> str:
        """What was refused (``down``, ``scale``...)."""
        return str(self.args[3]) if len(self.args) > 3 else ""

    @property
    def needs(self) -> str:
        """The role the operation needs."""
        return str(self.args[4]) if len(self.args) > 4 else ""


class MeshError(CorralError):
    """The mesh's certificate authority could not issue or load a certificate."""


class ProxyError(CorralError):
    """A front proxy could not be set up (its TLS configuration was refused, say)."""


class CircuitOpenError(CorralError):
    """A call was rejected because the circuit is open (or forced open, or out of half-open trials).

    Raised with ``args == (state, remaining)``: rejections are the breaker's hot path, so the
    message is only built when it is read.
    """

    @property
    def state(self) -> str:
        """``open``, ``forced_open`` or ``half_open``."""
        return str(self.args[0])

    @property
    def remaining(self) -> float:
        """Seconds until trial calls are admitted (0 when unknown)."""
        return float(self.args[1])

    @property
    def message(self) -> str:
        return f"circuit {self.state}: call rejected, retry in {self.remaining:.3f}s"


class PortError(CorralError):
    """A port could not be allocated or released."""


class PortsExhausted(PortError):
    """Every port of the allocator's ranges is in use."""

    @property
    def ranges(self) -> str:
        """The ranges, ``start-end[,start-end...]``."""
        return str(self.args[1])

    @property
    def in_use(self) -> int:
        """Ports not available."""
        return int(self.args[2])

    @property
    def total(self) -> int:
        """Ports in all ranges."""
        return int(self.args[3])


class PortInUse(PortError):
    """The port asked for is already taken."""

    @property
    def port(self) -> int:
        """The port."""
        return int(self.args[1])

    @property
    def holder(self) -> str | None:
        """Who holds it, when known: an allocation name, ``reserved``, or ``pid N (name)``."""
        value: str | None = self.args[2]
        return value


class ResourceError(CorralError):
    """A resource ledger operation failed (e.g. a grant released twice)."""


class InsufficientResources(ResourceError):
    """The request does not fit; the message says what was short and by how much."""


class TopologyError(CorralError):
    """The CPU topology could not be read."""


class NoBackendError(CorralError):
    """The load balancer has no backend that is up."""


class RetryExhausted(CorralError):
    """Retries ran out while the result still asked for one (``retry_if_result``)."""

    @property
    def last_result(self) -> object:
        """The last result returned."""
        return self.args[1]

    @property
    def attempts(self) -> int:
        """Attempts made."""
        return int(self.args[2])

