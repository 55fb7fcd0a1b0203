//! `ResourceManager`, `ResourceRequest`, `Grant`.

use std::collections::HashMap;
use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyInt};

use corral_core::resources::{self as core, CachePolicy, NumaPolicy, VolumeSpec};

use crate::errors::{bad_arg, bad_type, PyResultExt};
use crate::topology::Topology;

/// What one instance asks for.
#[pyclass(frozen, module = "corral._core")]
pub struct ResourceRequest {
    inner: core::ResourceRequest,
}

#[pymethods]
impl ResourceRequest {
    #[new]
    #[pyo3(signature = (*, cpu = 0.0, cores = 0, numa = "none", cache = "any", memory_mb = 0, swap_mb = 0, storage_mb = 0, volume = None, numa_node = None))]
    fn new(
        cpu: f64,
        cores: u32,
        numa: &str,
        cache: &str,
        memory_mb: u64,
        swap_mb: u64,
        storage_mb: u64,
        volume: Option<String>,
        numa_node: Option<u32>,
    ) -> PyResult<Self> {
        if !(cpu >= 0.0 && cpu.is_finite()) {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "cpu must be a non-negative number, got {cpu}"
            )));
        }
        Ok(Self {
            inner: core::ResourceRequest {
                cpu,
                cores,
                numa: NumaPolicy::parse(numa)
                    .ok_or_else(|| bad_arg("numa", numa, "'none', 'prefer', 'require'"))?,
                cache: CachePolicy::parse(cache)
                    .ok_or_else(|| bad_arg("cache", cache, "'any', 'prefer-large'"))?,
                numa_node,
                memory_mb,
                swap_mb,
                storage_mb,
                volume,
            },
        })
    }
    #[getter]
    fn cpu(&self) -> f64 {
        self.inner.cpu
    }
    #[getter]
    fn cores(&self) -> u32 {
        self.inner.cores
    }
    #[getter]
    fn memory_mb(&self) -> u64 {
        self.inner.memory_mb
    }
    #[getter]
    fn storage_mb(&self) -> u64 {
        self.inner.storage_mb
    }
    #[getter]
    fn volume(&self) -> Option<&str> {
        self.inner.volume.as_deref()
    }
    fn __repr__(&self) -> String {
        let r = &self.inner;
        format!(
            "ResourceRequest(cpu={}, cores={}, memory_mb={}, storage_mb={}, volume={:?})",
            r.cpu, r.cores, r.memory_mb, r.storage_mb, r.volume
        )
    }
}

/// What an allocation granted; release it exactly once.
#[pyclass(frozen, get_all, module = "corral._core")]
pub struct Grant {
    /// Unique within its manager.
    id: u64,
    /// Exclusive CPUs.
    cpus: Vec<u32>,
    /// NUMA node of the cores (and pinned memory), when one.
    numa_node: Option<u32>,
    /// L3 domains of the cores.
    l3_domains: Vec<u32>,
    /// Shared CPU, millicores.
    millicores: u32,
    /// Memory, MiB.
    memory_mb: u64,
    /// Swap allowance, MiB.
    swap_mb: u64,
    /// Storage, MiB.
    storage_mb: u64,
    /// Volume of the storage.
    volume: Option<String>,
}

#[pymethods]
impl Grant {
    fn __repr__(&self) -> String {
        format!(
            "Grant(id={}, cpus={:?}, numa_node={:?}, millicores={}, memory_mb={}, storage_mb={})",
            self.id, self.cpus, self.numa_node, self.millicores, self.memory_mb, self.storage_mb
        )
    }
}

/// CPU, memory and storage ledgers over a topology.
#[pyclass(frozen, module = "corral._core")]
pub struct ResourceManager {
    inner: core::ResourceManager,
}

#[pymethods]
impl ResourceManager {
    #[new]
    #[pyo3(signature = (topology, memory_mb = None, reserved_cpus = None, cpu_overcommit = 1.0, memory_overcommit = 1.0, volumes = None, *, swap_mb = None))]
    fn new(
        topology: &Bound<'_, Topology>,
        memory_mb: Option<u64>,
        reserved_cpus: Option<Vec<u32>>,
        cpu_overcommit: f64,
        memory_overcommit: f64,
        volumes: Option<&Bound<'_, PyDict>>,
        swap_mb: Option<u64>,
    ) -> PyResult<Self> {
        let mut specs = Vec::new();
        if let Some(v) = volumes {
            for (k, val) in v.iter() {
                let name: String = k.extract()?;
                let (path, capacity_mb) = if let Ok((p, c)) = val.extract::<(PathBuf, u64)>() {
                    (p, Some(c))
                } else if let Ok(p) = val.extract::<PathBuf>() {
                    (p, None)
                } else {
                    return Err(bad_type(
                        &format!("volumes[{name:?}]"),
                        "a path or a (path, capacity_mb) pair",
                    ));
                };
                specs.push(VolumeSpec {
                    name,
                    path,
                    capacity_mb,
                });
            }
        }
        let config = core::ResourceConfig {
            memory_mb,
            reserved_cpus,
            cpu_overcommit,
            memory_overcommit,
            swap_mb,
            volumes: specs,
        };
        Ok(Self {
            inner: core::ResourceManager::new((*topology.get().inner).clone(), config).py()?,
        })
    }

    /// Allocates everything the request asks for, or raises and allocates nothing.
    fn allocate(&self, request: &Bound<'_, ResourceRequest>) -> PyResult<Grant> {
        let g = self.inner.allocate(&request.get().inner).py()?;
        Ok(Grant {
            id: g.id,
            cpus: g.cpus,
            numa_node: g.numa_node,
            l3_domains: g.l3_domains,
            millicores: g.millicores,
            memory_mb: g.memory_mb,
            swap_mb: g.swap_mb,
            storage_mb: g.storage_mb,
            volume: g.volume,
        })
    }

    /// Returns everything a grant holds (a `Grant` or its id); a second release raises `ResourceError`.
    fn release(&self, grant: &Bound<'_, PyAny>) -> PyResult<()> {
        let id = if let Ok(g) = grant.cast::<Grant>() {
            g.get().id
        } else if grant.cast::<PyInt>().is_ok() {
            grant.extract()?
        } else {
            return Err(bad_type("grant", "a Grant or a grant id"));
        };
        self.inner.release(id).py()
    }

    /// Bytes used on disk in a volume now.
    fn volume_usage(&self, name: &str) -> PyResult<u64> {
        self.inner.volume_usage_bytes(name).py()
    }

    /// A snapshot of the ledgers, as a dict.
    fn usage<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let u = self.inner.usage();
        let d = PyDict::new(py);
        d.set_item("cpus", u.cpus)?;
        d.set_item("exclusive_cpus", u.exclusive_cpus)?;
        d.set_item("shared_capacity_millicores", u.shared_capacity_millicores)?;
        d.set_item("shared_used_millicores", u.shared_used_millicores)?;
        d.set_item("memory_capacity_mb", u.memory_capacity_mb)?;
        d.set_item("memory_used_mb", u.memory_used_mb)?;
        let nodes: HashMap<u32, (u64, u64)> = u
            .memory_by_node
            .iter()
            .map(|(n, c, used)| (*n, (*c, *used)))
            .collect();
        d.set_item("memory_by_node", nodes)?;
        d.set_item("swap_used_mb", u.swap_used_mb)?;
        let vols = PyDict::new(py);
        for v in u.volumes {
            let e = PyDict::new(py);
            e.set_item("path", v.path)?;
            e.set_item("capacity_mb", v.capacity_mb)?;
            e.set_item("reserved_mb", v.reserved_mb)?;
            vols.set_item(v.name, e)?;
        }
        d.set_item("volumes", vols)?;
        d.set_item("grants", u.grants)?;
        Ok(d)
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<ResourceManager>()?;
    m.add_class::<ResourceRequest>()?;
    m.add_class::<Grant>()?;
    Ok(())
}
