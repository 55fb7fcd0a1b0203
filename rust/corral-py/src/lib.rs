//! `corral._core`: the `PyO3` face of `corral-core`. One file per core concept,
//! mostly conversions; every class is frozen and safe to share across threads.
#![deny(unsafe_code)]
// PyO3's generated code trips these pedantic lints.
#![allow(
    clippy::needless_pass_by_value,
    clippy::unused_self,
    clippy::too_many_arguments
)]

use pyo3::prelude::*;

mod balance;
mod breaker;
mod callable;
mod cgroup;
mod du;
mod errors;
mod mesh;
mod ports;
mod probe;
mod process;
mod proxy;
mod registry;
mod resources;
mod retry;
mod topology;
mod volume;

/// The native core of corral.
#[pymodule(gil_used = false)]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    registry::register(m)?;
    ports::register(m)?;
    breaker::register(m)?;
    retry::register(m)?;
    balance::register(m)?;
    topology::register(m)?;
    resources::register(m)?;
    probe::register(m)?;
    process::register(m)?;
    proxy::register(m)?;
    mesh::register(m)?;
    cgroup::register(m)?;
    du::register(m)?;
    volume::register(m)?;
    Ok(())
}
