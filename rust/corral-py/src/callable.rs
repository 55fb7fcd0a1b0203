//! What the callable wrappers (`GuardedCall` in breaker.rs, `Retrying` in retry.rs) share.

use pyo3::prelude::*;

/// `__get__` for the callable wrappers: bound to an instance they become a method, as the
/// function they wrap would.
pub(crate) fn bind_as_method<'py>(
    wrapper: &Bound<'py, PyAny>,
    obj: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    match obj {
        Some(o) if !o.is_none() => wrapper
            .py()
            .import("types")?
            .getattr("MethodType")?
            .call1((wrapper, o)),
        _ => Ok(wrapper.clone()),
    }
}
