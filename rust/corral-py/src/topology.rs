//! `Topology`, `NumaNode`, `L3Domain`.

use std::path::PathBuf;
use std::sync::Arc;

use pyo3::prelude::*;

use corral_core::topology as core;

use crate::errors::PyResultExt;

/// A NUMA node.
#[pyclass(frozen, get_all, module = "corral._core")]
pub struct NumaNode {
    /// Node id.
    id: u32,
    /// Usable CPUs on it.
    cpus: Vec<u32>,
    /// Memory, MiB.
    memory_mb: u64,
}

#[pymethods]
impl NumaNode {
    fn __repr__(&self) -> String {
        format!(
            "NumaNode(id={}, cpus={:?}, memory_mb={})",
            self.id,
            core::format_cpulist(&self.cpus),
            self.memory_mb
        )
    }
}

/// CPUs sharing one L3 cache.
#[pyclass(frozen, get_all, module = "corral._core")]
pub struct L3Domain {
    /// Index among the machine's L3 domains.
    id: u32,
    /// Usable CPUs sharing it.
    cpus: Vec<u32>,
    /// Size, KiB.
    size_kb: u64,
    /// NUMA node.
    numa_node: u32,
}

#[pymethods]
impl L3Domain {
    fn __repr__(&self) -> String {
        format!(
            "L3Domain(id={}, cpus={:?}, size_kb={}, numa_node={})",
            self.id,
            core::format_cpulist(&self.cpus),
            self.size_kb,
            self.numa_node
        )
    }
}

/// The machine's CPU and memory topology.
#[pyclass(frozen, module = "corral._core")]
pub struct Topology {
    pub(crate) inner: Arc<core::Topology>,
}

#[pymethods]
impl Topology {
    /// Reads this machine (/sys, the affinity mask and the cgroup cpuset).
    #[staticmethod]
    fn detect() -> PyResult<Self> {
        Ok(Self {
            inner: Arc::new(core::Topology::detect().py()?),
        })
    }
    /// Reads a directory laid out like /sys.
    #[staticmethod]
    fn from_sysfs(root: PathBuf) -> PyResult<Self> {
        Ok(Self {
            inner: Arc::new(core::Topology::from_sysfs(root).py()?),
        })
    }
    /// Usable CPU ids (online and allowed).
    #[getter]
    fn cpus(&self) -> Vec<u32> {
        self.inner.cpus().to_vec()
    }
    /// Online CPU ids.
    #[getter]
    fn online(&self) -> Vec<u32> {
        self.inner.online().to_vec()
    }
    /// NUMA nodes.
    #[getter]
    fn numa_nodes(&self) -> Vec<NumaNode> {
        self.inner
            .numa_nodes()
            .iter()
            .map(|n| NumaNode {
                id: n.id,
                cpus: n.cpus.clone(),
                memory_mb: n.memory_mb,
            })
            .collect()
    }
    /// L3 cache domains.
    #[getter]
    fn l3_domains(&self) -> Vec<L3Domain> {
        self.inner
            .l3_domains()
            .iter()
            .map(|d| L3Domain {
                id: d.id,
                cpus: d.cpus.clone(),
                size_kb: d.size_kb,
                numa_node: d.numa_node,
            })
            .collect()
    }
    /// Physical cores, each as the list of its usable hardware threads.
    #[getter]
    fn cores(&self) -> Vec<Vec<u32>> {
        self.inner.cores().iter().map(|c| c.cpus.clone()).collect()
    }
    /// Package (socket) ids.
    #[getter]
    fn packages(&self) -> Vec<u32> {
        self.inner.packages().to_vec()
    }
    /// Memory on all nodes, MiB.
    #[getter]
    fn memory_mb(&self) -> u64 {
        self.inner.memory_mb()
    }
    /// Hardware threads per core.
    #[getter]
    fn threads_per_core(&self) -> usize {
        self.inner.threads_per_core()
    }
    /// The hardware threads of `cpu`'s physical core, `cpu` included.
    fn siblings(&self, cpu: u32) -> Vec<u32> {
        self.inner.siblings(cpu)
    }
    /// The NUMA node of a CPU, or None if it is not online.
    fn numa_node_of(&self, cpu: u32) -> Option<u32> {
        self.inner.cpu(cpu).map(|c| c.numa_node)
    }
    /// The L3 domain of a CPU, or None if it is not online.
    fn l3_of(&self, cpu: u32) -> Option<u32> {
        self.inner.cpu(cpu).map(|c| c.l3)
    }
    fn __repr__(&self) -> String {
        format!(
            "Topology(cpus={:?}, numa_nodes={}, l3_domains={}, cores={})",
            core::format_cpulist(self.inner.cpus()),
            self.inner.numa_nodes().len(),
            self.inner.l3_domains().len(),
            self.inner.cores().len()
        )
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Topology>()?;
    m.add_class::<NumaNode>()?;
    m.add_class::<L3Domain>()?;
    Ok(())
}
