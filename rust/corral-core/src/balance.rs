//! Load balancer over a set of backends: round robin (lock-free), smooth
//! weighted round robin (nginx's), least connections (exact scan up to 16
//! backends, power of two choices above), consistent hashing by key
//! (rendezvous: removing one of N backends moves only its ~1/N of keys) and
//! random.
//!
//! The backend set is an immutable snapshot behind an `ArcSwap`: picks are
//! lock-free; adding or removing a backend publishes a new snapshot. Health
//! (`up`) and in-flight counts are atomics on each backend.
//!
//! ```
//! use corral_core::balance::{LoadBalancer, Strategy};
//!
//! let lb = LoadBalancer::new(Strategy::RoundRobin, vec![("a", 1), ("b", 1)]).unwrap();
//! let first = lb.pick(None).unwrap().value;
//! let second = lb.pick(None).unwrap().value;
//! assert_ne!(first, second);
//! {
//!     let guard = lb.connection(None).unwrap();
//!     assert_eq!(guard.backend().active(), 1);
//! } // the count drops again here, even on panic or early return
//! ```

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;

use crate::error::BalanceError;
use crate::rng::{mix, stable_hash};

/// How a backend is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Strategy {
    /// Each backend in turn.
    RoundRobin,
    /// Smooth weighted round robin.
    WeightedRoundRobin,
    /// Fewest connections in flight.
    LeastConnections,
    /// The same key goes to the same backend (rendezvous hashing).
    IpHash,
    /// Uniformly at random.
    Random,
}

impl Strategy {
    /// The names [`Self::parse`] accepts, as documented.
    pub const NAMES: &'static [&'static str] = &[
        "round_robin",
        "weighted",
        "least_connections",
        "ip_hash",
        "random",
    ];

    /// Parses a strategy's name; `weighted_round_robin` is accepted for `weighted`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "round_robin" => Self::RoundRobin,
            "weighted_round_robin" | "weighted" => Self::WeightedRoundRobin,
            "least_connections" => Self::LeastConnections,
            "ip_hash" => Self::IpHash,
            "random" => Self::Random,
            _ => return None,
        })
    }
    /// The documented name (one of [`Self::NAMES`]).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RoundRobin => "round_robin",
            Self::WeightedRoundRobin => "weighted",
            Self::LeastConnections => "least_connections",
            Self::IpHash => "ip_hash",
            Self::Random => "random",
        }
    }
}

/// One backend and its live counters.
#[derive(Debug)]
pub struct Backend<T> {
    /// What the caller gave (an address, a handle ...).
    pub value: T,
    /// Stable identity for consistent hashing.
    pub hash_key: u64,
    /// Relative weight for weighted round robin (>= 1).
    pub weight: u32,
    up: AtomicBool,
    active: AtomicUsize,
    picks: AtomicU64,
}

impl<T> Backend<T> {
    /// Whether it may receive traffic.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }
    /// Marks it up or down.
    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::Release);
    }
    /// Connections in flight (held guards).
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }
    /// Guards handed out in total.
    pub fn connections(&self) -> u64 {
        self.picks.load(Ordering::Relaxed)
    }
}

struct Set<T> {
    backends: Vec<Arc<Backend<T>>>,
    /// Smooth WRR's current weights, one per backend.
    swrr: Mutex<Vec<i64>>,
}

impl<T> Set<T> {
    fn new(backends: Vec<Arc<Backend<T>>>) -> Self {
        let n = backends.len();
        Self {
            backends,
            swrr: Mutex::new(vec![0; n]),
        }
    }
}

/// A connection slot on a backend; dropping it releases the slot.
#[derive(Debug)]
pub struct ConnectionGuard<T> {
    backend: Arc<Backend<T>>,
}

impl<T> ConnectionGuard<T> {
    /// The chosen backend.
    pub fn backend(&self) -> &Arc<Backend<T>> {
        &self.backend
    }
}

impl<T> Drop for ConnectionGuard<T> {
    fn drop(&mut self) {
        self.backend.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Exact least-connections scan up to this many backends; power of two choices above.
const EXACT_SCAN_MAX: usize = 16;

thread_local! {
    static RNG: Cell<u64> = Cell::new(crate::rng::Rng::from_entropy().next_u64() | 1);
}

fn fast_rand() -> u64 {
    RNG.with(|c| {
        let s = c.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
        c.set(s);
        mix(s)
    })
}

fn below(n: usize) -> usize {
    ((u128::from(fast_rand()) * n as u128) >> 64) as usize
}

/// A load balancer over backends of type `T`.
pub struct LoadBalancer<T> {
    /// A [`Strategy`] as its `u8`: changeable while picks go on ([`LoadBalancer::set_strategy`]).
    strategy: AtomicU8,
    set: ArcSwap<Set<T>>,
    cursor: AtomicUsize,
    edit: Mutex<()>,
}

impl<T> std::fmt::Debug for LoadBalancer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadBalancer")
            .field("strategy", &self.strategy())
            .field("backends", &self.set.load().backends.len())
            .finish_non_exhaustive()
    }
}

impl<T: AsRef<[u8]>> LoadBalancer<T> {
    /// A balancer over `(value, weight)` pairs; each value's bytes are its hashing identity.
    pub fn new(strategy: Strategy, backends: Vec<(T, u32)>) -> Result<Self, BalanceError> {
        let items = backends
            .into_iter()
            .map(|(v, w)| {
                let k = stable_hash(v.as_ref());
                (v, k, w)
            })
            .collect();
        Self::with_keys(strategy, items)
    }
}

impl<T> LoadBalancer<T> {
    /// A balancer over `(value, hash key, weight)` triples.
    pub fn with_keys(
        strategy: Strategy,
        backends: Vec<(T, u64, u32)>,
    ) -> Result<Self, BalanceError> {
        let mut list = Vec::with_capacity(backends.len());
        for (value, key, weight) in backends {
            list.push(Arc::new(Self::make(value, key, weight)?));
        }
        Ok(Self {
            strategy: AtomicU8::new(strategy as u8),
            set: ArcSwap::from_pointee(Set::new(list)),
            cursor: AtomicUsize::new(0),
            edit: Mutex::new(()),
        })
    }

    fn make(value: T, hash_key: u64, weight: u32) -> Result<Backend<T>, BalanceError> {
        if weight == 0 {
            return Err(BalanceError::InvalidConfig(
                "weights must be at least 1".into(),
            ));
        }
        Ok(Backend {
            value,
            hash_key,
            weight,
            up: AtomicBool::new(true),
            active: AtomicUsize::new(0),
            picks: AtomicU64::new(0),
        })
    }

    /// The strategy.
    pub fn strategy(&self) -> Strategy {
        const ALL: [Strategy; 5] = [
            Strategy::RoundRobin,
            Strategy::WeightedRoundRobin,
            Strategy::LeastConnections,
            Strategy::IpHash,
            Strategy::Random,
        ];
        ALL[usize::from(self.strategy.load(Ordering::Relaxed))]
    }

    /// Changes the strategy from the next pick on; backends, their counts and the
    /// connections in flight stay as they are.
    pub fn set_strategy(&self, strategy: Strategy) {
        self.strategy.store(strategy as u8, Ordering::Relaxed);
    }

    /// The backends now, in order.
    pub fn backends(&self) -> Vec<Arc<Backend<T>>> {
        self.set.load().backends.clone()
    }

    /// Number of backends, up or down.
    pub fn len(&self) -> usize {
        self.set.load().backends.len()
    }

    /// Whether there is no backend.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds a backend (up).
    pub fn add(&self, value: T, hash_key: u64, weight: u32) -> Result<(), BalanceError> {
        let b = Arc::new(Self::make(value, hash_key, weight)?);
        let _g = self.edit.lock();
        let mut list = self.set.load().backends.clone();
        list.push(b);
        self.set.store(Arc::new(Set::new(list)));
        Ok(())
    }

    /// Removes the first backend matching `pred`; returns it.
    pub fn remove(&self, pred: impl Fn(&T) -> bool) -> Option<Arc<Backend<T>>> {
        let _g = self.edit.lock();
        let cur = self.set.load();
        let i = cur.backends.iter().position(|b| pred(&b.value))?;
        let mut list = cur.backends.clone();
        let gone = list.remove(i);
        self.set.store(Arc::new(Set::new(list)));
        Some(gone)
    }

    /// Removes this very backend (by identity); returns whether it was there.
    pub fn remove_backend(&self, target: &Arc<Backend<T>>) -> bool {
        let _g = self.edit.lock();
        let cur = self.set.load();
        let Some(i) = cur.backends.iter().position(|b| Arc::ptr_eq(b, target)) else {
            return false;
        };
        let mut list = cur.backends.clone();
        list.remove(i);
        self.set.store(Arc::new(Set::new(list)));
        true
    }

    /// The first backend matching `pred`.
    pub fn find(&self, pred: impl Fn(&T) -> bool) -> Option<Arc<Backend<T>>> {
        self.set
            .load()
            .backends
            .iter()
            .find(|b| pred(&b.value))
            .cloned()
    }

    fn no_backend(set: &Set<T>) -> BalanceError {
        BalanceError::NoBackend {
            total: set.backends.len(),
            down: set.backends.iter().filter(|b| !b.is_up()).count(),
        }
    }

    /// Chooses a backend and runs `f` on it without touching its reference count.
    /// `key` matters only to `IpHash` (without one, it falls back to round robin).
    #[inline]
    pub fn pick_with<R>(
        &self,
        key: Option<u64>,
        f: impl FnOnce(&Arc<Backend<T>>) -> R,
    ) -> Result<R, BalanceError> {
        let set = self.set.load();
        let bs = &set.backends;
        let n = bs.len();
        if n == 0 {
            return Err(Self::no_backend(&set));
        }
        let chosen = match (self.strategy(), key) {
            (Strategy::RoundRobin, _) | (Strategy::IpHash, None) => self.round_robin(bs),
            (Strategy::Random, _) => {
                let start = below(n);
                (0..n).map(|i| (start + i) % n).find(|&i| bs[i].is_up())
            }
            (Strategy::LeastConnections, _) => self.least_connections(bs),
            (Strategy::IpHash, Some(k)) => bs
                .iter()
                .enumerate()
                .filter(|(_, b)| b.is_up())
                .max_by_key(|(_, b)| mix(k ^ b.hash_key))
                .map(|(i, _)| i),
            (Strategy::WeightedRoundRobin, _) => {
                let mut cw = set.swrr.lock();
                let mut total = 0i64;
                let mut best: Option<usize> = None;
                for (i, b) in bs.iter().enumerate() {
                    if !b.is_up() {
                        continue;
                    }
                    let w = i64::from(b.weight);
                    cw[i] += w;
                    total += w;
                    if best.is_none_or(|j| cw[i] > cw[j]) {
                        best = Some(i);
                    }
                }
                if let Some(j) = best {
                    cw[j] -= total;
                }
                best
            }
        };
        match chosen {
            Some(i) => Ok(f(&bs[i])),
            None => Err(Self::no_backend(&set)),
        }
    }

    #[inline]
    fn round_robin(&self, bs: &[Arc<Backend<T>>]) -> Option<usize> {
        let n = bs.len();
        let start = self.cursor.fetch_add(1, Ordering::Relaxed) % n;
        if bs[start].is_up() {
            return Some(start);
        }
        (1..n).map(|i| (start + i) % n).find(|&i| bs[i].is_up())
    }

    #[inline]
    fn least_connections(&self, bs: &[Arc<Backend<T>>]) -> Option<usize> {
        let n = bs.len();
        if n <= EXACT_SCAN_MAX {
            // Rotate the scan's start so ties spread instead of piling on the first backend.
            let start = self.cursor.fetch_add(1, Ordering::Relaxed) % n;
            let mut best: Option<(usize, usize)> = None;
            for k in 0..n {
                let i = if start + k >= n {
                    start + k - n
                } else {
                    start + k
                };
                let b = &bs[i];
                if b.is_up() {
                    let a = b.active();
                    if best.is_none_or(|(_, ba)| a < ba) {
                        best = Some((i, a));
                    }
                }
            }
            return best.map(|(i, _)| i);
        }
        // Power of two choices among up backends; a few tries to find up ones before scanning.
        let pick_up = || (0..4).map(|_| below(n)).find(|&i| bs[i].is_up());
        match (pick_up(), pick_up()) {
            (Some(a), Some(b)) => Some(if bs[b].active() < bs[a].active() {
                b
            } else {
                a
            }),
            (Some(a), None) | (None, Some(a)) => Some(a),
            (None, None) => bs
                .iter()
                .enumerate()
                .filter(|(_, b)| b.is_up())
                .min_by_key(|(_, b)| b.active())
                .map(|(i, _)| i),
        }
    }

    /// Chooses a backend.
    pub fn pick(&self, key: Option<u64>) -> Result<Arc<Backend<T>>, BalanceError> {
        self.pick_with(key, Arc::clone)
    }

    /// Chooses a backend and counts a connection on it until the guard drops.
    pub fn connection(&self, key: Option<u64>) -> Result<ConnectionGuard<T>, BalanceError> {
        self.pick_with(key, Self::guard)
    }

    /// Counts a connection on a backend the caller chose (a retry that must avoid the ones
    /// that just failed, say), until the guard drops.
    pub fn connection_to(&self, backend: &Arc<Backend<T>>) -> ConnectionGuard<T> {
        Self::guard(backend)
    }

    fn guard(b: &Arc<Backend<T>>) -> ConnectionGuard<T> {
        b.active.fetch_add(1, Ordering::AcqRel);
        b.picks.fetch_add(1, Ordering::Relaxed);
        ConnectionGuard { backend: b.clone() }
    }
}

/// Hashes a key (a client address, a user id ...) for [`Strategy::IpHash`].
pub fn hash_key(bytes: &[u8]) -> u64 {
    stable_hash(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lb(s: Strategy, names: &[&'static str]) -> LoadBalancer<&'static str> {
        LoadBalancer::new(s, names.iter().map(|n| (*n, 1)).collect()).unwrap()
    }

    #[test]
    fn the_strategy_changes_in_place_and_every_one_reads_back() {
        let l = lb(Strategy::RoundRobin, &["a", "b", "c"]);
        for s in [
            Strategy::WeightedRoundRobin,
            Strategy::LeastConnections,
            Strategy::IpHash,
            Strategy::Random,
            Strategy::RoundRobin,
        ] {
            l.set_strategy(s);
            assert_eq!(l.strategy(), s);
        }
        l.set_strategy(Strategy::IpHash);
        let first = l.pick(Some(42)).unwrap().value;
        assert!((0..20).all(|_| l.pick(Some(42)).unwrap().value == first));
        l.set_strategy(Strategy::RoundRobin);
        let got: std::collections::HashSet<_> =
            (0..3).map(|_| l.pick(Some(42)).unwrap().value).collect();
        assert_eq!(got.len(), 3, "round robin again: the key is ignored");
    }

    #[test]
    fn round_robin_cycles_and_skips_down() {
        let l = lb(Strategy::RoundRobin, &["a", "b", "c"]);
        let got: Vec<_> = (0..6).map(|_| l.pick(None).unwrap().value).collect();
        assert_eq!(got, vec!["a", "b", "c", "a", "b", "c"]);
        l.find(|v| *v == "b").unwrap().set_up(false);
        let got: Vec<_> = (0..4).map(|_| l.pick(None).unwrap().value).collect();
        assert!(!got.contains(&"b"));
        for b in l.backends() {
            b.set_up(false);
        }
        assert_eq!(
            l.pick(None).unwrap_err(),
            BalanceError::NoBackend { total: 3, down: 3 }
        );
    }

    #[test]
    fn smooth_weighted_sequence() {
        let l = LoadBalancer::new(
            Strategy::WeightedRoundRobin,
            vec![("a", 5), ("b", 1), ("c", 1)],
        )
        .unwrap();
        let got: String = (0..7).map(|_| l.pick(None).unwrap().value).collect();
        // nginx's smooth WRR for 5:1:1
        assert_eq!(got, "aabacaa");
    }

    #[test]
    fn least_connections_prefers_idle() {
        let l = lb(Strategy::LeastConnections, &["a", "b", "c"]);
        let g1 = l.connection(None).unwrap();
        let g2 = l.connection(None).unwrap();
        let g3 = l.connection(None).unwrap();
        let mut seen: Vec<_> = [&g1, &g2, &g3].iter().map(|g| g.backend().value).collect();
        seen.sort_unstable();
        assert_eq!(seen, vec!["a", "b", "c"]);
        let freed = g2.backend().value;
        drop(g2);
        // The only backend with no connection in flight is the one just freed.
        for _ in 0..3 {
            assert_eq!(l.pick(None).unwrap().value, freed);
        }
        drop((g1, g3));
        assert!(l.backends().iter().all(|b| b.active() == 0));
    }

    #[test]
    fn least_connections_p2c_large_set() {
        let names: Vec<&'static str> = (0..64)
            .map(|i| &*Box::leak(format!("b{i}").into_boxed_str()))
            .collect();
        let l = lb(Strategy::LeastConnections, &names);
        let guards: Vec<_> = (0..640).map(|_| l.connection(None).unwrap()).collect();
        let max = l.backends().iter().map(|b| b.active()).max().unwrap();
        // Power of two choices keeps the maximum load near the mean (10).
        assert!(max <= 16, "max load {max}");
        drop(guards);
        assert!(l.backends().iter().all(|b| b.active() == 0));
    }

    #[test]
    fn ip_hash_is_sticky_and_moves_about_one_nth() {
        let names: Vec<&'static str> = (0..5)
            .map(|i| &*Box::leak(format!("10.0.0.{i}:80").into_boxed_str()))
            .collect();
        let l = lb(Strategy::IpHash, &names);
        let keys: Vec<u64> = (0..10_000)
            .map(|i| hash_key(format!("client-{i}").as_bytes()))
            .collect();
        let before: Vec<_> = keys
            .iter()
            .map(|k| l.pick(Some(*k)).unwrap().value)
            .collect();
        let again: Vec<_> = keys
            .iter()
            .map(|k| l.pick(Some(*k)).unwrap().value)
            .collect();
        assert_eq!(before, again);
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for b in &before {
            *counts.entry(b).or_default() += 1;
        }
        assert!(
            counts.values().all(|c| (1500..2500).contains(c)),
            "{counts:?}"
        );
        l.remove(|v| *v == names[2]);
        let after: Vec<_> = keys
            .iter()
            .map(|k| l.pick(Some(*k)).unwrap().value)
            .collect();
        let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        // Only the removed backend's keys move.
        assert_eq!(moved, counts[names[2]]);
        assert!(before
            .iter()
            .zip(&after)
            .all(|(a, b)| a == b || *a == names[2]));
    }

    #[test]
    fn random_covers_all() {
        let l = lb(Strategy::Random, &["a", "b", "c"]);
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for _ in 0..3000 {
            *counts.entry(l.pick(None).unwrap().value).or_default() += 1;
        }
        assert!(counts.values().all(|c| *c > 800), "{counts:?}");
    }

    #[test]
    fn zero_weight_rejected() {
        assert!(LoadBalancer::new(Strategy::WeightedRoundRobin, vec![("a", 0)]).is_err());
    }
}
