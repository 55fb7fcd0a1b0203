//! Every call into libc, and so every `unsafe` block of the crate, lives here.
//!
//! Each function is a small safe wrapper whose `SAFETY` comment says why its
//! block is sound; the rest of the crate is `#![deny(unsafe_code)]` and uses
//! only these wrappers. Keeping them in one file makes the whole unsafe
//! surface reviewable at once.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
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

/// `kill(pid, signal)`. The caller keeps `pid` above 1.
pub(crate) fn kill(pid: u32, signal: i32) -> io::Result<()> {
    debug_assert!(pid > 1);
    // SAFETY: kill has no memory preconditions.
    let rc = unsafe { libc::kill(pid as libc::pid_t, signal) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// This process's process group.
/// A new non-blocking, close-on-exec TCP socket of `domain` (`AF_INET` or `AF_INET6`), in
/// one call (no `fcntl` after it).
pub(crate) fn tcp_socket_nonblocking(domain: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes no pointers; a non-negative result is a new fd we own.
    let fd = unsafe {
        libc::socket(
            domain,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether `fd` is writable (or in error) right now: `poll` with a zero timeout.
pub(crate) fn writable_now(fd: std::os::fd::BorrowedFd<'_>) -> bool {
    let mut pfd = libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(&fd),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd on the stack; fd is borrowed, so open during the call.
    unsafe { libc::poll(&raw mut pfd, 1, 0) == 1 }
}

#[cfg(test)]
pub(crate) fn getpgrp() -> u32 {
    // SAFETY: getpgrp has no preconditions and cannot fail.
    unsafe { libc::getpgrp() as u32 }
}

/// The size of a memory page, bytes (what `/proc/<pid>/stat` counts RSS in).
pub(crate) fn page_size() -> u64 {
    // SAFETY: sysconf has no memory preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(n).unwrap_or(4096)
}

/// The effective user id.
pub(crate) fn geteuid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Bytes available to an unprivileged user on the filesystem holding `path`, and the
/// filesystem's size in bytes (`statvfs`).
pub(crate) fn statvfs_space(path: &Path) -> io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    // SAFETY: statvfs is plain data; the path is a valid NUL-terminated string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &raw mut st) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let frsize = st.f_frsize as u64;
    Ok((
        (st.f_bavail as u64).saturating_mul(frsize),
        (st.f_blocks as u64).saturating_mul(frsize),
    ))
}

/// Sends `payload` on a connected Unix socket with the descriptor `fd` attached
/// (`SCM_RIGHTS`): the receiver gets its own copy of the open file.
pub(crate) fn send_with_fd(sock: RawFd, payload: &[u8], fd: RawFd) -> io::Result<()> {
    let space = cmsg_space();
    let mut control = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr().cast_mut().cast(),
        iov_len: payload.len(),
    };
    // SAFETY: msghdr is plain data; every pointer in it points into `iov`, `payload` and
    // `control`, which outlive the sendmsg call; CMSG_FIRSTHDR of a buffer of CMSG_SPACE
    // bytes is non-null and has room for one int.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        if libc::sendmsg(sock, &raw const msg, libc::MSG_NOSIGNAL) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Receives one message into `buf` and the descriptor attached to it, if any (its copy is
/// close-on-exec). `Ok((0, None))` at end of stream.
pub(crate) fn recv_with_fd(sock: RawFd, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    let space = cmsg_space();
    let mut control = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: as in send_with_fd; recvmsg writes at most `buf.len()` bytes and `space`
    // control bytes; a descriptor read out of an SCM_RIGHTS header is new and ours alone.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let n = libc::recvmsg(sock, &raw mut msg, libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut fd = None;
        let mut cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let raw = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>());
                fd = Some(OwnedFd::from_raw_fd(raw));
            }
            cmsg = libc::CMSG_NXTHDR(&raw const msg, cmsg);
        }
        Ok((n as usize, fd))
    }
}

fn cmsg_space() -> usize {
    // SAFETY: CMSG_SPACE is arithmetic.
    unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) as usize }
}

/// A pidfd for `pid` (`pidfd_open`, Linux 5.3): readable once the process has exited,
/// whoever its parent is.
pub(crate) fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor just returned by the kernel, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Takes ownership of descriptor `raw`, a listening socket this process inherited across
/// exec for that purpose (the keeper's): it must be open, a socket and listening, or an
/// error comes back and nothing is taken.
pub(crate) fn inherited_listener(raw: RawFd) -> io::Result<OwnedFd> {
    let mut accepting: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `accepting`; on a descriptor that
    // is not an open socket it fails and writes nothing.
    let rc = unsafe {
        libc::getsockopt(
            raw,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&raw mut accepting).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if accepting == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a listening socket",
        ));
    }
    // SAFETY: an open, listening socket; the caller's contract (the exec that handed it
    // over leaves no other owner in this process) makes this the only owner from here on.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// A pidfd registered with the current tokio reactor (call inside a runtime context).
pub(crate) fn async_pidfd(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: the OwnedFd moves into the AsyncFd, which alone owns it from here on: the
    // descriptor stays open, and the same, until the AsyncFd is dropped.
    unsafe { tokio::io::unix::AsyncFd::register(fd) }.map_err(Into::into)
}

/// Makes this process a child subreaper (`PR_SET_CHILD_SUBREAPER`): orphaned descendants
/// are re-parented to it rather than to init, so it can reap (and find) them.
pub(crate) fn set_child_subreaper() -> io::Result<()> {
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes an integer flag.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

// --- loop devices and mounts (volume.rs) ---------------------------------------------

const LOOP_SET_FD: libc::c_ulong = 0x4C00;
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_SET_STATUS64: libc::c_ulong = 0x4C04;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

/// `struct loop_info64` of `<linux/loop.h>` (the kernel's field names).
#[repr(C)]
#[allow(clippy::struct_field_names, dead_code)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` of `<linux/loop.h>` (Linux 5.8).
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

fn cpath(path: &Path) -> io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

/// Asks `/dev/loop-control` (open as `ctl`) for a free loop device's number.
pub(crate) fn loop_get_free(ctl: RawFd) -> io::Result<u32> {
    // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a number or -1.
    let n = unsafe { libc::ioctl(ctl, LOOP_CTL_GET_FREE as _) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as u32)
}

/// Binds the open loop device `dev` to the file `backing`, with autoclear (the device
/// frees itself when its last user, the mount, goes): `LOOP_CONFIGURE` where the kernel
/// has it, else `LOOP_SET_FD` and `LOOP_SET_STATUS64`. `EBUSY`: another took the device.
pub(crate) fn loop_bind(dev: RawFd, backing: RawFd) -> io::Result<()> {
    // SAFETY: both structs are plain data; all-zero is their documented "no option" value.
    let mut cfg: LoopConfig = unsafe { std::mem::zeroed() };
    cfg.fd = backing as u32;
    cfg.info.lo_flags = LO_FLAGS_AUTOCLEAR;
    // SAFETY: a pointer to a loop_config that outlives the call.
    let rc = unsafe { libc::ioctl(dev, LOOP_CONFIGURE as _, &raw const cfg) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EINVAL) && err.raw_os_error() != Some(libc::ENOTTY) {
        return Err(err);
    }
    // SAFETY: LOOP_SET_FD takes the backing descriptor by value.
    if unsafe { libc::ioctl(dev, LOOP_SET_FD as _, backing as libc::c_ulong) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a pointer to a loop_info64 that outlives the call.
    let mut info: LoopInfo64 = unsafe { std::mem::zeroed() };
    info.lo_flags = LO_FLAGS_AUTOCLEAR;
    if unsafe { libc::ioctl(dev, LOOP_SET_STATUS64 as _, &raw const info) } != 0 {
        let err = io::Error::last_os_error();
        // SAFETY: LOOP_CLR_FD takes no argument; it undoes the SET_FD above.
        unsafe { libc::ioctl(dev, LOOP_CLR_FD as _, 0) };
        return Err(err);
    }
    Ok(())
}

/// Unbinds a loop device that was bound but could not be mounted.
pub(crate) fn loop_clear(dev: RawFd) {
    // SAFETY: LOOP_CLR_FD takes no argument; failing leaves the device as it was.
    unsafe { libc::ioctl(dev, LOOP_CLR_FD as _, 0) };
}

/// `mount(2)` of the block device `source` at `target` as `fstype`, nosuid and nodev.
pub(crate) fn mount_block(source: &Path, target: &Path, fstype: &str) -> io::Result<()> {
    let (s, t) = (cpath(source)?, cpath(target)?);
    let f = std::ffi::CString::new(fstype)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "fstype contains NUL"))?;
    // SAFETY: three valid NUL-terminated strings and no data.
    let rc = unsafe {
        libc::mount(
            s.as_ptr(),
            t.as_ptr(),
            f.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `umount2(2)`; `detach` makes it lazy (`MNT_DETACH`).
pub(crate) fn unmount(target: &Path, detach: bool) -> io::Result<()> {
    let t = cpath(target)?;
    // SAFETY: a valid NUL-terminated string.
    let rc = unsafe { libc::umount2(t.as_ptr(), if detach { libc::MNT_DETACH } else { 0 }) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
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
    fn a_descriptor_crosses_a_socket_pair() {
        use std::io::{Read, Write};
        use std::os::fd::AsRawFd;
        let (tx, rx) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let (mut reader, mut writer) = std::io::pipe().unwrap();
        send_with_fd(tx.as_raw_fd(), b"hello", reader.as_raw_fd()).unwrap();
        let mut buf = [0u8; 16];
        let (len, fd) = recv_with_fd(rx.as_raw_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..len], b"hello");
        writer.write_all(b"x").unwrap();
        drop(writer);
        let mut got = String::new();
        std::fs::File::from(fd.unwrap())
            .read_to_string(&mut got)
            .unwrap();
        assert_eq!(got, "x", "the received copy reads the same pipe");
        let mut rest = String::new();
        reader.read_to_string(&mut rest).unwrap();
    }

    #[test]
    fn pidfd_of_self() {
        assert!(pidfd_open(std::process::id()).is_ok());
        assert!(pidfd_open(u32::MAX >> 1).is_err());
    }

    #[test]
    fn statvfs_of_root() {
        let (free, size) = statvfs_space(Path::new("/")).unwrap();
        assert!(free <= size && size > 0);
        assert!(statvfs_space(Path::new("/definitely/not/here")).is_err());
    }
}
