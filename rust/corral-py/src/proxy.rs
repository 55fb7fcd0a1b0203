//! The load-balancing proxy.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use corral_core::balance::Strategy;
use corral_core::breaker::BreakerConfig;
use corral_core::error::ProxyError;
use corral_core::mesh::TlsFront;
use corral_core::proxy::{CounterSnapshot, Proxy as Core, ProxyConfig};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::{config_err, named, seconds, PyResultExt};

fn is_http(protocol: &str) -> PyResult<bool> {
    match protocol {
        "tcp" => Ok(false),
        "http" => Ok(true),
        other => Err(config_err(format!(
            "protocol must be tcp or http, got {other:?}"
        ))),
    }
}

/// A TCP front for a set of upstreams: balanced, with outlier ejection and draining.
#[pyclass(frozen, module = "corral._core")]
pub struct Proxy {
    inner: Arc<Core>,
}

/// The counters of one upstream of a front.
#[pyclass(frozen, eq, get_all, module = "corral._core")]
#[derive(Clone, PartialEq)]
pub struct UpstreamStats {
    id: String,
    address: String,
    ejected: bool,
    connections: u64,
    active: u64,
    bytes_in: u64,
    bytes_out: u64,
    errors: u64,
    ejections: u64,
    /// Connects at or below each bound of `CONNECT_BOUNDS`, cumulative.
    connect_buckets: Vec<u64>,
    /// Seconds spent connecting, in all.
    connect_sum: f64,
    /// Connects attempted.
    connect_count: u64,
}

/// The counters of a front: its totals, refusals, and each upstream's.
#[pyclass(frozen, eq, get_all, module = "corral._core")]
#[derive(PartialEq)]
pub struct ProxyStats {
    address: String,
    connections: u64,
    active: u64,
    bytes_in: u64,
    bytes_out: u64,
    errors: u64,
    ejections: u64,
    refused: u64,
    tls_refused: u64,
    upstreams: Vec<UpstreamStats>,
}

fn put_counters(d: &Bound<'_, PyDict>, c: &CounterSnapshot) -> PyResult<()> {
    d.set_item("connections", c.connections)?;
    d.set_item("active", c.active)?;
    d.set_item("bytes_in", c.bytes_in)?;
    d.set_item("bytes_out", c.bytes_out)?;
    d.set_item("errors", c.errors)?;
    d.set_item("ejections", c.ejections)
}

impl UpstreamStats {
    fn counters(&self) -> CounterSnapshot {
        CounterSnapshot {
            connections: self.connections,
            active: self.active,
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            errors: self.errors,
            ejections: self.ejections,
        }
    }
}

#[pymethods]
impl UpstreamStats {
    /// The JSON shape (what `GET /v1/status` serves under `fronts.<service>.upstreams`).
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("id", &self.id)?;
        d.set_item("address", &self.address)?;
        d.set_item("ejected", self.ejected)?;
        put_counters(&d, &self.counters())?;
        Ok(d)
    }
    fn __repr__(&self) -> String {
        format!(
            "UpstreamStats({} {}{}, connections={}, active={}, errors={})",
            self.id,
            self.address,
            if self.ejected { " ejected" } else { "" },
            self.connections,
            self.active,
            self.errors
        )
    }
}

#[pymethods]
impl ProxyStats {
    /// The JSON shape (what `GET /v1/status` serves under `fronts.<service>`).
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("address", &self.address)?;
        put_counters(
            &d,
            &CounterSnapshot {
                connections: self.connections,
                active: self.active,
                bytes_in: self.bytes_in,
                bytes_out: self.bytes_out,
                errors: self.errors,
                ejections: self.ejections,
            },
        )?;
        d.set_item("refused", self.refused)?;
        d.set_item("tls_refused", self.tls_refused)?;
        let ups = pyo3::types::PyList::empty(py);
        for u in &self.upstreams {
            ups.append(u.to_dict(py)?)?;
        }
        d.set_item("upstreams", ups)?;
        Ok(d)
    }
    fn __repr__(&self) -> String {
        format!(
            "ProxyStats({}: {} upstreams, connections={}, active={}, errors={}, refused={})",
            self.address,
            self.upstreams.len(),
            self.connections,
            self.active,
            self.errors,
            self.refused
        )
    }
}

#[pymethods]
impl Proxy {
    #[new]
    #[pyo3(signature = (host = "127.0.0.1".to_owned(), port = 0, *, strategy = "least_connections",
        connect_timeout = 1.0, max_attempts = 3, max_ejection_percent = 50, failure_threshold = 3,
        ejection_time = 5.0, max_ejection_time = 60.0, ca_pem = None, cert_pem = None, key_pem = None,
        allow = Vec::new(), hold = 5.0, protocol = "tcp"))]
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
        hold: f64,
        protocol: &str,
    ) -> PyResult<Self> {
        let http = is_http(protocol)?;
        let strategy = named("strategy", strategy, Strategy::parse, Strategy::NAMES)?;
        let ip: IpAddr = host
            .parse()
            .map_err(|_| config_err(format!("host must be an IP address, got {host:?}")))?;
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
            hold: seconds("hold", hold)?,
            http,
            ..ProxyConfig::default()
        };
        let handle = corral_core::runtime::proxy()?;
        let addr = SocketAddr::new(ip, port);
        let inner = match (ca_pem, cert_pem, key_pem) {
            (None, None, None) => py.detach(|| Core::bind(addr, cfg, handle)).py()?,
            (Some(ca), Some(cert), Some(key)) => {
                let tls = TlsFront::new(&ca, &cert, &key, allow)
                    .map_err(ProxyError::from)
                    .py()?;
                py.detach(|| Core::bind_tls(addr, cfg, handle, tls)).py()?
            }
            _ => {
                return Err(config_err(
                    "an mTLS front needs ca_pem, cert_pem and key_pem",
                ))
            }
        };
        Ok(Proxy { inner })
    }

    /// Connections open now to upstream ``id`` (still one, or removed and draining).
    fn active(&self, id: &str) -> u64 {
        self.inner.active_to(id)
    }

    /// Connections waiting now for an upstream to appear (there is none; see ``hold``).
    #[getter]
    fn held(&self) -> u64 {
        self.inner.held()
    }

    /// How long a connection waits for an upstream while there is none, seconds, from the
    /// next such wait on (0: closed at once).
    fn set_hold(&self, hold: f64) -> PyResult<()> {
        self.inner.set_hold(seconds("hold", hold)?);
        Ok(())
    }

    /// ``"http"`` frames HTTP/1 on connections accepted from now on (a draining upstream's
    /// connections end at a message boundary), ``"tcp"`` relays bytes.
    fn set_protocol(&self, protocol: &str) -> PyResult<()> {
        self.inner.set_http(is_http(protocol)?);
        Ok(())
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
                config_err(format!(
                    "upstream {id}: host must be an IP address, got {host:?}"
                ))
            })?;
            list.push((id, SocketAddr::new(ip, port), weight));
        }
        self.inner.set_upstreams(list);
        Ok(())
    }

    /// The front's counters now (its totals, refusals, and each upstream's).
    fn stats(&self) -> ProxyStats {
        let (t, refused) = self.inner.totals();
        let upstreams = self
            .inner
            .upstreams()
            .into_iter()
            .map(|u| UpstreamStats {
                id: u.id,
                address: u.address.to_string(),
                ejected: u.ejected,
                connections: u.counters.connections,
                active: u.counters.active,
                bytes_in: u.counters.bytes_in,
                bytes_out: u.counters.bytes_out,
                errors: u.counters.errors,
                ejections: u.counters.ejections,
                connect_buckets: u.connect.cumulative,
                connect_sum: u.connect.sum,
                connect_count: u.connect.count,
            })
            .collect();
        ProxyStats {
            address: self.inner.local_addr().to_string(),
            connections: t.connections,
            active: t.active,
            bytes_in: t.bytes_in,
            bytes_out: t.bytes_out,
            errors: t.errors,
            ejections: t.ejections,
            refused,
            tls_refused: self.inner.tls_refused(),
            upstreams,
        }
    }

    /// Presents a new certificate (PEM) from the next handshake on (mTLS fronts).
    fn set_certificate(&self, cert_pem: &str, key_pem: &str) -> PyResult<()> {
        let tls = self.inner.tls().ok_or(ProxyError::NotTls).py()?;
        tls.set_certificate(cert_pem, key_pem)
            .map_err(ProxyError::from)
            .py()
    }

    /// Changes the balancing strategy from the next connection on (upstreams and
    /// connections in flight stay).
    fn set_strategy(&self, strategy: &str) -> PyResult<()> {
        self.inner.set_strategy(named(
            "strategy",
            strategy,
            Strategy::parse,
            Strategy::NAMES,
        )?);
        Ok(())
    }

    /// Makes the front mTLS (all three PEMs) or plain (none), from the next connection on.
    #[pyo3(signature = (ca_pem = None, cert_pem = None, key_pem = None, allow = Vec::new()))]
    fn set_tls(
        &self,
        ca_pem: Option<String>,
        cert_pem: Option<String>,
        key_pem: Option<String>,
        allow: Vec<String>,
    ) -> PyResult<()> {
        let tls = match (ca_pem, cert_pem, key_pem) {
            (None, None, None) => None,
            (Some(ca), Some(cert), Some(key)) => Some(
                TlsFront::new(&ca, &cert, &key, allow)
                    .map_err(ProxyError::from)
                    .py()?,
            ),
            _ => {
                return Err(config_err(
                    "an mTLS front needs ca_pem, cert_pem and key_pem",
                ))
            }
        };
        self.inner.set_tls(tls);
        Ok(())
    }

    /// Stops accepting; open connections finish.
    fn close(&self) {
        self.inner.close();
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Proxy>()?;
    m.add_class::<ProxyStats>()?;
    m.add_class::<UpstreamStats>()
}
