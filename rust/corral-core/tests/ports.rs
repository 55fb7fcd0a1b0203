//! Port allocator: random operation sequences against a model, and concurrency.

use std::collections::HashSet;
use std::sync::Arc;

use corral_core::error::PortError;
use corral_core::ports::PortAllocator;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Dynamic,
    Static(u16),
    Release(u16),
}

proptest! {
    #[test]
    fn model(reserved in prop::collection::vec(100u16..140, 0..5),
             ops in prop::collection::vec(prop_oneof![
                 Just(Op::Dynamic),
                 (95u16..145).prop_map(Op::Static),
                 (95u16..145).prop_map(Op::Release)], 1..200)) {
        let p = PortAllocator::new(&[(100, 139)], &reserved).unwrap();
        let res: HashSet<u16> = reserved.iter().copied().collect();
        let mut held: HashSet<u16> = HashSet::new();
        let mut last_released: Option<u16> = None;
        for o in ops {
            match o {
                Op::Dynamic => {
                    if let Ok(x) = p.allocate() {
                        prop_assert!((100..=139).contains(&x));
                        prop_assert!(!res.contains(&x) && held.insert(x), "{} handed out twice", x);
                        if held.len() + res.len() < 39 {
                            prop_assert_ne!(Some(x), last_released, "just-released port reused at once");
                        }
                    } else {
                        prop_assert_eq!(held.len() + res.len(), 40);
                    }
                }
                Op::Static(x) => {
                    let ok = p.allocate_static(x, Some("n")).is_ok();
                    prop_assert_eq!(ok, (100..=139).contains(&x) && !res.contains(&x) && !held.contains(&x));
                    if ok { held.insert(x); }
                }
                Op::Release(x) => {
                    let ok = p.release(x).is_ok();
                    prop_assert_eq!(ok, held.remove(&x));
                    if ok { last_released = Some(x); }
                }
            }
            prop_assert_eq!(p.available(), 40 - held.len() - res.len());
        }
    }
}

#[test]
fn concurrent_allocate_release() {
    let p = Arc::new(PortAllocator::new(&[(20000, 20999)], &[]).unwrap());
    let hs: Vec<_> = (0..8)
        .map(|_| {
            let p = p.clone();
            std::thread::spawn(move || {
                let mut mine = Vec::new();
                for i in 0..2000 {
                    if i % 3 == 2 {
                        if let Some(x) = mine.pop() {
                            p.release(x).unwrap();
                        }
                    } else if let Ok(x) = p.allocate() {
                        mine.push(x);
                    }
                }
                mine
            })
        })
        .collect();
    let mut all = HashSet::new();
    for h in hs {
        for x in h.join().unwrap() {
            assert!(all.insert(x), "port {x} held by two threads");
        }
    }
    assert_eq!(p.available(), 1000 - all.len());
}

#[test]
fn ports_claimed_elsewhere_are_skipped_until_released() {
    let ports = PortAllocator::new(&[(20000, 20004)], &[]).unwrap();
    let mine = ports.allocate().unwrap();
    assert_eq!(mine, 20000);
    // 20000 is held here already: a claim on it elsewhere is a clash, not honoured.
    assert_eq!(ports.set_claimed(&[20000, 20001, 20002, 9999]), 1);
    assert_eq!(ports.claimed(), 2);
    assert_eq!(ports.in_use(), 1, "claims elsewhere are not ours");
    assert_eq!(ports.allocate().unwrap(), 20003);
    assert!(matches!(
        ports.allocate_static(20001, Some("x")),
        Err(PortError::InUse { port: 20001, .. })
    ));
    assert!(ports.release(20002).is_err(), "not ours to release");
    assert!(ports.is_allocated(20002));
    // The other stack let 20001 go: it is free here again; 20002 stays claimed.
    assert_eq!(ports.set_claimed(&[20002]), 0);
    assert_eq!(ports.claimed(), 1);
    assert_eq!(ports.allocate_static(20001, Some("x")).unwrap(), 20001);
    assert_eq!(ports.allocate().unwrap(), 20004);
    assert!(
        ports.allocate().is_err(),
        "20002 is claimed, the rest held here"
    );
    ports.set_claimed(&[]);
    assert_eq!(ports.allocate().unwrap(), 20002);
}

#[test]
fn a_cooling_port_claimed_elsewhere_leaves_the_cooling_queue() {
    let ports = PortAllocator::new(&[(20000, 20009)], &[]).unwrap();
    let p = ports.allocate().unwrap();
    ports.release(p).unwrap();
    ports.set_claimed(&[p]);
    for _ in 0..9 {
        assert_ne!(ports.allocate().unwrap(), p);
    }
    assert!(ports.allocate().is_err());
}
