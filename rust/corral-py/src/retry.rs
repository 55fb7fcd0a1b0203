//! `RetryPolicy`, `RetrySchedule`, `RetryBudget`, `RetryAttempts`, and `Retrying` (the
//! sync `@retry` wrapper). Both loops step the core's `Attempts`: the sync one here, the
//! async one in `corral/retry.py` (with `asyncio.sleep`), and the engine's spawn retries
//! on the event loop.

use std::sync::Arc;

use parking_lot::Mutex;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use corral_core::retry::{self as core, Backoff, Jitter};

use crate::errors::{named, retry_exhausted, seconds, PyResultExt};

/// How long to wait between attempts, and when to give up.
#[pyclass(frozen, module = "corral._core")]
#[derive(Clone)]
pub struct RetryPolicy {
    pub(crate) inner: core::RetryPolicy,
}

fn build(
    backoff: Backoff,
    max_delay: Option<f64>,
    max_attempts: Option<u32>,
    max_elapsed: Option<f64>,
    jitter: &str,
    seed: Option<u64>,
) -> PyResult<RetryPolicy> {
    let jitter = named("jitter", jitter, Jitter::parse, Jitter::NAMES)?;
    let inner = core::RetryPolicy::new(backoff)
        .jitter(jitter)
        .max_delay(max_delay.map(|d| seconds("max_delay", d)).transpose()?)
        .max_attempts(max_attempts)
        .max_elapsed(max_elapsed.map(|d| seconds("max_elapsed", d)).transpose()?)
        .seed(seed);
    inner.validate().py()?;
    Ok(RetryPolicy { inner })
}

#[pymethods]
impl RetryPolicy {
    /// The same delay every time.
    #[staticmethod]
    #[pyo3(signature = (delay, *, max_delay = None, max_attempts = Some(3), max_elapsed = None, jitter = "none", seed = None))]
    fn fixed(
        delay: f64,
        max_delay: Option<f64>,
        max_attempts: Option<u32>,
        max_elapsed: Option<f64>,
        jitter: &str,
        seed: Option<u64>,
    ) -> PyResult<Self> {
        build(
            Backoff::Fixed {
                delay: seconds("delay", delay)?,
            },
            max_delay,
            max_attempts,
            max_elapsed,
            jitter,
            seed,
        )
    }
    /// `initial + n * step`.
    #[staticmethod]
    #[pyo3(signature = (initial, step, *, max_delay = None, max_attempts = Some(3), max_elapsed = None, jitter = "none", seed = None))]
    fn linear(
        initial: f64,
        step: f64,
        max_delay: Option<f64>,
        max_attempts: Option<u32>,
        max_elapsed: Option<f64>,
        jitter: &str,
        seed: Option<u64>,
    ) -> PyResult<Self> {
        let b = Backoff::Linear {
            initial: seconds("initial", initial)?,
            step: seconds("step", step)?,
        };
        build(b, max_delay, max_attempts, max_elapsed, jitter, seed)
    }
    /// `initial * multiplier ** n`.
    #[staticmethod]
    #[pyo3(signature = (initial, multiplier = 2.0, *, max_delay = None, max_attempts = Some(3), max_elapsed = None, jitter = "none", seed = None))]
    fn exponential(
        initial: f64,
        multiplier: f64,
        max_delay: Option<f64>,
        max_attempts: Option<u32>,
        max_elapsed: Option<f64>,
        jitter: &str,
        seed: Option<u64>,
    ) -> PyResult<Self> {
        let b = Backoff::Exponential {
            initial: seconds("initial", initial)?,
            multiplier,
        };
        build(b, max_delay, max_attempts, max_elapsed, jitter, seed)
    }
    /// `initial * fib(n)`: 1, 1, 2, 3, 5, ...
    #[staticmethod]
    #[pyo3(signature = (initial, *, max_delay = None, max_attempts = Some(3), max_elapsed = None, jitter = "none", seed = None))]
    fn fibonacci(
        initial: f64,
        max_delay: Option<f64>,
        max_attempts: Option<u32>,
        max_elapsed: Option<f64>,
        jitter: &str,
        seed: Option<u64>,
    ) -> PyResult<Self> {
        build(
            Backoff::Fibonacci {
                initial: seconds("initial", initial)?,
            },
            max_delay,
            max_attempts,
            max_elapsed,
            jitter,
            seed,
        )
    }
    /// AWS's decorrelated jitter: `min(max_delay, uniform(initial, 3 * previous))`.
    #[staticmethod]
    #[pyo3(signature = (initial, *, max_delay = None, max_attempts = Some(3), max_elapsed = None, jitter = "none", seed = None))]
    fn decorrelated(
        initial: f64,
        max_delay: Option<f64>,
        max_attempts: Option<u32>,
        max_elapsed: Option<f64>,
        jitter: &str,
        seed: Option<u64>,
    ) -> PyResult<Self> {
        build(
            Backoff::Decorrelated {
                initial: seconds("initial", initial)?,
            },
            max_delay,
            max_attempts,
            max_elapsed,
            jitter,
            seed,
        )
    }
    /// The successive delays in seconds, without sleeping (endless without `max_attempts`).
    fn delays(&self) -> RetrySchedule {
        self.schedule()
    }
    /// One retried operation whose first attempt begins now (deposited in `budget`): ask
    /// `after_failure()` after each failed attempt.
    #[pyo3(signature = (budget = None))]
    fn attempts(&self, budget: Option<&Bound<'_, RetryBudget>>) -> RetryAttempts {
        RetryAttempts {
            inner: Mutex::new(core::Attempts::new(
                &self.inner,
                budget.map(|b| b.get().inner.clone()),
            )),
        }
    }
    /// A fresh schedule for one retried operation.
    fn schedule(&self) -> RetrySchedule {
        RetrySchedule {
            inner: Mutex::new(self.inner.schedule()),
        }
    }
    /// Total attempts allowed, or None.
    #[getter]
    fn max_attempts(&self) -> Option<u32> {
        self.inner.max_attempts
    }
    /// Elapsed-time cap in seconds, or None.
    #[getter]
    fn max_elapsed(&self) -> Option<f64> {
        self.inner.max_elapsed.map(|d| d.as_secs_f64())
    }
    fn __repr__(&self) -> String {
        format!(
            "RetryPolicy({:?}, max_attempts={:?})",
            self.inner.backoff, self.inner.max_attempts
        )
    }
}

/// The state of one retried operation; also an iterator of delays in seconds.
#[pyclass(frozen, module = "corral._core")]
pub struct RetrySchedule {
    inner: Mutex<core::Schedule>,
}

#[pymethods]
impl RetrySchedule {
    /// Seconds to wait before the next retry given the seconds since the first attempt began, or None to give up.
    #[pyo3(signature = (elapsed = 0.0))]
    fn next_delay(&self, elapsed: f64) -> PyResult<Option<f64>> {
        let e = seconds("elapsed", elapsed)?;
        Ok(self.inner.lock().next_delay(e).map(|d| d.as_secs_f64()))
    }
    /// Retries handed out so far.
    #[getter]
    fn retries(&self) -> u32 {
        self.inner.lock().retries()
    }
    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }
    fn __next__(&self) -> Option<f64> {
        self.inner.lock().next().map(|d| d.as_secs_f64())
    }
}

/// One retried operation, stepped by its caller (see `RetryPolicy.attempts`).
#[pyclass(frozen, module = "corral._core")]
pub struct RetryAttempts {
    inner: Mutex<core::Attempts>,
}

#[pymethods]
impl RetryAttempts {
    /// The last attempt failed: seconds to wait before the next, or None to give up (the
    /// policy's caps are reached or the budget is spent).
    fn after_failure(&self) -> Option<f64> {
        self.inner.lock().after_failure().map(|d| d.as_secs_f64())
    }
    /// Attempts begun so far (1 before any failure).
    #[getter]
    fn attempts(&self) -> u32 {
        self.inner.lock().attempts()
    }
    /// The `RetryExhausted` to raise when `last` (a result, not an exception) asked for the
    /// retry that `after_failure` refused.
    fn exhausted(&self, py: Python<'_>, last: Py<PyAny>) -> Py<PyAny> {
        let e = self.inner.lock().exhausted();
        retry_exhausted(&e, last).into_value(py).into_any()
    }
}

/// A token bucket shared by many callers so retries cannot multiply an outage.
#[pyclass(frozen, module = "corral._core")]
pub struct RetryBudget {
    pub(crate) inner: Arc<core::RetryBudget>,
}

#[pymethods]
impl RetryBudget {
    #[new]
    #[pyo3(signature = (ratio = 0.2, min_per_second = 10.0, ttl = 10.0))]
    fn new(ratio: f64, min_per_second: f64, ttl: f64) -> PyResult<Self> {
        Ok(Self {
            inner: Arc::new(
                core::RetryBudget::new(ratio, min_per_second, seconds("ttl", ttl)?).py()?,
            ),
        })
    }
    /// Records one call (a first attempt).
    fn deposit(&self) {
        self.inner.deposit();
    }
    /// Takes a token for one retry; False when the budget is spent.
    fn try_withdraw(&self) -> bool {
        self.inner.try_withdraw()
    }
    /// Retries that could be made now.
    #[getter]
    fn balance(&self) -> f64 {
        self.inner.balance()
    }
}

/// A sync function retried by a policy (what `@retry` makes of a sync function).
#[pyclass(frozen, dict, module = "corral._core")]
pub struct Retrying {
    func: Py<PyAny>,
    policy: core::RetryPolicy,
    on: Py<PyTuple>,
    retry_if_result: Option<Py<PyAny>>,
    budget: Option<Arc<core::RetryBudget>>,
}

#[pymethods]
impl Retrying {
    #[new]
    #[pyo3(signature = (func, policy, on, retry_if_result = None, budget = None))]
    fn new(
        func: Py<PyAny>,
        policy: &Bound<'_, RetryPolicy>,
        on: Py<PyTuple>,
        retry_if_result: Option<Py<PyAny>>,
        budget: Option<&Bound<'_, RetryBudget>>,
    ) -> Self {
        Self {
            func,
            policy: policy.get().inner.clone(),
            on,
            retry_if_result,
            budget: budget.map(|b| b.get().inner.clone()),
        }
    }

    #[pyo3(signature = (*args, **kwargs))]
    fn __call__<'py>(
        &self,
        py: Python<'py>,
        args: &Bound<'py, PyTuple>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let f = self.func.bind(py);
        let mut attempts = core::Attempts::new(&self.policy, self.budget.clone());
        loop {
            let (err, last) = match f.call(args, kwargs) {
                Ok(v) => match &self.retry_if_result {
                    Some(pred) if pred.bind(py).call1((&v,))?.is_truthy()? => (None, Some(v)),
                    _ => return Ok(v),
                },
                Err(e) => {
                    if !e.is_instance_of::<PyException>(py)
                        || !e.is_instance(py, self.on.bind(py).as_any())
                    {
                        return Err(e);
                    }
                    (Some(e), None)
                }
            };
            let Some(delay) = attempts.after_failure() else {
                return Err(match err {
                    Some(e) => e,
                    None => {
                        retry_exhausted(&attempts.exhausted(), last.expect("a result").unbind())
                    }
                });
            };
            if !delay.is_zero() {
                py.detach(|| std::thread::sleep(delay));
                py.check_signals()?;
            }
        }
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
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<RetryPolicy>()?;
    m.add_class::<RetrySchedule>()?;
    m.add_class::<RetryBudget>()?;
    m.add_class::<RetryAttempts>()?;
    m.add_class::<Retrying>()?;
    Ok(())
}
