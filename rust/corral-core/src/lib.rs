//! # corral-core
//!
//! The mechanisms of corral, a single-machine service orchestrator, as a
//! plain Rust library with no Python anywhere in its dependency tree:
//!
//! - [`registry`]: a concurrent service registry with change notification;
//! - [`ports`]: a port allocator over ranges, with a bind check;
//! - [`breaker`]: a lock-free circuit breaker;
//! - [`retry`]: backoff schedules and a shared retry budget;
//! - [`balance`]: load balancing strategies over live backends;
//! - [`topology`]: NUMA / L3 / SMT topology from sysfs;
//! - [`resources`]: all-or-nothing CPU, memory and storage ledgers with
//!   topology-aware placement of exclusive cores;
//! - [`process`]: process supervision (own process group, CPU affinity and
//!   cgroup set before exec, rotated logs, exits and probe results as events);
//! - [`probe`]: HTTP, TCP and exec health probes with Kubernetes semantics;
//! - [`cgroup`]: memory limits through cgroup v2 or v1;
//! - [`proxy`]: a TCP load-balancing proxy with outlier ejection and draining;
//! - [`mesh`]: a local certificate authority and mTLS fronts;
//! - [`runtime`]: the tokio runtimes the supervisor and the proxies run on;
//! - [`private`]: owner-only files and directories (0600/0700 whatever the umask);
//! - [`du`]: disk usage of a volume, as `du -sx` measures it;
//! - [`volume`]: size-limited volumes (an ext4 image loop-mounted at a directory).
//!
//! Every libc call and every `unsafe` block is in one private module, `sys`;
//! the rest of the crate denies `unsafe_code`.
//!
//! Every type is `Send + Sync` and every method takes `&self`: share them
//! behind an `Arc` across threads. The Python package `corral` is a thin
//! binding over this crate.

#![deny(unsafe_code)]

pub mod balance;
pub mod breaker;
pub mod cgroup;
pub mod clock;
pub mod cpuset;
pub mod du;
pub mod error;
pub mod histogram;
pub mod http1;
pub mod keeper;
pub mod log;
pub mod mesh;
pub mod ports;
pub mod private;
pub mod probe;
pub mod process;
pub mod proxy;
pub mod registry;
pub mod resources;
pub mod retry;
pub mod rng;
pub mod runtime;
mod sys;
pub mod topology;
pub mod volume;

pub use error::{
    BalanceError, BreakerError, CgroupError, CircuitOpen, MeshError, PortError, ProcessError,
    ProxyError, ResourceError, RetryError, TopologyError,
};
