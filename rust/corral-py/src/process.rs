//! The process supervisor: spawn, signal, events.

use std::path::PathBuf;
use std::sync::Arc;

use corral_core::probe::Health;
use corral_core::process::{self as core, Event, LogConfig, ProcessSpec};
use corral_core::runtime::Dedicated;
use pyo3::prelude::*;

use crate::errors::{config_err, IntoPyErr, PyResultExt};
use crate::probe::ProbeSpec;

/// Starts processes and reports their exits (`ProcessExited`) and probe verdicts
/// (`ProbeVerdict`).
#[pyclass(frozen, module = "corral._core")]
pub struct Supervisor {
    inner: Arc<core::Supervisor>,
    /// The supervisor's own runtime (see `corral_core::runtime`); dropping it ends its thread
    /// and with it its tasks.
    _runtime: Dedicated,
}

/// How to start one process (for `Supervisor.spawn_many`).
#[pyclass(frozen, module = "corral._core", name = "ProcessSpec")]
pub struct PyProcessSpec {
    inner: ProcessSpec,
}

#[pymethods]
impl PyProcessSpec {
    #[new]
    #[pyo3(signature = (argv, *, env = None, clear_env = false, cwd = None, cpus = Vec::new(),
        cgroup = None, log = None, log_max_bytes = 10 << 20, log_keep = 3, uid = None, gid = None))]
    fn new(
        argv: Vec<String>,
        env: Option<Vec<(String, String)>>,
        clear_env: bool,
        cwd: Option<PathBuf>,
        cpus: Vec<usize>,
        cgroup: Option<PathBuf>,
        log: Option<PathBuf>,
        log_max_bytes: u64,
        log_keep: usize,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> Self {
        PyProcessSpec {
            inner: ProcessSpec {
                argv,
                env: env.unwrap_or_default(),
                clear_env,
                cwd,
                cpus,
                cgroup,
                log: log.map(|path| LogConfig {
                    path,
                    max_bytes: log_max_bytes,
                    keep: log_keep,
                }),
                uid,
                gid,
            },
        }
    }

    #[getter]
    fn uid(&self) -> Option<u32> {
        self.inner.uid
    }

    #[getter]
    fn gid(&self) -> Option<u32> {
        self.inner.gid
    }

    #[getter]
    fn argv(&self) -> Vec<String> {
        self.inner.argv.clone()
    }

    #[getter]
    fn cpus(&self) -> Vec<usize> {
        self.inner.cpus.clone()
    }

    #[getter]
    fn env(&self) -> Vec<(String, String)> {
        self.inner.env.clone()
    }

    #[getter]
    fn cwd(&self) -> Option<PathBuf> {
        self.inner.cwd.clone()
    }
}

/// A process started by the supervisor exited.
#[pyclass(frozen, get_all, module = "corral._core")]
pub struct ProcessExited {
    id: String,
    pid: u32,
    code: Option<i32>,
    signal: Option<i32>,
}

#[pymethods]
impl ProcessExited {
    fn __repr__(&self) -> String {
        format!(
            "ProcessExited({} pid={} code={} signal={})",
            self.id,
            self.pid,
            opt(self.code),
            opt(self.signal)
        )
    }
}

/// A probe of an instance reached a verdict.
#[pyclass(frozen, get_all, module = "corral._core")]
pub struct ProbeVerdict {
    id: String,
    probe: &'static str,
    ok: bool,
    message: String,
}

#[pymethods]
impl ProbeVerdict {
    fn __repr__(&self) -> String {
        format!(
            "ProbeVerdict({} {} ok={} {:?})",
            self.id, self.probe, self.ok, self.message
        )
    }
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "None".to_owned(), |v| v.to_string())
}

fn convert(py: Python<'_>, e: Event) -> PyResult<Py<PyAny>> {
    Ok(match e {
        Event::Exited {
            id,
            pid,
            code,
            signal,
        } => Py::new(
            py,
            ProcessExited {
                id,
                pid,
                code,
                signal,
            },
        )?
        .into_any(),
        Event::Probe { id, result } => Py::new(
            py,
            ProbeVerdict {
                id,
                probe: result.kind.as_str(),
                ok: result.ok,
                message: result.message,
            },
        )?
        .into_any(),
    })
}

#[pymethods]
impl Supervisor {
    #[new]
    #[pyo3(signature = (*, pid_log = None, keeper = None))]
    fn new(pid_log: Option<PathBuf>, keeper: Option<PathBuf>) -> PyResult<Self> {
        let rt = Dedicated::current_thread("corral-supervisor")?;
        let inner = core::Supervisor::new(rt.handle().clone());
        if let Some(p) = pid_log {
            inner.log_pids_to(&p).py()?;
        }
        if let Some(k) = keeper {
            inner.log_via_keeper(&k).py()?;
        }
        Ok(Supervisor {
            inner,
            _runtime: rt,
        })
    }

    /// Stops handing output to the keeper (it died): later spawns log through this process.
    fn drop_keeper(&self, why: &str) {
        self.inner.drop_keeper(why);
    }

    /// Why output no longer goes to the keeper, or None while it does (or without one).
    fn keeper_lost(&self) -> Option<String> {
        self.inner.keeper_lost()
    }

    /// Starts `argv` under `id`; returns `(pid, start_time)`. The pid is also its process group.
    #[pyo3(signature = (id, argv, *, env = None, clear_env = false, cwd = None, cpus = Vec::new(),
        cgroup = None, log = None, log_max_bytes = 10 << 20, log_keep = 3, uid = None, gid = None))]
    fn spawn(
        &self,
        py: Python<'_>,
        id: &str,
        argv: Vec<String>,
        env: Option<Vec<(String, String)>>,
        clear_env: bool,
        cwd: Option<PathBuf>,
        cpus: Vec<usize>,
        cgroup: Option<PathBuf>,
        log: Option<PathBuf>,
        log_max_bytes: u64,
        log_keep: usize,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> PyResult<(u32, u64)> {
        let spec = PyProcessSpec::new(
            argv,
            env,
            clear_env,
            cwd,
            cpus,
            cgroup,
            log,
            log_max_bytes,
            log_keep,
            uid,
            gid,
        )
        .inner;
        // fork + exec take a while in a large process; let other Python threads run.
        let s = py.detach(|| self.inner.spawn(id, &spec)).py()?;
        Ok((s.pid, s.start_time))
    }

    /// Starts `(id, ProcessSpec)` pairs, several at a time; returns `(pid, start_time)` or the
    /// `OSError` of each, in order.
    #[pyo3(signature = (items, *, threads = 2))]
    fn spawn_many(
        &self,
        py: Python<'_>,
        items: Vec<(String, PyRef<'_, PyProcessSpec>)>,
        threads: usize,
    ) -> Vec<Py<PyAny>> {
        let items: Vec<(String, ProcessSpec)> = items
            .into_iter()
            .map(|(id, s)| (id, s.inner.clone()))
            .collect();
        let results = py.detach(|| self.inner.spawn_many(&items, threads));
        results
            .into_iter()
            .map(|r| match r {
                Ok(s) => (s.pid, s.start_time)
                    .into_pyobject(py)
                    .map(|t| t.into_any().unbind())
                    .expect("tuple"),
                Err(e) => e.into_pyerr().into_value(py).into_any(),
            })
            .collect()
    }

    /// Runs the given probes for instance `id` (replacing any it had); initial delays count from now.
    #[pyo3(signature = (id, *, startup = None, readiness = None, liveness = None))]
    fn start_health(
        &self,
        id: &str,
        startup: Option<PyRef<'_, ProbeSpec>>,
        readiness: Option<PyRef<'_, ProbeSpec>>,
        liveness: Option<PyRef<'_, ProbeSpec>>,
    ) {
        let spec = |p: Option<PyRef<'_, ProbeSpec>>| p.map(|p| p.inner.clone());
        self.inner.start_health(
            id,
            Health {
                startup: spec(startup),
                readiness: spec(readiness),
                liveness: spec(liveness),
            },
        );
    }

    /// Every probe attempt of `id`: `(probe, cumulative bucket counts, sum of seconds,
    /// attempts, failures)` for each probe that ran, the buckets' bounds in `PROBE_BOUNDS`.
    fn probe_stats(&self, id: &str) -> Vec<(&'static str, Vec<u64>, f64, u64, u64)> {
        let Some(stats) = self.inner.probe_stats(id) else {
            return Vec::new();
        };
        [
            ("startup", &stats.startup),
            ("readiness", &stats.readiness),
            ("liveness", &stats.liveness),
        ]
        .into_iter()
        .filter_map(|(kind, s)| {
            let (buckets, sum, count, failures) = s.snapshot();
            (count > 0).then_some((kind, buckets, sum, count, failures))
        })
        .collect()
    }

    /// Stops the probes of `id`; returns whether any ran.
    fn stop_health(&self, id: &str) -> bool {
        self.inner.stop_health(id)
    }

    /// Awaitable: the next event.
    fn next_event<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let sup = self.inner.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            let e = sup.next_event().await;
            Python::attach(|py| e.map(|e| convert(py, e)).transpose())
        })
    }

    /// Watches `pid`, started by an agent that died, through a pidfd: its exit arrives as
    /// a `ProcessExited` under `id` with neither code nor signal. False when it is gone.
    fn adopt(&self, id: &str, pid: u32) -> PyResult<bool> {
        self.inner.adopt(id, pid).py()
    }

    /// Events already queued, without waiting.
    #[pyo3(signature = (max = 4096))]
    fn drain(&self, py: Python<'_>, max: usize) -> PyResult<Vec<Py<PyAny>>> {
        self.inner
            .drain(max)
            .into_iter()
            .map(|e| convert(py, e))
            .collect()
    }
}

/// Sends `signal` to process group `pgid`; False when the group is gone.
#[pyfunction]
fn signal_group(pgid: u32, signal: i32) -> PyResult<bool> {
    core::signal_group(pgid, signal).py()
}

/// Whether any process of group `pgid` exists.
#[pyfunction]
fn group_alive(pgid: u32) -> bool {
    core::group_alive(pgid)
}

/// Live (non-zombie) pids of group `pgid`.
#[pyfunction]
fn group_members(pgid: u32) -> Vec<u32> {
    core::group_members(pgid)
}

/// Whether `pid` exists and is not a zombie.
#[pyfunction]
fn process_alive(pid: u32) -> bool {
    core::alive(pid)
}

/// Start time of `pid` in clock ticks since boot, or None if it is gone.
#[pyfunction]
fn process_start_time(pid: u32) -> Option<u64> {
    core::start_time(pid)
}

/// `(cpu_ticks, rss_bytes, open_fds, processes)` of the process tree under each leader
/// (read without the GIL).
#[pyfunction]
fn group_usage(py: Python<'_>, leaders: Vec<u32>) -> Vec<(u64, u64, u64, u32)> {
    py.detach(|| core::group_usage(&leaders))
        .into_iter()
        .map(|u| (u.cpu_ticks, u.rss_bytes, u.open_fds, u.processes))
        .collect()
}

/// Live processes whose starting environment holds `entry` (`KEY=value`).
#[pyfunction]
fn find_by_env(entry: &str) -> Vec<u32> {
    core::find_by_env(entry)
}

/// Sends `signal` to one process; False when it is gone.
#[pyfunction]
fn kill_pid(pid: u32, signal: i32) -> bool {
    core::kill_pid(pid, signal)
}

/// Makes this process a child subreaper (orphaned descendants come to it, not to init).
#[pyfunction]
fn become_subreaper() -> PyResult<()> {
    core::become_subreaper().py()
}

/// Binds a listening keeper socket at `path` (owner-only) and returns its descriptor, left
/// to be inherited across exec by the keeper (`LogKeeper(fd=...)`).
#[pyfunction]
fn keeper_listen(path: PathBuf) -> PyResult<i32> {
    use std::os::fd::IntoRawFd;
    Ok(corral_core::keeper::listen(&path)?.into_raw_fd())
}

/// Holds the output pipes of a stack's instances and writes their logs.
#[pyclass(frozen, module = "corral._core")]
pub struct LogKeeper {
    inner: std::sync::Arc<corral_core::keeper::LogKeeper>,
}

#[pymethods]
impl LogKeeper {
    /// Listens at `path` (owner-only; a stale socket there is replaced) and serves it on
    /// threads of its own; or, with `fd`, serves that inherited listening socket (from
    /// `keeper_listen` in the process that exec'd this one), which it then owns.
    #[new]
    #[pyo3(signature = (path = None, *, fd = None))]
    fn new(path: Option<PathBuf>, fd: Option<i32>) -> PyResult<Self> {
        let inner = match (path, fd) {
            (Some(p), None) => {
                corral_core::keeper::LogKeeper::serve(corral_core::keeper::listen(&p)?)?
            }
            (None, Some(fd)) => corral_core::keeper::LogKeeper::serve_inherited(fd)?,
            _ => {
                return Err(config_err(
                    "LogKeeper takes a path or an inherited fd, not both",
                ))
            }
        };
        Ok(LogKeeper { inner })
    }
    /// Pipes being copied now.
    #[getter]
    fn active(&self) -> usize {
        self.inner.active()
    }
    /// Pipes handed over since it started.
    #[getter]
    fn handed(&self) -> u64 {
        self.inner.handed()
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Supervisor>()?;
    m.add("PROBE_BOUNDS", corral_core::probe::DURATION_BOUNDS.to_vec())?;
    m.add(
        "CONNECT_BOUNDS",
        corral_core::histogram::CONNECT_BOUNDS.to_vec(),
    )?;
    m.add_class::<LogKeeper>()?;
    m.add_function(wrap_pyfunction!(become_subreaper, m)?)?;
    m.add_function(wrap_pyfunction!(keeper_listen, m)?)?;
    m.add_function(wrap_pyfunction!(find_by_env, m)?)?;
    m.add_function(wrap_pyfunction!(group_usage, m)?)?;
    m.add_function(wrap_pyfunction!(kill_pid, m)?)?;
    m.add_class::<ProcessExited>()?;
    m.add_class::<ProbeVerdict>()?;
    m.add_class::<PyProcessSpec>()?;
    m.add_function(wrap_pyfunction!(signal_group, m)?)?;
    m.add_function(wrap_pyfunction!(group_alive, m)?)?;
    m.add_function(wrap_pyfunction!(group_members, m)?)?;
    m.add_function(wrap_pyfunction!(process_start_time, m)?)?;
    m.add_function(wrap_pyfunction!(process_alive, m)?)?;
    Ok(())
}
