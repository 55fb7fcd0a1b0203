//! Every call into libc, and so every `unsafe` block of the crate, lives here.
//!
//! Each function is a small safe wrapper whose `SAFETY` comment says why its
//! block is sound; the rest of the crate is `#![deny(unsafe_code)]` and uses
//! only these wrappers. Keeping them in one file makes the whole unsafe
//! surface reviewable at once.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::RawFd;
use std::path::Path;
use std::process::Command;

/// A CPU affinity mask (`cpu_set_t`).
#[derive(Clone, Copy)]
pub(crate) struct CpuMask(libc::cpu_set_t);

impl std::fmt::Debug for CpuMask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("CpuMask").field(&self.cpus()).finish()
    }
}

impl CpuMask {
    /// CPUs a mask can hold.
    pub(crate) const CAPACITY: usize = 8 * std::mem::size_of::<libc::cpu_set_t>();

    /// The mask of `cpus`; `Err(cpu)` names the first CPU past [`CpuMask::CAPACITY`].
    pub(crate) fn of(cpus: &[usize]) -> Result<Self, usize> {
        // SAFETY: cpu_set_t is a plain bit array; all-zero is the empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        for &cpu in cpus {
            if cpu >= Self::CAPACITY {
                return Err(cpu);
            }
            // SAFETY: cpu < the set's size, checked above.
            unsafe { libc::CPU_SET(cpu, &mut set) };
        }
        Ok(CpuMask(set))
    }

    /// The calling thread's mask.
    pub(crate) fn current() -> io::Result<Self> {
        // SAFETY: sched_getaffinity writes at most `size_of::<cpu_set_t>()` bytes into `set`.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        let rc = unsafe {
            libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw mut set)
        };
        if rc == 0 {
            Ok(CpuMask(set))
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Makes this the calling thread's mask.
    pub(crate) fn apply(&self) -> io::Result<()> {
        // SAFETY: a pointer to a cpu_set_t of the size passed.
        let rc = unsafe {
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw const self.0)
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// The CPUs in the mask, ascending.
    pub(crate) fn cpus(&self) -> Vec<u32> {
        (0..Self::CAPACITY)
            // SAFETY: i < CPU_SETSIZE.
            .filter(|&i| unsafe { libc::CPU_ISSET(i, &self.0) })
            .map(|i| i as u32)
            .collect()
    }
}

/// The calling thread's CPU mask, replaced until dropped.
#[derive(Debug)]
pub(crate) struct ThreadMask(CpuMask);

impl ThreadMask {
    /// Sets `mask` on the calling thread; the old one comes back on drop.
    pub(crate) fn set(mask: &CpuMask) -> io::Result<Self> {
        let old = CpuMask::current()?;
        mask.apply()?;
        Ok(ThreadMask(old))
    }
}

impl Drop for ThreadMask {
    fn drop(&mut self) {
        let _ = self.0.apply();
    }
}

/// Runs, in the forked child before exec, `sched_setaffinity(mask)` and then a write of
/// the child's pid to `procs_fd` (a cgroup's `cgroup.procs`, opened before fork).
pub(crate) fn before_exec_join(cmd: &mut Command, mask: Option<CpuMask>, procs_fd: RawFd) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
    // system calls (sched_setaffinity, getpid, write) on memory prepared before fork;
    // it does not allocate.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(m) = &mask {
                if libc::sched_setaffinity(
                    0,
                    std::mem::size_of::<libc::cpu_set_t>(),
                    &raw const m.0,
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            let mut buf = [0u8; 16];
            let digits = format_pid(libc::getpid() as u32, &mut buf);
            if libc::write(procs_fd, digits.as_ptr().cast(), digits.len()) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Decimal digits of `pid` in `buf`, without allocating (this runs between fork and exec).
fn format_pid(mut pid: u32, buf: &mut [u8; 16]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (pid % 10) as u8;
        pid /= 10;
        if pid == 0 {
            break;
        }
    }
    &buf[i..]
}

/// `killpg(pgid, signal)`. The caller keeps `pgid` above 1 (0 and 1 mean "us" and "all").
pub(crate) fn killpg(pgid: u32, signal: i32) -> io::Result<()> {
    debug_assert!(pgid > 1);
    // SAFETY: killpg has no memory preconditions.
    let rc = unsafe { libc::killpg(pgid as libc::pid_t, signal) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// This process's process group.
#[cfg(test)]
pub(crate) fn getpgrp() -> u32 {
    // SAFETY: getpgrp has no preconditions and cannot fail.
    unsafe { libc::getpgrp() as u32 }
}

/// The effective user id.
pub(crate) fn geteuid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Bytes available to an unprivileged user on the filesystem holding `path` (`statvfs`).
pub(crate) fn statvfs_available(path: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    // SAFETY: statvfs is plain data; the path is a valid NUL-terminated string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &raw mut st) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_digits() {
        let mut b = [0u8; 16];
        assert_eq!(format_pid(0, &mut b), b"0");
        assert_eq!(format_pid(4_194_304, &mut b), b"4194304");
    }

    #[test]
    fn masks_round_trip() {
        let m = CpuMask::of(&[0, 3, 64]).unwrap();
        assert_eq!(m.cpus(), vec![0, 3, 64]);
        assert_eq!(
            CpuMask::of(&[CpuMask::CAPACITY]).unwrap_err(),
            CpuMask::CAPACITY
        );
        assert!(!CpuMask::current().unwrap().cpus().is_empty());
    }

    #[test]
    fn statvfs_of_root() {
        assert!(statvfs_available(Path::new("/")).is_ok());
        assert!(statvfs_available(Path::new("/definitely/not/here")).is_err());
    }
}
