//! Process supervision: the mechanism under corral's lifecycle engine.
//!
//! [`Supervisor::spawn`] starts a command in its own process group, with its
//! CPU affinity and cgroup set in the child *before* exec (so every thread it
//! ever creates inherits them), its stdout and stderr written to a log file
//! that rotates by size, and a task that reports its exit. Health probes run
//! on the same runtime ([`Supervisor::start_health`]). Exits and probe
//! verdicts arrive on one queue ([`Supervisor::next_event`]), so the policy
//! above sees nothing while nothing changes.
//!
//! ```
//! use corral_core::process::{Event, ProcessSpec, Supervisor};
//!
//! let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
//! let sup = Supervisor::new(rt.handle().clone());
//! let spec = ProcessSpec { argv: vec!["sh".into(), "-c".into(), "exit 3".into()], ..Default::default() };
//! let child = sup.spawn("job-0", &spec).unwrap();
//! match rt.block_on(sup.next_event()) {
//!     Some(Event::Exited { id, pid, code, .. }) => {
//!         assert_eq!((id.as_str(), pid, code), ("job-0", child.pid, Some(3)));
//!     }
//!     other => panic!("{other:?}"),
//! }
//! ```

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use dashmap::DashMap;
use parking_lot::Mutex;
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use crate::error::ProcessError;
use crate::keeper::KeeperLink;
use crate::log::copy_to_log;
pub use crate::log::{LogConfig, RotatingLog};
use crate::probe::{run_health_counted, Health, HealthStats, ProbeResult};
use crate::sys::{self, CpuMask, ThreadMask};

/// How to start a process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessSpec {
    /// Program and arguments; the program is looked up in `PATH`.
    pub argv: Vec<String>,
    /// Environment variables, added to the inherited environment (or alone with `clear_env`).
    pub env: Vec<(String, String)>,
    /// Start from an empty environment.
    pub clear_env: bool,
    /// Working directory.
    pub cwd: Option<PathBuf>,
    /// CPUs the process (and all its threads and children) may run on; empty: unchanged.
    pub cpus: Vec<usize>,
    /// A cgroup directory the child joins before exec (see [`crate::cgroup`]).
    pub cgroup: Option<PathBuf>,
    /// Output log; `None` discards output.
    pub log: Option<LogConfig>,
    /// Run as this user (the supplementary groups are dropped); needs root.
    pub uid: Option<u32>,
    /// Run with this group; needs root.
    pub gid: Option<u32>,
}

/// A started process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spawned {
    /// Its pid, which is also its process group id.
    pub pid: u32,
    /// Its start time in clock ticks since boot (`/proc/<pid>/stat` field 22), which tells
    /// a recycled pid from the original.
    pub start_time: u64,
}

/// What the supervisor reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A process started with [`Supervisor::spawn`] exited.
    Exited {
        /// The id it was spawned under.
        id: String,
        /// Its pid.
        pid: u32,
        /// Exit code, when it exited.
        code: Option<i32>,
        /// Signal number, when a signal ended it.
        signal: Option<i32>,
    },
    /// A probe of an instance reached a verdict.
    Probe {
        /// The id health was started under.
        id: String,
        /// The verdict.
        result: ProbeResult,
    },
}

/// Starts and watches processes; see the [module docs](self).
pub struct Supervisor {
    handle: Handle,
    /// Where each spawn appends `pid start_time id`, the moment it returns.
    pid_log: Mutex<Option<std::fs::File>>,
    tx: mpsc::UnboundedSender<Event>,
    rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<Event>>,
    health: DashMap<String, AbortHandle>,
    /// Every probe attempt of each id, kept across its restarts (counters only grow).
    probe_stats: DashMap<String, Arc<HealthStats>>,
    probe_tx: mpsc::UnboundedSender<(String, ProbeResult)>,
    /// Where output pipes go instead of this process ([`Supervisor::log_via_keeper`]).
    keeper: Mutex<Option<(PathBuf, Arc<KeeperLink>)>>,
    /// Why the keeper was let go ([`Supervisor::drop_keeper`], or a hand-over that failed).
    keeper_lost: Mutex<Option<String>>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("health_tasks", &self.health.len())
            .finish_non_exhaustive()
    }
}

impl Supervisor {
    /// A supervisor whose tasks run on `handle` (which needs its IO and time drivers).
    pub fn new(handle: Handle) -> Arc<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let (probe_tx, mut probe_rx) = mpsc::unbounded_channel::<(String, ProbeResult)>();
        let fwd = tx.clone();
        handle.spawn(async move {
            while let Some((id, result)) = probe_rx.recv().await {
                if fwd.send(Event::Probe { id, result }).is_err() {
                    break;
                }
            }
        });
        Arc::new(Supervisor {
            handle,
            pid_log: Mutex::new(None),
            tx,
            rx: tokio::sync::Mutex::new(rx),
            health: DashMap::new(),
            probe_stats: DashMap::new(),
            probe_tx,
            keeper: Mutex::new(None),
            keeper_lost: Mutex::new(None),
        })
    }

    /// From now on, the output of every spawn goes to the log keeper listening at `path`
    /// (see [`crate::keeper`]) instead of through this process: an instance's output then
    /// never depends on its supervisor being alive.
    pub fn log_via_keeper(&self, path: &Path) -> Result<(), ProcessError> {
        let link = KeeperLink::connect(path).map_err(|source| ProcessError::Keeper {
            path: path.to_path_buf(),
            source,
        })?;
        *self.keeper.lock() = Some((path.to_path_buf(), Arc::new(link)));
        Ok(())
    }

    /// Stops handing output to the keeper (it died): from the next spawn on, output goes
    /// through this process to the log, as without a keeper. `why` is what
    /// [`Supervisor::keeper_lost`] says from then on.
    pub fn drop_keeper(&self, why: &str) {
        if self.keeper.lock().take().is_some() {
            *self.keeper_lost.lock() = Some(why.to_string());
        }
    }

    /// Why output no longer goes to the keeper, once it does not (None while it does, or
    /// when there never was one).
    pub fn keeper_lost(&self) -> Option<String> {
        self.keeper_lost.lock().clone()
    }

    /// Watches `pid`, started by another supervisor (an agent that died), through a pidfd:
    /// its exit is reported as [`Event::Exited`] under `id`, with no code or signal (only
    /// its parent can read those). `Ok(false)` when it is gone already.
    pub fn adopt(&self, id: &str, pid: u32) -> Result<bool, ProcessError> {
        let fd = match sys::pidfd_open(pid) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(false),
            Err(source) => return Err(ProcessError::Adopt { pid, source }),
        };
        let _guard = self.handle.enter();
        let watched = sys::async_pidfd(fd).map_err(|source| ProcessError::Adopt { pid, source })?;
        let tx = self.tx.clone();
        let id = id.to_owned();
        self.handle.spawn(async move {
            let _ = watched.readable().await;
            let _ = tx.send(Event::Exited {
                id,
                pid,
                code: None,
                signal: None,
            });
        });
        Ok(true)
    }

    /// From now on, every spawn appends `pid start_time id` to `path` (owner-only, opened
    /// for appending) the moment the process exists, before it is handed to the caller.
    /// Processes live in their own process groups and outlive their supervisor, so a
    /// supervisor killed right after a spawn must still leave a trace of what it started.
    pub fn log_pids_to(&self, path: &Path) -> Result<(), ProcessError> {
        let file = crate::private::open_append(path).map_err(|source| ProcessError::Log {
            path: path.to_path_buf(),
            source,
        })?;
        *self.pid_log.lock() = Some(file);
        Ok(())
    }

    /// Starts `spec` under `id`; its exit is reported as [`Event::Exited`].
    pub fn spawn(&self, id: &str, spec: &ProcessSpec) -> Result<Spawned, ProcessError> {
        let (program, args) = spec.argv.split_first().ok_or(ProcessError::EmptyCommand)?;
        let mut cmd = std::process::Command::new(program);
        cmd.args(args).stdin(Stdio::null()).process_group(0);
        if spec.clear_env {
            cmd.env_clear();
        }
        cmd.envs(spec.env.iter().map(|(k, v)| (k, v)));
        if let Some(cwd) = &spec.cwd {
            cmd.current_dir(cwd);
        }
        // In the child before exec: setgid, setgroups([]) (when root), then setuid.
        if let Some(gid) = spec.gid {
            cmd.gid(gid);
        }
        if let Some(uid) = spec.uid {
            cmd.uid(uid);
        }
        let keeper = self.keeper.lock().clone();
        let mut handed = false;
        if let (Some(cfg), Some((path, link))) = (&spec.log, &keeper) {
            // The keeper holds the read end before the child exists: whatever becomes of
            // this process, the child's output has a reader.
            let err = |source| ProcessError::Keeper {
                path: path.clone(),
                source,
            };
            let (read, write) = std::io::pipe().map_err(err)?;
            match link.hand_over(id, cfg, &read) {
                Ok(()) => {
                    drop(read);
                    cmd.stdout(Stdio::from(write.try_clone().map_err(err)?))
                        .stderr(Stdio::from(write));
                    handed = true;
                }
                // The keeper is gone (it died, or was killed): this spawn, and every one
                // after it, logs through this process rather than failing for good.
                Err(e) => self.drop_keeper(&format!("log keeper {}: {e}", path.display())),
            }
        }
        let log = if handed {
            None
        } else if let Some(cfg) = &spec.log {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
            Some(Arc::new(Mutex::new(RotatingLog::open(cfg)?)))
        } else {
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
            None
        };
        let affinity = cpu_set(&spec.cpus)?;
        let procs = match &spec.cgroup {
            Some(dir) => {
                let p = dir.join("cgroup.procs");
                let f = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&p)
                    .map_err(|e| ProcessError::Spawn {
                        program: program.clone(),
                        source: with_path(&e, &p),
                    })?;
                Some(f)
            }
            None => None,
        };
        // Two ways to get the affinity (and cgroup) in place before exec:
        // - with a cgroup to join, a pre_exec hook in the forked child writes its pid to the
        //   cgroup and sets the mask (fork copies the page tables of this, possibly large,
        //   process: ~1 ms);
        // - otherwise the child inherits the mask of the thread that spawns it, so this thread
        //   takes the mask for the moment of the spawn and the spawn stays on posix_spawn
        //   (vfork-like, no page table copy: several times faster).
        let mut restore = None;
        if let Some(f) = &procs {
            sys::before_exec_join(&mut cmd, affinity, f.as_raw_fd());
        } else if let Some(set) = &affinity {
            restore = Some(ThreadMask::set(set).map_err(|source| ProcessError::Spawn {
                program: program.clone(),
                source,
            })?);
        }
        let _guard = self.handle.enter();
        let spawned = tokio::process::Command::from(cmd).spawn();
        drop(restore);
        let mut child = spawned.map_err(|source| ProcessError::Spawn {
            program: program.clone(),
            source,
        })?;
        drop(procs);
        let pid = child.id().unwrap_or(0);
        let start_time = start_time(pid).unwrap_or(0);
        if let Some(f) = self.pid_log.lock().as_mut() {
            // One write(2) per line (O_APPEND): lines of concurrent spawns never interleave.
            let _ = std::io::Write::write_all(f, format!("{pid} {start_time} {id}\n").as_bytes());
        }
        if let Some(log) = log {
            if let Some(out) = child.stdout.take() {
                self.handle.spawn(copy_to_log(out, log.clone()));
            }
            if let Some(err) = child.stderr.take() {
                self.handle.spawn(copy_to_log(err, log));
            }
        }
        let tx = self.tx.clone();
        let id = id.to_owned();
        self.handle.spawn(async move {
            let (code, signal) = match child.wait().await {
                Ok(st) => (st.code(), st.signal()),
                Err(_) => (None, None),
            };
            let _ = tx.send(Event::Exited {
                id,
                pid,
                code,
                signal,
            });
        });
        Ok(Spawned { pid, start_time })
    }

    /// Starts several processes, on up to `threads` threads at once (each spawn waits for
    /// its exec; spawning in parallel hides that wait). Results come in the order given.
    pub fn spawn_many(
        &self,
        items: &[(String, ProcessSpec)],
        threads: usize,
    ) -> Vec<Result<Spawned, ProcessError>> {
        let threads = threads.clamp(1, items.len().max(1));
        if threads == 1 {
            return items
                .iter()
                .map(|(id, spec)| self.spawn(id, spec))
                .collect();
        }
        let chunk = items.len().div_ceil(threads);
        std::thread::scope(|scope| {
            let handles: Vec<_> = items
                .chunks(chunk)
                .map(|part| {
                    scope.spawn(move || {
                        part.iter()
                            .map(|(id, spec)| self.spawn(id, spec))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("spawn thread panicked"))
                .collect()
        })
    }

    /// Starts the probes of `health` for the instance `id`, replacing any running for it.
    /// Initial delays count from now.
    pub fn start_health(&self, id: &str, health: Health) {
        let stats = self.probe_stats.entry(id.to_owned()).or_default().clone();
        let task = self.handle.spawn(run_health_counted(
            health,
            tokio::time::Instant::now(),
            id.to_owned(),
            self.probe_tx.clone(),
            stats,
        ));
        if let Some(old) = self.health.insert(id.to_owned(), task.abort_handle()) {
            old.abort();
        }
    }

    /// Every probe attempt of `id` so far (None before its first probe).
    pub fn probe_stats(&self, id: &str) -> Option<Arc<HealthStats>> {
        self.probe_stats.get(id).map(|s| s.clone())
    }

    /// Stops the probes of `id`; returns whether any ran.
    pub fn stop_health(&self, id: &str) -> bool {
        self.health.remove(id).map(|(_, h)| h.abort()).is_some()
    }

    /// The next event, waiting for one; `None` never happens while the supervisor lives.
    pub async fn next_event(&self) -> Option<Event> {
        self.rx.lock().await.recv().await
    }

    /// Events already queued, without waiting (at most `max`).
    pub fn drain(&self, max: usize) -> Vec<Event> {
        let mut out = Vec::new();
        if let Ok(mut rx) = self.rx.try_lock() {
            while out.len() < max {
                match rx.try_recv() {
                    Ok(e) => out.push(e),
                    Err(_) => break,
                }
            }
        }
        out
    }
}

/// Sends `signal` to the process group `pgid`; `Ok(false)` when the group no longer exists.
pub fn signal_group(pgid: u32, signal: i32) -> Result<bool, ProcessError> {
    if pgid <= 1 {
        // killpg(0) and killpg(1) would hit our own group or everything: never.
        return Ok(false);
    }
    match sys::killpg(pgid, signal) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(false),
        Err(source) => Err(ProcessError::Signal {
            pgid,
            signal,
            source,
        }),
    }
}

/// Makes this process a child subreaper: the orphaned descendants of what it starts come to
/// it (to reap, and to find at a stop) instead of going to init.
pub fn become_subreaper() -> Result<(), ProcessError> {
    sys::set_child_subreaper().map_err(|source| ProcessError::Adopt {
        pid: std::process::id(),
        source,
    })
}

/// Sends `signal` to one process; false when it is gone (or `pid` is 0 or 1).
pub fn kill_pid(pid: u32, signal: i32) -> bool {
    pid > 1 && sys::kill(pid, signal).is_ok()
}

/// Live processes (this one excepted) whose environment, as they were started, holds the
/// entry `entry` (`KEY=value`): what an instance started inherits it, whatever group or
/// session it moved to, so a stop can find a daemon that left its process group. Only
/// processes this user may read are seen (all, as root).
pub fn find_by_env(entry: &str) -> Vec<u32> {
    let me = std::process::id();
    let want = entry.as_bytes();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|&pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|&b| b == 0).any(|kv| kv == want))
        })
        .filter(|&pid| alive(pid))
        .collect()
}

/// Whether any process of group `pgid` is alive (zombies included: they still hold the group).
pub fn group_alive(pgid: u32) -> bool {
    signal_group(pgid, 0).unwrap_or(true)
}

/// Pids in process group `pgid` that are not zombies, read from `/proc`.
pub fn group_members(pgid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| stat_fields(pid).is_some_and(|f| f.pgrp == pgid && f.state != 'Z'))
        .collect()
}

/// What the processes of one group use now: CPU time, resident memory, open descriptors.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupUsage {
    /// User and system CPU time of its live processes, in clock ticks.
    pub cpu_ticks: u64,
    /// Resident memory of its live processes, in bytes.
    pub rss_bytes: u64,
    /// Open file descriptors of its live processes.
    pub open_fds: u64,
    /// Live processes in it.
    pub processes: u32,
}

/// The usage of the process tree under each of `leaders` (an instance's process and what it
/// started, followed through `/proc/<pid>/task/<pid>/children`): the metrics of an instance
/// without a cgroup. Only the instances' own trees are read, not all of `/proc`.
///
/// Descriptors are counted from the size the kernel reports for `/proc/<pid>/fd` (Linux 6.2
/// and later: the slots taken in the descriptor table, one being reserved while the process
/// blocks in `accept`), which costs a `stat` instead of listing the directory, a third of
/// the whole read; older kernels report 0 there, and the directory is listed.
///
/// Past [`USAGE_CHUNK`] leaders the trees are read on one scoped thread per CPU (at most
/// four): the kernel's work behind each `/proc` file is most of the cost, and a scrape of
/// 200 instances then takes a fraction of the time on the caller's clock.
pub fn group_usage(leaders: &[u32]) -> Vec<GroupUsage> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    if leaders.len() < USAGE_CHUNK || threads == 1 {
        return leaders.iter().map(|&l| tree_usage(l)).collect();
    }
    let per = leaders.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let parts: Vec<_> = leaders
            .chunks(per)
            .skip(1)
            .map(|part| {
                scope.spawn(move || part.iter().map(|&l| tree_usage(l)).collect::<Vec<_>>())
            })
            .collect();
        let mut out: Vec<GroupUsage> = leaders[..per.min(leaders.len())]
            .iter()
            .map(|&l| tree_usage(l))
            .collect();
        for part in parts {
            out.extend(part.join().unwrap_or_default());
        }
        out
    })
}

/// Leaders below which [`group_usage`] reads on the caller's thread only.
pub const USAGE_CHUNK: usize = 64;

fn tree_usage(leader: u32) -> GroupUsage {
    let page = sys::page_size();
    let mut u = GroupUsage::default();
    let mut todo = vec![leader];
    let mut seen = 0usize;
    while let Some(pid) = todo.pop() {
        seen += 1;
        if pid == 0 || seen > 4096 {
            break;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        // From field 3 (state): utime is field 14, stime 15, rss (pages) 24.
        if f.first() == Some(&"Z") {
            continue;
        }
        let num = |k: usize| f.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        u.cpu_ticks += num(11) + num(12);
        u.rss_bytes += num(21) * page;
        let fd_dir = format!("/proc/{pid}/fd");
        u.open_fds += match std::fs::metadata(&fd_dir).map(|m| m.len()) {
            Ok(n) if n > 0 => n,
            _ => std::fs::read_dir(&fd_dir).map_or(0, |d| d.count() as u64),
        };
        u.processes += 1;
        if let Ok(children) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
            todo.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
    }
    u
}

/// Whether `pid` is a live process: it exists and is not a zombie (a dead process that its
/// parent, or a slow init, has not reaped yet).
pub fn alive(pid: u32) -> bool {
    stat_fields(pid).is_some_and(|f| f.state != 'Z')
}

/// A process's start time in clock ticks since boot, or `None` when it is gone.
pub fn start_time(pid: u32) -> Option<u64> {
    stat_fields(pid).map(|f| f.start_time)
}

struct Stat {
    state: char,
    pgrp: u32,
    start_time: u64,
}

fn stat_fields(pid: u32) -> Option<Stat> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: parse after the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); pgrp is field 5, starttime field 22.
    Some(Stat {
        state: f.first()?.chars().next()?,
        pgrp: f.get(2)?.parse().ok()?,
        start_time: f.get(19)?.parse().ok()?,
    })
}

fn cpu_set(cpus: &[usize]) -> Result<Option<CpuMask>, ProcessError> {
    if cpus.is_empty() {
        return Ok(None);
    }
    CpuMask::of(cpus)
        .map(Some)
        .map_err(|cpu| ProcessError::BadCpu {
            cpu,
            max: CpuMask::CAPACITY,
        })
}

fn with_path(e: &std::io::Error, p: &Path) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{}: {e}", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_of_self_has_our_group() {
        let st = stat_fields(std::process::id()).unwrap();
        assert_eq!(st.pgrp, sys::getpgrp());
        assert!(st.start_time > 0);
        assert!(alive(std::process::id()));
        assert!(!alive(u32::MAX - 1), "no such process");
    }
}
