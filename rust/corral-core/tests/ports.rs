//! Port allocator: random operation sequences against a model, and concurrency.

use std::collections::HashSet;
use std::sync::Arc;

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
