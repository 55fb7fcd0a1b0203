//! Disk usage of a volume (`corral_core::du`).

use std::path::PathBuf;

use corral_core::du;
use pyo3::prelude::*;

use crate::errors::{config_err, os_error_at};

/// What a walk of a volume found (see `disk_usage`).
#[pyclass(frozen, module = "corral._core")]
pub struct DiskUsage {
    /// Allocated bytes (512-byte blocks, as `du` counts), every inode once.
    #[pyo3(get)]
    bytes: u64,
    /// Distinct inodes, the root included.
    #[pyo3(get)]
    inodes: u64,
    /// Entries that could not be read, or that changed under the walk.
    #[pyo3(get)]
    skipped: u64,
    /// Directories not entered because they are on another filesystem.
    #[pyo3(get)]
    other_filesystems: u64,
    /// Whether the walk stopped at `max_entries` (the figures are then a lower bound).
    #[pyo3(get)]
    truncated: bool,
}

#[pymethods]
impl DiskUsage {
    fn __repr__(&self) -> String {
        format!(
            "DiskUsage(bytes={}, inodes={}, skipped={}, other_filesystems={}, truncated={})",
            self.bytes,
            self.inodes,
            self.skipped,
            self.other_filesystems,
            if self.truncated { "True" } else { "False" }
        )
    }
}

/// Measures the tree at `path` as `du -sx` does: no link followed, one filesystem, hard
/// links once, at most `max_entries` entries; off the GIL. Raises `ConfigError` when
/// `path` is a symbolic link, `OSError` when it cannot be opened as a directory.
#[pyfunction]
#[pyo3(signature = (path, max_entries = 10_000_000))]
fn disk_usage(py: Python<'_>, path: PathBuf, max_entries: u64) -> PyResult<DiskUsage> {
    match py.detach(|| du::disk_usage(&path, max_entries)) {
        Ok(u) => Ok(DiskUsage {
            bytes: u.bytes,
            inodes: u.inodes,
            skipped: u.skipped,
            other_filesystems: u.other_filesystems,
            truncated: u.truncated,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => Err(config_err(e.to_string())),
        Err(e) => Err(os_error_at(&e, e.to_string(), Some(&path))),
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<DiskUsage>()?;
    m.add_function(wrap_pyfunction!(disk_usage, m)?)
}
