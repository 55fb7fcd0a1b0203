//! The mesh: a local certificate authority and the certificates it issues.

use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use corral_core::mesh::{Authority as Core, Issued};
use pyo3::prelude::*;

use crate::errors::{config_err, seconds, PyResultExt};

/// A certificate issued to a service.
#[pyclass(frozen, get_all, module = "corral._core")]
pub struct IssuedCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    cert_pem: String,
    key_pem: String,
    serial: String,
    not_after: f64,
    spiffe_id: String,
}

impl From<Issued> for IssuedCert {
    fn from(i: Issued) -> Self {
        IssuedCert {
            cert_path: i.cert_path,
            key_path: i.key_path,
            cert_pem: i.cert_pem,
            key_pem: i.key_pem,
            serial: i.serial,
            not_after: i
                .not_after
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            spiffe_id: i.spiffe_id,
        }
    }
}

/// The local certificate authority in a directory (created on first use, key mode 0600).
#[pyclass(frozen, module = "corral._core")]
pub struct Authority {
    inner: Core,
}

#[pymethods]
impl Authority {
    #[new]
    fn new(dir: PathBuf, trust_domain: &str) -> PyResult<Self> {
        Ok(Authority {
            inner: Core::load_or_create(&dir, trust_domain).py()?,
        })
    }

    /// The CA certificate, PEM.
    #[getter]
    fn ca_pem(&self) -> String {
        self.inner.ca_pem().to_owned()
    }

    /// The CA certificate file.
    #[getter]
    fn ca_path(&self) -> PathBuf {
        self.inner.ca_path()
    }

    /// `spiffe://<trust domain>/svc/<service>`.
    fn spiffe_id(&self, service: &str) -> String {
        self.inner.spiffe_id(service)
    }

    /// Issues (or re-issues) `service`'s certificate for `lifetime` seconds and writes it.
    #[pyo3(signature = (service, lifetime = 86400.0, *, not_before = None))]
    fn issue(&self, service: &str, lifetime: f64, not_before: Option<f64>) -> PyResult<IssuedCert> {
        let life = seconds("lifetime", lifetime)?;
        let issued = match not_before {
            None => self.inner.issue(service, life),
            Some(t) => {
                let start = time::OffsetDateTime::from_unix_timestamp(t as i64)
                    .map_err(|e| config_err(e.to_string()))?;
                self.inner
                    .issue_valid(service, start, life.max(Duration::from_secs(1)))
            }
        };
        Ok(issued.py()?.into())
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Authority>()?;
    m.add_class::<IssuedCert>()
}
