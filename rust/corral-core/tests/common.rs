//! Shared helpers for the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use corral_core::topology::Topology;

/// A committed fake sysfs tree (see `tests/fixtures/make_sysfs.py` at the repository root).
pub fn fixture(name: &str) -> Topology {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/sysfs")
        .join(name);
    Topology::from_sysfs(&root).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}
