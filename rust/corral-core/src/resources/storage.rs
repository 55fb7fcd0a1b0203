//! Storage: named volumes (directories) whose quotas are taken from their filesystem.
//!
//! Capacity belongs to the filesystem, not to the directory: two volumes on one disk share
//! its free space, so the quotas of every volume on a filesystem (this ledger's and those
//! held elsewhere on the machine) add up to at most its free space, less a reserve kept for
//! everything else that writes there. A filesystem is known by its device number; a volume
//! given an explicit capacity is a filesystem of its own (a test ledger, a disk image).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::ResourceError;

/// A named volume: a directory whose filesystem space is handed out as quotas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    /// Name used in requests.
    pub name: String,
    /// Directory.
    pub path: PathBuf,
    /// Capacity, MiB; `None` takes the filesystem's free space (statvfs) at construction,
    /// less the disk reserve.
    pub capacity_mb: Option<u64>,
}

/// Use and capacity of one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeUsage {
    /// Name.
    pub name: String,
    /// Directory.
    pub path: PathBuf,
    /// The filesystem it takes its quota from (see [`filesystem_id`]).
    pub filesystem: String,
    /// Capacity of that filesystem for quotas, MiB.
    pub capacity_mb: u64,
    /// Reserved on this volume by grants, MiB.
    pub reserved_mb: u64,
}

/// Use and capacity of one filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilesystemUsage {
    /// Its id (see [`filesystem_id`]).
    pub id: String,
    /// The directory it was first measured at.
    pub path: PathBuf,
    /// What quotas may take, MiB: its free space when measured, less the reserve.
    pub capacity_mb: u64,
    /// Reserved by this ledger's grants, MiB.
    pub reserved_mb: u64,
    /// Reserved by other holders on the machine, MiB (see [`super::Elsewhere`]).
    pub elsewhere_mb: u64,
}

struct Volume {
    spec: VolumeSpec,
    fs: String,
    reserved_mb: u64,
}

struct Filesystem {
    path: PathBuf,
    capacity_mb: u64,
    reserved_mb: u64,
    elsewhere_mb: u64,
}

/// A volume measured, not yet in the ledger (measuring is a syscall: done outside the lock).
pub(super) struct Measured {
    spec: VolumeSpec,
    fs: String,
    capacity_mb: u64,
}

/// The volumes of one ledger and the filesystems they sit on.
#[derive(Default)]
pub(super) struct Storage {
    volumes: BTreeMap<String, Volume>,
    filesystems: BTreeMap<String, Filesystem>,
}

/// The nearest existing ancestor of `path` (itself when it exists): a volume created at
/// start is measured where it will be.
fn existing(path: &Path) -> std::io::Result<&Path> {
    let mut at = path;
    loop {
        match std::fs::symlink_metadata(at) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match at.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => at = parent,
                _ => return Err(e),
            },
            Err(e) => return Err(e),
            Ok(_) => return Ok(at),
        }
    }
}

/// Free space of the filesystem that holds, or will hold, `path`, MiB: a path that does not
/// exist yet (a volume created at start) is measured at its nearest existing ancestor.
pub fn filesystem_free_mb(path: &Path) -> std::io::Result<u64> {
    let (free, _) = crate::sys::statvfs_space(existing(path)?)?;
    Ok(free / (1024 * 1024))
}

/// The id of the filesystem that holds, or will hold, `path`: `dev:<st_dev>` of its nearest
/// existing ancestor. Every holder on the machine names a filesystem the same way.
pub fn filesystem_id(path: &Path) -> std::io::Result<String> {
    use std::os::unix::fs::MetadataExt;
    Ok(format!("dev:{}", std::fs::metadata(existing(path)?)?.dev()))
}

/// Bytes used on disk under `path` (allocated blocks, as `du` counts them; hard links once).
pub fn disk_usage_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let mut total = 0u64;
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        let md = std::fs::symlink_metadata(&p)?;
        if md.nlink() > 1 && !md.is_dir() && !seen.insert((md.dev(), md.ino())) {
            continue;
        }
        total += md.blocks() * 512;
        if md.is_dir() {
            for e in std::fs::read_dir(&p)? {
                stack.push(e?.path());
            }
        }
    }
    Ok(total)
}

/// Measures a volume: its filesystem and what quotas may take there. `reserve_mb` is kept
/// free on a measured filesystem (`None`: 5% of its size, at most 10 GiB).
pub(super) fn measure(
    spec: VolumeSpec,
    reserve_mb: Option<u64>,
) -> Result<Measured, ResourceError> {
    let cannot = |e: std::io::Error| {
        ResourceError::InvalidConfig(format!(
            "volume '{}': cannot stat {}: {e}",
            spec.name,
            spec.path.display()
        ))
    };
    if let Some(c) = spec.capacity_mb {
        return Ok(Measured {
            fs: format!("volume:{}", spec.name),
            capacity_mb: c,
            spec,
        });
    }
    let at = existing(&spec.path).map_err(cannot)?;
    let (free, size) = crate::sys::statvfs_space(at).map_err(cannot)?;
    let mib = 1024 * 1024;
    let reserve = reserve_mb.unwrap_or_else(|| (size / mib / 20).min(10 * 1024));
    let fs = filesystem_id(at).map_err(cannot)?;
    Ok(Measured {
        fs,
        capacity_mb: (free / mib).saturating_sub(reserve),
        spec,
    })
}

impl Storage {
    /// Whether a volume of this name is known.
    pub(super) fn has(&self, name: &str) -> bool {
        self.volumes.contains_key(name)
    }

    /// Adds a measured volume; `false` (nothing changes) when its name is known already. A
    /// filesystem known already keeps its first measurement and its reservations.
    pub(super) fn insert(&mut self, m: Measured) -> bool {
        if self.volumes.contains_key(&m.spec.name) {
            return false;
        }
        self.filesystems
            .entry(m.fs.clone())
            .or_insert_with(|| Filesystem {
                path: m.spec.path.clone(),
                capacity_mb: m.capacity_mb,
                reserved_mb: 0,
                elsewhere_mb: 0,
            });
        self.volumes.insert(
            m.spec.name.clone(),
            Volume {
                spec: m.spec,
                fs: m.fs,
                reserved_mb: 0,
            },
        );
        true
    }

    /// Checks that `mb` more fit on volume `name`; returns its filesystem.
    pub(super) fn check(&self, name: &str, mb: u64) -> Result<&str, ResourceError> {
        let v = self
            .volumes
            .get(name)
            .ok_or_else(|| ResourceError::UnknownVolume(name.to_string()))?;
        let fs = &self.filesystems[&v.fs];
        let free = fs
            .capacity_mb
            .saturating_sub(fs.reserved_mb + fs.elsewhere_mb);
        if mb > free {
            let elsewhere = if fs.elsewhere_mb > 0 {
                format!(", {} MiB held elsewhere", fs.elsewhere_mb)
            } else {
                String::new()
            };
            return Err(ResourceError::Insufficient(format!(
                "storage: asked {mb} MiB on volume '{name}', {free} MiB free of {} MiB{elsewhere}",
                fs.capacity_mb
            )));
        }
        Ok(&v.fs)
    }

    /// Takes `mb` on volume `name` (checked before).
    pub(super) fn take(&mut self, name: &str, mb: u64) {
        let v = self.volumes.get_mut(name).expect("checked before");
        v.reserved_mb += mb;
        self.filesystems
            .get_mut(&v.fs)
            .expect("a volume's filesystem")
            .reserved_mb += mb;
    }

    /// Gives back `mb` taken on volume `name`.
    pub(super) fn give(&mut self, name: &str, mb: u64) {
        if let Some(v) = self.volumes.get_mut(name) {
            v.reserved_mb -= mb;
            if let Some(fs) = self.filesystems.get_mut(&v.fs) {
                fs.reserved_mb -= mb;
            }
        }
    }

    /// What other holders reserve, per filesystem id; filesystems no volume here sits on
    /// are of no concern.
    pub(super) fn set_elsewhere(&mut self, by_fs: &[(String, u64)]) {
        for fs in self.filesystems.values_mut() {
            fs.elsewhere_mb = 0;
        }
        for (id, mb) in by_fs {
            if let Some(fs) = self.filesystems.get_mut(id) {
                fs.elsewhere_mb += mb;
            }
        }
    }

    /// The directory of volume `name`.
    pub(super) fn path(&self, name: &str) -> Result<PathBuf, ResourceError> {
        Ok(self
            .volumes
            .get(name)
            .ok_or_else(|| ResourceError::UnknownVolume(name.into()))?
            .spec
            .path
            .clone())
    }

    /// Every volume's use.
    pub(super) fn volumes(&self) -> Vec<VolumeUsage> {
        self.volumes
            .values()
            .map(|v| VolumeUsage {
                name: v.spec.name.clone(),
                path: v.spec.path.clone(),
                filesystem: v.fs.clone(),
                capacity_mb: self.filesystems[&v.fs].capacity_mb,
                reserved_mb: v.reserved_mb,
            })
            .collect()
    }

    /// Every filesystem's use.
    pub(super) fn filesystems(&self) -> Vec<FilesystemUsage> {
        self.filesystems
            .iter()
            .map(|(id, f)| FilesystemUsage {
                id: id.clone(),
                path: f.path.clone(),
                capacity_mb: f.capacity_mb,
                reserved_mb: f.reserved_mb,
                elsewhere_mb: f.elsewhere_mb,
            })
            .collect()
    }
}
