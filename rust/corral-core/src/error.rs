//! One error enum per concern. Messages name the resource and the numbers,
//! so a log line alone says what ran out and by how much.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Errors from the [`crate::ports::PortAllocator`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PortError {
    /// Every port of every range is allocated, reserved or held by another process.
    #[error("port range {ranges} exhausted ({in_use} of {total} in use)")]
    Exhausted {
        /// The ranges, as `start-end[,start-end...]`.
        ranges: String,
        /// Ports that cannot be handed out (allocated, reserved or held elsewhere).
        in_use: usize,
        /// Ports in all ranges.
        total: usize,
    },
    /// The port asked for is already allocated, reserved or bound by someone else.
    #[error("port {port} is in use{}", holder.as_ref().map(|h| format!(" by {h}")).unwrap_or_default())]
    InUse {
        /// The port.
        port: u16,
        /// Who holds it, when known (an allocation name, "reserved", or a process).
        holder: Option<String>,
    },
    /// The port lies outside every configured range.
    #[error("port {port} is outside the allocator's ranges {ranges}")]
    OutOfRange {
        /// The port.
        port: u16,
        /// The ranges, as `start-end[,start-end...]`.
        ranges: String,
    },
    /// Release of a port that is not allocated.
    #[error("port {port} is not allocated")]
    NotAllocated {
        /// The port.
        port: u16,
    },
    /// A range whose start lies after its end, or an empty list of ranges.
    #[error("invalid port range: {0}")]
    InvalidRange(String),
}

/// The call was rejected because the circuit is open.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("circuit {state}: call rejected, retry in {remaining_secs:.3}s")]
pub struct CircuitOpen {
    /// `"open"`, `"forced_open"` or `"half_open"` (all trial permits taken).
    pub state: &'static str,
    /// Seconds until the breaker admits trial calls again (0 when unknown).
    pub remaining_secs: f64,
}

/// Errors from reading a topology out of a sysfs tree.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TopologyError {
    /// A file that must exist could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file held something that is not what sysfs writes there.
    #[error("cannot parse {path}: {detail}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// No usable CPU was found.
    #[error("no usable CPU found under {0}")]
    NoCpus(PathBuf),
}

/// Errors from the [`crate::resources::ResourceManager`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ResourceError {
    /// The request does not fit in what is free now; the message says what was short and by how much.
    #[error("{0}")]
    Insufficient(String),
    /// The request names a volume the manager does not know.
    #[error("unknown volume '{0}'")]
    UnknownVolume(String),
    /// The request is malformed (negative share, storage without a volume, ...).
    #[error("invalid resource request: {0}")]
    InvalidRequest(String),
    /// The grant was released already, or never came from this manager.
    #[error("grant {0} is not held (released twice, or from another manager)")]
    UnknownGrant(u64),
    /// The manager's configuration is inconsistent (a reserved CPU that does not exist, ...).
    #[error("invalid resource configuration: {0}")]
    InvalidConfig(String),
    /// What other holders have contradicts a grant held here (see `set_elsewhere`).
    #[error("resource conflict: {0}")]
    Conflict(String),
}

/// Errors from retry policies: construction, and retries that ran out on a result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RetryError {
    /// A parameter is out of its domain (negative delay, multiplier below 1, ...).
    #[error("invalid retry policy: {0}")]
    InvalidPolicy(String),
    /// Attempts ran out while the result still asked for a retry.
    #[error("gave up after {attempts} attempts: the result still asked for a retry")]
    Exhausted {
        /// Attempts made.
        attempts: u32,
    },
}

/// Errors from the circuit breaker's configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BreakerError {
    /// A parameter is out of its domain.
    #[error("invalid circuit breaker configuration: {0}")]
    InvalidConfig(String),
}

/// Errors from the load balancer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BalanceError {
    /// No backend is up.
    #[error("no backend available ({total} configured, {down} down)")]
    NoBackend {
        /// Backends configured.
        total: usize,
        /// Of them, marked down.
        down: usize,
    },
    /// A parameter is out of its domain (weights of the wrong length, a zero weight ...).
    #[error("invalid load balancer configuration: {0}")]
    InvalidConfig(String),
}

/// Errors from starting and signalling processes ([`crate::process`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProcessError {
    /// The command line is empty.
    #[error("empty command")]
    EmptyCommand,
    /// The program could not be started (not found, not executable, bad working directory,
    /// affinity or cgroup refused before exec).
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// The program (argv\[0\]).
        program: String,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A CPU in the affinity set does not exist on this machine.
    #[error("CPU {cpu} is beyond the affinity mask's size ({max})")]
    BadCpu {
        /// The CPU asked for.
        cpu: usize,
        /// CPUs a mask can hold.
        max: usize,
    },
    /// The log file could not be opened.
    #[error("cannot open log file {path}: {source}")]
    Log {
        /// The log file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A signal could not be sent.
    #[error("cannot send signal {signal} to process group {pgid}: {source}")]
    Signal {
        /// The process group.
        pgid: u32,
        /// The signal number.
        signal: i32,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A process started elsewhere could not be watched (no pidfd for it).
    #[error("cannot watch pid {pid}: {source}")]
    Adopt {
        /// The process.
        pid: u32,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The log keeper could not be reached, or refused an instance's output.
    #[error("log keeper {path}: {source}")]
    Keeper {
        /// The keeper's socket.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
}

/// Errors from the cgroup memory controller ([`crate::cgroup`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CgroupError {
    /// No usable memory controller (no cgroupfs, read-only, controller not delegated).
    #[error("cgroup memory limits unavailable: {0}")]
    Unavailable(String),
    /// A cgroup file or directory could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
}

/// Errors of the mesh ([`crate::mesh`]): its authority's files, certificates, TLS setup.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MeshError {
    /// A file of the authority could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// Key or certificate generation or parsing failed.
    #[error("certificate: {0}")]
    Certificate(String),
    /// A file of the authority is not safely ours (another owner, a link, writable by others).
    #[error("refusing {path}: {reason}")]
    Untrusted {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Errors from the front proxy ([`crate::proxy`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// The front's address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A parameter is out of its domain (a zero attempt count, a percentage above 100, ...).
    #[error("invalid proxy configuration: {0}")]
    InvalidConfig(String),
    /// The front's TLS configuration was refused (bad certificate, key or CA).
    #[error("mTLS front: {0}")]
    Tls(#[from] MeshError),
    /// A TLS operation on a front that is plain TCP.
    #[error("not an mTLS front")]
    NotTls,
}
