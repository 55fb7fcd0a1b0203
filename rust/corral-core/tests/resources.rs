//! Resource ledgers: placement rules on fake topologies, and random operation
//! sequences checked against the ledger invariants.

mod common;
use common::fixture;

use std::collections::HashSet;

use corral_core::error::ResourceError;
use corral_core::resources::{
    CachePolicy, NumaPolicy, ResourceConfig, ResourceManager, ResourceRequest, VolumeSpec,
};
use proptest::prelude::*;

fn rm(name: &str) -> ResourceManager {
    ResourceManager::new(fixture(name), ResourceConfig::default()).unwrap()
}

fn cores(n: u32) -> ResourceRequest {
    ResourceRequest {
        cores: n,
        ..Default::default()
    }
}

#[test]
fn cpu0_is_kept_for_the_system() {
    let m = rm("ryzen-7800x3d");
    let g = m.allocate(&cores(14)).unwrap();
    assert!(!g.cpus.contains(&0));
    let e = m.allocate(&cores(2)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "cpu: asked 2 exclusive cores, 1 free of 15 (CPU 0 reserved for the system)"
    );
}

#[test]
fn whole_physical_cores_before_splitting() {
    let m = rm("ryzen-7800x3d");
    let g = m.allocate(&cores(4)).unwrap();
    // Two whole cores: each CPU's sibling is in the grant too.
    for c in &g.cpus {
        let sib = if *c < 8 { c + 8 } else { c - 8 };
        assert!(g.cpus.contains(&sib), "{:?} splits a core", g.cpus);
    }
    // An odd request takes the half-core left next to CPU 0 (its sibling 8) before splitting a free core.
    let g1 = m.allocate(&cores(1)).unwrap();
    assert_eq!(g1.cpus, vec![8]);
}

#[test]
fn prefer_large_cache_on_7950x3d() {
    let m = rm("ryzen-7950x3d");
    let g = m
        .allocate(&ResourceRequest {
            cores: 4,
            cache: CachePolicy::PreferLarge,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(g.l3_domains, vec![0], "the 96 MiB CCD");
    // Without the preference, the tightest fit also avoids splitting domains.
    let g2 = m.allocate(&cores(4)).unwrap();
    assert_eq!(g2.l3_domains.len(), 1);
}

#[test]
fn fits_inside_one_l3_domain_when_possible() {
    let m = rm("dual-socket");
    for _ in 0..6 {
        let g = m.allocate(&cores(4)).unwrap();
        assert_eq!(g.l3_domains.len(), 1, "{g:?}");
        assert!(g.numa_node.is_some());
    }
}

#[test]
fn numa_require_fails_with_per_node_counts() {
    let m = rm("dual-socket");
    let _a = m.allocate(&cores(10)).unwrap();
    let _b = m.allocate(&cores(10)).unwrap();
    let e = m
        .allocate(&ResourceRequest {
            cores: 8,
            numa: NumaPolicy::Require,
            ..Default::default()
        })
        .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("cpu: asked 8 exclusive cores on one NUMA node"),
        "{e}"
    );
    // Prefer spreads instead.
    let g = m
        .allocate(&ResourceRequest {
            cores: 8,
            numa: NumaPolicy::Prefer,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(g.numa_node, None);
    assert_eq!(g.cpus.len(), 8);
}

#[test]
fn numa_memory_is_accounted_per_node() {
    let m = ResourceManager::new(
        fixture("dual-socket"),
        ResourceConfig {
            memory_mb: Some(2000),
            ..Default::default()
        },
    )
    .unwrap();
    let req = |mb| ResourceRequest {
        cores: 2,
        numa: NumaPolicy::Require,
        memory_mb: mb,
        ..Default::default()
    };
    let a = m.allocate(&req(700)).unwrap();
    let b = m.allocate(&req(700)).unwrap();
    assert_ne!(
        a.numa_node, b.numa_node,
        "the second does not fit on the first node"
    );
    let e = m.allocate(&req(500)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "memory: asked 500 MiB, 300 MiB free on node 0, 600 MiB free in total"
    );
}

#[test]
fn memory_and_overcommit() {
    let m = ResourceManager::new(
        fixture("no-smt"),
        ResourceConfig {
            memory_mb: Some(1000),
            memory_overcommit: 1.5,
            ..Default::default()
        },
    )
    .unwrap();
    let _g = m
        .allocate(&ResourceRequest {
            memory_mb: 1400,
            ..Default::default()
        })
        .unwrap();
    let e = m
        .allocate(&ResourceRequest {
            memory_mb: 200,
            ..Default::default()
        })
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "memory: asked 200 MiB, 100 MiB free in total"
    );
}

#[test]
fn shared_pool_shrinks_with_exclusive_cores() {
    let m = rm("no-smt"); // CPUs 1-3 for exclusive use; the shared pool also has reserved CPU 0
    let s = m
        .allocate(&ResourceRequest {
            cpu: 3.5,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(s.millicores, 3500);
    // One exclusive core would leave 3000 millicores for 3500 in use.
    let e = m.allocate(&cores(1)).unwrap_err();
    assert!(e.to_string().contains("shared pool"), "{e}");
    m.release(s.id).unwrap();
    m.allocate(&cores(1)).unwrap();
}

#[test]
fn storage_quota_against_volume() {
    let dir = tempfile::tempdir().unwrap();
    let m = ResourceManager::new(
        fixture("no-smt"),
        ResourceConfig {
            volumes: vec![VolumeSpec {
                name: "data".into(),
                path: dir.path().into(),
                capacity_mb: Some(100),
            }],
            ..Default::default()
        },
    )
    .unwrap();
    let st = |mb| ResourceRequest {
        storage_mb: mb,
        volume: Some("data".into()),
        ..Default::default()
    };
    m.allocate(&st(60)).unwrap();
    let e = m.allocate(&st(50)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "storage: asked 50 MiB on volume 'data', 40 MiB free of 100 MiB"
    );
    assert!(matches!(
        m.allocate(&ResourceRequest {
            storage_mb: 1,
            volume: Some("nope".into()),
            ..Default::default()
        }),
        Err(ResourceError::UnknownVolume(_))
    ));
    std::fs::write(dir.path().join("f"), vec![1u8; 64 * 1024]).unwrap();
    assert!(m.volume_usage_bytes("data").unwrap() >= 64 * 1024);
}

#[test]
fn a_volume_added_later_is_accounted_and_a_second_add_keeps_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let m = ResourceManager::new(fixture("no-smt"), ResourceConfig::default()).unwrap();
    let st = |mb| ResourceRequest {
        storage_mb: mb,
        volume: Some("late".into()),
        ..Default::default()
    };
    assert!(matches!(
        m.allocate(&st(1)),
        Err(ResourceError::UnknownVolume(_))
    ));
    let spec = |c| VolumeSpec {
        name: "late".into(),
        path: dir.path().into(),
        capacity_mb: Some(c),
    };
    assert!(m.add_volume(spec(10)).unwrap());
    m.allocate(&st(8)).unwrap();
    // Added again (a second apply naming it): the reservations stay, the capacity too.
    assert!(!m.add_volume(spec(1000)).unwrap());
    assert!(m.allocate(&st(8)).is_err());
    m.allocate(&st(2)).unwrap();
}

#[test]
fn volume_capacity_defaults_to_statvfs() {
    let dir = tempfile::tempdir().unwrap();
    let m = ResourceManager::new(
        fixture("no-smt"),
        ResourceConfig {
            volumes: vec![VolumeSpec {
                name: "d".into(),
                path: dir.path().into(),
                capacity_mb: None,
            }],
            ..Default::default()
        },
    )
    .unwrap();
    assert!(m.usage().volumes[0].capacity_mb > 0);
}

#[test]
fn all_or_nothing() {
    let m = ResourceManager::new(
        fixture("ryzen-7800x3d"),
        ResourceConfig {
            memory_mb: Some(100),
            ..Default::default()
        },
    )
    .unwrap();
    let before = m.usage();
    assert!(m
        .allocate(&ResourceRequest {
            cores: 2,
            cpu: 1.0,
            memory_mb: 500,
            ..Default::default()
        })
        .is_err());
    assert_eq!(m.usage(), before);
}

#[test]
fn release_exactly_once() {
    let m = rm("no-smt");
    let g = m.allocate(&cores(1)).unwrap();
    m.release(g.id).unwrap();
    assert_eq!(
        m.release(g.id).unwrap_err(),
        ResourceError::UnknownGrant(g.id)
    );
}

#[test]
fn concurrent_allocate_release_keeps_totals() {
    let m = std::sync::Arc::new(
        ResourceManager::new(
            fixture("dual-socket"),
            ResourceConfig {
                memory_mb: Some(10_000),
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let hs: Vec<_> = (0..8)
        .map(|i| {
            let m = m.clone();
            std::thread::spawn(move || {
                for j in 0..500 {
                    let req = ResourceRequest {
                        cores: 1 + (i + j) % 3,
                        cpu: 0.1,
                        memory_mb: 10,
                        ..Default::default()
                    };
                    if let Ok(g) = m.allocate(&req) {
                        m.release(g.id).unwrap();
                    }
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    let u = m.usage();
    assert!(u.exclusive_cpus.is_empty());
    assert_eq!(
        (u.memory_used_mb, u.shared_used_millicores, u.grants),
        (0, 0, 0)
    );
}

#[derive(Debug, Clone)]
enum Op {
    Alloc {
        cores: u32,
        milli: u32,
        mem: u64,
        numa: u8,
        large: bool,
    },
    Release(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u32..6, 0u32..3000, 0u64..3000, 0u8..3, any::<bool>()).prop_map(
            |(cores, milli, mem, numa, large)| Op::Alloc {
                cores,
                milli,
                mem,
                numa,
                large
            }
        ),
        (0usize..16).prop_map(Op::Release),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]
    #[test]
    fn ledger_invariants(fix in prop::sample::select(vec!["ryzen-7800x3d", "ryzen-7950x3d", "dual-socket", "no-smt"]),
                         ops in prop::collection::vec(op(), 1..60)) {
        let topo = fixture(fix);
        let m = ResourceManager::new(topo.clone(), ResourceConfig { memory_mb: Some(8000), ..Default::default() }).unwrap();
        let mut held = Vec::new();
        let initial = m.usage();
        for o in ops {
            match o {
                Op::Alloc { cores, milli, mem, numa, large } => {
                    let numa = [NumaPolicy::None, NumaPolicy::Prefer, NumaPolicy::Require][numa as usize];
                    let req = ResourceRequest {
                        cores, cpu: f64::from(milli) / 1000.0, memory_mb: mem, numa,
                        cache: if large { CachePolicy::PreferLarge } else { CachePolicy::Any },
                        ..Default::default()
                    };
                    let before = m.usage();
                    if let Ok(g) = m.allocate(&req) {
                            prop_assert_eq!(g.cpus.len(), cores as usize);
                            prop_assert!(!g.cpus.contains(&0), "CPU 0 is reserved");
                            if numa == NumaPolicy::Require && cores > 0 {
                                let n = g.numa_node.unwrap();
                                prop_assert!(g.cpus.iter().all(|c| topo.cpu(*c).unwrap().numa_node == n));
                            }
                            // Placement: inside one L3 domain whenever one had room before.
                            let fits_one = topo.l3_domains().iter().any(|d| {
                                d.cpus.iter().filter(|c| **c != 0 && !before.exclusive_cpus.contains(c)).count() >= cores as usize
                            });
                            if fits_one && cores > 0 && numa == NumaPolicy::None {
                                prop_assert_eq!(g.l3_domains.len(), 1, "{:?} before {:?}", g, before.exclusive_cpus);
                            }
                            held.push(g);
                    } else {
                        prop_assert_eq!(m.usage(), before, "a failed allocation changes nothing");
                    }
                }
                Op::Release(i) => {
                    if !held.is_empty() {
                        let g = held.remove(i % held.len());
                        m.release(g.id).unwrap();
                        prop_assert!(m.release(g.id).is_err());
                    }
                }
            }
            // No CPU granted twice; totals match grants and never exceed capacity.
            let u = m.usage();
            let mut seen = HashSet::new();
            for g in &held {
                for c in &g.cpus {
                    prop_assert!(seen.insert(*c), "CPU {} granted twice", c);
                }
            }
            prop_assert_eq!(u.exclusive_cpus.len(), seen.len());
            prop_assert_eq!(u.memory_used_mb, held.iter().map(|g| g.memory_mb).sum::<u64>());
            prop_assert!(u.memory_used_mb <= u.memory_capacity_mb);
            prop_assert_eq!(u.shared_used_millicores, held.iter().map(|g| u64::from(g.millicores)).sum::<u64>());
            prop_assert!(u.shared_used_millicores <= u.shared_capacity_millicores);
            for n in &u.memory_by_node {
                prop_assert!(n.used_mb <= n.capacity_mb, "node {} over capacity", n.node);
            }
            // The shared CPUs are exactly those nobody holds exclusively.
            let shared = m.shared_cpus(None);
            prop_assert!(shared.iter().all(|c| !seen.contains(c)));
            prop_assert_eq!(shared.len() + seen.len(), m.topology().cpus().len());
        }
        for g in held {
            m.release(g.id).unwrap();
        }
        prop_assert_eq!(m.usage(), initial, "release restores exactly");
    }
}

#[test]
fn shared_cpus_follow_exclusive_grants_and_nodes() {
    let m = rm("dual-socket");
    let all = m.topology().cpus().to_vec();
    assert_eq!(
        m.shared_cpus(None),
        all,
        "nothing held: every CPU is shared"
    );
    let g = m
        .allocate(&ResourceRequest {
            cores: 2,
            numa: NumaPolicy::Require,
            ..Default::default()
        })
        .unwrap();
    let node = g.numa_node.unwrap();
    let shared = m.shared_cpus(None);
    assert!(g.cpus.iter().all(|c| !shared.contains(c)));
    assert_eq!(shared.len(), all.len() - 2);
    let on_node = m.shared_cpus(Some(node));
    assert!(!on_node.is_empty());
    assert!(on_node
        .iter()
        .all(|&c| m.topology().cpu(c).unwrap().numa_node == node && shared.contains(&c)));
    // A node that does not exist falls back to the whole machine.
    assert_eq!(m.shared_cpus(Some(99)), shared);
    m.release(g.id).unwrap();
    assert_eq!(m.shared_cpus(None), all);
}

#[test]
fn free_space_of_a_path_not_created_yet_is_its_ancestors() {
    let dir = tempfile::tempdir().unwrap();
    let deep = dir.path().join("not/yet/there");
    let here = corral_core::resources::filesystem_free_mb(dir.path()).unwrap();
    let there = corral_core::resources::filesystem_free_mb(&deep).unwrap();
    // The same filesystem; free space may move a little between the two calls.
    assert!(here.abs_diff(there) < 64, "{here} vs {there}");
}

#[test]
fn a_grant_is_restored_on_exactly_the_cpus_it_held() {
    let m = ResourceManager::new(fixture("no-smt"), ResourceConfig::default()).unwrap();
    let first = m
        .allocate(&ResourceRequest {
            cores: 2,
            ..Default::default()
        })
        .unwrap();
    m.release(first.id).unwrap();
    let exact = |cpus: Vec<u32>| ResourceRequest {
        cores: cpus.len() as u32,
        exact_cpus: cpus,
        memory_mb: 16,
        ..Default::default()
    };
    let g = m
        .allocate(&exact(first.cpus.iter().rev().copied().collect()))
        .unwrap();
    assert_eq!(g.cpus, first.cpus, "the same cores, ascending");
    let e = m.allocate(&exact(vec![first.cpus[0]])).unwrap_err();
    assert!(e.to_string().contains("is not free"), "{e}");
    assert!(m
        .allocate(&ResourceRequest {
            cores: 1,
            exact_cpus: vec![1, 2],
            ..Default::default()
        })
        .is_err());
    assert_eq!(m.usage().memory_used_mb, 16);
}
