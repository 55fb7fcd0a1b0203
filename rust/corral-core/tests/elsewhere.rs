//! One ledger among several on a machine: what other holders have ([`Elsewhere`]) is kept
//! clear of, by exclusive CPU, shared CPU, memory (per node too), swap and storage per
//! filesystem; and two ledgers that hand each other what they hold, as a machine ledger
//! does, never grant a CPU twice nor more memory than there is.

mod common;
use common::fixture;

use corral_core::error::ResourceError;
use corral_core::resources::{
    filesystem_id, Elsewhere, NumaPolicy, ResourceConfig, ResourceManager, ResourceRequest,
    VolumeSpec,
};
use proptest::prelude::*;

fn rm(name: &str, memory_mb: u64) -> ResourceManager {
    ResourceManager::new(
        fixture(name),
        ResourceConfig {
            memory_mb: Some(memory_mb),
            ..Default::default()
        },
    )
    .unwrap()
}

#[test]
fn cores_held_elsewhere_are_not_granted_and_the_message_says_so() {
    let m = rm("no-smt", 1024);
    let all = m.usage().cpus;
    let mut others = all.clone();
    let mine = others.pop().unwrap();
    m.set_elsewhere(&Elsewhere {
        cpus: others.clone(),
        ..Default::default()
    })
    .unwrap();
    let g = m
        .allocate(&ResourceRequest {
            cores: 1,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(g.cpus, vec![mine]);
    let e = m
        .allocate(&ResourceRequest {
            cores: 1,
            ..Default::default()
        })
        .unwrap_err();
    let text = e.to_string();
    assert!(
        text.starts_with("cpu: asked 1 exclusive cores, 0 free of"),
        "{text}"
    );
    assert!(
        text.contains(&format!("{} held elsewhere", others.len())),
        "{text}"
    );
    // The usage tells mine from theirs; the shared pool has neither.
    let u = m.usage();
    assert_eq!(u.exclusive_cpus, vec![mine]);
    assert_eq!(u.elsewhere.cpus, others);
    assert!(m
        .shared_cpus(None)
        .iter()
        .all(|c| *c != mine && !others.contains(c)));
    // Released elsewhere: free here again.
    m.set_elsewhere(&Elsewhere::default()).unwrap();
    assert!(m
        .allocate(&ResourceRequest {
            cores: 1,
            ..Default::default()
        })
        .is_ok());
}

#[test]
fn a_cpu_claimed_elsewhere_that_a_grant_here_holds_is_a_conflict() {
    let m = rm("no-smt", 1024);
    let g = m
        .allocate(&ResourceRequest {
            cores: 1,
            ..Default::default()
        })
        .unwrap();
    let e = m
        .set_elsewhere(&Elsewhere {
            cpus: g.cpus.clone(),
            ..Default::default()
        })
        .unwrap_err();
    assert!(matches!(e, ResourceError::Conflict(_)), "{e}");
    assert_eq!(m.usage().elsewhere, Elsewhere::default(), "nothing changed");
}

#[test]
fn memory_shared_cpu_and_swap_elsewhere_count_against_the_capacity() {
    let m = ResourceManager::new(
        fixture("no-smt"),
        ResourceConfig {
            memory_mb: Some(1000),
            swap_mb: Some(100),
            ..Default::default()
        },
    )
    .unwrap();
    let pool = m.usage().shared_capacity_millicores;
    m.set_elsewhere(&Elsewhere {
        millicores: pool - 500,
        memory_mb: 700,
        swap_mb: 90,
        ..Default::default()
    })
    .unwrap();
    let mem = |mb| ResourceRequest {
        memory_mb: mb,
        ..Default::default()
    };
    assert_eq!(
        m.allocate(&mem(301)).unwrap_err().to_string(),
        "memory: asked 301 MiB, 300 MiB free in total, 700 MiB held elsewhere"
    );
    let g = m.allocate(&mem(300)).unwrap();
    assert_eq!(m.usage().memory_used_mb, 300, "mine only");
    m.release(g.id).unwrap();
    let e = m
        .allocate(&ResourceRequest {
            cpu: 0.6,
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("500 free of") && e.contains("held elsewhere"),
        "{e}"
    );
    assert!(m
        .allocate(&ResourceRequest {
            cpu: 0.5,
            ..Default::default()
        })
        .is_ok());
    assert!(m
        .allocate(&ResourceRequest {
            swap_mb: 11,
            ..Default::default()
        })
        .is_err());
}

#[test]
fn memory_pinned_elsewhere_counts_on_its_node() {
    let m = rm("dual-socket", 2000);
    let node_cap = m.usage().memory_by_node[0].capacity_mb;
    m.set_elsewhere(&Elsewhere {
        memory_mb: node_cap,
        node_memory_mb: vec![(0, node_cap)],
        ..Default::default()
    })
    .unwrap();
    let g = m
        .allocate(&ResourceRequest {
            cores: 2,
            numa: NumaPolicy::Require,
            memory_mb: 100,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(g.numa_node, Some(1), "node 0's memory is held elsewhere");
    assert_eq!(m.usage().memory_by_node[0].elsewhere_mb, node_cap);
}

#[test]
fn two_volumes_on_one_filesystem_share_its_space_with_other_holders() {
    let dir = tempfile::tempdir().unwrap();
    let (first, second) = (dir.path().join("a"), dir.path().join("b/deeper"));
    let vol = |name: &str, path: &std::path::Path| VolumeSpec {
        name: name.into(),
        path: path.into(),
        capacity_mb: None,
    };
    let m = ResourceManager::new(
        fixture("no-smt"),
        ResourceConfig {
            disk_reserve_mb: Some(0),
            volumes: vec![vol("a", &first), vol("b", &second)],
            ..Default::default()
        },
    )
    .unwrap();
    let u = m.usage();
    assert_eq!(u.filesystems.len(), 1, "{:?}", u.filesystems);
    let fs = &u.filesystems[0];
    assert_eq!(fs.id, filesystem_id(dir.path()).unwrap());
    let cap = fs.capacity_mb;
    assert!(cap > 20, "this test needs some free space: {cap} MiB");
    m.set_elsewhere(&Elsewhere {
        storage_mb: vec![(fs.id.clone(), cap - 20), ("dev:elsewhere".into(), 1 << 40)],
        ..Default::default()
    })
    .unwrap();
    let st = |name: &str, mb| ResourceRequest {
        storage_mb: mb,
        volume: Some(name.into()),
        ..Default::default()
    };
    let g = m.allocate(&st("a", 15)).unwrap();
    assert_eq!(g.filesystem.as_deref(), Some(fs.id.as_str()));
    let e = m.allocate(&st("b", 6)).unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "storage: asked 6 MiB on volume 'b', 5 MiB free of {cap} MiB, {} MiB held elsewhere",
            cap - 20
        )
    );
    m.allocate(&st("b", 5)).unwrap();
}

#[test]
fn the_disk_reserve_is_kept_free() {
    let dir = tempfile::tempdir().unwrap();
    let make = |reserve| {
        ResourceManager::new(
            fixture("no-smt"),
            ResourceConfig {
                disk_reserve_mb: Some(reserve),
                volumes: vec![VolumeSpec {
                    name: "d".into(),
                    path: dir.path().into(),
                    capacity_mb: None,
                }],
                ..Default::default()
            },
        )
        .unwrap()
        .usage()
        .filesystems[0]
            .capacity_mb
    };
    let (none, some) = (make(0), make(100));
    // Free space moves as the machine writes: allow a little drift between the two readings.
    assert!(none.abs_diff(some + 100) <= 8, "{none} vs {some} + 100");
}

#[derive(Debug, Clone)]
enum Op {
    Alloc(usize, u32, u64),
    Release(usize, usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0usize..2, 0u32..4, 0u64..400).prop_map(|(h, c, m)| Op::Alloc(h, c, m)),
        (0usize..2, 0usize..8).prop_map(|(h, i)| Op::Release(h, i)),
    ]
}

/// What one holder has, as the machine ledger hands it to the others.
fn held(m: &ResourceManager) -> Elsewhere {
    let u = m.usage();
    Elsewhere {
        cpus: u.exclusive_cpus,
        millicores: u.shared_used_millicores,
        memory_mb: u.memory_used_mb,
        ..Default::default()
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn two_holders_never_share_a_core_nor_exceed_the_memory(
        fix in prop::sample::select(vec!["ryzen-7800x3d", "dual-socket", "no-smt"]),
        ops in prop::collection::vec(op(), 1..60),
    ) {
        let ledgers = [rm(fix, 1000), rm(fix, 1000)];
        let mut grants: [Vec<u64>; 2] = [Vec::new(), Vec::new()];
        for o in ops {
            match o {
                Op::Alloc(h, cores, mb) => {
                    // One transaction: the other's holdings in, then place.
                    ledgers[h].set_elsewhere(&held(&ledgers[1 - h])).unwrap();
                    let req = ResourceRequest { cores, memory_mb: mb, cpu: 0.1, ..Default::default() };
                    if let Ok(g) = ledgers[h].allocate(&req) {
                        grants[h].push(g.id);
                    }
                }
                Op::Release(h, i) => {
                    if !grants[h].is_empty() {
                        let id = grants[h].remove(i % grants[h].len());
                        ledgers[h].release(id).unwrap();
                    }
                }
            }
            let (a, b) = (ledgers[0].usage(), ledgers[1].usage());
            prop_assert!(a.exclusive_cpus.iter().all(|c| !b.exclusive_cpus.contains(c)));
            prop_assert!(a.memory_used_mb + b.memory_used_mb <= 1000);
            prop_assert!(a.shared_used_millicores + b.shared_used_millicores <= a.shared_capacity_millicores.max(b.shared_capacity_millicores));
        }
    }
}
