//! Memory limits through the cgroup memory controller, v2 or v1.
//!
//! [`Cgroups::detect`] looks at a cgroup mount (normally `/sys/fs/cgroup`):
//! a unified v2 hierarchy with the memory controller, a v1 `memory`
//! hierarchy, or neither (then [`Cgroups::mode`] is
//! [`CgroupMode::Unavailable`] with the reason, and callers warn once and
//! run without limits). [`Cgroups::create`] makes one cgroup per instance
//! under `<parent>/` and writes its limits; the process joins it before exec
//! through [`crate::process::ProcessSpec::cgroup`].
//!
//! v2 files: `memory.max` (hard limit), `memory.low` (the reservation, when a
//! separate hard limit is set), `memory.swap.max`. v1 files:
//! `memory.limit_in_bytes`, `memory.soft_limit_in_bytes`,
//! `memory.memsw.limit_in_bytes` (memory + swap, when swap accounting is on).

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::CgroupError;

/// Which controller corral can use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupMode {
    /// The unified hierarchy with the memory controller.
    V2,
    /// A legacy `memory` hierarchy.
    V1,
    /// Neither; the reason says why.
    Unavailable(String),
}

/// Limits for one instance, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryLimits {
    /// Hard limit: the kernel reclaims, then OOM-kills, past it.
    pub max: Option<u64>,
    /// Protected reservation (v2 `memory.low`, v1 soft limit).
    pub low: Option<u64>,
    /// Swap the instance may use (`Some(0)`: none).
    pub swap: Option<u64>,
}

/// The cgroup tree corral manages; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct Cgroups {
    mode: CgroupMode,
    base: PathBuf,
}

impl Cgroups {
    /// Inspects the cgroup mount at `mount` and prepares `parent` (a relative path such as
    /// `corral/shop`) below the right hierarchy. Never fails: problems become
    /// [`CgroupMode::Unavailable`].
    pub fn detect(mount: &Path, parent: &str) -> Cgroups {
        match Self::try_detect(mount, parent) {
            Ok(c) => c,
            Err(reason) => Cgroups {
                mode: CgroupMode::Unavailable(reason),
                base: PathBuf::new(),
            },
        }
    }

    fn try_detect(mount: &Path, parent: &str) -> Result<Cgroups, String> {
        let controllers = mount.join("cgroup.controllers");
        if let Ok(list) = fs::read_to_string(&controllers) {
            if !list.split_whitespace().any(|c| c == "memory") {
                return Err(format!(
                    "cgroup v2 at {} does not offer the memory controller",
                    mount.display()
                ));
            }
            // Enable memory for the children of every level from the mount down to `parent`
            // (a cgroup's own processes must live in a leaf: corral never puts any here).
            let base = mount.join(parent);
            fs::create_dir_all(&base)
                .map_err(|e| format!("cannot create {}: {e}", base.display()))?;
            let mut dir = mount.to_path_buf();
            for part in Path::new(parent).components() {
                enable_memory(&dir)?;
                dir.push(part);
            }
            enable_memory(&base)?;
            return Ok(Cgroups {
                mode: CgroupMode::V2,
                base,
            });
        }
        let v1 = mount.join("memory");
        if v1.join("memory.limit_in_bytes").exists() {
            let base = v1.join(parent);
            fs::create_dir_all(&base)
                .map_err(|e| format!("cannot create {}: {e}", base.display()))?;
            return Ok(Cgroups {
                mode: CgroupMode::V1,
                base,
            });
        }
        Err(format!(
            "no cgroup memory controller under {}",
            mount.display()
        ))
    }

    /// v2, v1 or unavailable (with the reason).
    pub fn mode(&self) -> &CgroupMode {
        &self.mode
    }

    /// The directory instance cgroups are created in.
    pub fn base(&self) -> &Path {
        &self.base
    }

    /// Creates (or reuses) the cgroup `name` with `limits`; returns its directory.
    pub fn create(&self, name: &str, limits: &MemoryLimits) -> Result<PathBuf, CgroupError> {
        if let CgroupMode::Unavailable(reason) = &self.mode {
            return Err(CgroupError::Unavailable(reason.clone()));
        }
        let dir = self.base.join(name);
        fs::create_dir_all(&dir).map_err(|source| CgroupError::Write {
            path: dir.clone(),
            source,
        })?;
        let num = |v: u64| v.to_string();
        if self.mode == CgroupMode::V2 {
            if let Some(max) = limits.max {
                write(&dir.join("memory.max"), &num(max))?;
            }
            if let Some(low) = limits.low {
                write(&dir.join("memory.low"), &num(low))?;
            }
            if let Some(swap) = limits.swap {
                write(&dir.join("memory.swap.max"), &num(swap))?;
            }
        } else {
            if let Some(max) = limits.max {
                write(&dir.join("memory.limit_in_bytes"), &num(max))?;
                let memsw = dir.join("memory.memsw.limit_in_bytes");
                if let (Some(swap), true) = (limits.swap, memsw.exists()) {
                    write(&memsw, &num(max + swap))?;
                }
            }
            if let Some(low) = limits.low {
                write(&dir.join("memory.soft_limit_in_bytes"), &num(low))?;
            }
        }
        Ok(dir)
    }

    /// Ends every process in an instance's cgroup, wherever it went (another process
    /// group, another session): cgroup v2's `cgroup.kill` when the kernel has it, else
    /// SIGKILL to each pid of `cgroup.procs` (v1). Returns how many pids were signalled by
    /// hand (0 with `cgroup.kill`, which the kernel does at once).
    pub fn kill(&self, dir: &Path) -> Result<usize, CgroupError> {
        let kill = dir.join("cgroup.kill");
        if kill.exists() {
            write(&kill, "1")?;
            return Ok(0);
        }
        let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        let mut n = 0;
        for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
            if pid > 1 && crate::process::kill_pid(pid, libc::SIGKILL) {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Removes an instance's cgroup once its processes are gone (best effort: the kernel
    /// refuses while a process remains).
    pub fn remove(&self, dir: &Path) -> bool {
        fs::remove_dir(dir).is_ok()
    }
}

fn enable_memory(dir: &Path) -> Result<(), String> {
    let ctl = dir.join("cgroup.subtree_control");
    let current = fs::read_to_string(&ctl).unwrap_or_default();
    if current.split_whitespace().any(|c| c == "memory") {
        return Ok(());
    }
    fs::write(&ctl, "+memory").map_err(|e| {
        format!(
            "cannot enable the memory controller in {}: {e}",
            ctl.display()
        )
    })
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // A fake cgroupfs: plain files stand in for the kernel's, because this machine cannot
    // mount a v2 hierarchy. It checks which files corral writes and what it writes there.
    fn fake_v2(controllers: &str) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("cgroup.controllers"), controllers).unwrap();
        fs::write(d.path().join("cgroup.subtree_control"), "").unwrap();
        d
    }

    #[test]
    fn v2_enables_memory_down_the_tree_and_writes_limits() {
        let d = fake_v2("cpuset cpu io memory pids");
        let cg = Cgroups::detect(d.path(), "corral/shop");
        assert_eq!(cg.mode(), &CgroupMode::V2);
        for level in ["", "corral", "corral/shop"] {
            let ctl =
                fs::read_to_string(d.path().join(level).join("cgroup.subtree_control")).unwrap();
            assert_eq!(ctl, "+memory", "level {level:?}");
        }
        let lim = MemoryLimits {
            max: Some(512 << 20),
            low: Some(256 << 20),
            swap: Some(0),
        };
        let dir = cg.create("api-0", &lim).unwrap();
        assert_eq!(dir, d.path().join("corral/shop/api-0"));
        let read = |f: &str| fs::read_to_string(dir.join(f)).unwrap();
        assert_eq!(read("memory.max"), "536870912");
        assert_eq!(read("memory.low"), "268435456");
        assert_eq!(read("memory.swap.max"), "0");
    }

    #[test]
    fn v2_without_memory_controller_is_unavailable() {
        let d = fake_v2("cpu pids");
        let cg = Cgroups::detect(d.path(), "corral");
        assert!(matches!(cg.mode(), CgroupMode::Unavailable(r) if r.contains("memory controller")));
        assert!(matches!(
            cg.create("x", &MemoryLimits::default()),
            Err(CgroupError::Unavailable(_))
        ));
    }

    #[test]
    fn v1_writes_legacy_files() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("memory")).unwrap();
        fs::write(
            d.path().join("memory/memory.limit_in_bytes"),
            "9223372036854771712",
        )
        .unwrap();
        let cg = Cgroups::detect(d.path(), "corral/shop");
        assert_eq!(cg.mode(), &CgroupMode::V1);
        let dir = cg
            .create(
                "db-0",
                &MemoryLimits {
                    max: Some(1 << 30),
                    low: None,
                    swap: None,
                },
            )
            .unwrap();
        assert_eq!(
            fs::read_to_string(dir.join("memory.limit_in_bytes")).unwrap(),
            "1073741824"
        );
        assert!(!dir.join("memory.soft_limit_in_bytes").exists());
    }

    #[test]
    fn nothing_mounted_is_unavailable() {
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(
            Cgroups::detect(d.path(), "corral").mode(),
            CgroupMode::Unavailable(_)
        ));
    }
}
