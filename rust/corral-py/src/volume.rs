//! Size-limited volumes (`corral_core::volume`).

use std::path::PathBuf;

use corral_core::volume;
use pyo3::prelude::*;

use crate::errors::{config_err, os_error_at};

/// Why this process cannot loop-mount volume images here (not root, no loop device, no
/// `mkfs.ext4`, no ext4), or None when it can.
#[pyfunction]
fn volume_support() -> Option<String> {
    volume::loop_support().err()
}

/// Makes a new ext4 image of `size` bytes at `image` (0600, sparse), its root owned by
/// `uid`:`gid` when given. Raises `FileExistsError` for an existing file, `OSError` when
/// `mkfs.ext4` fails (nothing is left behind then).
#[pyfunction]
#[pyo3(signature = (image, size, uid = None, gid = None))]
fn create_volume_image(
    py: Python<'_>,
    image: PathBuf,
    size: u64,
    uid: Option<u32>,
    gid: Option<u32>,
) -> PyResult<()> {
    let owner = match (uid, gid) {
        (Some(u), Some(g)) => Some((u, g)),
        (None, None) => None,
        _ => return Err(config_err("give both uid and gid, or neither")),
    };
    py.detach(|| volume::create_image(&image, size, owner))
        .map_err(|e| {
            os_error_at(
                &e,
                format!("volume image {}: {e}", image.display()),
                Some(&image),
            )
        })
}

/// Grows an unmounted image to `size` bytes; `ConfigError` for a smaller size.
#[pyfunction]
fn grow_volume_image(py: Python<'_>, image: PathBuf, size: u64) -> PyResult<()> {
    match py.detach(|| volume::grow_image(&image, size)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => Err(config_err(e.to_string())),
        Err(e) => Err(os_error_at(
            &e,
            format!("growing {}: {e}", image.display()),
            Some(&image),
        )),
    }
}

/// Mounts `image` at the directory `target` through a free loop device (nosuid, nodev);
/// returns the device's path. `OSError` when it cannot (nothing stays attached then).
#[pyfunction]
fn mount_volume_image(py: Python<'_>, image: PathBuf, target: PathBuf) -> PyResult<String> {
    py.detach(|| volume::mount_image(&image, &target))
        .map(|d| d.display().to_string())
        .map_err(|e| os_error_at(&e, e.to_string(), Some(&target)))
}

/// Unmounts `target`; True when it was busy and was detached lazily instead.
#[pyfunction]
fn unmount_volume(py: Python<'_>, target: PathBuf) -> PyResult<bool> {
    py.detach(|| volume::unmount(&target)).map_err(|e| {
        os_error_at(
            &e,
            format!("unmounting {}: {e}", target.display()),
            Some(&target),
        )
    })
}

/// The image mounted at `target`, or None.
#[pyfunction]
fn mounted_volume_image(target: PathBuf) -> Option<String> {
    volume::mounted_image(&target).map(|p| p.display().to_string())
}

/// Every loop-backed mount: (mount point, image).
#[pyfunction]
fn volume_mounts() -> Vec<(String, String)> {
    volume::loop_mounts()
        .into_iter()
        .map(|(p, i)| (p.display().to_string(), i.display().to_string()))
        .collect()
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(volume_support, m)?)?;
    m.add_function(wrap_pyfunction!(create_volume_image, m)?)?;
    m.add_function(wrap_pyfunction!(grow_volume_image, m)?)?;
    m.add_function(wrap_pyfunction!(mount_volume_image, m)?)?;
    m.add_function(wrap_pyfunction!(unmount_volume, m)?)?;
    m.add_function(wrap_pyfunction!(mounted_volume_image, m)?)?;
    m.add_function(wrap_pyfunction!(volume_mounts, m)?)
}
