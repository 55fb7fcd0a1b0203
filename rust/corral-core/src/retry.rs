//! Retry policies: how long to wait before each retry, when to give up, and
//! a shared budget that stops retries from multiplying an outage.
//!
//! A [`RetryPolicy`] is an immutable description; each retried operation
//! takes a fresh [`Schedule`] from it. Backoff kinds: fixed, linear,
//! exponential, fibonacci and decorrelated jitter (AWS's). Jitter: none,
//! full, equal. Caps: per-delay, attempts, total elapsed time.
//!
//! ```
//! use std::time::Duration;
//! use corral_core::retry::{Backoff, RetryPolicy};
//!
//! let p = RetryPolicy::new(Backoff::Exponential { initial: Duration::from_millis(100), multiplier: 2.0 })
//!     .max_attempts(Some(5))
//!     .max_delay(Some(Duration::from_millis(300)));
//! let d: Vec<u64> = p.delays().map(|d| d.as_millis() as u64).collect();
//! assert_eq!(d, vec![100, 200, 300, 300]); // 5 attempts, 4 waits
//! ```

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::clock::{self, Clock};
use crate::error::RetryError;
use crate::rng::Rng;

/// How the delay grows from one retry to the next.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Backoff {
    /// The same delay every time.
    Fixed {
        /// The delay.
        delay: Duration,
    },
    /// `initial + n * step`.
    Linear {
        /// First delay.
        initial: Duration,
        /// Added per retry.
        step: Duration,
    },
    /// `initial * multiplier^n`.
    Exponential {
        /// First delay.
        initial: Duration,
        /// Growth factor (>= 1).
        multiplier: f64,
    },
    /// `initial * fib(n)`: 1, 1, 2, 3, 5, ...
    Fibonacci {
        /// First delay.
        initial: Duration,
    },
    /// AWS's decorrelated jitter: `min(cap, uniform(initial, 3 * previous))`.
    Decorrelated {
        /// Smallest delay, and the first previous.
        initial: Duration,
    },
}

/// Randomisation applied to each computed delay (not to decorrelated, which is random already).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Jitter {
    /// The delay as computed.
    #[default]
    None,
    /// Uniform in `[0, d]`.
    Full,
    /// `d / 2 + uniform(0, d / 2)`.
    Equal,
}

impl Jitter {
    /// The names [`Self::parse`] accepts, as documented.
    pub const NAMES: &'static [&'static str] = &["none", "full", "equal"];

    /// Parses `none`, `full`, `equal`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "none" => Self::None,
            "full" => Self::Full,
            "equal" => Self::Equal,
            _ => return None,
        })
    }
}

/// A retry policy.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// The backoff kind.
    pub backoff: Backoff,
    /// Jitter.
    pub jitter: Jitter,
    /// Cap on any single delay.
    pub max_delay: Option<Duration>,
    /// Total attempts, the first included; `None` for no limit.
    pub max_attempts: Option<u32>,
    /// No retry starts later than this after the first attempt began.
    pub max_elapsed: Option<Duration>,
    /// Seed for the jitter; `None` seeds from entropy per schedule.
    pub seed: Option<u64>,
}

impl RetryPolicy {
    /// A policy with this backoff, three attempts, no jitter, no caps.
    pub fn new(backoff: Backoff) -> Self {
        Self {
            backoff,
            jitter: Jitter::None,
            max_delay: None,
            max_attempts: Some(3),
            max_elapsed: None,
            seed: None,
        }
    }
    /// Sets the jitter.
    #[must_use]
    pub fn jitter(mut self, j: Jitter) -> Self {
        self.jitter = j;
        self
    }
    /// Sets the per-delay cap.
    #[must_use]
    pub fn max_delay(mut self, d: Option<Duration>) -> Self {
        self.max_delay = d;
        self
    }
    /// Sets the attempt cap.
    #[must_use]
    pub fn max_attempts(mut self, n: Option<u32>) -> Self {
        self.max_attempts = n;
        self
    }
    /// Sets the elapsed-time cap.
    #[must_use]
    pub fn max_elapsed(mut self, d: Option<Duration>) -> Self {
        self.max_elapsed = d;
        self
    }
    /// Sets the seed.
    #[must_use]
    pub fn seed(mut self, s: Option<u64>) -> Self {
        self.seed = s;
        self
    }

    /// Checks the parameters.
    pub fn validate(&self) -> Result<(), RetryError> {
        let bad = |m: &str| Err(RetryError::InvalidPolicy(m.into()));
        if let Backoff::Exponential { multiplier, .. } = self.backoff {
            if !(multiplier >= 1.0 && multiplier.is_finite()) {
                return bad("exponential multiplier must be a finite number >= 1");
            }
        }
        if self.max_attempts == Some(0) {
            return bad("max_attempts must be at least 1");
        }
        Ok(())
    }

    /// A fresh schedule for one retried operation.
    pub fn schedule(&self) -> Schedule {
        let rng = match self.seed {
            Some(s) => Rng::seeded(s),
            None => Rng::from_entropy(),
        };
        let prev = match self.backoff {
            Backoff::Decorrelated { initial } => initial,
            _ => Duration::ZERO,
        };
        Schedule {
            policy: self.clone(),
            retries: 0,
            fib: (0, 1),
            prev,
            rng,
        }
    }

    /// The successive delays, without sleeping (infinite without an attempt cap).
    pub fn delays(&self) -> Schedule {
        self.schedule()
    }
}

/// The state of one retried operation: which retry comes next and how long to wait.
#[derive(Debug, Clone)]
pub struct Schedule {
    policy: RetryPolicy,
    retries: u32,
    fib: (u64, u64),
    prev: Duration,
    rng: Rng,
}

impl Schedule {
    /// Retries handed out so far.
    pub fn retries(&self) -> u32 {
        self.retries
    }

    fn raw_delay(&mut self) -> Duration {
        let n = self.retries;
        let cap = self.policy.max_delay.unwrap_or(Duration::MAX);
        let d = match self.policy.backoff {
            Backoff::Fixed { delay } => delay,
            Backoff::Linear { initial, step } => initial.saturating_add(step.saturating_mul(n)),
            Backoff::Exponential {
                initial,
                multiplier,
            } => {
                let secs = initial.as_secs_f64() * multiplier.powi(n.min(1000) as i32);
                Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
            }
            Backoff::Fibonacci { initial } => {
                let (a, b) = self.fib;
                self.fib = (b, a.saturating_add(b));
                initial.saturating_mul(b.min(u64::from(u32::MAX)) as u32)
            }
            Backoff::Decorrelated { initial } => {
                let hi = self.prev.saturating_mul(3).as_secs_f64();
                let lo = initial.as_secs_f64();
                let pick = lo + self.rng.next_f64() * (hi - lo).max(0.0);
                let d = Duration::try_from_secs_f64(pick)
                    .unwrap_or(Duration::MAX)
                    .min(cap);
                self.prev = d;
                return d;
            }
        };
        let d = d.min(cap);
        match self.policy.jitter {
            Jitter::None => d,
            Jitter::Full => d.mul_f64(self.rng.next_f64()),
            Jitter::Equal => d / 2 + (d / 2).mul_f64(self.rng.next_f64()),
        }
    }

    /// The wait before the next retry, given the time since the first attempt
    /// began; `None` when the policy gives up.
    pub fn next_delay(&mut self, elapsed: Duration) -> Option<Duration> {
        if let Some(max) = self.policy.max_attempts {
            if self.retries + 1 >= max {
                return None;
            }
        }
        let d = self.raw_delay();
        if let Some(limit) = self.policy.max_elapsed {
            if elapsed.saturating_add(d) > limit {
                return None;
            }
        }
        self.retries += 1;
        Some(d)
    }
}

impl Iterator for Schedule {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        self.next_delay(Duration::ZERO)
    }
}

/// One retried operation, stepped by whoever runs it: the sync loop of a binding, an async
/// loop, or an engine that schedules the next attempt on its event loop. It owns the
/// bookkeeping every such loop needs (the budget's deposit and withdrawals, the elapsed
/// time, the attempt count), so there is one retry loop's logic, not one per caller.
///
/// ```
/// use std::time::Duration;
/// use corral_core::retry::{Attempts, Backoff, RetryPolicy};
///
/// let p = RetryPolicy::new(Backoff::Fixed { delay: Duration::from_millis(10) }).max_attempts(Some(3));
/// let mut a = Attempts::new(&p, None);
/// assert_eq!(a.after_failure(), Some(Duration::from_millis(10))); // attempt 2
/// assert_eq!(a.after_failure(), Some(Duration::from_millis(10))); // attempt 3
/// assert_eq!(a.after_failure(), None);                             // give up
/// assert_eq!(a.attempts(), 3);
/// ```
#[derive(Debug)]
pub struct Attempts {
    policy: RetryPolicy,
    schedule: Option<Schedule>,
    budget: Option<Arc<RetryBudget>>,
    /// When the first attempt began; read only when the policy caps elapsed time.
    start: Option<std::time::Instant>,
    begun: u32,
}

impl Attempts {
    /// The first attempt begins now; it is deposited in `budget`.
    pub fn new(policy: &RetryPolicy, budget: Option<Arc<RetryBudget>>) -> Self {
        if let Some(b) = &budget {
            b.deposit();
        }
        Attempts {
            policy: policy.clone(),
            schedule: None,
            budget,
            start: policy.max_elapsed.is_some().then(std::time::Instant::now),
            begun: 1,
        }
    }

    /// The last attempt failed: the wait before the next one, or `None` to give up (the
    /// policy's caps are reached, or the budget is spent). A `Some` counts the next attempt.
    pub fn after_failure(&mut self) -> Option<Duration> {
        let elapsed = self.start.map_or(Duration::ZERO, |s| s.elapsed());
        let delay = self
            .schedule
            .get_or_insert_with(|| self.policy.schedule())
            .next_delay(elapsed)?;
        if let Some(b) = &self.budget {
            if !b.try_withdraw() {
                return None;
            }
        }
        self.begun += 1;
        Some(delay)
    }

    /// Attempts begun so far (1 before any failure).
    pub fn attempts(&self) -> u32 {
        self.begun
    }

    /// The error to raise when the result, not an exception, asked for the retry that
    /// [`Attempts::after_failure`] refused.
    pub fn exhausted(&self) -> RetryError {
        RetryError::Exhausted {
            attempts: self.begun,
        }
    }
}

/// A token bucket shared by many callers, as Finagle's retry budget: every
/// call deposits `ratio` of a token, every retry withdraws one, and
/// `min_per_second` retries a second are allowed regardless. Deposits expire
/// after `ttl`.
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    min_per_second: f64,
    ttl_secs: u64,
    clock: Arc<dyn Clock>,
    state: Mutex<BudgetWindow>,
}

/// Per-second buckets of deposits and withdrawals over the last `ttl` seconds.
#[derive(Debug)]
struct BudgetWindow {
    /// (second index, deposits, withdrawals)
    buckets: Vec<(u64, u64, u64)>,
}

impl BudgetWindow {
    fn bucket(&mut self, sec: u64) -> &mut (u64, u64, u64) {
        let n = self.buckets.len() as u64;
        let b = &mut self.buckets[(sec % n) as usize];
        if b.0 != sec {
            *b = (sec, 0, 0);
        }
        b
    }
    fn totals(&self, now_sec: u64) -> (u64, u64) {
        let n = self.buckets.len() as u64;
        self.buckets
            .iter()
            .filter(|b| b.0 <= now_sec && now_sec - b.0 < n)
            .fold((0, 0), |(d, w), b| (d + b.1, w + b.2))
    }
}

impl RetryBudget {
    /// A budget: `ratio` retries per call (0..=1000), `min_per_second` retries a second regardless, over `ttl`.
    pub fn new(ratio: f64, min_per_second: f64, ttl: Duration) -> Result<Self, RetryError> {
        Self::with_clock(ratio, min_per_second, ttl, clock::monotonic())
    }

    /// The same on a given clock.
    pub fn with_clock(
        ratio: f64,
        min_per_second: f64,
        ttl: Duration,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, RetryError> {
        if !(0.0..=1000.0).contains(&ratio) {
            return Err(RetryError::InvalidPolicy(format!(
                "budget ratio must be in [0, 1000], got {ratio}"
            )));
        }
        if min_per_second < 0.0 || !min_per_second.is_finite() {
            return Err(RetryError::InvalidPolicy(format!(
                "budget min_per_second must be >= 0, got {min_per_second}"
            )));
        }
        let ttl_secs = ttl.as_secs_f64().ceil() as u64;
        if !(1..=60).contains(&ttl_secs) {
            return Err(RetryError::InvalidPolicy(format!(
                "budget ttl must be 1 to 60 s, got {ttl:?}"
            )));
        }
        Ok(Self {
            ratio,
            min_per_second,
            ttl_secs,
            clock,
            state: Mutex::new(BudgetWindow {
                buckets: vec![(u64::MAX, 0, 0); ttl_secs as usize],
            }),
        })
    }

    fn now_sec(&self) -> u64 {
        self.clock.now_nanos() / 1_000_000_000
    }

    /// Records one call (a first attempt).
    pub fn deposit(&self) {
        let s = self.now_sec();
        self.state.lock().bucket(s).1 += 1;
    }

    /// Takes a token for one retry; `false` when the budget is spent.
    pub fn try_withdraw(&self) -> bool {
        let s = self.now_sec();
        let mut st = self.state.lock();
        if self.balance_locked(&st, s) >= 1.0 {
            st.bucket(s).2 += 1;
            true
        } else {
            false
        }
    }

    fn balance_locked(&self, st: &BudgetWindow, now: u64) -> f64 {
        let (d, w) = st.totals(now);
        self.min_per_second * self.ttl_secs as f64 + self.ratio * d as f64 - w as f64
    }

    /// Retries that could be made now.
    pub fn balance(&self) -> f64 {
        let s = self.now_sec();
        let st = self.state.lock();
        self.balance_locked(&st, s).max(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn ms(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|&m| Duration::from_millis(m)).collect()
    }

    #[test]
    fn kinds() {
        let i = Duration::from_millis(10);
        let take = |b: Backoff| {
            RetryPolicy::new(b)
                .max_attempts(Some(6))
                .delays()
                .collect::<Vec<_>>()
        };
        assert_eq!(take(Backoff::Fixed { delay: i }), ms(&[10; 5]));
        assert_eq!(
            take(Backoff::Linear {
                initial: i,
                step: i
            }),
            ms(&[10, 20, 30, 40, 50])
        );
        assert_eq!(
            take(Backoff::Exponential {
                initial: i,
                multiplier: 3.0
            }),
            ms(&[10, 30, 90, 270, 810])
        );
        assert_eq!(
            take(Backoff::Fibonacci { initial: i }),
            ms(&[10, 10, 20, 30, 50])
        );
    }

    #[test]
    fn decorrelated_stays_in_bounds_and_is_seedable() {
        let p = RetryPolicy::new(Backoff::Decorrelated {
            initial: Duration::from_millis(10),
        })
        .max_attempts(Some(50))
        .max_delay(Some(Duration::from_millis(500)))
        .seed(Some(7));
        let a: Vec<_> = p.delays().collect();
        let b: Vec<_> = p.delays().collect();
        assert_eq!(a, b);
        let mut prev = Duration::from_millis(10);
        for d in a {
            assert!(d >= Duration::from_millis(10) && d <= Duration::from_millis(500));
            assert!(d <= prev * 3);
            prev = d;
        }
    }

    #[test]
    fn jitter_bounds() {
        let base = Duration::from_millis(100);
        for (j, lo) in [(Jitter::Full, Duration::ZERO), (Jitter::Equal, base / 2)] {
            let p = RetryPolicy::new(Backoff::Fixed { delay: base })
                .jitter(j)
                .max_attempts(Some(200))
                .seed(Some(1));
            let ds: Vec<_> = p.delays().collect();
            assert!(ds.iter().all(|d| *d >= lo && *d <= base));
            assert!(ds.iter().any(|d| *d != ds[0]), "jitter varies");
        }
    }

    #[test]
    fn max_elapsed_stops() {
        let p = RetryPolicy::new(Backoff::Fixed {
            delay: Duration::from_secs(1),
        })
        .max_attempts(None)
        .max_elapsed(Some(Duration::from_millis(2500)));
        let mut s = p.schedule();
        assert!(s.next_delay(Duration::ZERO).is_some());
        assert!(s.next_delay(Duration::from_secs(1)).is_some());
        assert!(s.next_delay(Duration::from_secs(2)).is_none());
    }

    #[test]
    fn budget_ratio_and_floor() {
        let c = ManualClock::new();
        let b = RetryBudget::with_clock(0.5, 0.0, Duration::from_secs(10), c.clone()).unwrap();
        assert!(!b.try_withdraw());
        for _ in 0..4 {
            b.deposit();
        }
        assert!(b.try_withdraw());
        assert!(b.try_withdraw());
        assert!(!b.try_withdraw());
        // Deposits expire after the ttl.
        c.advance(Duration::from_secs(11));
        for _ in 0..2 {
            b.deposit();
        }
        assert!(b.try_withdraw());
        assert!(!b.try_withdraw());
        let floor = RetryBudget::with_clock(0.0, 2.0, Duration::from_secs(1), c).unwrap();
        assert!(floor.try_withdraw());
        assert!(floor.try_withdraw());
        assert!(!floor.try_withdraw());
    }

    #[test]
    fn invalid() {
        assert!(RetryPolicy::new(Backoff::Exponential {
            initial: Duration::ZERO,
            multiplier: 0.5
        })
        .validate()
        .is_err());
        assert!(RetryPolicy::new(Backoff::Fixed {
            delay: Duration::ZERO
        })
        .max_attempts(Some(0))
        .validate()
        .is_err());
        assert!(RetryBudget::new(-1.0, 1.0, Duration::from_secs(1)).is_err());
    }
}
