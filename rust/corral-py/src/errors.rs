//! The one place where core errors become Python exceptions.
//!
//! The exception classes live in `corral/exceptions.py`, so they are
//! documented, typed and can inherit from builtins (`ConfigError` is also a
//! `ValueError`). Each is imported once and cached. Exceptions are raised as
//! (type, args) and instantiated lazily by `CPython`, which keeps the rejected
//! breaker call cheap.

use pyo3::exceptions::{PyOSError, PyTypeError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;

use corral_core::error::{
    BalanceError, BreakerError, CgroupError, CircuitOpen, MeshError, PortError, ProcessError,
    ProxyError, ResourceError, RetryError, TopologyError,
};

/// Cached exception classes from `corral.exceptions`, by name.
macro_rules! exception {
    ($fn:ident, $name:literal) => {
        pub(crate) fn $fn(py: Python<'_>) -> &Bound<'_, PyType> {
            static CELL: PyOnceLock<Py<PyType>> = PyOnceLock::new();
            CELL.get_or_init(py, || {
                py.import("corral.exceptions")
                    .and_then(|m| m.getattr($name))
                    .and_then(|t| t.cast_into::<PyType>().map_err(Into::into))
                    .map(Bound::unbind)
                    .expect(concat!("corral.exceptions defines ", $name))
            })
            .bind(py)
        }
    };
}

exception!(circuit_open_error, "CircuitOpenError");
exception!(ports_exhausted, "PortsExhausted");
exception!(port_in_use, "PortInUse");
exception!(port_error, "PortError");
exception!(insufficient_resources, "InsufficientResources");
exception!(resource_error, "ResourceError");
exception!(config_error, "ConfigError");
exception!(topology_error, "TopologyError");
exception!(no_backend_error, "NoBackendError");
exception!(retry_exhausted_error, "RetryExhausted");
exception!(mesh_error, "MeshError");
exception!(proxy_error, "ProxyError");

/// Conversion of a core error into the Python exception that documents it.
pub(crate) trait IntoPyErr {
    /// The Python exception.
    fn into_pyerr(self) -> PyErr;
}

fn raise<A>(ty: fn(Python<'_>) -> &Bound<'_, PyType>, args: A) -> PyErr
where
    A: for<'py> IntoPyObject<'py> + Send + Sync + 'static,
{
    Python::attach(|py| PyErr::from_type(ty(py).clone(), args))
}

impl IntoPyErr for CircuitOpen {
    /// Raised on every rejected call, so it carries only `(state, remaining)`;
    /// `CircuitOpenError.__str__` builds the message when someone reads it.
    fn into_pyerr(self) -> PyErr {
        Python::attach(|py| {
            PyErr::from_type(
                circuit_open_error(py).clone(),
                (self.state, self.remaining_secs),
            )
        })
    }
}

impl IntoPyErr for PortError {
    fn into_pyerr(self) -> PyErr {
        let msg = self.to_string();
        match self {
            PortError::Exhausted {
                ranges,
                in_use,
                total,
            } => raise(ports_exhausted, (msg, ranges, in_use, total)),
            PortError::InUse { port, holder } => raise(port_in_use, (msg, port, holder)),
            PortError::InvalidRange(_) => raise(config_error, (msg,)),
            _ => raise(port_error, (msg,)),
        }
    }
}

impl IntoPyErr for ResourceError {
    fn into_pyerr(self) -> PyErr {
        let msg = self.to_string();
        match self {
            ResourceError::Insufficient(_) => raise(insufficient_resources, (msg,)),
            ResourceError::InvalidConfig(_)
            | ResourceError::InvalidRequest(_)
            | ResourceError::UnknownVolume(_) => raise(config_error, (msg,)),
            _ => raise(resource_error, (msg,)),
        }
    }
}

impl IntoPyErr for TopologyError {
    fn into_pyerr(self) -> PyErr {
        match self {
            // I/O errors keep their errno so callers can catch FileNotFoundError and friends.
            TopologyError::Io { path, source } => os_error_at(
                &source,
                format!("cannot read {}", path.display()),
                Some(&path),
            ),
            other => raise(topology_error, (other.to_string(),)),
        }
    }
}

impl IntoPyErr for RetryError {
    fn into_pyerr(self) -> PyErr {
        raise(config_error, (self.to_string(),))
    }
}

/// `RetryExhausted(message, last_result, attempts)`: retries ran out on a result.
pub(crate) fn retry_exhausted(e: &RetryError, last: Py<PyAny>) -> PyErr {
    let attempts = match e {
        RetryError::Exhausted { attempts } => *attempts,
        _ => 0,
    };
    Python::attach(|py| {
        PyErr::from_type(
            retry_exhausted_error(py).clone(),
            (e.to_string(), last, attempts),
        )
    })
}

impl IntoPyErr for MeshError {
    fn into_pyerr(self) -> PyErr {
        let msg = self.to_string();
        match self {
            MeshError::Io { source, path } => os_error_at(&source, msg, Some(&path)),
            _ => raise(mesh_error, (msg,)),
        }
    }
}

impl IntoPyErr for ProxyError {
    fn into_pyerr(self) -> PyErr {
        let msg = self.to_string();
        match self {
            ProxyError::Bind { source, .. } => os_error(&source, msg),
            ProxyError::InvalidConfig(_) => raise(config_error, (msg,)),
            _ => raise(proxy_error, (msg,)),
        }
    }
}

impl IntoPyErr for BreakerError {
    fn into_pyerr(self) -> PyErr {
        raise(config_error, (self.to_string(),))
    }
}

impl IntoPyErr for BalanceError {
    fn into_pyerr(self) -> PyErr {
        let msg = self.to_string();
        match self {
            BalanceError::NoBackend { .. } => raise(no_backend_error, (msg,)),
            _ => raise(config_error, (msg,)),
        }
    }
}

impl IntoPyErr for ProcessError {
    fn into_pyerr(self) -> PyErr {
        let msg = self.to_string();
        match self {
            // The OSError subclass follows the errno (FileNotFoundError, PermissionError, ...);
            // the message names the program, file or process group.
            ProcessError::Spawn { source, .. }
            | ProcessError::Log { source, .. }
            | ProcessError::Signal { source, .. }
            | ProcessError::Adopt { source, .. }
            | ProcessError::Keeper { source, .. } => os_error(&source, msg),
            _ => raise(config_error, (msg,)),
        }
    }
}

impl IntoPyErr for CgroupError {
    fn into_pyerr(self) -> PyErr {
        let msg = self.to_string();
        match self {
            CgroupError::Write { source, .. } => os_error(&source, msg),
            _ => raise(resource_error, (msg,)),
        }
    }
}

/// The builtin `OSError` subclass of `source`'s errno (`OSError(errno, msg)` picks it), with
/// `errno` and `strerror` set; `msg` names what failed.
fn os_error(source: &std::io::Error, msg: String) -> PyErr {
    os_error_at(source, msg, None)
}

pub(crate) fn os_error_at(
    source: &std::io::Error,
    msg: String,
    path: Option<&std::path::Path>,
) -> PyErr {
    match source.raw_os_error() {
        Some(errno) => match path {
            Some(p) => PyOSError::new_err((errno, msg, p.display().to_string())),
            None => PyOSError::new_err((errno, msg)),
        },
        // No errno (an error made in Rust): the subclass follows the error's kind.
        None => std::io::Error::new(source.kind(), msg).into(),
    }
}

/// Shorthand: `result.py()?`.
pub(crate) trait PyResultExt<T> {
    fn py(self) -> PyResult<T>;
}

impl<T, E: IntoPyErr> PyResultExt<T> for Result<T, E> {
    #[inline]
    fn py(self) -> PyResult<T> {
        self.map_err(IntoPyErr::into_pyerr)
    }
}

/// A `ConfigError` (also a `ValueError`): a bad argument.
pub(crate) fn config_err(msg: impl Into<String>) -> PyErr {
    raise(config_error, (msg.into(),))
}

/// Parses one of an enum's names (`parse` and `names` come from the core enum), or a
/// `ConfigError` naming the argument, what it got and what it accepts.
pub(crate) fn named<T>(
    name: &str,
    got: &str,
    parse: fn(&str) -> Option<T>,
    names: &[&str],
) -> PyResult<T> {
    parse(got).ok_or_else(|| {
        let accepted: Vec<String> = names.iter().map(|n| format!("'{n}'")).collect();
        config_err(format!(
            "{name}: {got:?} is not one of {}",
            accepted.join(", ")
        ))
    })
}

/// A `TypeError` for a wrong argument type.
pub(crate) fn bad_type(name: &str, expected: &str) -> PyErr {
    PyTypeError::new_err(format!("{name} must be {expected}"))
}

/// Seconds (float) to a Duration, rejecting negatives, NaN and infinities (`ConfigError`).
pub(crate) fn seconds(name: &str, v: f64) -> PyResult<std::time::Duration> {
    std::time::Duration::try_from_secs_f64(v).map_err(|_| {
        config_err(format!(
            "{name} must be a non-negative number of seconds, got {v}"
        ))
    })
}
