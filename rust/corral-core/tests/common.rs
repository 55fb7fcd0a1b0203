//! Shared helpers for the integration tests.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;

use corral_core::topology::Topology;

/// A committed fake sysfs tree (see `tests/fixtures/make_sysfs.py` at the repository root).
pub fn fixture(name: &str) -> Topology {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/sysfs")
        .join(name);
    Topology::from_sysfs(&root).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

/// A listener on 127.0.0.1 that hands each connection to `handle` on a thread of its own.
pub fn serve<F: Fn(TcpStream) + Clone + Send + 'static>(handle: F) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let handle = handle.clone();
            std::thread::spawn(move || handle(s));
        }
    });
    addr
}
