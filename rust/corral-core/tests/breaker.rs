//! Circuit breaker state machine under random event sequences, and under threads.

use std::sync::Arc;
use std::time::Duration;

use corral_core::breaker::{BreakerConfig, CircuitBreaker, State};
use corral_core::clock::ManualClock;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Ev {
    Call(bool),
    Advance(u64),
    Force,
    Reset,
}

proptest! {
    #[test]
    fn transitions_are_legal(threshold in 1u32..5, half in 1u32..4,
                             evs in prop::collection::vec(prop_oneof![
                                 any::<bool>().prop_map(Ev::Call),
                                 (0u64..3000).prop_map(Ev::Advance),
                                 Just(Ev::Force), Just(Ev::Reset)], 1..150)) {
        let clock = ManualClock::new();
        let cb = Arc::new(CircuitBreaker::with_clock(BreakerConfig {
            failure_threshold: threshold,
            half_open_max_calls: half,
            reset_timeout: Duration::from_secs(1),
            max_reset_timeout: Some(Duration::from_secs(4)),
            ..Default::default()
        }, clock.clone()).unwrap());
        let log = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let l2 = log.clone();
        cb.add_listener(Arc::new(move |f, t| l2.lock().push((f, t))));
        let mut run = 0u32;
        for e in evs {
            let before = cb.state();
            match e {
                Ev::Call(fail) => {
                    if cb.allow().is_ok() {
                        prop_assert!(matches!(cb.state(), State::Closed | State::HalfOpen));
                        if fail { cb.record_failure(); run += 1; } else { cb.record_success(); run = 0; }
                        if before == State::Closed && run >= threshold {
                            prop_assert_eq!(cb.state(), State::Open);
                        }
                    } else {
                        prop_assert!(matches!(cb.state(), State::Open | State::HalfOpen | State::ForcedOpen));
                    }
                }
                Ev::Advance(ms) => clock.advance(Duration::from_millis(ms)),
                Ev::Force => cb.force_open(),
                Ev::Reset => { cb.reset(); run = 0; }
            }
            if cb.state() != State::Closed { run = 0; }
            prop_assert!(cb.open_remaining() <= Duration::from_secs(4));
        }
        for (f, t) in log.lock().iter() {
            let legal = matches!((f, t),
                (State::Closed | State::HalfOpen, State::Open) | (State::Open, State::HalfOpen) |
                (_, State::ForcedOpen | State::Closed | State::Disabled));
            prop_assert!(legal, "illegal transition {:?} -> {:?}", f, t);
        }
    }
}

#[test]
fn half_open_admits_exactly_the_permitted_trials_across_threads() {
    let clock = ManualClock::new();
    let cb = Arc::new(
        CircuitBreaker::with_clock(
            BreakerConfig {
                failure_threshold: 1,
                half_open_max_calls: 3,
                ..Default::default()
            },
            clock.clone(),
        )
        .unwrap(),
    );
    cb.record_failure();
    clock.advance(Duration::from_secs(30));
    let admitted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let hs: Vec<_> = (0..8)
        .map(|_| {
            let (cb, a) = (cb.clone(), admitted.clone());
            std::thread::spawn(move || {
                for _ in 0..100 {
                    if cb.allow().is_ok() {
                        a.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    assert_eq!(admitted.load(std::sync::atomic::Ordering::SeqCst), 3);
    assert_eq!(cb.stats().rejected, 797);
}

#[test]
fn many_threads_counting() {
    let cb = Arc::new(
        CircuitBreaker::new(BreakerConfig {
            failure_threshold: 1_000_000,
            ..Default::default()
        })
        .unwrap(),
    );
    let hs: Vec<_> = (0..8)
        .map(|i| {
            let cb = cb.clone();
            std::thread::spawn(move || {
                for j in 0..10_000 {
                    cb.allow().unwrap();
                    if (i + j) % 2 == 0 {
                        cb.record_success();
                    } else {
                        cb.record_failure();
                    }
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    let s = cb.stats();
    assert_eq!(s.successes + s.failures, 80_000);
    assert_eq!(s.successes, 40_000);
}
