//! The tokio runtimes corral runs its tasks on, and why there are several.
//!
//! - **A supervisor runtime per [`Supervisor`](crate::process::Supervisor)**
//!   ([`Dedicated::current_thread`]): exit waits, log copies and probes of one deployment
//!   run on one thread of their own. Hundreds of probes a second then cost one thread's
//!   wake-ups, not the work-stealing hand-offs of a multi-threaded runtime, and they never
//!   queue behind the caller's own async work. The thread ends when the runtime is dropped.
//! - **One proxy runtime for every front** ([`proxy`]): a multi-threaded runtime with a
//!   single worker, not a current-thread one. The latter wakes tasks readied while it waits
//!   on epoll through its injection queue and an eventfd write: one extra system call per
//!   request (measured with strace under `make bench-proxy`).
//! - A binding may add its own (the Python one uses `pyo3-async-runtimes`' shared runtime to
//!   turn futures such as `Supervisor::next_event` into awaitables); that runtime only
//!   hands results over and does no supervision work.
//!
//! ```
//! let rt = corral_core::runtime::Dedicated::current_thread("doc-example").unwrap();
//! let (tx, rx) = std::sync::mpsc::channel();
//! rt.handle().spawn(async move { tx.send(6 * 7).unwrap() });
//! assert_eq!(rx.recv().unwrap(), 42);
//! ```

use std::io;
use std::sync::OnceLock;

use tokio::runtime::{Builder, Handle};
use tokio::sync::oneshot;

/// A runtime driven by a thread of its own, which ends when this is dropped.
#[derive(Debug)]
pub struct Dedicated {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
}

impl Dedicated {
    /// A current-thread runtime (IO and time enabled) on a new thread called `name`.
    pub fn current_thread(name: &str) -> io::Result<Self> {
        let rt = Builder::new_current_thread().enable_all().build()?;
        let handle = rt.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                rt.block_on(async {
                    let _ = stopped.await;
                });
            })?;
        Ok(Dedicated {
            handle,
            stop: Some(stop),
        })
    }

    /// Where to spawn tasks.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }
}

impl Drop for Dedicated {
    fn drop(&mut self) {
        // The thread's block_on returns, dropping the runtime and its tasks.
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The runtime every proxy of this process shares (started on first use, lives as long as
/// the process); see the [module docs](self) for why it has one worker.
pub fn proxy() -> io::Result<&'static Handle> {
    static HANDLE: OnceLock<Handle> = OnceLock::new();
    if let Some(h) = HANDLE.get() {
        return Ok(h);
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("corral-proxy".into())
        .spawn(move || {
            match Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("corral-proxy")
                .enable_all()
                .build()
            {
                Ok(rt) => {
                    let _ = tx.send(Ok(rt.handle().clone()));
                    rt.block_on(std::future::pending::<()>());
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        })?;
    let handle = rx
        .recv()
        .map_err(|e| io::Error::other(format!("the proxy runtime's thread died: {e}")))??;
    Ok(HANDLE.get_or_init(|| handle))
}
