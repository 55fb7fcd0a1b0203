//! A native tool using corral-core alone, no Python: place three workers on
//! this machine's cores, give each a port, register them, and balance over them.
//!
//! Run: `cargo run -p corral-core --example native_tool`

use corral_core::balance::{LoadBalancer, Strategy};
use corral_core::breaker::{BreakerConfig, CircuitBreaker};
use corral_core::ports::PortAllocator;
use corral_core::registry::{Instance, ServiceRegistry};
use corral_core::resources::{ResourceConfig, ResourceManager, ResourceRequest};
use corral_core::topology::{format_cpulist, Topology};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let topo = Topology::detect()?;
    println!(
        "machine: CPUs {} on {} NUMA node(s), {} L3 domain(s), {} MiB",
        format_cpulist(topo.cpus()),
        topo.numa_nodes().len(),
        topo.l3_domains().len(),
        topo.memory_mb()
    );
    let resources = ResourceManager::new(
        topo,
        ResourceConfig {
            memory_mb: Some(1024),
            ..Default::default()
        },
    )?;
    let ports = PortAllocator::default();
    let registry = ServiceRegistry::new();
    let mut grants = Vec::new();
    for i in 0..3 {
        let grant = resources.allocate(&ResourceRequest {
            cpu: 0.25,
            memory_mb: 128,
            ..Default::default()
        })?;
        let port = ports.allocate()?;
        registry.register(Instance::new(
            "worker",
            format!("worker-{i}"),
            "127.0.0.1",
            port,
        ));
        println!(
            "worker-{i}: port {port}, {} millicores, {} MiB",
            grant.millicores, grant.memory_mb
        );
        grants.push((grant, port));
    }
    let backends = registry
        .instances("worker", true)
        .iter()
        .map(|i| (i.address(), 1))
        .collect();
    let lb = LoadBalancer::new(Strategy::RoundRobin, backends)?;
    let breaker = CircuitBreaker::new(BreakerConfig::default())?;
    for _ in 0..4 {
        let target = lb.pick(None)?.value.clone();
        let reply = breaker.call(|| Ok::<_, std::io::Error>(format!("sent to {target}")));
        println!("{}", reply.map_err(|e| e.to_string())?);
    }
    for (grant, port) in grants {
        resources.release(grant.id)?;
        ports.release(port)?;
    }
    println!(
        "released everything: {} grants outstanding",
        resources.usage().grants
    );
    Ok(())
}
