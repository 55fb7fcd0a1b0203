//! Health probe specifications and one-off checks.

use corral_core::probe::{run_check, Check, LogWatch, ProbeSpec as CoreSpec, RunAs};
use pyo3::prelude::*;

use crate::errors::{config_err, seconds};

/// One probe: what to check and on which schedule.
#[pyclass(frozen, module = "corral._core")]
pub struct ProbeSpec {
    pub(crate) inner: CoreSpec,
    kind: &'static str,
}

#[pymethods]
impl ProbeSpec {
    #[new]
    #[pyo3(signature = (kind, *, host = "127.0.0.1".to_owned(), port = 0, path = "/".to_owned(),
        argv = Vec::new(), env = Vec::new(), pattern = String::new(), offset = None, initial_delay = 0.0,
        period = 10.0, timeout = 1.0, success_threshold = 1, failure_threshold = 3, uid = None, gid = None,
        cwd = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        kind: &str,
        host: String,
        port: u16,
        path: String,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        pattern: String,
        offset: Option<u64>,
        initial_delay: f64,
        period: f64,
        timeout: f64,
        success_threshold: u32,
        failure_threshold: u32,
        uid: Option<u32>,
        gid: Option<u32>,
        cwd: Option<std::path::PathBuf>,
    ) -> PyResult<Self> {
        let (check, kind) = match kind {
            "http" => (Check::Http { host, port, path }, "http"),
            "tcp" => (Check::Tcp { host, port }, "tcp"),
            "exec" => {
                if argv.is_empty() {
                    return Err(config_err("exec probe needs a command (argv)"));
                }
                let run_as = RunAs { uid, gid, cwd };
                (Check::Exec { argv, env, run_as }, "exec")
            }
            "log" => {
                if pattern.is_empty() {
                    return Err(config_err("log probe needs a pattern"));
                }
                let watch = LogWatch::new(path, &pattern, offset)
                    .map_err(|e| config_err(format!("log pattern {pattern:?}: {e}")))?;
                (Check::Log(std::sync::Arc::new(watch)), "log")
            }
            other => {
                return Err(config_err(format!(
                    "kind: {other:?} is not one of 'http', 'tcp', 'exec', 'log'"
                )))
            }
        };
        if success_threshold == 0 || failure_threshold == 0 {
            return Err(config_err("probe thresholds must be at least 1"));
        }
        let period = seconds("period", period)?;
        if period.is_zero() {
            return Err(config_err("period must be positive"));
        }
        Ok(ProbeSpec {
            inner: CoreSpec {
                check,
                initial_delay: seconds("initial_delay", initial_delay)?,
                period,
                timeout: seconds("timeout", timeout)?,
                success_threshold,
                failure_threshold,
            },
            kind,
        })
    }

    /// `http`, `tcp` or `exec`.
    #[getter]
    fn kind(&self) -> &'static str {
        self.kind
    }

    #[getter]
    fn period(&self) -> f64 {
        self.inner.period.as_secs_f64()
    }

    #[getter]
    fn timeout(&self) -> f64 {
        self.inner.timeout.as_secs_f64()
    }

    /// One attempt, now: `(ok, message)`. Awaitable.
    fn check<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let check = self.inner.check.clone();
        let timeout = self.inner.timeout;
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            Ok(match run_check(&check, timeout).await {
                Ok(m) => (true, m),
                Err(m) => (false, m),
            })
        })
    }

    fn __repr__(&self) -> String {
        let what = match &self.inner.check {
            Check::Http { host, port, path } => format!("http://{host}:{port}{path}"),
            Check::Tcp { host, port } => format!("tcp {host}:{port}"),
            Check::Exec { argv, .. } => format!("exec {argv:?}"),
            Check::Log(w) => format!("log /{}/ in {}", w.pattern(), w.path().display()),
        };
        format!("ProbeSpec({what}, period={:?})", self.inner.period)
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<ProbeSpec>()
}
