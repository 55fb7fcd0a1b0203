//! `CircuitBreaker`: the guarded call, the context manager, manual
//! `allow()`/`record_*()`, listeners and stats. The Python subclass in
//! `corral/breaker.py` adds `call_async` and the decorator.

use std::cell::RefCell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple, PyType};

use corral_core::breaker::{self as core, BreakerConfig, State, Ticket};

use crate::errors::{seconds, IntoPyErr, PyResultExt};

/// A thread-safe circuit breaker.
#[pyclass(frozen, subclass, module = "corral._core")]
pub struct CircuitBreaker {
    inner: Arc<core::CircuitBreaker>,
    /// Exceptions that count neither as failure nor success.
    exclude: Option<Py<PyTuple>>,
    /// When set, only these exceptions count as failures (others are ignored).
    failure_on: Option<Py<PyTuple>>,
    /// Whether calls are timed (slow-call detection).
    timed: bool,
    name: Option<String>,
}

thread_local! {
    /// `with breaker:` blocks open on this thread: the breaker, the ticket its admission got,
    /// and (for slow-call detection) when it began.
    static WITH_BLOCKS: RefCell<Vec<(usize, Ticket, Option<Instant>)>> = const { RefCell::new(Vec::new()) };
}

fn as_tuple(
    py: Python<'_>,
    name: &str,
    v: Option<&Bound<'_, PyAny>>,
) -> PyResult<Option<Py<PyTuple>>> {
    let Some(v) = v else { return Ok(None) };
    let t = if let Ok(t) = v.cast::<PyTuple>() {
        t.clone()
    } else if v.cast::<PyType>().is_ok() {
        PyTuple::new(py, [v])?
    } else {
        PyTuple::new(py, v.try_iter()?.collect::<PyResult<Vec<_>>>()?)?
    };
    for item in t.iter() {
        let ok = item.cast::<PyType>().is_ok_and(|ty| {
            ty.is_subclass_of::<pyo3::exceptions::PyBaseException>()
                .unwrap_or(false)
        });
        if !ok {
            return Err(crate::errors::bad_type(
                name,
                "an exception class or a tuple of them",
            ));
        }
    }
    Ok((!t.is_empty()).then(|| t.unbind()))
}

impl CircuitBreaker {
    /// The manual `record_success` / `record_failure`: timed when a duration is given, in the
    /// generation of `ticket` when one is given (else in the current one).
    fn record_outcome(
        &self,
        failed: bool,
        duration: Option<f64>,
        ticket: Option<u32>,
    ) -> PyResult<()> {
        let d = duration.map(|d| seconds("duration", d)).transpose()?;
        let ticket = ticket.map_or_else(|| self.now(), Ticket::from_bits);
        self.inner.record_with(ticket, failed, d);
        Ok(())
    }

    /// A ticket for the current generation (for outcomes recorded without one).
    fn now(&self) -> Ticket {
        self.inner.ticket_now()
    }

    /// Records an exception raised by a guarded call, by its class.
    fn classify(&self, py: Python<'_>, err: &PyErr, elapsed: Option<Duration>, ticket: Ticket) {
        let ignored = self
            .exclude
            .as_ref()
            .is_some_and(|ex| err.is_instance(py, ex.bind(py).as_any()))
            || !err.is_instance_of::<PyException>(py)
            || self
                .failure_on
                .as_ref()
                .is_some_and(|f| !err.is_instance(py, f.bind(py).as_any()));
        if ignored {
            self.inner.record_ignored_with(ticket);
        } else {
            self.inner.record_with(ticket, true, elapsed);
        }
    }

    #[inline]
    pub(crate) fn guarded<'py>(
        &self,
        py: Python<'py>,
        f: &Bound<'py, PyAny>,
        args: &Bound<'py, PyTuple>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let ticket = match self.inner.admit() {
            Ok(t) => t,
            Err(open) => return Err(open.into_pyerr()),
        };
        let t0 = self.timed.then(Instant::now);
        let r = f.call(args, kwargs);
        let e = t0.map(|t| t.elapsed());
        match &r {
            Ok(_) => self.inner.record_with(ticket, false, e),
            Err(err) => self.classify(py, err, e, ticket),
        }
        r
    }
}

#[pymethods]
impl CircuitBreaker {
    #[new]
    #[pyo3(signature = (
        failure_threshold = 5, reset_timeout = 30.0, half_open_max_calls = 1,
        failure_rate_threshold = None, window_size = 100, minimum_calls = 10,
        slow_call_duration = None, max_reset_timeout = None, exclude = None, failure_on = None,
        *, name = None,
    ))]
    fn new(
        py: Python<'_>,
        failure_threshold: u32,
        reset_timeout: f64,
        half_open_max_calls: u32,
        failure_rate_threshold: Option<f64>,
        window_size: u32,
        minimum_calls: u32,
        slow_call_duration: Option<f64>,
        max_reset_timeout: Option<f64>,
        exclude: Option<&Bound<'_, PyAny>>,
        failure_on: Option<&Bound<'_, PyAny>>,
        name: Option<String>,
    ) -> PyResult<Self> {
        let config = BreakerConfig {
            failure_threshold,
            reset_timeout: seconds("reset_timeout", reset_timeout)?,
            half_open_max_calls,
            failure_rate_threshold,
            window_size,
            minimum_calls,
            slow_call_duration: slow_call_duration
                .map(|s| seconds("slow_call_duration", s))
                .transpose()?,
            max_reset_timeout: max_reset_timeout
                .map(|s| seconds("max_reset_timeout", s))
                .transpose()?,
        };
        Ok(Self {
            timed: config.slow_call_duration.is_some(),
            inner: Arc::new(core::CircuitBreaker::new(config).py()?),
            exclude: as_tuple(py, "exclude", exclude)?,
            failure_on: as_tuple(py, "failure_on", failure_on)?,
            name,
        })
    }

    /// Calls `f(*args, **kwargs)` under the breaker.
    #[pyo3(signature = (f, /, *args, **kwargs))]
    fn call<'py>(
        &self,
        py: Python<'py>,
        f: &Bound<'py, PyAny>,
        args: &Bound<'py, PyTuple>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.guarded(py, f, args, kwargs)
    }

    /// Whether a call may run now (a half-open trial permit is taken when it returns True).
    fn allow(&self) -> bool {
        self.inner.allow().is_ok()
    }

    /// Like `allow()`, but raises `CircuitOpenError` instead of returning False.
    fn check(&self) -> PyResult<()> {
        self.inner.allow().map_err(IntoPyErr::into_pyerr)
    }

    /// Admits one call (raises `CircuitOpenError` when open) and returns its ticket: the
    /// state and generation it was admitted in. Pass it to `record_*` with the outcome.
    fn admit(&self) -> PyResult<u32> {
        self.inner
            .admit()
            .map(Ticket::to_bits)
            .map_err(IntoPyErr::into_pyerr)
    }

    /// Records a success; with `duration` (seconds), a slow one counts as a failure.
    #[pyo3(signature = (duration = None, *, ticket = None))]
    fn record_success(&self, duration: Option<f64>, ticket: Option<u32>) -> PyResult<()> {
        self.record_outcome(false, duration, ticket)
    }

    /// Records a failure.
    #[pyo3(signature = (duration = None, *, ticket = None))]
    fn record_failure(&self, duration: Option<f64>, ticket: Option<u32>) -> PyResult<()> {
        self.record_outcome(true, duration, ticket)
    }

    /// Records an exception a guarded call raised, as the breaker's exception rules say.
    #[pyo3(signature = (exc, duration = None, *, ticket = None))]
    fn record_exception(
        &self,
        py: Python<'_>,
        exc: &Bound<'_, PyAny>,
        duration: Option<f64>,
        ticket: Option<u32>,
    ) -> PyResult<()> {
        let err = PyErr::from_value(exc.clone());
        let d = duration.map(|d| seconds("duration", d)).transpose()?;
        let ticket = ticket.map_or_else(|| self.now(), Ticket::from_bits);
        self.classify(py, &err, d, ticket);
        Ok(())
    }

    /// Whether calls are timed for slow-call detection.
    #[getter]
    fn timed(&self) -> bool {
        self.timed
    }

    /// `closed`, `open`, `half_open`, `forced_open` or `disabled`.
    #[getter]
    fn state(&self) -> &'static str {
        self.inner.state().as_str()
    }

    /// The name given at construction.
    #[getter]
    fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// Opens the circuit until `reset()`.
    fn force_open(&self) {
        self.inner.force_open();
    }
    /// Admits every call and counts nothing until `reset()`.
    fn disable(&self) {
        self.inner.disable();
    }
    /// Closes the circuit and forgets its history.
    fn reset(&self) {
        self.inner.reset();
    }
    /// Opens the circuit now, as a trip would.
    fn trip(&self) {
        self.inner.trip();
    }

    /// Calls `fn(old_state, new_state)` on every state change.
    fn add_listener(&self, listener: Py<PyAny>) {
        self.inner
            .add_listener(Arc::new(move |from: State, to: State| {
                Python::attach(|py| {
                    if let Err(e) = listener.call1(py, (from.as_str(), to.as_str())) {
                        e.write_unraisable(py, Some(listener.bind(py)));
                    }
                });
            }));
    }

    /// A snapshot of the counters.
    fn stats(&self) -> BreakerStats {
        let s = self.inner.stats();
        BreakerStats {
            state: s.state.as_str(),
            successes: s.successes,
            failures: s.failures,
            slow_calls: s.slow_calls,
            rejected: s.rejected,
            ignored: s.ignored,
            opened: s.opened,
            consecutive_failures: s.consecutive_failures,
            failure_rate: s.failure_rate,
            open_remaining: s.open_remaining,
        }
    }

    fn __enter__(slf: &Bound<'_, Self>) -> PyResult<()> {
        let me = slf.get();
        let ticket = me.inner.admit().map_err(IntoPyErr::into_pyerr)?;
        let key = Arc::as_ptr(&me.inner) as usize;
        let start = me.timed.then(Instant::now);
        WITH_BLOCKS.with(|s| s.borrow_mut().push((key, ticket, start)));
        Ok(())
    }

    #[pyo3(signature = (exc_type, exc, tb))]
    fn __exit__(
        &self,
        py: Python<'_>,
        exc_type: Option<&Bound<'_, PyAny>>,
        exc: Option<&Bound<'_, PyAny>>,
        tb: Option<&Bound<'_, PyAny>>,
    ) -> bool {
        let _ = (exc_type, tb);
        let key = Arc::as_ptr(&self.inner) as usize;
        let (ticket, start) = WITH_BLOCKS
            .with(|s| {
                let mut s = s.borrow_mut();
                let pos = s.iter().rposition(|(k, _, _)| *k == key)?;
                let (_, t, st) = s.remove(pos);
                Some((t, st))
            })
            .unwrap_or_else(|| (self.now(), None));
        let elapsed = start.map(|t| t.elapsed());
        match exc {
            Some(e) if !e.is_none() => {
                self.classify(py, &PyErr::from_value(e.clone()), elapsed, ticket);
            }
            _ => self.inner.record_with(ticket, false, elapsed),
        }
        false
    }

    fn __repr__(&self) -> String {
        format!(
            "CircuitBreaker(name={:?}, state={:?})",
            self.name,
            self.inner.state().as_str()
        )
    }
}

/// A snapshot of a breaker's counters.
#[pyclass(frozen, get_all, module = "corral._core")]
pub struct BreakerStats {
    /// State when taken.
    state: &'static str,
    /// Successful calls.
    successes: u64,
    /// Failed calls (slow ones included).
    failures: u64,
    /// Calls recorded as slow.
    slow_calls: u64,
    /// Calls rejected while open.
    rejected: u64,
    /// Outcomes ignored (excluded exceptions).
    ignored: u64,
    /// Times the circuit opened.
    opened: u64,
    /// Current run of consecutive failures.
    consecutive_failures: u32,
    /// Failure rate over the sliding window, when configured and non-empty.
    failure_rate: Option<f64>,
    /// Seconds until trial calls, when open.
    open_remaining: f64,
}

#[pymethods]
impl BreakerStats {
    fn __repr__(&self) -> String {
        format!(
            "BreakerStats(state={:?}, successes={}, failures={}, rejected={}, opened={})",
            self.state, self.successes, self.failures, self.rejected, self.opened
        )
    }
}

/// A function guarded by a breaker (what `@breaker` makes of a sync function).
#[pyclass(frozen, dict, module = "corral._core")]
pub struct GuardedCall {
    breaker: Py<CircuitBreaker>,
    func: Py<PyAny>,
}

#[pymethods]
impl GuardedCall {
    #[new]
    fn new(breaker: Py<CircuitBreaker>, func: Py<PyAny>) -> Self {
        Self { breaker, func }
    }
    #[pyo3(signature = (*args, **kwargs))]
    fn __call__<'py>(
        &self,
        py: Python<'py>,
        args: &Bound<'py, PyTuple>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.breaker
            .get()
            .guarded(py, self.func.bind(py), args, kwargs)
    }
    /// Binds like a function when used as a method.
    fn __get__<'py>(
        slf: &Bound<'py, Self>,
        obj: Option<&Bound<'py, PyAny>>,
        objtype: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let _ = objtype;
        crate::callable::bind_as_method(slf.as_any(), obj)
    }
    /// The breaker guarding it.
    #[getter]
    fn breaker(&self, py: Python<'_>) -> Py<CircuitBreaker> {
        self.breaker.clone_ref(py)
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<CircuitBreaker>()?;
    m.add_class::<BreakerStats>()?;
    m.add_class::<GuardedCall>()?;
    Ok(())
}
