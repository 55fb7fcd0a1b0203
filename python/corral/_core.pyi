"""Type stubs for ``corral._core``, the native core (Rust, via PyO3).

Every class here is immutable from Python (its state lives behind atomics
and fine-grained locks in Rust) and safe to share between threads.
"""

from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any, Literal, TypeAlias, final

from typing_extensions import disjoint_base

from corral.exceptions import RetryExhausted

__all__ = [
    "CONNECT_BOUNDS",
    "PROBE_BOUNDS",
    "Authority",
    "BreakerStats",
    "Cgroups",
    "CircuitBreaker",
    "ConnectionGuard",
    "DiskUsage",
    "FilesystemUsage",
    "Grant",
    "GuardedCall",
    "Instance",
    "IssuedCert",
    "L3Domain",
    "LoadBalancer",
    "LogKeeper",
    "NodeMemory",
    "NumaNode",
    "PortAllocator",
    "ProbeSpec",
    "ProbeVerdict",
    "ProcessExited",
    "ProcessSpec",
    "Proxy",
    "ProxyStats",
    "RegistryEvent",
    "RegistryWatch",
    "ResourceManager",
    "ResourceRequest",
    "RetryAttempts",
    "RetryBudget",
    "RetryPolicy",
    "RetrySchedule",
    "Retrying",
    "ServiceRegistry",
    "Supervisor",
    "Topology",
    "UpstreamStats",
    "Usage",
    "VolumeUsage",
    "__version__",
    "become_subreaper",
    "create_volume_image",
    "disk_usage",
    "filesystem_id",
    "find_by_env",
    "group_alive",
    "group_members",
    "group_usage",
    "grow_volume_image",
    "keeper_listen",
    "kill_pid",
    "mount_volume_image",
    "mounted_volume_image",
    "process_alive",
    "process_start_time",
    "signal_group",
    "unmount_volume",
    "volume_mounts",
    "volume_support",
]

__version__: str

_BreakerState: TypeAlias = Literal["closed", "open", "half_open", "forced_open", "disabled"]
_Strategy: TypeAlias = Literal[
    "round_robin", "weighted", "weighted_round_robin", "least_connections", "ip_hash", "random"
]
"""``weighted_round_robin`` is another spelling of ``weighted``; ``strategy`` reads ``weighted``."""
_ChangeKind: TypeAlias = Literal["registered", "replaced", "deregistered", "health_changed", "lagged"]

# --- registry -----------------------------------------------------------------

@final
class Instance:
    """One running instance of a service."""

    def __new__(
        cls,
        *,
        service: str,
        id: str,
        host: str,
        port: int,
        tags: Iterable[str] = ...,
        meta: Mapping[str, str] = ...,
        healthy: bool = True,
    ) -> Instance: ...
    @property
    def service(self) -> str: ...
    @property
    def id(self) -> str: ...
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def tags(self) -> tuple[str, ...]: ...
    @property
    def meta(self) -> dict[str, str]:
        """A fresh copy of the metadata."""
    @property
    def healthy(self) -> bool: ...
    @property
    def address(self) -> str:
        """``host:port`` (IPv6 hosts in brackets)."""
    def replace(
        self,
        *,
        service: str | None = None,
        id: str | None = None,
        host: str | None = None,
        port: int | None = None,
        tags: Iterable[str] | None = None,
        meta: Mapping[str, str] | None = None,
        healthy: bool | None = None,
    ) -> Instance:
        """A copy with the given fields changed."""
    def __eq__(self, other: object, /) -> bool: ...
    def __hash__(self) -> int: ...

@final
class RegistryEvent:
    """One change to a registry, as yielded by :meth:`ServiceRegistry.watch`."""

    @property
    def kind(self) -> _ChangeKind:
        """What happened; ``lagged`` means changes were missed and the watcher should re-list."""
    @property
    def generation(self) -> int:
        """The registry's generation right after the change (0 for ``lagged``)."""
    @property
    def instance(self) -> Instance | None:
        """The instance after the change (before it, for ``deregistered``); None for ``lagged``."""

@final
class RegistryWatch:
    """Async iterator of :class:`RegistryEvent`; holds up to 1024 unread changes."""

    def __aiter__(self) -> RegistryWatch: ...
    def __anext__(self) -> Any: ...

@final
class ServiceRegistry:
    """A concurrent registry of service instances; every change bumps :attr:`generation`."""

    def __new__(cls) -> ServiceRegistry: ...
    def register(self, instance: Instance) -> bool:
        """Registers an instance; True when its id was new, False when it replaced one."""
    def deregister(self, id: str) -> Instance | None:
        """Removes an instance and returns it; None for an unknown id."""
    def get(self, id: str) -> Instance | None:
        """The instance with this id."""
    def instances(self, service: str, healthy_only: bool = False) -> list[Instance]:
        """The instances of a service, in registration order."""
    def set_health(self, id: str, healthy: bool) -> bool:
        """Sets the health flag; False for an unknown id."""
    def services(self) -> list[str]:
        """Names of services with at least one instance, sorted."""
    @property
    def generation(self) -> int:
        """Grows by one on every change."""
    def __len__(self) -> int: ...
    def __contains__(self, id: object, /) -> bool: ...
    def watch(self) -> RegistryWatch:
        """An async iterator over every change from now on."""

# --- ports ----------------------------------------------------------------------

@final
class PortAllocator:
    """Hands out ports from inclusive ranges over a bitmap.

    Dynamic allocation takes the next free port after the last one given, and a released
    port cools down before reuse. With ``check_bind`` (an IP address), each port is first
    bound on that address, and ports other processes hold are skipped and remembered.
    """

    def __new__(
        cls,
        start: int = 20000,
        end: int = 32000,
        reserved: Iterable[int] = ...,
        *,
        ranges: Iterable[tuple[int, int]] | None = None,
        check_bind: str | None = None,
    ) -> PortAllocator: ...
    def allocate(self, port: int | None = None, *, name: str | None = None, check: bool = True) -> int:
        """A free port, or exactly ``port`` (recorded under ``name``); ``check=False`` skips
        the bind check (the port's holder is ours: an instance being re-adopted).

        Raises ``PortsExhausted`` or ``PortInUse``.
        """
    def release(self, port: int) -> None:
        """Returns a port; raises ``PortError`` if it is not allocated."""
    def refresh(self, address: str = "127.0.0.1") -> int:
        """Frees remembered externally-held ports that can now be bound; returns how many."""
    def is_allocated(self, port: int) -> bool: ...
    @property
    def available(self) -> int:
        """Ports that can still be handed out."""
    @property
    def capacity(self) -> int:
        """Ports in all ranges."""
    @property
    def in_use(self) -> int:
        """Ports held through this allocator (allocated, or reserved in range)."""
    def set_claimed(self, ports: Iterable[int]) -> int:
        """The ports other holders of the machine (other stacks) claim now, replacing the set
        given before: never handed out while claimed, free again once no longer claimed.
        Returns how many of them are held here already (0 when the two ledgers agree)."""
    @property
    def claimed(self) -> int:
        """Ports in range claimed by other holders of the machine (``set_claimed``)."""
    @property
    def held_elsewhere(self) -> int:
        """Ports skipped because another process held them when checked (see ``refresh_external``)."""
    @property
    def ranges(self) -> list[tuple[int, int]]: ...

# --- breaker --------------------------------------------------------------------

@final
class BreakerStats:
    """A snapshot of a breaker's counters."""

    @property
    def state(self) -> _BreakerState: ...
    @property
    def successes(self) -> int: ...
    @property
    def failures(self) -> int:
        """Failed calls, slow ones included."""
    @property
    def slow_calls(self) -> int: ...
    @property
    def rejected(self) -> int: ...
    @property
    def ignored(self) -> int:
        """Outcomes of excluded exceptions."""
    @property
    def opened(self) -> int:
        """Times the circuit opened."""
    @property
    def consecutive_failures(self) -> int: ...
    @property
    def failure_rate(self) -> float | None:
        """Failure rate over the sliding window, when configured and non-empty."""
    @property
    def open_remaining(self) -> float:
        """Seconds until trial calls, when open."""

@disjoint_base
class CircuitBreaker:
    """The native breaker; use :class:`corral.CircuitBreaker`, which adds async and decorator use.

    Trips on ``failure_threshold`` consecutive failures (0: off) and/or a
    ``failure_rate_threshold`` (0-1] over the last ``window_size`` calls once
    ``minimum_calls`` were seen; calls slower than ``slow_call_duration`` seconds count
    as failures. Stays open ``reset_timeout`` seconds, doubling on each failed trial up to
    ``max_reset_timeout`` when given; then admits ``half_open_max_calls`` trial calls, all
    of which must succeed to close. ``exclude`` exceptions count neither way; with
    ``failure_on``, only those exceptions count as failures. ``BaseException``s that are
    not ``Exception``s (KeyboardInterrupt, CancelledError) never count.
    """

    def __new__(
        cls,
        failure_threshold: int = 5,
        reset_timeout: float = 30.0,
        half_open_max_calls: int = 1,
        failure_rate_threshold: float | None = None,
        window_size: int = 100,
        minimum_calls: int = 10,
        slow_call_duration: float | None = None,
        max_reset_timeout: float | None = None,
        exclude: type[BaseException] | Iterable[type[BaseException]] | None = None,
        failure_on: type[BaseException] | Iterable[type[BaseException]] | None = None,
        *,
        name: str | None = None,
    ) -> CircuitBreaker: ...
    def call(self, f: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Calls ``f(*args, **kwargs)`` under the breaker; raises ``CircuitOpenError`` when open."""
    def allow(self) -> bool:
        """Whether a call may run now (takes a half-open trial permit when True)."""
    def check(self) -> None:
        """Like :meth:`allow`, raising ``CircuitOpenError`` instead of returning False."""
    def admit(self) -> int:
        """Admits one call (raises ``CircuitOpenError`` when open) and returns its ticket: the
        state and generation it was admitted in. Give it to ``record_*(ticket=...)``: the
        outcome then counts toward the state machine only in that generation."""
    def record_success(self, duration: float | None = None, *, ticket: int | None = None) -> None:
        """Records a success; with ``duration`` seconds, a slow call counts as a failure.
        Without ``ticket`` it counts in the generation now."""
    def record_failure(self, duration: float | None = None, *, ticket: int | None = None) -> None:
        """Records a failure."""
    def record_exception(self, exc: BaseException, duration: float | None = None, *,
                         ticket: int | None = None) -> None:
        """Records an exception by the breaker's exception rules."""
    @property
    def timed(self) -> bool:
        """Whether calls are timed (``slow_call_duration`` is set)."""
    @property
    def state(self) -> _BreakerState: ...
    @property
    def name(self) -> str | None: ...
    def force_open(self) -> None:
        """Rejects every call until :meth:`reset`."""
    def disable(self) -> None:
        """Admits every call and counts nothing until :meth:`reset`."""
    def reset(self) -> None:
        """Closes the circuit and forgets its history."""
    def trip(self) -> None:
        """Opens the circuit now, as a trip would."""
    def add_listener(self, listener: Callable[[str, str], object]) -> None:
        """Calls ``listener(old_state, new_state)`` on every change (errors go to ``sys.unraisablehook``)."""
    def stats(self) -> BreakerStats: ...
    def __enter__(self) -> None: ...
    def __exit__(self, exc_type: object, exc: object, tb: object) -> bool: ...

@final
class GuardedCall:
    """A sync function guarded by a breaker (what ``@breaker`` makes)."""

    def __new__(cls, breaker: CircuitBreaker, func: Callable[..., Any]) -> GuardedCall: ...
    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...
    def __get__(self, obj: object, objtype: object = None, /) -> Any: ...
    __wrapped__: Callable[..., Any]
    @property
    def breaker(self) -> CircuitBreaker: ...

# --- retry ----------------------------------------------------------------------

@final
class RetryPolicy:
    """How long to wait between attempts and when to give up; build one with a constructor below.

    Common keywords: ``max_delay`` caps any single delay (seconds); ``max_attempts`` counts
    every attempt, the first included (None: no limit); ``max_elapsed`` stops retrying when
    the next attempt would start later than that many seconds after the first;
    ``jitter`` randomises delays (``full``: uniform in [0, d]; ``equal``: d/2 + uniform in
    [0, d/2]); ``seed`` makes the randomness repeatable.
    """

    @staticmethod
    def fixed(delay: float, *, max_delay: float | None = None, max_attempts: int | None = ...,
              max_elapsed: float | None = None, jitter: Literal["none", "full", "equal"] = "none",
              seed: int | None = None) -> RetryPolicy:
        """The same delay every time."""
    @staticmethod
    def linear(initial: float, step: float, *, max_delay: float | None = None, max_attempts: int | None = ...,
               max_elapsed: float | None = None, jitter: Literal["none", "full", "equal"] = "none",
               seed: int | None = None) -> RetryPolicy:
        """``initial + n * step``."""
    @staticmethod
    def exponential(initial: float, multiplier: float = 2.0, *, max_delay: float | None = None,
                    max_attempts: int | None = ..., max_elapsed: float | None = None,
                    jitter: Literal["none", "full", "equal"] = "none", seed: int | None = None) -> RetryPolicy:
        """``initial * multiplier ** n``."""
    @staticmethod
    def fibonacci(initial: float, *, max_delay: float | None = None, max_attempts: int | None = ...,
                  max_elapsed: float | None = None, jitter: Literal["none", "full", "equal"] = "none",
                  seed: int | None = None) -> RetryPolicy:
        """``initial * fib(n)``: 1, 1, 2, 3, 5, ..."""
    @staticmethod
    def decorrelated(initial: float, *, max_delay: float | None = None, max_attempts: int | None = ...,
                     max_elapsed: float | None = None, jitter: Literal["none", "full", "equal"] = "none",
                     seed: int | None = None) -> RetryPolicy:
        """AWS's decorrelated jitter: ``min(max_delay, uniform(initial, 3 * previous))``."""
    def delays(self) -> RetrySchedule:
        """The successive delays in seconds, without sleeping."""
    def schedule(self) -> RetrySchedule:
        """A fresh schedule for one retried operation."""
    def attempts(self, budget: RetryBudget | None = None) -> RetryAttempts:
        """One retried operation whose first attempt begins now (deposited in ``budget``)."""
    @property
    def max_attempts(self) -> int | None: ...
    @property
    def max_elapsed(self) -> float | None: ...

@final
class RetrySchedule(Iterator[float]):
    """The state of one retried operation; iterating yields the delays."""

    def next_delay(self, elapsed: float = 0.0) -> float | None:
        """Seconds to wait before the next retry, given seconds since the first attempt; None: give up."""
    @property
    def retries(self) -> int: ...
    def __iter__(self) -> RetrySchedule: ...
    def __next__(self) -> float: ...

@final
class RetryAttempts:
    """One retried operation, stepped by its caller: the loop every retry runs (the sync
    ``@retry``, the async one, the engine's spawn retries) asks ``after_failure`` after each
    failed attempt."""

    def after_failure(self) -> float | None:
        """Seconds to wait before the next attempt, or None to give up (the policy's caps are
        reached, or the budget is spent)."""
    @property
    def attempts(self) -> int:
        """Attempts begun so far (1 before any failure)."""
    def exhausted(self, last: object) -> RetryExhausted:
        """The error to raise when ``last``, a result, asked for the retry that was refused."""

@final
class RetryBudget:
    """A token bucket shared by many callers (Finagle's): each call deposits ``ratio`` of a retry,
    each retry withdraws one, and ``min_per_second`` retries a second are always allowed;
    deposits expire after ``ttl`` seconds (1-60)."""

    def __new__(cls, ratio: float = 0.2, min_per_second: float = 10.0, ttl: float = 10.0) -> RetryBudget: ...
    def deposit(self) -> None: ...
    def try_withdraw(self) -> bool: ...
    @property
    def balance(self) -> float:
        """Retries that could be made now."""

@final
class Retrying:
    """A sync function retried by a policy (what ``@retry`` makes)."""

    def __new__(
        cls,
        func: Callable[..., Any],
        policy: RetryPolicy,
        on: tuple[type[BaseException], ...],
        retry_if_result: Callable[[Any], bool] | None = None,
        budget: RetryBudget | None = None,
    ) -> Retrying: ...
    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...
    def __get__(self, obj: object, objtype: object = None, /) -> Any: ...
    __wrapped__: Callable[..., Any]

# --- balance --------------------------------------------------------------------

@final
class ConnectionGuard:
    """A connection slot on a backend; releases it when the ``with`` block ends, even on error."""

    @property
    def backend(self) -> Any: ...
    def release(self) -> None:
        """Releases the slot now (idempotent)."""
    def __enter__(self) -> Any: ...
    def __exit__(self, *_exc: object) -> bool: ...

@final
class LoadBalancer:
    """Chooses among backends (any objects; ``str()`` is their identity for ``ip_hash``).

    ``round_robin`` is lock-free; ``weighted_round_robin`` is nginx's smooth WRR;
    ``least_connections`` scans up to 16 backends exactly, then uses two random choices;
    ``ip_hash`` is rendezvous hashing (removing one of N backends moves ~1/N of keys);
    ``random`` is uniform. Backends marked down receive nothing.
    """

    def __new__(cls, backends: Iterable[Any], strategy: _Strategy = "round_robin",
                weights: Iterable[int] | None = None) -> LoadBalancer: ...
    def pick(self, key: str | bytes | int | None = None) -> Any:
        """A backend; raises ``NoBackendError`` when none is up."""
    def connection(self, key: str | bytes | int | None = None) -> ConnectionGuard:
        """Picks a backend and counts a connection on it until the guard is released."""
    def mark_down(self, backend: Any) -> None: ...
    def mark_up(self, backend: Any) -> None: ...
    def is_up(self, backend: Any) -> bool: ...
    def active(self, backend: Any) -> int:
        """Connections in flight on a backend."""
    def add(self, backend: Any, weight: int = 1) -> None: ...
    def remove(self, backend: Any) -> None: ...
    @property
    def backends(self) -> list[Any]: ...
    @property
    def strategy(self) -> _Strategy: ...
    def stats(self) -> list[tuple[Any, bool, int, int]]:
        """Per backend: (backend, up, active connections, connections in total)."""
    def __len__(self) -> int: ...

# --- topology -------------------------------------------------------------------

@final
class NumaNode:
    """A NUMA node."""

    @property
    def id(self) -> int: ...
    @property
    def cpus(self) -> list[int]: ...
    @property
    def memory_mb(self) -> int: ...

@final
class L3Domain:
    """CPUs sharing one L3 cache."""

    @property
    def id(self) -> int: ...
    @property
    def cpus(self) -> list[int]: ...
    @property
    def size_kb(self) -> int: ...
    @property
    def numa_node(self) -> int: ...

@final
class Topology:
    """NUMA nodes, packages, L3 domains, cores and SMT siblings, and memory, read from sysfs."""

    @staticmethod
    def detect() -> Topology:
        """This machine: /sys, narrowed by the affinity mask and the cgroup cpuset."""
    @staticmethod
    def from_sysfs(root: str | PathLike[str]) -> Topology:
        """A directory laid out like /sys (``root/devices/system/cpu``, ``.../node``)."""
    @property
    def cpus(self) -> list[int]:
        """Usable CPUs: online and allowed."""
    @property
    def online(self) -> list[int]: ...
    @property
    def numa_nodes(self) -> list[NumaNode]: ...
    @property
    def l3_domains(self) -> list[L3Domain]: ...
    @property
    def cores(self) -> list[list[int]]:
        """Physical cores, each as its usable hardware threads."""
    @property
    def packages(self) -> list[int]: ...
    @property
    def memory_mb(self) -> int: ...
    @property
    def threads_per_core(self) -> int: ...
    def siblings(self, cpu: int) -> list[int]:
        """The hardware threads of ``cpu``'s core, itself included; empty if unknown."""
    def numa_node_of(self, cpu: int) -> int | None: ...
    def l3_of(self, cpu: int) -> int | None: ...

# --- resources ------------------------------------------------------------------

@final
class ResourceRequest:
    """What one instance asks for: ``cpu`` (fractional share), ``cores`` (exclusive CPUs),
    ``memory_mb``, ``swap_mb``, ``storage_mb`` on ``volume``."""

    def __new__(
        cls,
        *,
        cpu: float = 0.0,
        cores: int = 0,
        numa: Literal["none", "prefer", "require"] = "none",
        cache: Literal["any", "prefer-large"] = "any",
        memory_mb: int = 0,
        swap_mb: int = 0,
        storage_mb: int = 0,
        volume: str | None = None,
        numa_node: int | None = None,
        exact_cpus: Iterable[int] = ...,
    ) -> ResourceRequest: ...
    @property
    def cpu(self) -> float: ...
    @property
    def cores(self) -> int: ...
    @property
    def memory_mb(self) -> int: ...
    @property
    def storage_mb(self) -> int: ...
    @property
    def volume(self) -> str | None: ...

@final
class Grant:
    """What an allocation granted; release it exactly once."""

    @property
    def id(self) -> int: ...
    @property
    def cpus(self) -> list[int]:
        """Exclusive CPUs, ascending."""
    @property
    def numa_node(self) -> int | None: ...
    @property
    def l3_domains(self) -> list[int]: ...
    @property
    def millicores(self) -> int: ...
    @property
    def memory_mb(self) -> int: ...
    @property
    def memory_pinned(self) -> bool:
        """Whether the memory is accounted on ``numa_node``."""
    @property
    def swap_mb(self) -> int: ...
    @property
    def storage_mb(self) -> int: ...
    @property
    def volume(self) -> str | None: ...
    @property
    def filesystem(self) -> str | None:
        """The volume's filesystem (``dev:<st_dev>``, or ``volume:<name>`` for a volume given
        its own capacity): what the machine ledger counts storage by."""

@final
class ResourceManager:
    """All-or-nothing CPU, memory and storage ledgers over a topology: one holder's view of a
    machine that others share (``set_elsewhere`` says what they have).

    ``memory_mb``: what may be handed out (default: the machine's less ``memory_reserve_mb``,
    itself by default 10% of it, at most 1 GiB); ``reserved_cpus``: kept for the system
    (default: CPU 0); ``volumes``: name to a path (capacity = its filesystem's free space less
    ``disk_reserve_mb``, by default 5% of the filesystem, at most 10 GiB; volumes on one
    filesystem share it) or a ``(path, capacity_mb)`` pair.
    """

    def __new__(
        cls,
        topology: Topology,
        memory_mb: int | None = None,
        reserved_cpus: Iterable[int] | None = None,
        cpu_overcommit: float = 1.0,
        memory_overcommit: float = 1.0,
        volumes: Mapping[str, str | PathLike[str] | tuple[str | PathLike[str], int]] | None = None,
        *,
        swap_mb: int | None = None,
        memory_reserve_mb: int | None = None,
        disk_reserve_mb: int | None = None,
    ) -> ResourceManager: ...
    def add_volume(self, name: str, path: str | PathLike[str], capacity_mb: int | None = None) -> bool:
        """Adds a volume (capacity: the filesystem's free space unless given); False, and
        nothing changes, when one of that name is there already."""
    def allocate(self, request: ResourceRequest) -> Grant:
        """Everything asked for, or ``InsufficientResources`` naming what was short."""
    def release(self, grant: Grant | int) -> None:
        """Returns a grant's resources; a second release raises ``ResourceError``."""
    def set_elsewhere(
        self,
        *,
        cpus: Iterable[int] = ...,
        millicores: int = 0,
        memory_mb: int = 0,
        node_memory_mb: Mapping[int, int] = ...,
        swap_mb: int = 0,
        storage_mb: Mapping[str, int] = ...,
    ) -> None:
        """What the other holders of the machine have now, replacing what was set before:
        exclusive CPUs, shared CPU, memory (of it, ``node_memory_mb`` pinned per node), swap,
        and storage per filesystem id. Placement keeps clear of it from the next allocation
        on. Raises ``ResourceError`` (nothing changed) when another holder is said to have a
        CPU a grant here holds."""
    def volume_usage(self, name: str) -> int:
        """Bytes used on disk in a volume now."""
    def usage(self) -> Usage:
        """A snapshot of the ledgers."""
    def shared_cpus(self, node: int | None = None) -> list[int]:
        """CPUs nobody holds exclusively now, where shared-CPU work may run: on ``node`` when
        given and it has any, else on the whole machine (the reserved CPUs included)."""

@final
class NodeMemory:
    """Memory of one NUMA node, MiB."""

    @property
    def node(self) -> int: ...
    @property
    def capacity_mb(self) -> int:
        """After overcommit."""
    @property
    def used_mb(self) -> int:
        """Pinned to the node by grants."""
    @property
    def elsewhere_mb(self) -> int:
        """Pinned to the node by other holders of the machine."""

@final
class VolumeUsage:
    """Use and capacity of one volume, MiB."""

    @property
    def name(self) -> str: ...
    @property
    def path(self) -> Path: ...
    @property
    def filesystem(self) -> str:
        """The filesystem it takes its quota from (see ``FilesystemUsage``)."""
    @property
    def capacity_mb(self) -> int:
        """What quotas may take on that filesystem."""
    @property
    def reserved_mb(self) -> int:
        """Reserved on this volume by grants."""

@final
class FilesystemUsage:
    """Use and capacity of one filesystem, MiB: the volumes on it share its capacity with
    the other holders of the machine."""

    @property
    def id(self) -> str:
        """``dev:<st_dev>`` (or ``volume:<name>`` for a volume given its own capacity)."""
    @property
    def path(self) -> Path:
        """Where it was measured."""
    @property
    def capacity_mb(self) -> int:
        """Its free space when measured, less the disk reserve."""
    @property
    def reserved_mb(self) -> int:
        """Reserved by grants here."""
    @property
    def elsewhere_mb(self) -> int:
        """Reserved by other holders of the machine."""

@final
class Usage:
    """A snapshot of the ledgers (``ResourceManager.usage()``); compares equal to an equal snapshot."""

    @property
    def cpus(self) -> list[int]:
        """CPUs that may be handed out exclusively."""
    @property
    def exclusive_cpus(self) -> list[int]:
        """Of them, held exclusively now."""
    @property
    def shared_capacity_millicores(self) -> int: ...
    @property
    def shared_used_millicores(self) -> int: ...
    @property
    def memory_capacity_mb(self) -> int: ...
    @property
    def memory_used_mb(self) -> int: ...
    @property
    def memory_by_node(self) -> dict[int, NodeMemory]: ...
    @property
    def swap_used_mb(self) -> int: ...
    @property
    def volumes(self) -> dict[str, VolumeUsage]: ...
    @property
    def filesystems(self) -> dict[str, FilesystemUsage]:
        """The filesystems the volumes sit on, by id."""
    @property
    def grants(self) -> int:
        """Grants outstanding."""
    @property
    def elsewhere_cpus(self) -> list[int]:
        """Exclusive CPUs other holders of the machine have (as last set)."""
    @property
    def elsewhere_millicores(self) -> int: ...
    @property
    def elsewhere_memory_mb(self) -> int: ...
    @property
    def elsewhere_swap_mb(self) -> int: ...

# --- probe ------------------------------------------------------------------------

@final
class ProbeSpec:
    """One health probe: an HTTP GET (status 200-399), a TCP connect, a command (exit 0) or
    a log line, repeated every ``period`` after ``initial_delay``, each attempt bounded by
    ``timeout``, with Kubernetes' success and failure thresholds. ``host`` defaults to
    ``127.0.0.1`` and ``path`` to ``/``; ``argv``, ``env``, ``uid``, ``gid`` and ``cwd``
    (whom the command runs as, and where: the service's, never more) are for ``exec``. ``log``
    reads the file ``path`` from byte ``offset`` (None: its end now) for a line matching
    ``pattern`` (the ``regex`` crate's syntax; a bad one is a
    :class:`~corral.exceptions.ConfigError`); once one matched, every attempt succeeds."""

    def __new__(
        cls,
        kind: Literal["http", "tcp", "exec", "log"],
        *,
        host: str = ...,
        port: int = 0,
        path: str = ...,
        argv: Sequence[str] = ...,
        env: Sequence[tuple[str, str]] = ...,
        pattern: str = ...,
        offset: int | None = None,
        initial_delay: float = 0.0,
        period: float = 10.0,
        timeout: float = 1.0,
        success_threshold: int = 1,
        failure_threshold: int = 3,
        uid: int | None = None,
        gid: int | None = None,
        cwd: str | PathLike[str] | None = None,
    ) -> ProbeSpec: ...
    @property
    def kind(self) -> Literal["http", "tcp", "exec", "log"]: ...
    @property
    def period(self) -> float: ...
    @property
    def timeout(self) -> float: ...
    def check(self) -> Awaitable[tuple[bool, str]]:
        """One attempt now: ``(ok, message)``."""

# --- process ----------------------------------------------------------------------

@final
class ProcessExited:
    """A process the supervisor started exited: ``code`` when it exited, ``signal`` when a
    signal ended it."""

    @property
    def id(self) -> str: ...
    @property
    def pid(self) -> int: ...
    @property
    def code(self) -> int | None: ...
    @property
    def signal(self) -> int | None: ...

@final
class ProbeVerdict:
    """A probe of instance ``id`` reached a verdict."""

    @property
    def id(self) -> str: ...
    @property
    def probe(self) -> Literal["startup", "readiness", "liveness"]: ...
    @property
    def ok(self) -> bool: ...
    @property
    def message(self) -> str: ...

@final
class ProcessSpec:
    """How to start one process, for :meth:`Supervisor.spawn_many` (the keywords of
    :meth:`Supervisor.spawn`)."""

    def __new__(
        cls,
        argv: Sequence[str],
        *,
        env: Sequence[tuple[str, str]] | None = None,
        clear_env: bool = False,
        cwd: str | PathLike[str] | None = None,
        cpus: Sequence[int] = ...,
        cgroup: str | PathLike[str] | None = None,
        log: str | PathLike[str] | None = None,
        log_max_bytes: int = ...,
        log_keep: int = 3,
        uid: int | None = None,
        gid: int | None = None,
    ) -> ProcessSpec: ...
    @property
    def argv(self) -> list[str]: ...
    @property
    def cpus(self) -> list[int]: ...
    @property
    def env(self) -> list[tuple[str, str]]: ...
    @property
    def cwd(self) -> Path | None: ...
    @property
    def uid(self) -> int | None: ...
    @property
    def gid(self) -> int | None: ...

@final
class Supervisor:
    """Starts processes (own process group; CPU affinity and cgroup set before exec; output
    to a size-rotated log) and runs their probes, on a runtime thread of its own. Exits
    (``ProcessExited``) and probe verdicts (``ProbeVerdict``) arrive, in order, from
    ``next_event``."""

    def __new__(cls, *, pid_log: str | PathLike[str] | None = None,
                keeper: str | PathLike[str] | None = None) -> Supervisor:
        """With ``pid_log``, every spawn appends ``pid start_time id`` to that file (0600) the
        moment the process exists: a trace that survives a supervisor killed right after.
        With ``keeper`` (a ``LogKeeper``'s socket), output pipes go to that keeper, which
        writes the logs: an instance's output then never depends on this process."""
    def adopt(self, id: str, pid: int) -> bool:
        """Watches ``pid``, started by an agent that died, through a pidfd: its exit arrives as
        a ``ProcessExited`` under ``id`` with neither code nor signal; False when it is gone."""
    def drop_keeper(self, why: str) -> None:
        """Stops handing output to the keeper (it died): later spawns log through this process
        (a hand-over that fails does the same by itself)."""
    def keeper_lost(self) -> str | None:
        """Why output no longer goes to the keeper; None while it does (or without one)."""
    def spawn(
        self,
        id: str,
        argv: Sequence[str],
        *,
        env: Sequence[tuple[str, str]] | None = None,
        clear_env: bool = False,
        cwd: str | PathLike[str] | None = None,
        cpus: Sequence[int] = ...,
        cgroup: str | PathLike[str] | None = None,
        log: str | PathLike[str] | None = None,
        log_max_bytes: int = ...,
        log_keep: int = 3,
        uid: int | None = None,
        gid: int | None = None,
    ) -> tuple[int, int]:
        """Starts ``argv`` (as ``uid``/``gid`` when given: needs root; supplementary groups are
        dropped); returns ``(pid, start_time)``. ``log`` rotates past ``log_max_bytes``
        (default 10 MiB), keeping ``log_keep`` old files. Raises ``OSError`` subclasses
        (``FileNotFoundError`` for a missing program) naming the program."""
    def spawn_many(
        self, items: Sequence[tuple[str, ProcessSpec]], *, threads: int = 2
    ) -> list[tuple[int, int] | OSError]:
        """Starts ``(id, spec)`` pairs on up to ``threads`` threads; each result is
        ``(pid, start_time)`` or the ``OSError`` that spawn raised, in the order given."""
    def start_health(
        self,
        id: str,
        *,
        startup: ProbeSpec | None = None,
        readiness: ProbeSpec | None = None,
        liveness: ProbeSpec | None = None,
    ) -> None:
        """Runs the probes of ``id``: startup first, then readiness (reported on every change,
        starting not ready) and liveness (reported once, when it fails)."""
    def stop_health(self, id: str) -> bool:
        """Stops the probes of ``id``; returns whether any ran."""
    def probe_stats(self, id: str) -> list[tuple[str, list[int], float, int, int]]:
        """Every probe attempt of ``id``: ``(probe, cumulative bucket counts, sum of seconds,
        attempts, failures)`` for each probe that ran; bucket bounds in ``PROBE_BOUNDS``."""
    def next_event(self) -> Awaitable[ProcessExited | ProbeVerdict | None]:
        """The next event, waiting for one."""
    def drain(self, max: int = 4096) -> list[ProcessExited | ProbeVerdict]:
        """Events already queued, without waiting."""

def signal_group(pgid: int, signal: int) -> bool:
    """Sends ``signal`` to process group ``pgid``; False when no process of it is left."""

def group_alive(pgid: int) -> bool:
    """Whether any process (zombies included) of group ``pgid`` exists."""

def group_members(pgid: int) -> list[int]:
    """Live pids in process group ``pgid``."""

def process_alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""

PROBE_BOUNDS: list[float]
"""Upper bounds (seconds) of the probe-duration histogram's buckets; ``+Inf`` beyond."""

CONNECT_BOUNDS: list[float]
"""Upper bounds (seconds) of the front's upstream-connect histogram; ``+Inf`` beyond."""

def group_usage(leaders: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """``(cpu_ticks, rss_bytes, open_fds, processes)`` of the live process tree under each
    leader (followed through ``/proc/<pid>/task/<pid>/children``)."""

def filesystem_id(path: str | PathLike[str]) -> str:
    """The id of the filesystem that holds, or will hold, ``path`` (``dev:<st_dev>`` of its
    nearest existing ancestor): how the machine ledger counts storage. ``OSError`` when
    nothing of the path exists."""

def find_by_env(entry: str) -> list[int]:
    """Live processes (not this one) whose starting environment holds ``entry``
    (``KEY=value``): an instance's descendants, whatever group or session they moved to."""

def kill_pid(pid: int, signal: int) -> bool:
    """Sends ``signal`` to one process; False when it is gone."""

def keeper_listen(path: str | PathLike[str]) -> int:
    """Binds a listening keeper socket at ``path`` (owner-only) and returns its descriptor,
    for a ``LogKeeper(fd=...)`` in a process this one execs."""

def become_subreaper() -> None:
    """Makes this process a child subreaper: orphaned descendants come to it, not to init."""

@final
class LogKeeper:
    """Holds the output pipes of a stack's instances and writes their rotating logs, on
    threads of its own, so that no instance depends on its agent being alive."""

    def __new__(cls, path: str | PathLike[str] | None = None, *, fd: int | None = None) -> LogKeeper:
        """Listens at ``path`` (owner-only; a stale socket there is replaced), or serves the
        inherited listening socket ``fd`` (from ``keeper_listen``), which it then owns."""
    @property
    def active(self) -> int:
        """Pipes being copied now."""
    @property
    def handed(self) -> int:
        """Pipes handed over since it started."""

def process_start_time(pid: int) -> int | None:
    """``pid``'s start time in clock ticks since boot (tells a recycled pid apart)."""

# --- proxy ------------------------------------------------------------------------

@final
class Proxy:
    """A TCP front (``host:port``, port 0 picks one) for a set of upstreams, on a runtime
    thread of its own. Each connection goes to one upstream chosen by ``strategy``; bytes
    flow both ways, half-closes passed on. An upstream whose breaker opens after
    ``failure_threshold`` connect failures or resets is ejected for ``ejection_time``
    (doubling up to ``max_ejection_time`` while it keeps failing; never more than
    ``max_ejection_percent`` of upstreams, always at least one); a failed connect is retried
    on another upstream, up to ``max_attempts`` in all. Upstreams dropped by
    ``set_upstreams`` get no new connections while their open ones finish."""

    def __new__(
        cls,
        host: str = ...,
        port: int = 0,
        *,
        strategy: _Strategy = "least_connections",
        connect_timeout: float = 1.0,
        max_attempts: int = 3,
        max_ejection_percent: int = 50,
        failure_threshold: int = 3,
        ejection_time: float = 5.0,
        max_ejection_time: float = 60.0,
        ca_pem: str | None = None,
        cert_pem: str | None = None,
        key_pem: str | None = None,
        allow: Sequence[str] = ...,
        hold: float = 5.0,
        protocol: Literal["tcp", "http"] = "tcp",
    ) -> Proxy:
        """With ``ca_pem``, ``cert_pem`` and ``key_pem`` it is an mTLS front: clients present a
        certificate from that CA whose SPIFFE ID is in ``allow`` (empty: any), or the handshake
        fails; upstreams get plain TCP. While there is no upstream at all, a connection waits
        up to ``hold`` seconds for one (0: closed at once). ``protocol="http"`` frames HTTP/1:
        a removed upstream's connections end at a message boundary (``Connection: close`` on
        the next response; closed after a second quiet between messages)."""
    def active(self, id: str) -> int:
        """Connections open now to upstream ``id`` (still one, or removed and draining)."""
    @property
    def held(self) -> int:
        """Connections waiting now for an upstream to appear."""
    @property
    def port(self) -> int: ...
    @property
    def address(self) -> str:
        """``host:port`` it listens on."""
    def set_upstreams(self, upstreams: Iterable[tuple[str, str, int] | tuple[str, str, int, int]]) -> None:
        """Makes these ``(id, host, port[, weight])`` the upstreams."""
    def stats(self) -> ProxyStats:
        """The front's counters now."""
    def set_certificate(self, cert_pem: str, key_pem: str) -> None:
        """Presents a new certificate from the next handshake on (mTLS fronts)."""
    def set_strategy(self, strategy: str) -> None:
        """Changes the balancing strategy from the next connection on; the upstreams and the
        connections in flight stay (``ConfigError`` for an unknown name)."""
    def set_protocol(self, protocol: str) -> None:
        """``"http"`` or ``"tcp"``, for connections accepted from now on (``ConfigError`` for another)."""
    def set_hold(self, hold: float) -> None:
        """How long a connection waits for an upstream while there is none, seconds, from the
        next such wait on (0: closed at once)."""
    def set_tls(self, ca_pem: str | None = None, cert_pem: str | None = None, key_pem: str | None = None,
                allow: Iterable[str] = ...) -> None:
        """Makes the front mTLS (all three PEMs; ``allow`` as in the constructor) or plain
        (none of them), from the next connection on; open connections keep theirs."""
    def close(self) -> None:
        """Stops accepting; open connections finish."""

@final
class UpstreamStats:
    """The counters of one upstream of a front."""

    @property
    def id(self) -> str: ...
    @property
    def address(self) -> str: ...
    @property
    def ejected(self) -> bool:
        """Ejected now (its breaker is open)."""
    @property
    def connections(self) -> int:
        """Connections relayed to it."""
    @property
    def active(self) -> int:
        """Open now."""
    @property
    def bytes_in(self) -> int:
        """From clients to it."""
    @property
    def bytes_out(self) -> int:
        """From it to clients."""
    @property
    def errors(self) -> int:
        """Connect failures and resets."""
    @property
    def ejections(self) -> int:
        """Times it was ejected."""
    @property
    def connect_buckets(self) -> list[int]:
        """Connects at or below each bound of ``CONNECT_BOUNDS``, cumulative."""
    @property
    def connect_sum(self) -> float:
        """Seconds spent connecting to it, in all."""
    @property
    def connect_count(self) -> int:
        """Connects to it attempted (failed ones too)."""
    def to_dict(self) -> dict[str, Any]:
        """The JSON shape."""

@final
class ProxyStats:
    """The counters of a front: its totals, its refusals and each upstream's."""

    @property
    def address(self) -> str:
        """``host:port`` it listens on."""
    @property
    def connections(self) -> int: ...
    @property
    def active(self) -> int: ...
    @property
    def bytes_in(self) -> int: ...
    @property
    def bytes_out(self) -> int: ...
    @property
    def errors(self) -> int: ...
    @property
    def ejections(self) -> int: ...
    @property
    def refused(self) -> int:
        """Connections closed because no upstream could take them."""
    @property
    def tls_refused(self) -> int:
        """Connections refused at the TLS handshake (mTLS fronts)."""
    @property
    def upstreams(self) -> list[UpstreamStats]: ...
    def to_dict(self) -> dict[str, Any]:
        """The JSON shape (``GET /v1/status`` serves it under ``fronts.<service>``)."""

# --- mesh -------------------------------------------------------------------------

@final
class IssuedCert:
    """A service certificate: files, PEMs, serial (hex), expiry (epoch seconds), SPIFFE ID."""

    @property
    def cert_path(self) -> Path: ...
    @property
    def key_path(self) -> Path: ...
    @property
    def cert_pem(self) -> str: ...
    @property
    def key_pem(self) -> str: ...
    @property
    def serial(self) -> str: ...
    @property
    def not_after(self) -> float: ...
    @property
    def spiffe_id(self) -> str: ...

@final
class Authority:
    """The local certificate authority in ``dir`` (``ca.crt``, ``ca.key``, mode 0600, the
    directory 0700; created on first use) for the trust domain ``<stack>.corral``. An existing
    key that is a link, another user's, or writable by others raises ``MeshError``."""

    def __new__(cls, dir: str | PathLike[str], trust_domain: str) -> Authority: ...
    @property
    def ca_pem(self) -> str: ...
    @property
    def ca_path(self) -> Path: ...
    def spiffe_id(self, service: str) -> str:
        """``spiffe://<trust domain>/svc/<service>``."""
    def issue(self, service: str, lifetime: float = 86400.0, *, not_before: float | None = None) -> IssuedCert:
        """Issues ``service``'s certificate (URI SAN = its SPIFFE ID, loopback SANs) for
        ``lifetime`` seconds from now (or from ``not_before``) and writes ``services/<service>.crt``
        and ``services/<service>.key`` (0600) under the CA's directory, replacing any before."""

# --- cgroup -----------------------------------------------------------------------

@final
class Cgroups:
    """Memory limits through cgroup v2 (``memory.max``/``low``/``swap.max``) or v1
    (``memory.limit_in_bytes``/``soft_limit_in_bytes``/``memsw``)."""

    @staticmethod
    def detect(mount: str | PathLike[str] = ..., parent: str = ...) -> Cgroups:
        """Inspects ``mount`` (default ``/sys/fs/cgroup``) and prepares ``parent`` (default
        ``corral``) below it; never raises."""
    @property
    def mode(self) -> Literal["v2", "v1", "unavailable"]: ...
    @property
    def reason(self) -> str | None:
        """Why limits are unavailable."""
    @property
    def base(self) -> Path: ...
    def create(self, name: str, *, max: int | None = None, low: int | None = None, swap: int | None = None) -> Path:
        """Creates cgroup ``name`` with limits in bytes; returns its directory."""
    def kill(self, path: str | PathLike[str]) -> int:
        """Ends every process of an instance's cgroup, wherever it went: ``cgroup.kill`` (v2),
        else SIGKILL to each pid of ``cgroup.procs``; returns how many were signalled by hand."""
    def remove(self, path: str | PathLike[str]) -> bool:
        """Removes an empty instance cgroup; returns whether it went."""

@final
class DiskUsage:
    """What a walk of a volume found (see :func:`disk_usage`)."""

    @property
    def bytes(self) -> int:
        """Allocated bytes (512-byte blocks, as ``du`` counts), every inode once."""
    @property
    def inodes(self) -> int:
        """Distinct inodes, the root included."""
    @property
    def skipped(self) -> int:
        """Entries that could not be read, or that changed under the walk."""
    @property
    def other_filesystems(self) -> int:
        """Directories not entered because they are on another filesystem."""
    @property
    def truncated(self) -> bool:
        """Whether the walk stopped at ``max_entries`` (the figures are then a lower bound)."""

def disk_usage(path: str | PathLike[str], max_entries: int = 10_000_000) -> DiskUsage:
    """Measures the tree at ``path`` as ``du -sx`` does: no link followed, one filesystem,
    hard links once, at most ``max_entries`` entries; off the GIL. Raises
    :class:`~corral.exceptions.ConfigError` when ``path`` is a symbolic link, ``OSError``
    when it cannot be opened as a directory."""

# --- volume ------------------------------------------------------------------------------

def volume_support() -> str | None:
    """Why this process cannot loop-mount volume images here (not root, no loop device, no
    ``mkfs.ext4``, no ext4), or None when it can."""

def create_volume_image(image: str | PathLike[str], size: int, uid: int | None = None,
                        gid: int | None = None) -> None:
    """Makes a new ext4 image of ``size`` bytes at ``image`` (0600, sparse), its root owned
    by ``uid``:``gid`` when given. Raises ``FileExistsError`` for an existing file,
    ``OSError`` when ``mkfs.ext4`` fails (nothing is left behind then)."""

def grow_volume_image(image: str | PathLike[str], size: int) -> None:
    """Grows an unmounted image to ``size`` bytes; :class:`~corral.exceptions.ConfigError`
    for a smaller size."""

def mount_volume_image(image: str | PathLike[str], target: str | PathLike[str]) -> str:
    """Mounts ``image`` at the directory ``target`` through a free loop device (nosuid,
    nodev); returns the device's path. ``OSError`` when it cannot (nothing stays attached)."""

def unmount_volume(target: str | PathLike[str]) -> bool:
    """Unmounts ``target``; True when it was busy and was detached lazily instead."""

def mounted_volume_image(target: str | PathLike[str]) -> str | None:
    """The image mounted at ``target``, or None."""

def volume_mounts() -> list[tuple[str, str]]:
    """Every loop-backed mount: (mount point, image)."""
