//! `ServiceRegistry`, `Instance`, and the async `watch()` iterator.

use std::collections::BTreeMap;
use std::sync::Arc;

use pyo3::exceptions::PyStopAsyncIteration;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use tokio::sync::broadcast::error::RecvError;

use corral_core::registry as core;

/// One instance of a service.
#[pyclass(frozen, module = "corral._core", name = "Instance")]
pub struct PyInstance {
    pub(crate) inner: Arc<core::Instance>,
}

#[pymethods]
impl PyInstance {
    #[new]
    #[pyo3(signature = (*, service, id, host, port, tags = Vec::new(), meta = BTreeMap::new(), healthy = true))]
    fn new(
        service: String,
        id: String,
        host: String,
        port: u16,
        tags: Vec<String>,
        meta: BTreeMap<String, String>,
        healthy: bool,
    ) -> Self {
        Self {
            inner: Arc::new(core::Instance {
                service,
                id,
                host,
                port,
                tags,
                meta,
                healthy,
            }),
        }
    }
    #[getter]
    fn service(&self) -> &str {
        &self.inner.service
    }
    #[getter]
    fn id(&self) -> &str {
        &self.inner.id
    }
    #[getter]
    fn host(&self) -> &str {
        &self.inner.host
    }
    #[getter]
    fn port(&self) -> u16 {
        self.inner.port
    }
    #[getter]
    fn tags<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, &self.inner.tags)
    }
    #[getter]
    fn meta<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, v) in &self.inner.meta {
            d.set_item(k, v)?;
        }
        Ok(d)
    }
    #[getter]
    fn healthy(&self) -> bool {
        self.inner.healthy
    }
    /// `host:port`.
    #[getter]
    fn address(&self) -> String {
        self.inner.address()
    }
    /// A copy with some fields changed.
    #[pyo3(signature = (*, service = None, id = None, host = None, port = None, tags = None, meta = None, healthy = None))]
    fn replace(
        &self,
        service: Option<String>,
        id: Option<String>,
        host: Option<String>,
        port: Option<u16>,
        tags: Option<Vec<String>>,
        meta: Option<BTreeMap<String, String>>,
        healthy: Option<bool>,
    ) -> Self {
        let i = &self.inner;
        Self {
            inner: Arc::new(core::Instance {
                service: service.unwrap_or_else(|| i.service.clone()),
                id: id.unwrap_or_else(|| i.id.clone()),
                host: host.unwrap_or_else(|| i.host.clone()),
                port: port.unwrap_or(i.port),
                tags: tags.unwrap_or_else(|| i.tags.clone()),
                meta: meta.unwrap_or_else(|| i.meta.clone()),
                healthy: healthy.unwrap_or(i.healthy),
            }),
        }
    }
    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other
            .cast::<PyInstance>()
            .is_ok_and(|o| *o.get().inner == *self.inner)
    }
    fn __hash__(&self) -> u64 {
        corral_core::rng::stable_hash(self.inner.id.as_bytes())
    }
    fn __repr__(&self) -> String {
        let i = &self.inner;
        format!(
            "Instance(service={:?}, id={:?}, host={:?}, port={}, healthy={})",
            i.service,
            i.id,
            i.host,
            i.port,
            if i.healthy { "True" } else { "False" }
        )
    }
}

fn wrap(inner: &Arc<core::Instance>) -> PyInstance {
    PyInstance {
        inner: inner.clone(),
    }
}

/// A change to the registry, as yielded by `watch()`.
#[pyclass(frozen, module = "corral._core")]
pub struct RegistryEvent {
    /// `registered`, `replaced`, `deregistered`, `health_changed`, or `lagged` (re-list: changes were missed).
    #[pyo3(get)]
    kind: &'static str,
    /// Registry generation right after the change.
    #[pyo3(get)]
    generation: u64,
    /// The instance after the change (before, for `deregistered`); `None` for `lagged`.
    #[pyo3(get)]
    instance: Option<Py<PyInstance>>,
}

#[pymethods]
impl RegistryEvent {
    fn __repr__(&self) -> String {
        let id = self.instance.as_ref().map(|i| i.get().inner.id.clone());
        format!(
            "RegistryEvent(kind={:?}, generation={}, id={:?})",
            self.kind, self.generation, id
        )
    }
}

/// A concurrent registry of service instances.
#[pyclass(frozen, module = "corral._core")]
pub struct ServiceRegistry {
    inner: Arc<core::ServiceRegistry>,
}

#[pymethods]
impl ServiceRegistry {
    #[new]
    fn new() -> Self {
        Self {
            inner: Arc::new(core::ServiceRegistry::new()),
        }
    }
    /// Registers an instance; returns True when its id was new (False: it replaced one).
    fn register(&self, instance: &Bound<'_, PyInstance>) -> bool {
        self.inner
            .register(core::Instance::clone(&instance.get().inner))
    }
    /// Removes an instance; returns it, or None when the id is unknown.
    fn deregister(&self, id: &str) -> Option<PyInstance> {
        self.inner.deregister(id).as_ref().map(wrap)
    }
    /// The instance with this id, or None.
    fn get(&self, id: &str) -> Option<PyInstance> {
        self.inner.get(id).as_ref().map(wrap)
    }
    /// The instances of a service, in registration order.
    #[pyo3(signature = (service, healthy_only = false))]
    fn instances(&self, service: &str, healthy_only: bool) -> Vec<PyInstance> {
        self.inner
            .instances(service, healthy_only)
            .iter()
            .map(wrap)
            .collect()
    }
    /// Sets an instance's health; returns False when the id is unknown.
    fn set_health(&self, id: &str, healthy: bool) -> bool {
        self.inner.set_health(id, healthy)
    }
    /// Names of the services with at least one instance.
    fn services(&self) -> Vec<String> {
        self.inner.services()
    }
    /// A counter that grows on every change.
    #[getter]
    fn generation(&self) -> u64 {
        self.inner.generation()
    }
    fn __len__(&self) -> usize {
        self.inner.len()
    }
    fn __contains__(&self, id: &str) -> bool {
        self.inner.get(id).is_some()
    }
    /// An async iterator over changes from now on.
    fn watch(&self) -> RegistryWatch {
        RegistryWatch {
            rx: Arc::new(tokio::sync::Mutex::new(self.inner.subscribe())),
        }
    }
}

/// Async iterator of `RegistryEvent`s.
#[pyclass(frozen, module = "corral._core")]
pub struct RegistryWatch {
    rx: Arc<tokio::sync::Mutex<core::Watcher>>,
}

#[pymethods]
impl RegistryWatch {
    fn __aiter__(slf: Py<Self>) -> Py<Self> {
        slf
    }
    fn __anext__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let rx = self.rx.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            let got = rx.lock().await.recv().await;
            Python::attach(|py| match got {
                Ok(change) => Ok(RegistryEvent {
                    kind: change.kind.as_str(),
                    generation: change.generation,
                    instance: Some(Py::new(py, wrap(&change.instance))?),
                }),
                Err(RecvError::Lagged(_)) => Ok(RegistryEvent {
                    kind: "lagged",
                    generation: 0,
                    instance: None,
                }),
                Err(RecvError::Closed) => Err(PyStopAsyncIteration::new_err(())),
            })
        })
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyInstance>()?;
    m.add_class::<ServiceRegistry>()?;
    m.add_class::<RegistryEvent>()?;
    m.add_class::<RegistryWatch>()?;
    Ok(())
}
