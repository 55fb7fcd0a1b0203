//! Resource ledgers: all-or-nothing allocation of CPU, memory and storage.
//!
//! CPU comes two ways. Exclusive cores are whole logical CPUs, placed inside
//! one NUMA node when they fit, then inside one L3 cache domain, taking whole
//! physical cores (all SMT siblings) before splitting one, and never CPU 0 by
//! default (left to the system). Shared CPU is a fractional share
//! (millicores) of the CPUs no one holds exclusively (the system's reserved
//! CPUs included, as in Kubernetes' static CPU manager), with an overcommit ratio.
//! Memory is MiB against a capacity, also per NUMA node for pinned requests.
//! Storage is a quota on a named volume against the space its filesystem had
//! free (see [`storage`]).
//!
//! One lock guards the whole ledger, so an allocation either takes everything
//! it asked for or nothing, and a grant is released exactly once.
//!
//! A ledger is one holder's view of a machine that others share. What the other holders
//! have (their exclusive CPUs, shared CPU, memory, swap and storage per filesystem) comes
//! in as an [`Elsewhere`] through [`ResourceManager::set_elsewhere`], and placement keeps
//! clear of it by the same rules: a machine ledger (corral's is an `SQLite` file every stack
//! reserves in, one transaction at a time) hands each holder what the others have, then
//! lets it place.
//!
//! ```
//! use corral_core::resources::{ResourceConfig, ResourceManager, ResourceRequest};
//! use corral_core::topology::Topology;
//!
//! let topo = Topology::detect().unwrap();
//! let rm = ResourceManager::new(topo, ResourceConfig { memory_mb: Some(1024), ..Default::default() }).unwrap();
//! let g = rm.allocate(&ResourceRequest { cpu: 0.5, memory_mb: 256, ..Default::default() }).unwrap();
//! assert_eq!(rm.usage().memory_used_mb, 256);
//! rm.release(g.id).unwrap();
//! assert!(rm.release(g.id).is_err()); // exactly once
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use parking_lot::Mutex;

mod place;
pub mod storage;

use self::place::Placed;
use self::storage::Storage;
pub use self::storage::{
    disk_usage_bytes, filesystem_free_mb, filesystem_id, FilesystemUsage, VolumeSpec, VolumeUsage,
};
use crate::cpuset::CpuSet;
use crate::error::ResourceError;
use crate::topology::{format_cpulist, Topology};

/// How strictly exclusive cores must sit on one NUMA node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NumaPolicy {
    /// One node when they fit, else spread; memory is not pinned.
    #[default]
    None,
    /// One node when they fit, else spread; memory is accounted on that node.
    Prefer,
    /// One node or fail; memory is accounted on that node.
    Require,
}

impl NumaPolicy {
    /// The names [`Self::parse`] accepts, as documented.
    pub const NAMES: &'static [&'static str] = &["none", "prefer", "require"];

    /// Parses `none`, `prefer`, `require`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "none" => Self::None,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            _ => return None,
        })
    }
}

/// Which L3 domain to prefer for exclusive cores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CachePolicy {
    /// The tightest fit (keeps large free blocks for larger requests).
    #[default]
    Any,
    /// The largest L3 cache that fits (the 7950X3D's V-cache die).
    PreferLarge,
}

impl CachePolicy {
    /// The names [`Self::parse`] accepts, as documented.
    pub const NAMES: &'static [&'static str] = &["any", "prefer-large"];

    /// Parses `any`, `prefer-large`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "any" => Self::Any,
            "prefer-large" | "prefer_large" => Self::PreferLarge,
            _ => return None,
        })
    }
}

/// What one instance asks for.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ResourceRequest {
    /// Fractional share of the shared pool, in cores (0.5 = half a core).
    pub cpu: f64,
    /// Exclusive logical CPUs.
    pub cores: u32,
    /// NUMA policy for exclusive cores and memory.
    pub numa: NumaPolicy,
    /// Cache policy for exclusive cores.
    pub cache: CachePolicy,
    /// Preferred NUMA node, when the scheduler has chosen one.
    pub numa_node: Option<u32>,
    /// Memory, MiB.
    pub memory_mb: u64,
    /// Swap allowance, MiB.
    pub swap_mb: u64,
    /// Storage quota, MiB, on `volume`.
    pub storage_mb: u64,
    /// The named volume the storage quota is taken from.
    pub volume: Option<String>,
    /// Exactly these exclusive CPUs (`cores` of them), as a grant held before: an agent
    /// that re-adopts running instances restores their grants as they were. Empty: the
    /// ledger chooses.
    pub exact_cpus: Vec<u32>,
}

/// What an allocation granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Unique within its manager; used to release it.
    pub id: u64,
    /// Exclusive CPUs, ascending.
    pub cpus: Vec<u32>,
    /// The NUMA node the cores (and pinned memory) sit on, when one.
    pub numa_node: Option<u32>,
    /// L3 domains the cores sit in.
    pub l3_domains: Vec<u32>,
    /// Shared CPU, millicores.
    pub millicores: u32,
    /// Memory, MiB.
    pub memory_mb: u64,
    /// Whether the memory is accounted on `numa_node`.
    pub memory_pinned: bool,
    /// Swap allowance, MiB.
    pub swap_mb: u64,
    /// Storage quota, MiB.
    pub storage_mb: u64,
    /// Volume of the storage quota.
    pub volume: Option<String>,
    /// The filesystem of that volume (see [`filesystem_id`]).
    pub filesystem: Option<String>,
}

/// What the other holders of the machine have, as one ledger must keep clear of it
/// ([`ResourceManager::set_elsewhere`]).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Elsewhere {
    /// Exclusive CPUs.
    pub cpus: Vec<u32>,
    /// Shared CPU, millicores.
    pub millicores: u64,
    /// Memory, MiB (pinned or not).
    pub memory_mb: u64,
    /// Of that memory, what is pinned to NUMA nodes: `(node, MiB)`.
    pub node_memory_mb: Vec<(u32, u64)>,
    /// Swap allowance, MiB.
    pub swap_mb: u64,
    /// Storage by filesystem id (see [`filesystem_id`]): `(filesystem, MiB)`.
    pub storage_mb: Vec<(String, u64)>,
}

/// The manager's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceConfig {
    /// Memory that may be handed out, MiB; `None`: the machine's, less `memory_reserve_mb`.
    pub memory_mb: Option<u64>,
    /// Memory kept for the system when `memory_mb` is `None`, MiB; `None`: 10% of the
    /// machine's, at most 1 GiB.
    pub memory_reserve_mb: Option<u64>,
    /// Space kept free on each measured filesystem, MiB; `None`: 5% of its size, at most 10 GiB.
    pub disk_reserve_mb: Option<u64>,
    /// CPUs kept for the system; `None`: CPU 0 when there is more than one CPU.
    pub reserved_cpus: Option<Vec<u32>>,
    /// Shared-pool overcommit (1.0 = none).
    pub cpu_overcommit: f64,
    /// Memory overcommit (1.0 = none).
    pub memory_overcommit: f64,
    /// Swap that may be handed out, MiB; `None`: not accounted.
    pub swap_mb: Option<u64>,
    /// Named volumes.
    pub volumes: Vec<VolumeSpec>,
}

impl Default for ResourceConfig {
    fn default() -> Self {
        Self {
            memory_mb: None,
            memory_reserve_mb: None,
            disk_reserve_mb: None,
            reserved_cpus: None,
            cpu_overcommit: 1.0,
            memory_overcommit: 1.0,
            swap_mb: None,
            volumes: Vec::new(),
        }
    }
}

/// Memory of one NUMA node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeMemory {
    /// The node.
    pub node: u32,
    /// Its capacity, MiB (after overcommit).
    pub capacity_mb: u64,
    /// Pinned to it by grants, MiB.
    pub used_mb: u64,
    /// Pinned to it by other holders, MiB.
    pub elsewhere_mb: u64,
}

/// A snapshot of the ledgers.
#[derive(Debug, Clone, PartialEq)]
pub struct Usage {
    /// CPUs corral may hand out exclusively (usable, not reserved).
    pub cpus: Vec<u32>,
    /// Of them, held exclusively now.
    pub exclusive_cpus: Vec<u32>,
    /// Shared pool capacity, millicores (after overcommit): CPUs not held exclusively, reserved ones included.
    pub shared_capacity_millicores: u64,
    /// Shared pool in use, millicores.
    pub shared_used_millicores: u64,
    /// Memory capacity, MiB (after overcommit).
    pub memory_capacity_mb: u64,
    /// Memory in use, MiB.
    pub memory_used_mb: u64,
    /// Memory per NUMA node.
    pub memory_by_node: Vec<NodeMemory>,
    /// Swap in use, MiB.
    pub swap_used_mb: u64,
    /// Volumes.
    pub volumes: Vec<VolumeUsage>,
    /// The filesystems they sit on.
    pub filesystems: Vec<FilesystemUsage>,
    /// Grants outstanding.
    pub grants: usize,
    /// What other holders of the machine have (as last set).
    pub elsewhere: Elsewhere,
}

/// What placement needs of the topology, computed once.
struct Precomputed {
    /// CPUs that may be handed out (usable less reserved).
    usable: CpuSet,
    reserved: Vec<u32>,
    nodes: Vec<NodeInfo>,
    l3: Vec<L3Info>,
    /// Each core's usable threads (reserved ones included, so a core with a reserved CPU is never "whole").
    cores: Vec<Vec<u32>>,
    core_of: HashMap<u32, usize>,
    l3_of: HashMap<u32, u32>,
    memory_capacity: u64,
    swap_capacity: Option<u64>,
}

/// A NUMA node as placement sees it.
struct NodeInfo {
    id: u32,
    /// Its CPUs that may be handed out.
    cpus: CpuSet,
    /// Its share of the memory capacity, MiB (before overcommit).
    memory_mb: u64,
}

/// An L3 cache domain as placement sees it.
struct L3Info {
    id: u32,
    /// Its CPUs that may be handed out.
    cpus: CpuSet,
    size_kb: u64,
}

struct Ledger {
    /// Usable CPUs nobody holds: neither a grant here nor another holder.
    free: CpuSet,
    /// Usable CPUs held by grants here.
    held: CpuSet,
    shared_used: u64,
    memory_used: u64,
    node_memory_used: BTreeMap<u32, u64>,
    swap_used: u64,
    storage: Storage,
    grants: HashMap<u64, Grant>,
    next_id: u64,
    /// What other holders have (storage's share is in `storage`).
    elsewhere: Elsewhere,
    elsewhere_node: BTreeMap<u32, u64>,
}

impl Ledger {
    /// Memory pinned to `node`, here and elsewhere, MiB.
    fn node_used(&self, node: u32) -> u64 {
        self.node_memory_used.get(&node).copied().unwrap_or(0)
            + self.elsewhere_node.get(&node).copied().unwrap_or(0)
    }
}

/// CPU, memory and storage ledgers over a topology.
pub struct ResourceManager {
    topology: Topology,
    config: ResourceConfig,
    pre: Precomputed,
    ledger: Mutex<Ledger>,
}

impl std::fmt::Debug for ResourceManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResourceManager")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl ResourceManager {
    /// A manager over `topology`.
    pub fn new(topology: Topology, config: ResourceConfig) -> Result<Self, ResourceError> {
        let bad = |m: String| Err(ResourceError::InvalidConfig(m));
        if !(config.cpu_overcommit >= 1.0 && config.cpu_overcommit.is_finite()) {
            return bad(format!(
                "cpu_overcommit must be >= 1, got {}",
                config.cpu_overcommit
            ));
        }
        if !(config.memory_overcommit >= 1.0 && config.memory_overcommit.is_finite()) {
            return bad(format!(
                "memory_overcommit must be >= 1, got {}",
                config.memory_overcommit
            ));
        }
        let all: CpuSet = topology.cpus().iter().collect();
        let reserved = match &config.reserved_cpus {
            Some(r) => {
                for c in r {
                    if !all.contains(*c) {
                        return bad(format!(
                            "reserved CPU {c} is not a usable CPU ({})",
                            format_cpulist(topology.cpus())
                        ));
                    }
                }
                r.clone()
            }
            None if topology.cpus().len() > 1 => vec![topology.cpus()[0]],
            None => vec![],
        };
        let mut usable = all.clone();
        for c in &reserved {
            usable.remove(*c);
        }
        let machine_mb = topology.memory_mb();
        let memory_capacity = match config.memory_mb {
            Some(m) => m,
            None => machine_mb.saturating_sub(
                config
                    .memory_reserve_mb
                    .unwrap_or_else(|| (machine_mb / 10).min(1024)),
            ),
        };
        let node_count = topology.numa_nodes().len().max(1) as u64;
        let nodes = topology
            .numa_nodes()
            .iter()
            .map(|n| {
                let cap = if machine_mb > 0 {
                    (u128::from(n.memory_mb) * u128::from(memory_capacity) / u128::from(machine_mb))
                        as u64
                } else {
                    memory_capacity / node_count
                };
                NodeInfo {
                    id: n.id,
                    cpus: n.cpus.iter().filter(|c| usable.contains(**c)).collect(),
                    memory_mb: cap,
                }
            })
            .collect();
        let l3 = topology
            .l3_domains()
            .iter()
            .map(|d| L3Info {
                id: d.id,
                cpus: d.cpus.iter().filter(|c| usable.contains(**c)).collect(),
                size_kb: d.size_kb,
            })
            .collect();
        let cores: Vec<Vec<u32>> = topology.cores().iter().map(|c| c.cpus.clone()).collect();
        let mut core_of = HashMap::new();
        let mut l3_of = HashMap::new();
        for &c in topology.cpus() {
            let info = topology.cpu(c).expect("usable CPUs are online");
            core_of.insert(c, info.core as usize);
            l3_of.insert(c, info.l3);
        }
        let mut storage = Storage::default();
        for v in &config.volumes {
            storage.insert(storage::measure(v.clone(), config.disk_reserve_mb)?);
        }
        let pre = Precomputed {
            usable: usable.clone(),
            reserved,
            nodes,
            l3,
            cores,
            core_of,
            l3_of,
            memory_capacity: (memory_capacity as f64 * config.memory_overcommit) as u64,
            swap_capacity: config.swap_mb,
        };
        Ok(Self {
            topology,
            config,
            pre,
            ledger: Mutex::new(Ledger {
                free: usable,
                held: CpuSet::new(),
                shared_used: 0,
                memory_used: 0,
                node_memory_used: BTreeMap::new(),
                swap_used: 0,
                storage,
                grants: HashMap::new(),
                next_id: 1,
                elsewhere: Elsewhere::default(),
                elsewhere_node: BTreeMap::new(),
            }),
        })
    }

    /// Adds a volume after construction (a service added to a running stack); its capacity
    /// is measured as in [`ResourceManager::new`]. A volume of that name already there is
    /// kept as it is (with its reservations) and `false` comes back.
    ///
    /// # Errors
    /// [`ResourceError::InvalidConfig`] when the capacity cannot be measured.
    pub fn add_volume(&self, spec: VolumeSpec) -> Result<bool, ResourceError> {
        if self.ledger.lock().storage.has(&spec.name) {
            return Ok(false);
        }
        let measured = storage::measure(spec, self.config.disk_reserve_mb)?;
        Ok(self.ledger.lock().storage.insert(measured))
    }

    /// What the other holders of the machine have now, replacing what was set before:
    /// placement keeps clear of it from the next allocation on. CPUs that are not usable
    /// here (reserved, offline) are ignored.
    ///
    /// # Errors
    /// [`ResourceError::Conflict`] when another holder has an exclusive CPU a grant here
    /// holds (the machine's ledger and this one disagree); nothing changes then.
    pub fn set_elsewhere(&self, elsewhere: &Elsewhere) -> Result<(), ResourceError> {
        let mut l = self.ledger.lock();
        let mut taken = CpuSet::new();
        for &c in &elsewhere.cpus {
            if l.held.contains(c) {
                return Err(ResourceError::Conflict(format!(
                    "CPU {c} is held here and by another holder of the machine"
                )));
            }
            if self.pre.usable.contains(c) {
                taken.insert(c);
            }
        }
        let mut free = self.pre.usable.clone();
        for c in l.held.iter().chain(taken.iter()) {
            free.remove(c);
        }
        l.free = free;
        l.elsewhere_node.clear();
        for &(n, mb) in &elsewhere.node_memory_mb {
            *l.elsewhere_node.entry(n).or_default() += mb;
        }
        l.storage.set_elsewhere(&elsewhere.storage_mb);
        l.elsewhere = elsewhere.clone();
        Ok(())
    }

    /// The topology it places on.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// The configuration.
    pub fn config(&self) -> &ResourceConfig {
        &self.config
    }

    /// Shared pool capacity when `free_cpus` exclusive-able CPUs are free: they and the reserved CPUs.
    fn shared_capacity(&self, free_cpus: usize) -> u64 {
        ((free_cpus + self.pre.reserved.len()) as f64 * 1000.0 * self.config.cpu_overcommit) as u64
    }

    fn node_capacity(&self, node: u32) -> u64 {
        let cap = self
            .pre
            .nodes
            .iter()
            .find(|n| n.id == node)
            .map_or(0, |n| n.memory_mb);
        (cap as f64 * self.config.memory_overcommit) as u64
    }

    /// Allocates everything `req` asks for, or nothing.
    pub fn allocate(&self, req: &ResourceRequest) -> Result<Grant, ResourceError> {
        if !(req.cpu >= 0.0 && req.cpu.is_finite()) {
            return Err(ResourceError::InvalidRequest(format!(
                "cpu must be a non-negative number, got {}",
                req.cpu
            )));
        }
        if req.storage_mb > 0 && req.volume.is_none() {
            return Err(ResourceError::InvalidRequest(
                "storage asked without a volume".into(),
            ));
        }
        let millicores = (req.cpu * 1000.0).round() as u64;
        let mut l = self.ledger.lock();

        // Storage and swap first: cheap checks, no placement.
        let filesystem = match &req.volume {
            Some(name) => Some(l.storage.check(name, req.storage_mb)?.to_string()),
            None => None,
        };
        if let Some(cap) = self.pre.swap_capacity {
            let used = l.swap_used + l.elsewhere.swap_mb;
            if used + req.swap_mb > cap {
                return Err(ResourceError::Insufficient(format!(
                    "swap: asked {} MiB, {} MiB free of {cap} MiB",
                    req.swap_mb,
                    cap.saturating_sub(used)
                )));
            }
        }
        let mem_free_total = self
            .pre
            .memory_capacity
            .saturating_sub(l.memory_used + l.elsewhere.memory_mb);
        if req.memory_mb > mem_free_total {
            let elsewhere = if l.elsewhere.memory_mb > 0 {
                format!(", {} MiB held elsewhere", l.elsewhere.memory_mb)
            } else {
                String::new()
            };
            return Err(ResourceError::Insufficient(format!(
                "memory: asked {} MiB, {mem_free_total} MiB free in total{elsewhere}",
                req.memory_mb
            )));
        }

        // Shared CPU comes from CPUs no one holds exclusively, after this request's cores.
        let k = req.cores as usize;
        let free_count = l.free.len();
        if k > free_count {
            return Err(ResourceError::Insufficient(self.cpu_shortage(&l, k)));
        }
        let pool_after = self.shared_capacity(free_count - k);
        let shared_used = l.shared_used + l.elsewhere.millicores;
        if shared_used + millicores > pool_after {
            return Err(ResourceError::Insufficient(format!(
                "cpu: asked {} millicores shared{}, {} free of {} in the shared pool{}",
                millicores,
                if k > 0 {
                    format!(" and {k} exclusive cores")
                } else {
                    String::new()
                },
                pool_after.saturating_sub(shared_used),
                pool_after,
                if l.elsewhere.millicores > 0 {
                    format!(" ({} held elsewhere)", l.elsewhere.millicores)
                } else {
                    String::new()
                }
            )));
        }

        let Placed { cpus, node } = if req.exact_cpus.is_empty() {
            self.place(&l, req)?
        } else {
            self.place_exact(&l, req)?
        };
        let pinned = req.numa != NumaPolicy::None && node.is_some();
        if pinned {
            let n = node.expect("pinned implies a node");
            let used = l.node_used(n);
            let cap = self.node_capacity(n);
            if used + req.memory_mb > cap {
                // `place` checks this for nodes it picks; reaching here means no node had room.
                return Err(ResourceError::Insufficient(format!(
                    "memory: asked {} MiB, {} MiB free on node {n}, {mem_free_total} MiB free in total",
                    req.memory_mb,
                    cap.saturating_sub(used)
                )));
            }
        }

        // Commit.
        for &c in &cpus {
            l.free.remove(c);
            l.held.insert(c);
        }
        l.shared_used += millicores;
        l.memory_used += req.memory_mb;
        if pinned {
            *l.node_memory_used.entry(node.expect("pinned")).or_default() += req.memory_mb;
        }
        l.swap_used += req.swap_mb;
        if let Some(name) = &req.volume {
            l.storage.take(name, req.storage_mb);
        }
        let id = l.next_id;
        l.next_id += 1;
        let mut l3_domains: Vec<u32> = cpus.iter().map(|c| self.pre.l3_of[c]).collect();
        l3_domains.sort_unstable();
        l3_domains.dedup();
        let grant = Grant {
            id,
            cpus,
            numa_node: node,
            l3_domains,
            millicores: millicores as u32,
            memory_mb: req.memory_mb,
            memory_pinned: pinned,
            swap_mb: req.swap_mb,
            storage_mb: req.storage_mb,
            volume: req.volume.clone(),
            filesystem,
        };
        l.grants.insert(id, grant.clone());
        Ok(grant)
    }

    fn cpu_shortage(&self, l: &Ledger, k: usize) -> String {
        let mut s = format!(
            "cpu: asked {k} exclusive cores, {} free of {}",
            l.free.len(),
            self.pre.usable.len()
        );
        let elsewhere = self.pre.usable.len() - l.free.len() - l.held.len();
        let mut notes = Vec::new();
        if elsewhere > 0 {
            notes.push(format!("{elsewhere} held elsewhere"));
        }
        if !self.pre.reserved.is_empty() {
            notes.push(format!(
                "CPU {} reserved for the system",
                format_cpulist(&self.pre.reserved)
            ));
        }
        if !notes.is_empty() {
            let _ = write!(s, " ({})", notes.join("; "));
        }
        s
    }

    /// Returns everything a grant holds. A second release of the same grant is an error.
    pub fn release(&self, grant_id: u64) -> Result<(), ResourceError> {
        let mut l = self.ledger.lock();
        let g = l
            .grants
            .remove(&grant_id)
            .ok_or(ResourceError::UnknownGrant(grant_id))?;
        for &c in &g.cpus {
            l.free.insert(c);
            l.held.remove(c);
        }
        l.shared_used -= u64::from(g.millicores);
        l.memory_used -= g.memory_mb;
        if g.memory_pinned {
            if let Some(n) = g.numa_node {
                *l.node_memory_used.entry(n).or_default() -= g.memory_mb;
            }
        }
        l.swap_used -= g.swap_mb;
        if let Some(v) = &g.volume {
            l.storage.give(v, g.storage_mb);
        }
        Ok(())
    }

    /// CPUs nobody holds exclusively now, where shared-CPU work may run: on `node` when it
    /// is given and has any, else on the whole machine (reserved CPUs included).
    pub fn shared_cpus(&self, node: Option<u32>) -> Vec<u32> {
        let l = self.ledger.lock();
        let shared: Vec<u32> = self
            .topology
            .cpus()
            .iter()
            .copied()
            .filter(|&c| !self.pre.usable.contains(c) || l.free.contains(c))
            .collect();
        drop(l);
        if let Some(n) = node {
            let on_node: Vec<u32> = shared
                .iter()
                .copied()
                .filter(|&c| self.topology.cpu(c).is_some_and(|i| i.numa_node == n))
                .collect();
            if !on_node.is_empty() {
                return on_node;
            }
        }
        shared
    }

    /// The grant with this id, if outstanding.
    pub fn grant(&self, id: u64) -> Option<Grant> {
        self.ledger.lock().grants.get(&id).cloned()
    }

    /// Bytes used on disk in a volume now (walks the directory).
    pub fn volume_usage_bytes(&self, name: &str) -> Result<u64, ResourceError> {
        let path = self.ledger.lock().storage.path(name)?;
        disk_usage_bytes(&path)
            .map_err(|e| ResourceError::InvalidRequest(format!("volume '{name}': {e}")))
    }

    /// A snapshot of the ledgers.
    pub fn usage(&self) -> Usage {
        let l = self.ledger.lock();
        let exclusive: Vec<u32> = l.held.iter().collect();
        Usage {
            cpus: self.pre.usable.to_vec(),
            exclusive_cpus: exclusive,
            shared_capacity_millicores: self.shared_capacity(l.free.len()),
            shared_used_millicores: l.shared_used,
            memory_capacity_mb: self.pre.memory_capacity,
            memory_used_mb: l.memory_used,
            memory_by_node: self
                .pre
                .nodes
                .iter()
                .map(|n| NodeMemory {
                    node: n.id,
                    capacity_mb: self.node_capacity(n.id),
                    used_mb: l.node_memory_used.get(&n.id).copied().unwrap_or(0),
                    elsewhere_mb: l.elsewhere_node.get(&n.id).copied().unwrap_or(0),
                })
                .collect(),
            swap_used_mb: l.swap_used,
            volumes: l.storage.volumes(),
            filesystems: l.storage.filesystems(),
            grants: l.grants.len(),
            elsewhere: l.elsewhere.clone(),
        }
    }
}
