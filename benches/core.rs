//! Criterion benches for corral-core's hot paths; `make bench` prints them against their targets.
#![allow(missing_docs)]

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use corral_core::balance::{LoadBalancer, Strategy};
use corral_core::breaker::{BreakerConfig, CircuitBreaker};
use corral_core::ports::PortAllocator;
use corral_core::registry::{Instance, ServiceRegistry};
use corral_core::resources::{
    Elsewhere, ResourceConfig, ResourceManager, ResourceRequest, VolumeSpec,
};
use corral_core::topology::Topology;
use criterion::{criterion_group, criterion_main, Criterion};

fn fixture(name: &str) -> Topology {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/sysfs")
        .join(name);
    Topology::from_sysfs(root).expect("fixture")
}

fn breaker(c: &mut Criterion) {
    let cb = CircuitBreaker::new(BreakerConfig::default()).unwrap();
    c.bench_function("breaker_check_closed", |b| {
        b.iter(|| black_box(&cb).allow().is_ok());
    });
    c.bench_function("breaker_call_closed", |b| {
        b.iter(|| black_box(&cb).call(|| Ok::<_, ()>(black_box(1))));
    });
}

fn registry(c: &mut Criterion) {
    // Registration into a registry that grows to 10 000 instances over 50 services, then
    // starts afresh (untimed), so the figure is not dominated by an ever-growing map.
    c.bench_function("registry_register", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let n = left.min(10_000);
                left -= n;
                let reg = ServiceRegistry::new();
                let batch: Vec<Instance> = (0..n)
                    .map(|i| {
                        Instance::new(
                            format!("svc-{}", i % 50),
                            format!("id-{i}"),
                            "127.0.0.1",
                            8080,
                        )
                    })
                    .collect();
                let t0 = Instant::now();
                for inst in batch {
                    reg.register(inst);
                }
                total += t0.elapsed();
            }
            total
        });
    });
    let reg = ServiceRegistry::new();
    for s in 0..50 {
        for i in 0..4 {
            reg.register(Instance::new(
                format!("svc-{s}"),
                format!("svc-{s}-{i}"),
                "127.0.0.1",
                8000 + i,
            ));
        }
    }
    c.bench_function("registry_lookup_by_service", |b| {
        b.iter(|| reg.instances(black_box("svc-17"), true));
    });
    c.bench_function("registry_get_by_id", |b| {
        b.iter(|| reg.get(black_box("svc-17-2")));
    });
    c.bench_function("registry_1000_from_8_threads", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let reg = Arc::new(ServiceRegistry::new());
                // Instances are built before the clock starts: the bench measures registration.
                let batches: Vec<Vec<Instance>> = (0..8)
                    .map(|t| {
                        (0..125)
                            .map(|i| {
                                Instance::new(
                                    format!("svc-{}", i % 20),
                                    format!("{t}-{i}"),
                                    "127.0.0.1",
                                    20000,
                                )
                            })
                            .collect()
                    })
                    .collect();
                let barrier = Arc::new(std::sync::Barrier::new(9));
                let handles: Vec<_> = batches
                    .into_iter()
                    .map(|batch| {
                        let (reg, barrier) = (reg.clone(), barrier.clone());
                        std::thread::spawn(move || {
                            barrier.wait();
                            for inst in batch {
                                reg.register(inst);
                            }
                        })
                    })
                    .collect();
                barrier.wait();
                let t0 = Instant::now();
                for h in handles {
                    h.join().unwrap();
                }
                total += t0.elapsed();
                assert_eq!(reg.len(), 1000);
            }
            total
        });
    });
}

fn ports(c: &mut Criterion) {
    let p = PortAllocator::default();
    c.bench_function("ports_allocate_release", |b| {
        b.iter(|| {
            let x = p.allocate().unwrap();
            p.release(black_box(x)).unwrap();
        });
    });
}

fn resources(c: &mut Criterion) {
    let rm = ResourceManager::new(fixture("ryzen-7950x3d"), ResourceConfig::default()).unwrap();
    let req = ResourceRequest {
        cores: 4,
        ..Default::default()
    };
    c.bench_function("resources_exclusive_4_cores_7950x3d", |b| {
        b.iter(|| {
            let g = rm.allocate(black_box(&req)).unwrap();
            rm.release(g.id).unwrap();
        });
    });
    let dir = std::env::temp_dir();
    let rm = ResourceManager::new(
        fixture("ryzen-7950x3d"),
        ResourceConfig {
            memory_mb: Some(60_000),
            volumes: vec![VolumeSpec {
                name: "data".into(),
                path: dir,
                capacity_mb: Some(100_000),
            }],
            ..Default::default()
        },
    )
    .unwrap();
    let req = ResourceRequest {
        cpu: 0.5,
        memory_mb: 512,
        storage_mb: 1024,
        volume: Some("data".into()),
        ..Default::default()
    };
    c.bench_function("resources_cpu_memory_storage", |b| {
        b.iter(|| {
            let g = rm.allocate(black_box(&req)).unwrap();
            rm.release(g.id).unwrap();
        });
    });
}

/// Placing one instance on a machine whose ledger holds 1000 claims: 500 grants of this
/// stack (shared CPU, memory, storage) and 500 of other stacks handed in as an `Elsewhere`
/// (8 exclusive CPUs among them), re-handed at each reservation as the machine ledger does.
fn resources_machine(c: &mut Criterion) {
    let rm = ResourceManager::new(
        fixture("dual-socket"),
        ResourceConfig {
            memory_mb: Some(1_000_000),
            cpu_overcommit: 64.0,
            volumes: vec![VolumeSpec {
                name: "data".into(),
                path: std::env::temp_dir(),
                capacity_mb: Some(10_000_000),
            }],
            ..Default::default()
        },
    )
    .unwrap();
    let small = ResourceRequest {
        cpu: 0.1,
        memory_mb: 64,
        storage_mb: 16,
        volume: Some("data".into()),
        ..Default::default()
    };
    for _ in 0..500 {
        rm.allocate(&small).unwrap();
    }
    let others = Elsewhere {
        cpus: (8..16).collect(),
        millicores: 500 * 100,
        memory_mb: 500 * 64,
        node_memory_mb: vec![(0, 4096), (1, 4096)],
        swap_mb: 0,
        storage_mb: vec![("volume:data".into(), 500 * 16)],
    };
    let req = ResourceRequest {
        cores: 2,
        numa: corral_core::resources::NumaPolicy::Prefer,
        memory_mb: 256,
        ..Default::default()
    };
    c.bench_function("resources_place_against_1000_claims", |b| {
        b.iter(|| {
            rm.set_elsewhere(black_box(&others)).unwrap();
            let g = rm.allocate(black_box(&req)).unwrap();
            rm.release(g.id).unwrap();
        });
    });
    let ports = PortAllocator::default();
    let claimed: Vec<u16> = (20000..20500).collect();
    for _ in 0..500 {
        ports.allocate().unwrap();
    }
    c.bench_function("ports_allocate_against_1000_claims", |b| {
        b.iter(|| {
            ports.set_claimed(black_box(&claimed));
            let p = ports.allocate().unwrap();
            ports.release(p).unwrap();
        });
    });
}

fn balance(c: &mut Criterion) {
    let lb = LoadBalancer::new(
        Strategy::RoundRobin,
        (0..4).map(|i| (format!("b{i}"), 1)).collect(),
    )
    .unwrap();
    c.bench_function("balance_round_robin", |b| {
        b.iter(|| lb.pick_with(None, |x| x.weight));
    });
    let lb = LoadBalancer::new(
        Strategy::LeastConnections,
        (0..16).map(|i| (format!("b{i}"), 1)).collect(),
    )
    .unwrap();
    c.bench_function("balance_least_connections_16", |b| {
        b.iter(|| lb.pick_with(None, |x| x.weight));
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = breaker, registry, ports, resources, resources_machine, balance
}
criterion_main!(benches);
