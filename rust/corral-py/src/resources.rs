//! `ResourceManager`, `ResourceRequest`, `Grant`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyInt};

use corral_core::resources::{self as core, CachePolicy, Elsewhere, NumaPolicy, VolumeSpec};

use crate::errors::{bad_type, config_err, named, os_error_at, PyResultExt};
use crate::topology::Topology;

/// What one instance asks for.
#[pyclass(frozen, module = "corral._core")]
pub struct ResourceRequest {
    inner: core::ResourceRequest,
}

#[pymethods]
impl ResourceRequest {
    #[new]
    #[pyo3(signature = (*, cpu = 0.0, cores = 0, numa = "none", cache = "any", memory_mb = 0, swap_mb = 0, storage_mb = 0, volume = None, numa_node = None, exact_cpus = Vec::new()))]
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
        exact_cpus: Vec<u32>,
    ) -> PyResult<Self> {
        if !(cpu >= 0.0 && cpu.is_finite()) {
            return Err(config_err(format!(
                "cpu must be a non-negative number, got {cpu}"
            )));
        }
        Ok(Self {
            inner: core::ResourceRequest {
                cpu,
                cores,
                numa: named("numa", numa, NumaPolicy::parse, NumaPolicy::NAMES)?,
                cache: named("cache", cache, CachePolicy::parse, CachePolicy::NAMES)?,
                numa_node,
                memory_mb,
                swap_mb,
                storage_mb,
                volume,
                exact_cpus,
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
    /// Whether the memory is accounted on `numa_node`.
    memory_pinned: bool,
    /// Swap allowance, MiB.
    swap_mb: u64,
    /// Storage, MiB.
    storage_mb: u64,
    /// Volume of the storage.
    volume: Option<String>,
    /// The volume's filesystem.
    filesystem: Option<String>,
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
    #[pyo3(signature = (topology, memory_mb = None, reserved_cpus = None, cpu_overcommit = 1.0, memory_overcommit = 1.0, volumes = None, *, swap_mb = None, memory_reserve_mb = None, disk_reserve_mb = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        topology: &Bound<'_, Topology>,
        memory_mb: Option<u64>,
        reserved_cpus: Option<Vec<u32>>,
        cpu_overcommit: f64,
        memory_overcommit: f64,
        volumes: Option<&Bound<'_, PyDict>>,
        swap_mb: Option<u64>,
        memory_reserve_mb: Option<u64>,
        disk_reserve_mb: Option<u64>,
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
            memory_reserve_mb,
            disk_reserve_mb,
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

    /// Adds a volume to a running ledger; False when one of that name is there already.
    #[pyo3(signature = (name, path, capacity_mb = None))]
    fn add_volume(&self, name: String, path: PathBuf, capacity_mb: Option<u64>) -> PyResult<bool> {
        self.inner
            .add_volume(VolumeSpec {
                name,
                path,
                capacity_mb,
            })
            .py()
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
            memory_pinned: g.memory_pinned,
            swap_mb: g.swap_mb,
            storage_mb: g.storage_mb,
            volume: g.volume,
            filesystem: g.filesystem,
        })
    }

    /// What the other holders of the machine have now (replacing what was set before);
    /// placement keeps clear of it from the next allocation on.
    #[pyo3(signature = (*, cpus = Vec::new(), millicores = 0, memory_mb = 0, node_memory_mb = BTreeMap::new(), swap_mb = 0, storage_mb = BTreeMap::new()))]
    fn set_elsewhere(
        &self,
        cpus: Vec<u32>,
        millicores: u64,
        memory_mb: u64,
        node_memory_mb: BTreeMap<u32, u64>,
        swap_mb: u64,
        storage_mb: BTreeMap<String, u64>,
    ) -> PyResult<()> {
        self.inner
            .set_elsewhere(&Elsewhere {
                cpus,
                millicores,
                memory_mb,
                node_memory_mb: node_memory_mb.into_iter().collect(),
                swap_mb,
                storage_mb: storage_mb.into_iter().collect(),
            })
            .py()
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

    /// A snapshot of the ledgers.
    fn usage(&self) -> Usage {
        let u = self.inner.usage();
        Usage {
            cpus: u.cpus,
            exclusive_cpus: u.exclusive_cpus,
            shared_capacity_millicores: u.shared_capacity_millicores,
            shared_used_millicores: u.shared_used_millicores,
            memory_capacity_mb: u.memory_capacity_mb,
            memory_used_mb: u.memory_used_mb,
            memory_by_node: u
                .memory_by_node
                .iter()
                .map(|n| {
                    (
                        n.node,
                        NodeMemory {
                            node: n.node,
                            capacity_mb: n.capacity_mb,
                            used_mb: n.used_mb,
                            elsewhere_mb: n.elsewhere_mb,
                        },
                    )
                })
                .collect(),
            swap_used_mb: u.swap_used_mb,
            volumes: u
                .volumes
                .into_iter()
                .map(|v| {
                    (
                        v.name.clone(),
                        VolumeUsage {
                            name: v.name,
                            path: v.path,
                            filesystem: v.filesystem,
                            capacity_mb: v.capacity_mb,
                            reserved_mb: v.reserved_mb,
                        },
                    )
                })
                .collect(),
            filesystems: u
                .filesystems
                .into_iter()
                .map(|f| {
                    (
                        f.id.clone(),
                        FilesystemUsage {
                            id: f.id,
                            path: f.path,
                            capacity_mb: f.capacity_mb,
                            reserved_mb: f.reserved_mb,
                            elsewhere_mb: f.elsewhere_mb,
                        },
                    )
                })
                .collect(),
            grants: u.grants,
            elsewhere_cpus: u.elsewhere.cpus,
            elsewhere_millicores: u.elsewhere.millicores,
            elsewhere_memory_mb: u.elsewhere.memory_mb,
            elsewhere_swap_mb: u.elsewhere.swap_mb,
        }
    }

    /// CPUs nobody holds exclusively now, where shared-CPU work may run: on `node` when it
    /// is given and has any, else on the whole machine (the reserved CPUs included).
    #[pyo3(signature = (node = None))]
    fn shared_cpus(&self, node: Option<u32>) -> Vec<u32> {
        self.inner.shared_cpus(node)
    }
}

/// Memory of one NUMA node, MiB.
#[pyclass(frozen, eq, get_all, module = "corral._core")]
#[derive(Clone, PartialEq, Eq)]
pub struct NodeMemory {
    node: u32,
    capacity_mb: u64,
    used_mb: u64,
    elsewhere_mb: u64,
}

#[pymethods]
impl NodeMemory {
    fn __repr__(&self) -> String {
        format!(
            "NodeMemory(node={}, capacity_mb={}, used_mb={}, elsewhere_mb={})",
            self.node, self.capacity_mb, self.used_mb, self.elsewhere_mb
        )
    }
}

/// Use and capacity of one volume, MiB.
#[pyclass(frozen, eq, get_all, module = "corral._core")]
#[derive(Clone, PartialEq, Eq)]
pub struct VolumeUsage {
    name: String,
    path: PathBuf,
    filesystem: String,
    capacity_mb: u64,
    reserved_mb: u64,
}

#[pymethods]
impl VolumeUsage {
    fn __repr__(&self) -> String {
        format!(
            "VolumeUsage({:?}, path='{}', capacity_mb={}, reserved_mb={})",
            self.name,
            self.path.display(),
            self.capacity_mb,
            self.reserved_mb
        )
    }
}

/// Use and capacity of one filesystem, MiB.
#[pyclass(frozen, eq, get_all, module = "corral._core")]
#[derive(Clone, PartialEq, Eq)]
pub struct FilesystemUsage {
    id: String,
    path: PathBuf,
    capacity_mb: u64,
    reserved_mb: u64,
    elsewhere_mb: u64,
}

#[pymethods]
impl FilesystemUsage {
    fn __repr__(&self) -> String {
        format!(
            "FilesystemUsage({:?}, path='{}', capacity_mb={}, reserved_mb={}, elsewhere_mb={})",
            self.id,
            self.path.display(),
            self.capacity_mb,
            self.reserved_mb,
            self.elsewhere_mb
        )
    }
}

/// A snapshot of the ledgers (`ResourceManager.usage()`).
#[pyclass(frozen, eq, get_all, module = "corral._core")]
#[derive(Clone, PartialEq, Eq)]
pub struct Usage {
    cpus: Vec<u32>,
    exclusive_cpus: Vec<u32>,
    shared_capacity_millicores: u64,
    shared_used_millicores: u64,
    memory_capacity_mb: u64,
    memory_used_mb: u64,
    memory_by_node: BTreeMap<u32, NodeMemory>,
    swap_used_mb: u64,
    volumes: BTreeMap<String, VolumeUsage>,
    filesystems: BTreeMap<String, FilesystemUsage>,
    grants: usize,
    elsewhere_cpus: Vec<u32>,
    elsewhere_millicores: u64,
    elsewhere_memory_mb: u64,
    elsewhere_swap_mb: u64,
}

#[pymethods]
impl Usage {
    fn __repr__(&self) -> String {
        format!(
            "Usage(grants={}, exclusive_cpus={:?}, shared {}/{} millicores, memory {}/{} MiB)",
            self.grants,
            self.exclusive_cpus,
            self.shared_used_millicores,
            self.shared_capacity_millicores,
            self.memory_used_mb,
            self.memory_capacity_mb
        )
    }
}

/// The id of the filesystem that holds, or will hold, `path` (`dev:<st_dev>` of its nearest
/// existing ancestor): how the machine ledger counts storage.
#[pyfunction]
fn filesystem_id(path: PathBuf) -> PyResult<String> {
    core::filesystem_id(&path)
        .map_err(|e| os_error_at(&e, format!("cannot stat {}", path.display()), Some(&path)))
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(filesystem_id, m)?)?;
    m.add_class::<ResourceManager>()?;
    m.add_class::<ResourceRequest>()?;
    m.add_class::<Grant>()?;
    m.add_class::<Usage>()?;
    m.add_class::<NodeMemory>()?;
    m.add_class::<VolumeUsage>()?;
    m.add_class::<FilesystemUsage>()?;
    Ok(())
}
