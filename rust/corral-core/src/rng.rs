//! A small, seedable pseudo-random generator (`SplitMix64`) for jitter and
//! load-balancer choices; not for anything security-related.

use std::sync::atomic::{AtomicU64, Ordering};

/// `SplitMix64`: one u64 of state, passes `BigCrush`, seedable for deterministic tests.
#[derive(Debug, Clone)]
pub struct Rng(u64);

static SEQ: AtomicU64 = AtomicU64::new(0x9E37_79B9_7F4A_7C15);

impl Rng {
    /// A generator with a fixed seed.
    pub fn seeded(seed: u64) -> Self {
        Self(seed)
    }

    /// A generator seeded from the time and a process-wide counter.
    pub fn from_entropy() -> Self {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Self(t ^ SEQ.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform float in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A uniform integer in [0, n); `n` must be > 0.
    pub fn below(&mut self, n: usize) -> usize {
        // Lemire's multiply-shift; the tiny bias is irrelevant here.
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }
}

/// A stable 64-bit hash of bytes (FNV-1a, then a `SplitMix64` finaliser for avalanche).
/// Stable across processes and runs, unlike `std`'s `RandomState`.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    mix(h)
}

/// `SplitMix64`'s finaliser: spreads every input bit over the output.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
