//! The log keeper: who holds an instance's output, so that the instance never depends on
//! the agent that started it being alive.
//!
//! An agent that works with a keeper ([`Supervisor::log_via_keeper`]) owns no instance's
//! output. Before each spawn it makes a pipe, hands the read end to the keeper over a
//! `SOCK_SEQPACKET` Unix socket (`SCM_RIGHTS`, with the instance's log file and rotation),
//! and gives only the write end to the child. The keeper copies every pipe into its rotating
//! log ([`crate::log::RotatingLog`]), all of them on one thread. When the agent dies
//! (`kill -9`), nothing changes for the instances: their pipes are still read, so none dies
//! of `SIGPIPE` and no line is lost; a new agent connects and hands over the pipes of what
//! it spawns. This is containerd-shim's and conmon's job, done once for a whole stack rather
//! than by a process per instance: one thread and one pipe buffer per instance.
//!
//! [`Supervisor::log_via_keeper`]: crate::process::Supervisor::log_via_keeper
//!
//! ```
//! use corral_core::keeper::{listen, KeeperLink, LogKeeper};
//! use corral_core::log::LogConfig;
//! use std::io::Write;
//!
//! let dir = tempfile::tempdir().unwrap();
//! let keeper = LogKeeper::serve(listen(&dir.path().join("keeper.sock")).unwrap()).unwrap();
//! let link = KeeperLink::connect(&dir.path().join("keeper.sock")).unwrap();
//! let (r, mut w) = std::io::pipe().unwrap();
//! let log = LogConfig { path: dir.path().join("a.log"), max_bytes: 0, keep: 0 };
//! link.hand_over("a-0", &log, &r).unwrap();
//! drop(r);
//! w.write_all(b"hello\n").unwrap();
//! drop(w); // the writer is gone: the keeper finishes the file and lets the pipe go
//! while keeper.active() > 0 || keeper.handed() == 0 {
//!     std::thread::sleep(std::time::Duration::from_millis(5));
//! }
//! assert_eq!(std::fs::read_to_string(dir.path().join("a.log")).unwrap(), "hello\n");
//! ```

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::log::{copy_to_log, LogConfig, RotatingLog};
use crate::runtime::Dedicated;
use crate::sys;

/// Longest hand-over message: an instance id, a log path and two numbers.
const MAX_MESSAGE: usize = 8192;

/// A bound, listening `SOCK_SEQPACKET` socket at `path`, owner-only (a stale socket file is
/// replaced).
pub fn listen(path: &Path) -> io::Result<OwnedFd> {
    let _ = std::fs::remove_file(path);
    let s = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::SEQPACKET, None)?;
    s.bind(&socket2::SockAddr::unix(path)?)?;
    crate::private::set_mode(path, 0o600)?;
    s.listen(64)?;
    Ok(s.into())
}

/// The keeper side: copies every pipe handed to it into its log; see the [module docs](self).
pub struct LogKeeper {
    rt: Dedicated,
    active: Arc<AtomicUsize>,
    handed: AtomicU64,
}

impl std::fmt::Debug for LogKeeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogKeeper")
            .field("active", &self.active())
            .finish_non_exhaustive()
    }
}

impl LogKeeper {
    /// Serves `listener` (see [`listen`]) on threads of its own: one accepts agents, one
    /// per agent reads its hand-overs, one copies every pipe.
    pub fn serve(listener: OwnedFd) -> io::Result<Arc<Self>> {
        let keeper = Arc::new(LogKeeper {
            rt: Dedicated::current_thread("corral-keeper-logs")?,
            active: Arc::new(AtomicUsize::new(0)),
            handed: AtomicU64::new(0),
        });
        let listener = socket2::Socket::from(listener);
        let k = keeper.clone();
        std::thread::Builder::new()
            .name("corral-keeper".into())
            .spawn(move || {
                while let Ok((conn, _)) = listener.accept() {
                    let k = k.clone();
                    let _ = std::thread::Builder::new()
                        .name("corral-keeper-agent".into())
                        .spawn(move || k.read_agent(&conn));
                }
            })?;
        Ok(keeper)
    }

    /// Like [`LogKeeper::serve`], on descriptor `raw`: a listening socket from [`listen`]
    /// that this process inherited across exec (its starter binds it before the first agent
    /// can try to connect). No other code in this process may use or close `raw`.
    pub fn serve_inherited(raw: i32) -> io::Result<Arc<Self>> {
        Self::serve(sys::inherited_listener(raw)?)
    }

    /// Pipes it copies now (an instance's output whose writers are not all gone).
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Pipes handed to it since it started.
    pub fn handed(&self) -> u64 {
        self.handed.load(Ordering::Acquire)
    }

    fn read_agent(&self, conn: &socket2::Socket) {
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            match sys::recv_with_fd(conn.as_raw_fd(), &mut buf) {
                Ok((0, None)) | Err(_) => return, // the agent is gone; its pipes stay here
                Ok((n, Some(fd))) => {
                    if let Some(cfg) = decode(&buf[..n]) {
                        self.copy(fd, &cfg);
                    }
                }
                Ok((_, None)) => {}
            }
        }
    }

    fn copy(&self, fd: OwnedFd, cfg: &LogConfig) {
        let Ok(log) = RotatingLog::open(cfg) else {
            return; // dropping the read end: the writer gets EPIPE, as with no log at all
        };
        let _guard = self.rt.handle().enter();
        let Ok(pipe) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd) else {
            return;
        };
        self.active.fetch_add(1, Ordering::AcqRel);
        self.handed.fetch_add(1, Ordering::AcqRel);
        let active = self.active.clone();
        self.rt.handle().spawn(async move {
            copy_to_log(pipe, Arc::new(Mutex::new(log))).await;
            active.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

/// The agent side: a connection to a keeper.
#[derive(Debug)]
pub struct KeeperLink {
    sock: Mutex<socket2::Socket>,
}

impl KeeperLink {
    /// Connects to the keeper listening at `path`, waiting up to two seconds for it to
    /// listen (a keeper and its first agent start together).
    pub fn connect(path: &Path) -> io::Result<Self> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            let s = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::SEQPACKET, None)?;
            match s.connect(&socket2::SockAddr::unix(path)?) {
                Ok(()) => {
                    return Ok(KeeperLink {
                        sock: Mutex::new(s),
                    })
                }
                Err(e)
                    if std::time::Instant::now() < deadline
                        && matches!(
                            e.kind(),
                            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                        ) =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Hands the read end of an instance's output pipe to the keeper, which from now on
    /// writes it to `log` (the caller may close its copy at once).
    pub fn hand_over(&self, id: &str, log: &LogConfig, read_end: &impl AsFd) -> io::Result<()> {
        let msg = encode(id, log);
        if msg.len() > MAX_MESSAGE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "log path too long",
            ));
        }
        let sock = self.sock.lock();
        sys::send_with_fd(sock.as_raw_fd(), &msg, read_end.as_fd().as_raw_fd())
    }
}

fn encode(id: &str, log: &LogConfig) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    let mut out = Vec::new();
    out.extend_from_slice(id.as_bytes());
    out.push(0);
    out.extend_from_slice(log.path.as_os_str().as_bytes());
    out.push(0);
    out.extend_from_slice(format!("{}\0{}", log.max_bytes, log.keep).as_bytes());
    out
}

fn decode(msg: &[u8]) -> Option<LogConfig> {
    use std::os::unix::ffi::OsStrExt;
    let mut parts = msg.split(|&b| b == 0);
    let _id = parts.next()?;
    let path = PathBuf::from(std::ffi::OsStr::from_bytes(parts.next()?));
    let max_bytes = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
    let keep = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
    Some(LogConfig {
        path,
        max_bytes,
        keep,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let cfg = LogConfig {
            path: "/tmp/x y/a-0.log".into(),
            max_bytes: 1 << 20,
            keep: 3,
        };
        assert_eq!(decode(&encode("a-0", &cfg)), Some(cfg));
        assert_eq!(decode(b"a-0\0/x\0nope\x003"), None);
    }
}
