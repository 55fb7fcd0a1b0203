//! Circuit breaker: closed, open, half-open, plus forced-open and disabled.
//!
//! Trip rules: a number of consecutive failures, and/or a failure rate over a
//! count-based sliding window once it holds a minimum number of calls
//! (Resilience4j's model); slow calls can count as failures. The open duration
//! can grow on repeated trips up to a cap. Half-open admits a limited number of
//! trial calls at once; all of them must succeed to close again, any failure
//! opens the circuit again.
//!
//! The state check is one atomic load when closed. Transitions take a small
//! lock that is never held while a guarded call runs, and listeners are called
//! after it is released.
//!
//! Every admission is tagged ([`Ticket`]) with the state *and the generation* it was
//! admitted in (the state and a transition counter share one atomic word), and an
//! outcome counts toward the state machine only in the generation that admitted it, as
//! Resilience4j's per-state machine does: a slow call admitted while closed that ends
//! during half-open neither closes the circuit nor frees a trial permit it never took.
//! Outcomes recorded without a ticket count in the generation they arrive in.
//!
//! ```
//! use std::time::Duration;
//! use corral_core::breaker::{BreakerConfig, CircuitBreaker, State};
//! use corral_core::clock::ManualClock;
//!
//! let clock = ManualClock::new();
//! let cb = CircuitBreaker::with_clock(
//!     BreakerConfig { failure_threshold: 2, reset_timeout: Duration::from_secs(1), ..Default::default() },
//!     clock.clone(),
//! ).unwrap();
//! cb.record_failure();
//! cb.record_failure();
//! assert_eq!(cb.state(), State::Open);
//! assert!(cb.allow().is_err());
//! clock.advance(Duration::from_secs(1));
//! assert!(cb.allow().is_ok()); // the trial call
//! assert_eq!(cb.state(), State::HalfOpen);
//! cb.record_success();
//! assert_eq!(cb.state(), State::Closed);
//! ```

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};

use crate::clock::{self, Clock};
use crate::error::{BreakerError, CircuitOpen};

/// The breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum State {
    /// Calls pass; outcomes are counted.
    Closed = 0,
    /// Calls are rejected until the open duration has passed.
    Open = 1,
    /// A limited number of trial calls pass.
    HalfOpen = 2,
    /// Calls are rejected until the state is changed by hand.
    ForcedOpen = 3,
    /// Calls pass and nothing is counted.
    Disabled = 4,
}

impl State {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Closed,
            1 => Self::Open,
            2 => Self::HalfOpen,
            3 => Self::ForcedOpen,
            _ => Self::Disabled,
        }
    }
    /// The name the Python face uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
            Self::ForcedOpen => "forced_open",
            Self::Disabled => "disabled",
        }
    }
    /// Parses [`as_str`](Self::as_str)'s names.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "closed" => Self::Closed,
            "open" => Self::Open,
            "half_open" => Self::HalfOpen,
            "forced_open" => Self::ForcedOpen,
            "disabled" => Self::Disabled,
            _ => return None,
        })
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What [`CircuitBreaker::admit`] hands out: the state and generation a call was admitted
/// in. Give it back with the call's outcome ([`CircuitBreaker::record_with`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ticket(u32);

impl Ticket {
    /// The state the call was admitted in.
    pub fn state(self) -> State {
        State::from_u8((self.0 & STATE_MASK) as u8)
    }
    /// The ticket as a number (for a binding to hand to its caller).
    pub fn to_bits(self) -> u32 {
        self.0
    }
    /// A ticket back from [`Ticket::to_bits`].
    pub fn from_bits(bits: u32) -> Self {
        Ticket(bits)
    }
}

const STATE_MASK: u32 = 0xff;
const GENERATION: u32 = 0x100;

/// How a breaker trips and recovers.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerConfig {
    /// Consecutive failures that open the circuit; 0 turns this rule off.
    pub failure_threshold: u32,
    /// How long the circuit stays open after the first trip.
    pub reset_timeout: Duration,
    /// Trial calls admitted at once in half-open; this many successes close it.
    pub half_open_max_calls: u32,
    /// Failure rate (0 < r <= 1) over the sliding window that opens the circuit; `None` turns the rule off.
    pub failure_rate_threshold: Option<f64>,
    /// Calls in the sliding window.
    pub window_size: u32,
    /// Calls the window must hold before the rate rule applies.
    pub minimum_calls: u32,
    /// Calls at least this slow count as failures.
    pub slow_call_duration: Option<Duration>,
    /// With a cap, the open duration doubles on each trip that follows a failed trial, up to it.
    pub max_reset_timeout: Option<Duration>,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            reset_timeout: Duration::from_secs(30),
            half_open_max_calls: 1,
            failure_rate_threshold: None,
            window_size: 100,
            minimum_calls: 10,
            slow_call_duration: None,
            max_reset_timeout: None,
        }
    }
}

impl BreakerConfig {
    fn validate(&self) -> Result<(), BreakerError> {
        let bad = |m: String| Err(BreakerError::InvalidConfig(m));
        if self.half_open_max_calls == 0 {
            return bad("half_open_max_calls must be at least 1".into());
        }
        if let Some(r) = self.failure_rate_threshold {
            if !(r > 0.0 && r <= 1.0) {
                return bad(format!("failure_rate_threshold must be in (0, 1], got {r}"));
            }
            if self.window_size == 0 {
                return bad("window_size must be at least 1".into());
            }
            if self.minimum_calls > self.window_size {
                return bad(format!(
                    "minimum_calls ({}) exceeds window_size ({})",
                    self.minimum_calls, self.window_size
                ));
            }
        }
        if self.failure_threshold == 0 && self.failure_rate_threshold.is_none() {
            return bad("no trip rule: set failure_threshold or failure_rate_threshold".into());
        }
        if let Some(max) = self.max_reset_timeout {
            if max < self.reset_timeout {
                return bad(format!(
                    "max_reset_timeout ({max:?}) is below reset_timeout ({:?})",
                    self.reset_timeout
                ));
            }
        }
        Ok(())
    }
}

/// A count-based sliding window of outcomes, lock-free: each record swaps
/// one slot and adjusts the failure count by the difference.
#[derive(Debug)]
struct Window {
    slots: Box<[AtomicU8]>,
    next: AtomicU64,
    filled: AtomicU32,
    failures: AtomicU32,
}

const EMPTY: u8 = 0;
const OK: u8 = 1;
const FAIL: u8 = 2;

impl Window {
    fn new(n: u32) -> Self {
        Self {
            slots: (0..n).map(|_| AtomicU8::new(EMPTY)).collect(),
            next: AtomicU64::new(0),
            filled: AtomicU32::new(0),
            failures: AtomicU32::new(0),
        }
    }
    /// Records an outcome; returns (calls in window, failures in window).
    fn record(&self, failed: bool) -> (u32, u32) {
        let i = (self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len() as u64) as usize;
        let new = if failed { FAIL } else { OK };
        let old = self.slots[i].swap(new, Ordering::AcqRel);
        let filled = if old == EMPTY {
            self.filled.fetch_add(1, Ordering::AcqRel) + 1
        } else {
            self.filled.load(Ordering::Acquire)
        };
        let failures = match (old == FAIL, failed) {
            (false, true) => self.failures.fetch_add(1, Ordering::AcqRel) + 1,
            (true, false) => self.failures.fetch_sub(1, Ordering::AcqRel) - 1,
            _ => self.failures.load(Ordering::Acquire),
        };
        (filled, failures)
    }
    fn reset(&self) {
        for s in &*self.slots {
            s.store(EMPTY, Ordering::Release);
        }
        self.filled.store(0, Ordering::Release);
        self.failures.store(0, Ordering::Release);
    }
    fn rate(&self) -> Option<f64> {
        let n = self.filled.load(Ordering::Acquire);
        (n > 0).then(|| f64::from(self.failures.load(Ordering::Acquire)) / f64::from(n))
    }
}

/// A snapshot of a breaker's counters.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerStats {
    /// State now.
    pub state: State,
    /// Successful calls recorded.
    pub successes: u64,
    /// Failed calls recorded (slow ones included).
    pub failures: u64,
    /// Calls recorded as slow.
    pub slow_calls: u64,
    /// Calls rejected while open.
    pub rejected: u64,
    /// Outcomes recorded as neither (ignored exceptions).
    pub ignored: u64,
    /// Times the circuit opened.
    pub opened: u64,
    /// Current run of consecutive failures.
    pub consecutive_failures: u32,
    /// Failure rate over the sliding window, when it is configured and holds calls.
    pub failure_rate: Option<f64>,
    /// Seconds until trials are admitted, when open.
    pub open_remaining: f64,
}

/// A state-change listener: `(from, to)`.
pub type Listener = Arc<dyn Fn(State, State) + Send + Sync>;

/// A thread-safe circuit breaker.
pub struct CircuitBreaker {
    config: BreakerConfig,
    clock: Arc<dyn Clock>,
    /// The state (low 8 bits) and the generation: every transition adds [`GENERATION`].
    word: AtomicU32,
    consecutive: AtomicU32,
    window: Option<Window>,
    open_until: AtomicU64,
    /// Trips in a row without a successful close; drives the growing open duration.
    trips: AtomicU32,
    half_open_permits: AtomicU32,
    half_open_successes: AtomicU32,
    transition: Mutex<()>,
    listeners: RwLock<Vec<Listener>>,
    successes: AtomicU64,
    failures: AtomicU64,
    slow: AtomicU64,
    rejected: AtomicU64,
    ignored: AtomicU64,
    opened: AtomicU64,
}

impl std::fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("state", &self.state())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Either the circuit rejected the call, or the call itself failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError<E> {
    /// Rejected without running.
    #[error(transparent)]
    Open(#[from] CircuitOpen),
    /// Ran and failed.
    #[error("{0}")]
    Failed(E),
}

impl CircuitBreaker {
    /// A closed breaker on the monotonic clock.
    pub fn new(config: BreakerConfig) -> Result<Self, BreakerError> {
        Self::with_clock(config, clock::monotonic())
    }

    /// A closed breaker on the given clock.
    pub fn with_clock(config: BreakerConfig, clock: Arc<dyn Clock>) -> Result<Self, BreakerError> {
        config.validate()?;
        let window = config
            .failure_rate_threshold
            .map(|_| Window::new(config.window_size));
        Ok(Self {
            config,
            clock,
            word: AtomicU32::new(State::Closed as u32),
            consecutive: AtomicU32::new(0),
            window,
            open_until: AtomicU64::new(0),
            trips: AtomicU32::new(0),
            half_open_permits: AtomicU32::new(0),
            half_open_successes: AtomicU32::new(0),
            transition: Mutex::new(()),
            listeners: RwLock::new(Vec::new()),
            successes: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            slow: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            ignored: AtomicU64::new(0),
            opened: AtomicU64::new(0),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }

    /// The current state (an open circuit whose time is up reads as open until a call is admitted).
    #[inline]
    pub fn state(&self) -> State {
        State::from_u8((self.word.load(Ordering::Acquire) & STATE_MASK) as u8)
    }

    /// Asks to run one call. `Ok` admits it; the caller then records its outcome.
    #[inline]
    pub fn allow(&self) -> Result<(), CircuitOpen> {
        self.admit().map(|_| ())
    }

    /// Like [`allow`](Self::allow), and says in which state and generation the call was
    /// admitted: record its outcome with [`record_with`](Self::record_with).
    #[inline]
    pub fn admit(&self) -> Result<Ticket, CircuitOpen> {
        let w = self.word.load(Ordering::Acquire);
        let s = w & STATE_MASK;
        if s == State::Closed as u32 || s == State::Disabled as u32 {
            return Ok(Ticket(w));
        }
        self.admit_slow(w)
    }

    /// A ticket for the generation now, admitting nothing: what an outcome recorded without
    /// an admission of its own counts in.
    pub fn ticket_now(&self) -> Ticket {
        Ticket(self.word.load(Ordering::Acquire))
    }

    #[cold]
    fn admit_slow(&self, mut w: u32) -> Result<Ticket, CircuitOpen> {
        loop {
            let state = State::from_u8((w & STATE_MASK) as u8);
            match state {
                State::Closed | State::Disabled => return Ok(Ticket(w)),
                State::ForcedOpen => return Err(self.reject(state)),
                State::Open => {
                    if self.clock.now_nanos() < self.open_until.load(Ordering::Acquire) {
                        return Err(self.reject(state));
                    }
                    self.move_to(State::HalfOpen, Some(w));
                    w = self.word.load(Ordering::Acquire);
                }
                State::HalfOpen => {
                    // Under the transition lock, so the permit and the generation it is taken
                    // in cannot come apart.
                    let guard = self.transition.lock();
                    let now = self.word.load(Ordering::Acquire);
                    if now != w {
                        drop(guard);
                        w = now;
                        continue;
                    }
                    let max = self.config.half_open_max_calls;
                    let taken = self.half_open_permits.fetch_update(
                        Ordering::AcqRel,
                        Ordering::Acquire,
                        |n| (n < max).then_some(n + 1),
                    );
                    drop(guard);
                    return match taken {
                        Ok(_) => Ok(Ticket(w)),
                        Err(_) => Err(self.reject(state)),
                    };
                }
            }
        }
    }

    fn reject(&self, state: State) -> CircuitOpen {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        CircuitOpen {
            state: state.as_str(),
            remaining_secs: self.open_remaining().as_secs_f64(),
        }
    }

    /// Time until trial calls are admitted (zero unless open).
    pub fn open_remaining(&self) -> Duration {
        if self.state() != State::Open {
            return Duration::ZERO;
        }
        let until = self.open_until.load(Ordering::Acquire);
        Duration::from_nanos(until.saturating_sub(self.clock.now_nanos()))
    }

    /// Records a successful call.
    #[inline]
    pub fn record_success(&self) {
        self.record(false, None);
    }

    /// Records a failed call.
    #[inline]
    pub fn record_failure(&self) {
        self.record(true, None);
    }

    /// Records a call's outcome with its duration (a slow success counts as a failure).
    pub fn record_timed(&self, failed: bool, elapsed: Duration) {
        self.record(failed, Some(elapsed));
    }

    /// Records an outcome that counts neither way (an ignored exception); frees its trial permit.
    pub fn record_ignored(&self) {
        self.record_ignored_with(Ticket(self.word.load(Ordering::Acquire)));
    }

    /// Records an ignored outcome of the call admitted with `ticket`: it frees a trial
    /// permit only if it was a trial of the half-open period still running.
    pub fn record_ignored_with(&self, ticket: Ticket) {
        self.ignored.fetch_add(1, Ordering::Relaxed);
        if ticket.state() == State::HalfOpen {
            let _g = self.transition.lock();
            if self.word.load(Ordering::Acquire) == ticket.0 {
                let _ =
                    self.half_open_permits
                        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
            }
        }
    }

    /// Records the outcome of the call admitted with `ticket` (with its duration, when
    /// slow calls count): always in the totals, toward the state machine only in the
    /// generation that admitted it.
    #[inline]
    pub fn record_with(&self, ticket: Ticket, failed: bool, elapsed: Option<Duration>) {
        self.record_tagged(ticket.0, failed, elapsed);
    }

    #[inline]
    fn record(&self, failed: bool, elapsed: Option<Duration>) {
        self.record_tagged(self.word.load(Ordering::Acquire), failed, elapsed);
    }

    #[inline]
    fn record_tagged(&self, admitted: u32, mut failed: bool, elapsed: Option<Duration>) {
        let state = (admitted & STATE_MASK) as u8;
        if state == State::Disabled as u8 {
            return;
        }
        if let (Some(e), Some(limit)) = (elapsed, self.config.slow_call_duration) {
            if e >= limit {
                self.slow.fetch_add(1, Ordering::Relaxed);
                failed = true;
            }
        }
        if failed {
            self.failures.fetch_add(1, Ordering::Relaxed);
        } else {
            self.successes.fetch_add(1, Ordering::Relaxed);
        }
        if self.word.load(Ordering::Acquire) != admitted {
            // Admitted in an earlier generation (a call that started before the circuit
            // opened, say): it is in the totals, and changes nothing else.
            return;
        }
        match State::from_u8(state) {
            State::Closed => self.record_closed(admitted, failed),
            State::HalfOpen => {
                if failed {
                    // The trial failed: one more failure in the current run, and open again.
                    self.consecutive.fetch_add(1, Ordering::AcqRel);
                    self.move_to(State::Open, Some(admitted));
                } else {
                    let n = self.half_open_successes.fetch_add(1, Ordering::AcqRel) + 1;
                    if n >= self.config.half_open_max_calls {
                        self.move_to(State::Closed, Some(admitted));
                    }
                }
            }
            State::Open | State::ForcedOpen | State::Disabled => {}
        }
    }

    #[inline]
    fn record_closed(&self, admitted: u32, failed: bool) {
        let mut trip = false;
        if failed {
            let n = self.consecutive.fetch_add(1, Ordering::AcqRel) + 1;
            trip |= self.config.failure_threshold > 0 && n >= self.config.failure_threshold;
        } else if self.consecutive.load(Ordering::Relaxed) != 0 {
            // Only write when needed: a store on every success would bounce the cache line between threads.
            self.consecutive.store(0, Ordering::Release);
        }
        if let (Some(w), Some(rate)) = (&self.window, self.config.failure_rate_threshold) {
            let (calls, failures) = w.record(failed);
            trip |= failed
                && calls >= self.config.minimum_calls.max(1)
                && f64::from(failures) >= rate * f64::from(calls);
        }
        if trip {
            self.move_to(State::Open, Some(admitted));
        }
    }

    /// The open duration for the next trip.
    fn next_open_duration(&self, trips: u32) -> Duration {
        match self.config.max_reset_timeout {
            None => self.config.reset_timeout,
            Some(cap) => {
                let factor = 2f64.powi(trips.min(62) as i32);
                let d = self.config.reset_timeout.as_secs_f64() * factor;
                Duration::from_secs_f64(d.min(cap.as_secs_f64()))
            }
        }
    }

    /// Moves to `to`, when the state word (state and generation) is still `from` (or from
    /// any state when `from` is `None`). Returns whether it moved. Listeners are called after
    /// the transition lock is released.
    fn move_to(&self, to: State, from: Option<u32>) -> bool {
        let prev = {
            let _g = self.transition.lock();
            let word = self.word.load(Ordering::Acquire);
            let cur = State::from_u8((word & STATE_MASK) as u8);
            if from.is_some_and(|f| f != word) || cur == to {
                return false;
            }
            match to {
                State::Open => {
                    let trips = self.trips.fetch_add(1, Ordering::AcqRel);
                    let d = self.next_open_duration(trips);
                    self.open_until.store(
                        self.clock.now_nanos().saturating_add(d.as_nanos() as u64),
                        Ordering::Release,
                    );
                    self.opened.fetch_add(1, Ordering::Relaxed);
                }
                State::HalfOpen => {
                    self.half_open_permits.store(0, Ordering::Release);
                    self.half_open_successes.store(0, Ordering::Release);
                }
                State::Closed => {
                    if cur == State::HalfOpen {
                        self.trips.store(0, Ordering::Release);
                    }
                    self.consecutive.store(0, Ordering::Release);
                    if let Some(w) = &self.window {
                        w.reset();
                    }
                }
                State::ForcedOpen | State::Disabled => {}
            }
            let generation = (word & !STATE_MASK).wrapping_add(GENERATION);
            self.word.store(generation | to as u32, Ordering::Release);
            cur
        };
        let listeners = self.listeners.read().clone();
        for l in listeners {
            l(prev, to);
        }
        true
    }

    /// Opens the circuit until [`reset`](Self::reset) or [`disable`](Self::disable).
    pub fn force_open(&self) {
        self.move_to(State::ForcedOpen, None);
    }

    /// Stops counting and admits every call until [`reset`](Self::reset).
    pub fn disable(&self) {
        self.move_to(State::Disabled, None);
    }

    /// Closes the circuit and clears its counts and trip history.
    pub fn reset(&self) {
        self.move_to(State::Closed, None);
        self.trips.store(0, Ordering::Release);
        self.consecutive.store(0, Ordering::Release);
        if let Some(w) = &self.window {
            w.reset();
        }
    }

    /// Opens the circuit now, as a trip would.
    pub fn trip(&self) {
        self.move_to(State::Open, None);
    }

    /// Adds a listener called with `(from, to)` on every state change.
    pub fn add_listener(&self, f: Listener) {
        self.listeners.write().push(f);
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> BreakerStats {
        BreakerStats {
            state: self.state(),
            successes: self.successes.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            slow_calls: self.slow.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            ignored: self.ignored.load(Ordering::Relaxed),
            opened: self.opened.load(Ordering::Relaxed),
            consecutive_failures: self.consecutive.load(Ordering::Relaxed),
            failure_rate: self.window.as_ref().and_then(Window::rate),
            open_remaining: self.open_remaining().as_secs_f64(),
        }
    }

    /// Runs `f` under the breaker: rejected when open, its outcome recorded otherwise.
    pub fn call<T, E>(&self, f: impl FnOnce() -> Result<T, E>) -> Result<T, CallError<E>> {
        let ticket = self.admit()?;
        if self.config.slow_call_duration.is_some() {
            let t0 = self.clock.now_nanos();
            let r = f();
            let e = Duration::from_nanos(self.clock.now_nanos().saturating_sub(t0));
            self.record_with(ticket, r.is_err(), Some(e));
            r.map_err(CallError::Failed)
        } else {
            let r = f();
            self.record_with(ticket, r.is_err(), None);
            r.map_err(CallError::Failed)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use std::sync::atomic::AtomicUsize;

    fn tripped(threshold: u32) -> (CircuitBreaker, Arc<ManualClock>) {
        let (b, c) = cb(BreakerConfig {
            failure_threshold: threshold,
            reset_timeout: Duration::from_millis(50),
            ..Default::default()
        });
        for _ in 0..threshold {
            b.record_failure();
        }
        assert_eq!(b.state(), State::Open);
        (b, c)
    }

    #[test]
    fn a_failed_trial_extends_the_run_of_failures() {
        let (b, c) = tripped(3);
        assert_eq!(b.stats().consecutive_failures, 3);
        c.advance(Duration::from_millis(50));
        let trial = b.admit().unwrap();
        assert_eq!(trial.state(), State::HalfOpen);
        b.record_with(trial, true, None);
        assert_eq!(b.state(), State::Open);
        assert_eq!(b.stats().consecutive_failures, 4);
    }

    #[test]
    fn a_call_admitted_while_closed_cannot_close_the_circuit() {
        let (b, c) = cb(BreakerConfig {
            failure_threshold: 2,
            reset_timeout: Duration::from_millis(50),
            ..Default::default()
        });
        let slow = b.admit().unwrap();
        b.record_failure();
        b.record_failure();
        c.advance(Duration::from_millis(50));
        let trial = b.admit().unwrap();
        b.record_with(slow, false, None);
        assert_eq!(
            b.state(),
            State::HalfOpen,
            "the slow closed-state success changes nothing"
        );
        b.record_with(trial, true, None);
        assert_eq!(b.state(), State::Open, "the only real trial failed");
        assert_eq!(
            b.stats().successes,
            1,
            "the slow success is still in the totals"
        );
    }

    #[test]
    fn a_late_ignored_outcome_frees_no_trial_permit() {
        let (b, c) = cb(BreakerConfig {
            failure_threshold: 2,
            reset_timeout: Duration::from_millis(50),
            half_open_max_calls: 1,
            ..Default::default()
        });
        let early = b.admit().unwrap();
        b.record_failure();
        b.record_failure();
        c.advance(Duration::from_millis(50));
        let trial = b.admit().unwrap();
        b.record_ignored_with(early);
        assert!(b.admit().is_err(), "still one trial at a time");
        b.record_ignored_with(trial);
        assert!(
            b.admit().is_ok(),
            "the trial's own ignored outcome frees its permit"
        );
    }

    fn cb(cfg: BreakerConfig) -> (CircuitBreaker, Arc<ManualClock>) {
        let c = ManualClock::new();
        (CircuitBreaker::with_clock(cfg, c.clone()).unwrap(), c)
    }

    #[test]
    fn consecutive_failures_trip_and_success_resets_the_run() {
        let (b, _) = cb(BreakerConfig {
            failure_threshold: 3,
            ..Default::default()
        });
        b.record_failure();
        b.record_failure();
        b.record_success();
        b.record_failure();
        b.record_failure();
        assert_eq!(b.state(), State::Closed);
        b.record_failure();
        assert_eq!(b.state(), State::Open);
        let e = b.allow().unwrap_err();
        assert_eq!(e.state, "open");
        assert!(e.remaining_secs > 29.0);
    }

    #[test]
    fn failure_rate_needs_minimum_calls() {
        let (b, _) = cb(BreakerConfig {
            failure_threshold: 0,
            failure_rate_threshold: Some(0.5),
            window_size: 10,
            minimum_calls: 4,
            ..Default::default()
        });
        b.record_failure();
        b.record_failure();
        b.record_failure();
        assert_eq!(b.state(), State::Closed, "3 calls are below the minimum");
        b.record_success();
        assert_eq!(b.state(), State::Closed, "success never trips");
        b.record_failure();
        assert_eq!(b.state(), State::Open, "4 of 5 failed");
    }

    #[test]
    fn window_slides() {
        let (b, _) = cb(BreakerConfig {
            failure_threshold: 0,
            failure_rate_threshold: Some(0.5),
            window_size: 4,
            minimum_calls: 4,
            ..Default::default()
        });
        for _ in 0..3 {
            b.record_failure();
            b.record_success();
            b.record_success();
            b.record_success();
        }
        // Window now holds [F? ...] as the last four: S S S plus the F from this round's start slid out.
        assert_eq!(b.state(), State::Closed);
        assert!(b.stats().failure_rate.unwrap() < 0.5);
    }

    #[test]
    fn half_open_limits_trials_and_needs_all_successes() {
        let (b, c) = cb(BreakerConfig {
            failure_threshold: 1,
            half_open_max_calls: 2,
            reset_timeout: Duration::from_secs(5),
            ..Default::default()
        });
        b.record_failure();
        c.advance(Duration::from_secs(5));
        assert!(b.allow().is_ok());
        assert!(b.allow().is_ok());
        assert_eq!(b.allow().unwrap_err().state, "half_open");
        b.record_success();
        assert_eq!(b.state(), State::HalfOpen);
        b.record_success();
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn failed_trial_reopens_with_growing_capped_duration() {
        let (b, c) = cb(BreakerConfig {
            failure_threshold: 1,
            reset_timeout: Duration::from_secs(1),
            max_reset_timeout: Some(Duration::from_secs(3)),
            ..Default::default()
        });
        b.record_failure();
        let mut seen = vec![];
        for _ in 0..4 {
            seen.push(b.open_remaining().as_secs());
            c.advance(b.open_remaining());
            assert!(b.allow().is_ok());
            b.record_failure();
        }
        assert_eq!(seen, vec![1, 2, 3, 3]);
        // A successful trial closes and resets the growth.
        c.advance(b.open_remaining());
        b.allow().unwrap();
        b.record_success();
        b.record_failure();
        assert_eq!(b.open_remaining().as_secs(), 1);
    }

    #[test]
    fn ignored_frees_trial_permit() {
        let (b, c) = cb(BreakerConfig {
            failure_threshold: 1,
            ..Default::default()
        });
        b.record_failure();
        c.advance(Duration::from_secs(30));
        b.allow().unwrap();
        assert!(b.allow().is_err());
        b.record_ignored();
        assert!(b.allow().is_ok());
    }

    #[test]
    fn slow_calls_count_as_failures() {
        let (b, _) = cb(BreakerConfig {
            failure_threshold: 2,
            slow_call_duration: Some(Duration::from_millis(100)),
            ..Default::default()
        });
        b.record_timed(false, Duration::from_millis(150));
        b.record_timed(false, Duration::from_millis(10));
        b.record_timed(false, Duration::from_millis(150));
        b.record_timed(false, Duration::from_millis(150));
        assert_eq!(b.state(), State::Open);
        assert_eq!(b.stats().slow_calls, 3);
    }

    #[test]
    fn forced_and_disabled() {
        let (b, _) = cb(BreakerConfig {
            failure_threshold: 1,
            ..Default::default()
        });
        b.force_open();
        assert_eq!(b.allow().unwrap_err().state, "forced_open");
        b.disable();
        b.record_failure();
        assert!(b.allow().is_ok());
        assert_eq!(b.state(), State::Disabled);
        b.reset();
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn listeners_see_transitions() {
        let (b, c) = cb(BreakerConfig {
            failure_threshold: 1,
            ..Default::default()
        });
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        b.add_listener(Arc::new(move |f, t| s2.lock().push((f, t))));
        b.record_failure();
        c.advance(Duration::from_secs(30));
        b.allow().unwrap();
        b.record_success();
        assert_eq!(
            *seen.lock(),
            vec![
                (State::Closed, State::Open),
                (State::Open, State::HalfOpen),
                (State::HalfOpen, State::Closed)
            ]
        );
    }

    #[test]
    fn call_helper() {
        let (b, _) = cb(BreakerConfig {
            failure_threshold: 1,
            ..Default::default()
        });
        assert_eq!(b.call(|| Ok::<_, ()>(7)).unwrap(), 7);
        assert!(matches!(
            b.call(|| Err::<(), _>("x")),
            Err(CallError::Failed("x"))
        ));
        let ran = AtomicUsize::new(0);
        let r = b.call(|| {
            ran.fetch_add(1, Ordering::Relaxed);
            Ok::<_, ()>(())
        });
        assert!(matches!(r, Err(CallError::Open(_))));
        assert_eq!(ran.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn invalid_configs() {
        assert!(CircuitBreaker::new(BreakerConfig {
            half_open_max_calls: 0,
            ..Default::default()
        })
        .is_err());
        assert!(CircuitBreaker::new(BreakerConfig {
            failure_rate_threshold: Some(1.5),
            ..Default::default()
        })
        .is_err());
        assert!(CircuitBreaker::new(BreakerConfig {
            failure_threshold: 0,
            ..Default::default()
        })
        .is_err());
    }
}
