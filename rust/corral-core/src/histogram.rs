//! Duration histograms counted with atomics, in Prometheus' shape: a count per upper
//! bound (`le`), a sum and a count. Recording is a few relaxed atomic adds and no lock, so
//! it can sit on a hot path (a probe's task, the proxy's connect to an upstream).
//!
//! ```
//! use corral_core::histogram::{Histogram, CONNECT_BOUNDS};
//! use std::time::Duration;
//!
//! let h = Histogram::new(&CONNECT_BOUNDS);
//! h.record(Duration::from_micros(40));
//! h.record(Duration::from_secs(20)); // beyond the last bound: only in +Inf (the count)
//! let s = h.snapshot();
//! assert_eq!(s.count, 2);
//! assert_eq!(s.cumulative[0], 0); // le 25 µs
//! assert_eq!(s.cumulative[1], 1); // le 50 µs
//! assert_eq!(*s.cumulative.last().unwrap(), 1);
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Bounds for probe attempts, seconds: half a millisecond to ten seconds.
pub const PROBE_BOUNDS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Bounds for a TCP connect to an upstream, seconds: a loopback connect takes tens of
/// microseconds, a remote or overloaded one milliseconds, a timeout one second.
pub const CONNECT_BOUNDS: [f64; 14] = [
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 1.0,
];

/// A histogram over one set of bounds; see the [module docs](self).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// The same bounds in nanoseconds, so a record compares integers.
    bounds_ns: Box<[u64]>,
    buckets: Box<[AtomicU64]>,
    sum_ns: AtomicU64,
    count: AtomicU64,
}

/// What a [`Histogram`] holds now.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// Observations at or below each bound, cumulative (Prometheus' `_bucket{le=...}`).
    pub cumulative: Vec<u64>,
    /// The sum of the observations, seconds.
    pub sum: f64,
    /// Observations in all (the `+Inf` bucket).
    pub count: u64,
}

impl Histogram {
    /// An empty histogram over `bounds` (seconds, ascending).
    pub fn new(bounds: &'static [f64]) -> Self {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let bounds_ns = bounds.iter().map(|b| (b * 1e9).round() as u64).collect();
        Histogram {
            bounds,
            bounds_ns,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Its bounds, seconds.
    pub fn bounds(&self) -> &'static [f64] {
        self.bounds
    }

    /// Counts one observation.
    pub fn record(&self, took: Duration) {
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        if let Some(i) = self.bounds_ns.iter().position(|&b| ns <= b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// The counts now (each a relaxed read: a snapshot taken while records land may be
    /// off by the ones in flight, as any scrape of live counters is).
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut total = 0;
        let cumulative = self
            .buckets
            .iter()
            .map(|b| {
                total += b.load(Ordering::Relaxed);
                total
            })
            .collect();
        #[allow(clippy::cast_precision_loss)]
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        HistogramSnapshot {
            cumulative,
            sum,
            count: self.count.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_inclusive_and_cumulative() {
        let h = Histogram::new(&PROBE_BOUNDS);
        h.record(Duration::from_micros(500)); // exactly the first bound
        h.record(Duration::from_micros(501));
        h.record(Duration::from_secs(3));
        let s = h.snapshot();
        assert_eq!(s.cumulative[0], 1);
        assert_eq!(s.cumulative[1], 2);
        assert_eq!(s.cumulative[11], 2); // le 2.5
        assert_eq!(s.cumulative[12], 3); // le 5
        assert_eq!(s.count, 3);
        assert!((s.sum - 3.001_001).abs() < 1e-9);
    }

    #[test]
    fn bounds_ascend() {
        for b in [&PROBE_BOUNDS[..], &CONNECT_BOUNDS[..]] {
            assert!(b.windows(2).all(|w| w[0] < w[1]));
        }
    }
}
