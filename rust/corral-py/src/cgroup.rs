//! cgroup memory limits.

use std::path::{Path, PathBuf};

use corral_core::cgroup::{CgroupMode, Cgroups as Core, MemoryLimits};
use pyo3::prelude::*;

use crate::errors::PyResultExt;

/// The cgroup tree for one deployment: v2, v1 or unavailable (with the reason).
#[pyclass(frozen, module = "corral._core")]
pub struct Cgroups {
    inner: Core,
}

#[pymethods]
impl Cgroups {
    /// Inspects `mount` and prepares `parent` below the memory hierarchy; never raises.
    #[staticmethod]
    #[pyo3(signature = (mount = PathBuf::from("/sys/fs/cgroup"), parent = "corral".to_owned()))]
    fn detect(mount: PathBuf, parent: String) -> Self {
        Cgroups {
            inner: Core::detect(&mount, &parent),
        }
    }

    /// `"v2"`, `"v1"` or `"unavailable"`.
    #[getter]
    fn mode(&self) -> &'static str {
        match self.inner.mode() {
            CgroupMode::V2 => "v2",
            CgroupMode::V1 => "v1",
            CgroupMode::Unavailable(_) => "unavailable",
        }
    }

    /// Why limits are unavailable, else None.
    #[getter]
    fn reason(&self) -> Option<String> {
        match self.inner.mode() {
            CgroupMode::Unavailable(r) => Some(r.clone()),
            _ => None,
        }
    }

    /// Where instance cgroups are created.
    #[getter]
    fn base(&self) -> PathBuf {
        self.inner.base().to_path_buf()
    }

    /// Creates the cgroup `name` with limits in bytes; returns its directory.
    #[pyo3(signature = (name, *, max = None, low = None, swap = None))]
    fn create(
        &self,
        name: &str,
        max: Option<u64>,
        low: Option<u64>,
        swap: Option<u64>,
    ) -> PyResult<PathBuf> {
        self.inner
            .create(name, &MemoryLimits { max, low, swap })
            .py()
    }

    /// Removes an instance cgroup once empty; returns whether it went.
    fn remove(&self, path: PathBuf) -> bool {
        self.inner.remove(Path::new(&path))
    }
    /// Ends every process of an instance's cgroup (`cgroup.kill`, or SIGKILL to each pid of
    /// `cgroup.procs`); returns how many pids were signalled by hand.
    fn kill(&self, path: PathBuf) -> PyResult<usize> {
        self.inner.kill(Path::new(&path)).py()
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Cgroups>()
}
