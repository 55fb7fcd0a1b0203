//! `LoadBalancer` over arbitrary Python backend objects, and its connection guard.

use std::sync::Arc;

use parking_lot::Mutex;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyInt, PyString};

use corral_core::balance::{self as core, Backend, Strategy};

use crate::errors::{config_err, named, PyResultExt};

type Lb = core::LoadBalancer<Py<PyAny>>;

/// A stable hash of a backend or key: str and bytes by content, int by value, anything else by `str()`.
fn key_hash(v: &Bound<'_, PyAny>) -> PyResult<u64> {
    if let Ok(s) = v.cast::<PyString>() {
        return Ok(core::hash_key(s.to_str()?.as_bytes()));
    }
    if let Ok(b) = v.cast::<PyBytes>() {
        return Ok(core::hash_key(b.as_bytes()));
    }
    if v.cast::<PyInt>().is_ok() {
        if let Ok(i) = v.extract::<i64>() {
            return Ok(core::hash_key(&i.to_le_bytes()));
        }
    }
    Ok(core::hash_key(v.str()?.to_str()?.as_bytes()))
}

/// Chooses among backends: `round_robin`, `weighted` (also spelled `weighted_round_robin`),
/// `least_connections`, `ip_hash`, `random`.
#[pyclass(frozen, module = "corral._core")]
pub struct LoadBalancer {
    inner: Lb,
}

impl LoadBalancer {
    /// The backend equal to `b` (Python equality), found outside any lock.
    fn find(&self, py: Python<'_>, b: &Bound<'_, PyAny>) -> PyResult<Arc<Backend<Py<PyAny>>>> {
        for cand in self.inner.backends() {
            if cand.value.bind(py).eq(b)? {
                return Ok(cand);
            }
        }
        Err(pyo3::exceptions::PyKeyError::new_err(format!(
            "no backend {}",
            b.repr()?
        )))
    }

    fn key(key: Option<&Bound<'_, PyAny>>) -> PyResult<Option<u64>> {
        key.filter(|k| !k.is_none()).map(key_hash).transpose()
    }
}

#[pymethods]
impl LoadBalancer {
    #[new]
    #[pyo3(signature = (backends, strategy = "round_robin", weights = None))]
    fn new(
        backends: &Bound<'_, PyAny>,
        strategy: &str,
        weights: Option<Vec<u32>>,
    ) -> PyResult<Self> {
        let strat = named("strategy", strategy, Strategy::parse, Strategy::NAMES)?;
        let items: Vec<Bound<'_, PyAny>> = backends.try_iter()?.collect::<PyResult<_>>()?;
        if let Some(w) = &weights {
            if w.len() != items.len() {
                return Err(config_err(format!(
                    "weights: {} given for {} backends",
                    w.len(),
                    items.len()
                )));
            }
        }
        let mut list = Vec::with_capacity(items.len());
        for (i, b) in items.into_iter().enumerate() {
            let w = weights.as_ref().map_or(1, |w| w[i]);
            list.push((key_hash(&b)?, b.unbind(), w));
        }
        let list = list.into_iter().map(|(k, v, w)| (v, k, w)).collect();
        Ok(Self {
            inner: Lb::with_keys(strat, list).py()?,
        })
    }

    /// A backend. `key` (a client address, a user id ...) matters to `ip_hash`.
    #[pyo3(signature = (key = None))]
    fn pick(&self, py: Python<'_>, key: Option<&Bound<'_, PyAny>>) -> PyResult<Py<PyAny>> {
        self.inner
            .pick_with(Self::key(key)?, |b| b.value.clone_ref(py))
            .py()
    }

    /// A context manager that picks a backend and counts a connection on it until the block ends.
    #[pyo3(signature = (key = None))]
    fn connection(&self, key: Option<&Bound<'_, PyAny>>) -> PyResult<ConnectionGuard> {
        let g = self.inner.connection(Self::key(key)?).py()?;
        Ok(ConnectionGuard {
            guard: Mutex::new(Some(g)),
        })
    }

    /// Stops sending traffic to a backend.
    fn mark_down(&self, py: Python<'_>, backend: &Bound<'_, PyAny>) -> PyResult<()> {
        self.find(py, backend)?.set_up(false);
        Ok(())
    }

    /// Sends traffic to a backend again.
    fn mark_up(&self, py: Python<'_>, backend: &Bound<'_, PyAny>) -> PyResult<()> {
        self.find(py, backend)?.set_up(true);
        Ok(())
    }

    /// Whether a backend receives traffic.
    fn is_up(&self, py: Python<'_>, backend: &Bound<'_, PyAny>) -> PyResult<bool> {
        Ok(self.find(py, backend)?.is_up())
    }

    /// Connections in flight on a backend.
    fn active(&self, py: Python<'_>, backend: &Bound<'_, PyAny>) -> PyResult<usize> {
        Ok(self.find(py, backend)?.active())
    }

    /// Adds a backend (up).
    #[pyo3(signature = (backend, weight = 1))]
    fn add(&self, backend: &Bound<'_, PyAny>, weight: u32) -> PyResult<()> {
        self.inner
            .add(backend.clone().unbind(), key_hash(backend)?, weight)
            .py()
    }

    /// Removes a backend; connections in flight keep their guard.
    fn remove(&self, py: Python<'_>, backend: &Bound<'_, PyAny>) -> PyResult<()> {
        let b = self.find(py, backend)?;
        self.inner.remove_backend(&b);
        Ok(())
    }

    /// The backends, in order.
    #[getter]
    fn backends(&self, py: Python<'_>) -> Vec<Py<PyAny>> {
        self.inner
            .backends()
            .iter()
            .map(|b| b.value.clone_ref(py))
            .collect()
    }

    /// The strategy's name.
    #[getter]
    fn strategy(&self) -> &'static str {
        self.inner.strategy().as_str()
    }

    /// Per backend: (backend, up, active connections, connections in total).
    fn stats(&self, py: Python<'_>) -> Vec<(Py<PyAny>, bool, usize, u64)> {
        self.inner
            .backends()
            .iter()
            .map(|b| {
                (
                    b.value.clone_ref(py),
                    b.is_up(),
                    b.active(),
                    b.connections(),
                )
            })
            .collect()
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }
}

/// A connection slot on a backend; `with lb.connection() as backend:`.
#[pyclass(frozen, module = "corral._core")]
pub struct ConnectionGuard {
    guard: Mutex<Option<core::ConnectionGuard<Py<PyAny>>>>,
}

#[pymethods]
impl ConnectionGuard {
    /// The chosen backend.
    #[getter]
    fn backend(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.guard
            .lock()
            .as_ref()
            .map(|g| g.backend().value.clone_ref(py))
            .ok_or_else(|| pyo3::exceptions::PyRuntimeError::new_err("connection already released"))
    }
    /// Releases the slot now (idempotent).
    fn release(&self) {
        drop(self.guard.lock().take());
    }
    fn __enter__(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.backend(py)
    }
    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, _exc: &Bound<'_, pyo3::types::PyTuple>) -> bool {
        self.release();
        false
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<LoadBalancer>()?;
    m.add_class::<ConnectionGuard>()?;
    Ok(())
}
