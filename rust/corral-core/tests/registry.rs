//! Registry under concurrency: 1000 registrations from 8 threads, mixed with reads and removals.

use std::sync::Arc;

use corral_core::registry::{Instance, ServiceRegistry};

#[test]
fn thousand_registrations_from_eight_threads() {
    let reg = Arc::new(ServiceRegistry::new());
    let hs: Vec<_> = (0..8)
        .map(|t| {
            let reg = reg.clone();
            std::thread::spawn(move || {
                for i in 0..125 {
                    let svc = format!("svc-{}", i % 10);
                    reg.register(Instance::new(
                        svc,
                        format!("{t}-{i}"),
                        "127.0.0.1",
                        20000 + i,
                    ));
                    let _ = reg.instances("svc-3", true);
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    assert_eq!(reg.len(), 1000);
    assert_eq!(reg.generation(), 1000);
    let total: usize = reg
        .services()
        .iter()
        .map(|s| reg.instances(s, false).len())
        .sum();
    assert_eq!(total, 1000);
    assert_eq!(reg.instances("svc-0", false).len(), 8 * 13);
}

#[test]
fn racing_same_ids_across_services_stays_consistent() {
    let reg = Arc::new(ServiceRegistry::new());
    let hs: Vec<_> = (0..8)
        .map(|t| {
            let reg = reg.clone();
            std::thread::spawn(move || {
                for i in 0..500 {
                    let id = format!("id-{}", i % 20);
                    match (t + i) % 3 {
                        0 => {
                            reg.register(Instance::new(format!("s{}", t % 3), id, "h", 1));
                        }
                        1 => {
                            reg.deregister(&id);
                        }
                        _ => {
                            reg.set_health(&id, i % 2 == 0);
                        }
                    }
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    // Every id is in exactly the service its current record names, and nowhere else.
    let mut listed = 0;
    for s in reg.services() {
        for inst in reg.instances(&s, false).iter() {
            assert_eq!(inst.service, s);
            assert_eq!(reg.get(&inst.id).unwrap().service, s);
            listed += 1;
        }
    }
    assert_eq!(listed, reg.len());
}
