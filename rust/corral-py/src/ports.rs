//! `PortAllocator`.

use std::net::IpAddr;

use pyo3::prelude::*;

use corral_core::ports as core;

use crate::errors::{config_err, PyResultExt};

/// Hands out ports from one or more ranges.
#[pyclass(frozen, module = "corral._core")]
pub struct PortAllocator {
    inner: core::PortAllocator,
    check: Option<IpAddr>,
}

fn parse_addr(a: &str) -> PyResult<IpAddr> {
    a.parse()
        .map_err(|_| config_err(format!("check_bind: {a:?} is not an IP address")))
}

#[pymethods]
impl PortAllocator {
    #[new]
    #[pyo3(signature = (start = 20000, end = 32000, reserved = Vec::new(), *, ranges = None, check_bind = None))]
    fn new(
        start: u16,
        end: u16,
        reserved: Vec<u16>,
        ranges: Option<Vec<(u16, u16)>>,
        check_bind: Option<&str>,
    ) -> PyResult<Self> {
        let ranges = ranges.unwrap_or_else(|| vec![(start, end)]);
        Ok(Self {
            inner: core::PortAllocator::new(&ranges, &reserved).py()?,
            check: check_bind.map(parse_addr).transpose()?,
        })
    }
    /// A free port (`port=None`), or exactly `port`, recorded under `name`; `check=False`
    /// skips the bind check for a port whose holder is ours (an instance being re-adopted).
    #[pyo3(signature = (port = None, *, name = None, check = true))]
    fn allocate(&self, port: Option<u16>, name: Option<&str>, check: bool) -> PyResult<u16> {
        match (port, self.check.filter(|_| check)) {
            (None, None) => self.inner.allocate().py(),
            (None, Some(a)) => self.inner.allocate_checked(a).py(),
            (Some(p), None) => self.inner.allocate_static(p, name).py(),
            (Some(p), Some(a)) => self.inner.allocate_static_checked(p, name, a).py(),
        }
    }
    /// Returns a port.
    fn release(&self, port: u16) -> PyResult<()> {
        self.inner.release(port).py()
    }
    /// Frees ports remembered as held by other processes that can now be bound; returns how many.
    #[pyo3(signature = (address = "127.0.0.1"))]
    fn refresh(&self, address: &str) -> PyResult<usize> {
        Ok(self.inner.refresh_external(parse_addr(address)?))
    }
    /// Whether a port is allocated, reserved or held elsewhere.
    fn is_allocated(&self, port: u16) -> bool {
        self.inner.is_allocated(port)
    }
    /// Ports that can still be handed out.
    #[getter]
    fn available(&self) -> usize {
        self.inner.available()
    }
    /// Ports in all ranges.
    #[getter]
    fn capacity(&self) -> usize {
        self.inner.capacity()
    }
    /// Ports held through this allocator (allocated, or reserved in range).
    #[getter]
    fn in_use(&self) -> usize {
        self.inner.in_use()
    }
    /// Ports skipped because another process held them when they were checked.
    #[getter]
    fn held_elsewhere(&self) -> usize {
        self.inner.held_elsewhere()
    }
    /// The ports other holders of the machine claim now (replacing the last set): never
    /// handed out while claimed. Returns how many of them are held here already.
    fn set_claimed(&self, ports: Vec<u16>) -> usize {
        self.inner.set_claimed(&ports)
    }
    /// Ports in range claimed by other holders of the machine.
    #[getter]
    fn claimed(&self) -> usize {
        self.inner.claimed()
    }
    /// The ranges, inclusive.
    #[getter]
    fn ranges(&self) -> Vec<(u16, u16)> {
        self.inner.ranges().to_vec()
    }
    fn __repr__(&self) -> String {
        format!(
            "PortAllocator(ranges={:?}, available={})",
            self.inner.ranges_text(),
            self.inner.available()
        )
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PortAllocator>()
}
