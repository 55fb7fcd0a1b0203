//! The load-balancing proxy.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use corral_core::balance::Strategy;
use corral_core::breaker::BreakerConfig;
use corral_core::mesh::TlsFront;
use corral_core::proxy::{CounterSnapshot, Proxy as Core, ProxyConfig};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::{bad_arg, seconds};

/// All proxies share one runtime with one worker thread of their own. A multi-threaded
/// runtime with a single worker, not a current-thread one: the latter wakes tasks readied
/// while it waits on epoll through its injection queue and an eventfd write, one extra
/// system call per request (measured with strace under `make bench-proxy`).
fn runtime() -> PyResult<&'static tokio::runtime::Handle> {
    static HANDLE: OnceLock<tokio::runtime::Handle> = OnceLock::new();
    if let Some(h) = HANDLE.get() {
        return Ok(h);
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("corral-proxy".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("corral-proxy")
                .enable_all()
                .build();
            match rt {
                Ok(rt) => {
                    let _ = tx.send(Ok(rt.handle().clone()));
                    rt.block_on(std::future::pending::<()>());
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        })
        .map_err(|e| {
            pyo3::exceptions::PyOSError::new_err(format!("cannot start the proxy thread: {e}"))
        })?;
    let handle = rx
        .recv()
        .map_err(|e| pyo3::exceptions::PyOSError::new_err(e.to_string()))?
        .map_err(|e| {
            pyo3::exceptions::PyOSError::new_err(format!("cannot start the proxy runtime: {e}"))
        })?;
    Ok(HANDLE.get_or_init(|| handle))
}

/// A TCP front for a set of upstreams: balanced, with outlier ejection and draining.
#[pyclass(frozen, module = "corral._core")]
pub struct Proxy {
    inner: Arc<Core>,
}

fn counters<'py>(py: Python<'py>, c: &CounterSnapshot) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("connections", c.connections)?;
    d.set_item("active", c.active)?;
    d.set_item("bytes_in", c.bytes_in)?;
    d.set_item("bytes_out", c.bytes_out)?;
    d.set_item("errors", c.errors)?;
    d.set_item("ejections", c.ejections)?;
    Ok(d)
}

#[pymethods]
impl Proxy {
    #[new]
    #[pyo3(signature = (host = "127.0.0.1".to_owned(), port = 0, *, strategy = "least_connections",
        connect_timeout = 1.0, max_attempts = 3, max_ejection_percent = 50, failure_threshold = 3,
        ejection_time = 5.0, max_ejection_time = 60.0, ca_pem = None, cert_pem = None, key_pem = None,
        allow = Vec::new()))]
    fn new(
        py: Python<'_>,
        host: String,
        port: u16,
        strategy: &str,
        connect_timeout: f64,
        max_attempts: u32,
        max_ejection_percent: u32,
        failure_threshold: u32,
        ejection_time: f64,
        max_ejection_time: f64,
        ca_pem: Option<String>,
        cert_pem: Option<String>,
        key_pem: Option<String>,
        allow: Vec<String>,
    ) -> PyResult<Self> {
        let strategy = Strategy::parse(strategy).ok_or_else(|| {
            bad_arg(
                "strategy",
                strategy,
                "'round_robin', 'weighted', 'least_connections', 'ip_hash', 'random'",
            )
        })?;
        let ip: IpAddr = host.parse().map_err(|_| {
            PyValueError::new_err(format!("host must be an IP address, got {host:?}"))
        })?;
        if max_attempts == 0 || failure_threshold == 0 || max_ejection_percent > 100 {
            return Err(PyValueError::new_err(
                "max_attempts and failure_threshold must be at least 1, max_ejection_percent at most 100",
            ));
        }
        let cfg = ProxyConfig {
            strategy,
            connect_timeout: seconds("connect_timeout", connect_timeout)?,
            max_attempts,
            max_ejection_percent,
            breaker: BreakerConfig {
                failure_threshold,
                reset_timeout: seconds("ejection_time", ejection_time)?,
                max_reset_timeout: Some(
                    seconds("max_ejection_time", max_ejection_time)?.max(Duration::from_millis(1)),
                ),
                ..BreakerConfig::default()
            },
            ..ProxyConfig::default()
        };
        let handle = runtime()?;
        let addr = SocketAddr::new(ip, port);
        let inner = match (ca_pem, cert_pem, key_pem) {
            (None, None, None) => py.detach(|| Core::bind(addr, cfg, handle))?,
            (Some(ca), Some(cert), Some(key)) => {
                let tls = TlsFront::new(&ca, &cert, &key, allow)
                    .map_err(|e| PyValueError::new_err(e.to_string()))?;
                py.detach(|| Core::bind_tls(addr, cfg, handle, tls))?
            }
            _ => {
                return Err(PyValueError::new_err(
                    "an mTLS front needs ca_pem, cert_pem and key_pem",
                ))
            }
        };
        Ok(Proxy { inner })
    }

    /// The port it listens on.
    #[getter]
    fn port(&self) -> u16 {
        self.inner.local_addr().port()
    }

    /// `host:port` it listens on.
    #[getter]
    fn address(&self) -> String {
        self.inner.local_addr().to_string()
    }

    /// Makes these `(id, host, port)` or `(id, host, port, weight)` the upstreams.
    fn set_upstreams(&self, upstreams: Vec<Bound<'_, PyAny>>) -> PyResult<()> {
        let mut list = Vec::with_capacity(upstreams.len());
        for u in upstreams {
            let (id, host, port, weight): (String, String, u16, u32) =
                if let Ok(t) = u.extract::<(String, String, u16, u32)>() {
                    t
                } else {
                    let (id, host, port): (String, String, u16) = u.extract()?;
                    (id, host, port, 1)
                };
            let ip: IpAddr = host.parse().map_err(|_| {
                PyValueError::new_err(format!(
                    "upstream {id}: host must be an IP address, got {host:?}"
                ))
            })?;
            list.push((id, SocketAddr::new(ip, port), weight));
        }
        self.inner.set_upstreams(list);
        Ok(())
    }

    /// Counters of the proxy (plus `refused`) and of each upstream (under `upstreams`).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let (totals, refused) = self.inner.totals();
        let d = counters(py, &totals)?;
        d.set_item("refused", refused)?;
        d.set_item("tls_refused", self.inner.tls_refused())?;
        d.set_item("address", self.inner.local_addr().to_string())?;
        let ups = pyo3::types::PyList::empty(py);
        for (id, addr, ejected, c) in self.inner.upstreams() {
            let u = counters(py, &c)?;
            u.set_item("id", id)?;
            u.set_item("address", addr.to_string())?;
            u.set_item("ejected", ejected)?;
            ups.append(u)?;
        }
        d.set_item("upstreams", ups)?;
        Ok(d)
    }

    /// Presents a new certificate (PEM) from the next handshake on (mTLS fronts).
    fn set_certificate(&self, cert_pem: &str, key_pem: &str) -> PyResult<()> {
        let tls = self
            .inner
            .tls()
            .ok_or_else(|| PyValueError::new_err("not an mTLS front"))?;
        tls.set_certificate(cert_pem, key_pem)
            .map_err(|e| PyValueError::new_err(e.to_string()))
    }

    /// Stops accepting; open connections finish.
    fn close(&self) {
        self.inner.close();
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Proxy>()
}
