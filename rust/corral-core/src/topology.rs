//! CPU and memory topology from sysfs: NUMA nodes, packages, L3 cache
//! domains (with size), physical cores and their SMT siblings, online and
//! allowed CPUs, memory per node.
//!
//! [`Topology::detect`] reads this machine; [`Topology::from_sysfs`] reads any
//! directory laid out like `/sys`, so placement can be tested on topologies
//! this machine does not have.
//!
//! ```
//! let topo = corral_core::topology::Topology::detect().unwrap();
//! assert!(!topo.cpus().is_empty());
//! for cpu in topo.cpus() {
//!     assert!(topo.siblings(*cpu).contains(cpu));
//! }
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use crate::error::TopologyError;

/// A NUMA node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumaNode {
    /// Node id (as in `nodeN`).
    pub id: u32,
    /// Usable CPUs on it.
    pub cpus: Vec<u32>,
    /// Memory on it, MiB.
    pub memory_mb: u64,
}

/// A set of CPUs sharing one L3 cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L3Domain {
    /// Index among the machine's L3 domains, ordered by first CPU.
    pub id: u32,
    /// Usable CPUs sharing it.
    pub cpus: Vec<u32>,
    /// Cache size, KiB (0 when sysfs does not say).
    pub size_kb: u64,
    /// The NUMA node of its first CPU.
    pub numa_node: u32,
}

/// A physical core and its hardware threads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Core {
    /// Index among the machine's cores, ordered by first CPU.
    pub id: u32,
    /// Package (socket).
    pub package: u32,
    /// Usable hardware threads (logical CPUs) of this core.
    pub cpus: Vec<u32>,
}

/// Where one logical CPU sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuInfo {
    /// Logical CPU id.
    pub id: u32,
    /// Index into [`Topology::cores`].
    pub core: u32,
    /// Package (socket).
    pub package: u32,
    /// NUMA node id.
    pub numa_node: u32,
    /// Index into [`Topology::l3_domains`].
    pub l3: u32,
}

/// The machine's topology, as far as corral places work on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    online: Vec<u32>,
    cpus: Vec<u32>,
    info: BTreeMap<u32, CpuInfo>,
    nodes: Vec<NumaNode>,
    l3: Vec<L3Domain>,
    cores: Vec<Core>,
    packages: Vec<u32>,
}

/// Parses a sysfs CPU list ("0-3,8,10-11").
pub fn parse_cpulist(s: &str) -> Option<Vec<u32>> {
    let mut out = BTreeSet::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                if a > b || b - a > 65536 {
                    return None;
                }
                out.extend(a..=b);
            }
            None => {
                out.insert(part.trim().parse().ok()?);
            }
        }
    }
    Some(out.into_iter().collect())
}

/// Formats CPU ids as a sysfs CPU list ("0-3,8").
pub fn format_cpulist(cpus: &[u32]) -> String {
    let mut v = cpus.to_vec();
    v.sort_unstable();
    v.dedup();
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j + 1 < v.len() && v[j + 1] == v[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            v[i].to_string()
        } else {
            format!("{}-{}", v[i], v[j])
        });
        i = j + 1;
    }
    out.join(",")
}

fn read(path: &Path) -> Result<String, TopologyError> {
    fs::read_to_string(path).map_err(|source| TopologyError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn read_opt(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok()
}

fn read_list(path: &Path) -> Result<Vec<u32>, TopologyError> {
    let s = read(path)?;
    parse_cpulist(&s).ok_or_else(|| TopologyError::Parse {
        path: path.to_path_buf(),
        detail: format!("not a CPU list: {:?}", s.trim()),
    })
}

/// Parses a cache size as sysfs writes it ("32768K", "96M").
fn parse_size_kb(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.chars().last()? {
        'K' => (&s[..s.len() - 1], 1),
        'M' => (&s[..s.len() - 1], 1024),
        'G' => (&s[..s.len() - 1], 1024 * 1024),
        _ => (s, 1),
    };
    num.parse::<u64>().ok().map(|n| n * mult)
}

/// Reads `Node N MemTotal: X kB` from a node's meminfo, in MiB.
fn node_memory_mb(text: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.contains("MemTotal:"))
        .and_then(|l| l.split_whitespace().rev().nth(1))
        .and_then(|n| n.parse::<u64>().ok())
        .map(|kb| kb / 1024)
}

/// This process's CPU affinity mask (Linux).
fn affinity() -> Option<Vec<u32>> {
    crate::sys::CpuMask::current().ok().map(|m| m.cpus())
}

/// The cpuset this process's cgroup allows, when one is visible (v2 or v1).
fn cgroup_cpuset(fs_root: &Path) -> Option<Vec<u32>> {
    let cg = read_opt(Path::new("/proc/self/cgroup")).unwrap_or_default();
    let mut candidates: Vec<PathBuf> = Vec::new();
    for line in cg.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let rel = path.trim_start_matches('/');
        if controllers.is_empty() {
            candidates.push(fs_root.join(rel).join("cpuset.cpus.effective"));
        } else if controllers.split(',').any(|c| c == "cpuset") {
            candidates.push(
                fs_root
                    .join("cpuset")
                    .join(rel)
                    .join("cpuset.effective_cpus"),
            );
            candidates.push(fs_root.join("cpuset").join(rel).join("cpuset.cpus"));
        }
    }
    candidates.push(fs_root.join("cpuset.cpus.effective"));
    candidates
        .iter()
        .filter_map(|p| read_opt(p))
        .find_map(|s| parse_cpulist(&s).filter(|v| !v.is_empty()))
}

impl Topology {
    /// Reads this machine: `/sys`, intersected with the affinity mask and cgroup cpuset.
    pub fn detect() -> Result<Self, TopologyError> {
        let mut t = Self::read_tree(Path::new("/sys"))?;
        let mut allowed: BTreeSet<u32> = t.online.iter().copied().collect();
        if let Some(a) = affinity() {
            allowed = allowed
                .intersection(&a.into_iter().collect())
                .copied()
                .collect();
        }
        if let Some(c) = cgroup_cpuset(Path::new("/sys/fs/cgroup")) {
            let narrowed: BTreeSet<u32> = allowed
                .intersection(&c.into_iter().collect())
                .copied()
                .collect();
            if !narrowed.is_empty() {
                allowed = narrowed;
            }
        }
        // With one node, all memory is on it: /proc/meminfo is the authority (some VMs
        // report hot-added memory there but not in node0/meminfo).
        if let Some(mb) = read_opt(Path::new("/proc/meminfo")).and_then(|s| node_memory_mb(&s)) {
            if let [only] = t.nodes.as_mut_slice() {
                only.memory_mb = only.memory_mb.max(mb);
            }
        }
        t.restrict(&allowed.into_iter().collect::<Vec<_>>(), Path::new("/sys"))?;
        Ok(t)
    }

    /// Reads a directory laid out like `/sys` (`root/devices/system/cpu/...`,
    /// `root/devices/system/node/...`). A `root/fs/cgroup/cpuset.cpus.effective`
    /// file, when present, narrows the allowed CPUs as a cgroup cpuset would.
    pub fn from_sysfs(root: impl AsRef<Path>) -> Result<Self, TopologyError> {
        let root = root.as_ref();
        let mut t = Self::read_tree(root)?;
        let allowed = read_opt(&root.join("fs/cgroup/cpuset.cpus.effective"))
            .and_then(|s| parse_cpulist(&s))
            .unwrap_or_else(|| t.online.clone());
        t.restrict(&allowed, root)?;
        Ok(t)
    }

    fn read_tree(root: &Path) -> Result<Self, TopologyError> {
        let cpu_dir = root.join("devices/system/cpu");
        let online = if let Some(s) = read_opt(&cpu_dir.join("online")) {
            parse_cpulist(&s).ok_or_else(|| TopologyError::Parse {
                path: cpu_dir.join("online"),
                detail: format!("not a CPU list: {:?}", s.trim()),
            })?
        } else {
            let entries = fs::read_dir(&cpu_dir).map_err(|source| TopologyError::Io {
                path: cpu_dir.clone(),
                source,
            })?;
            let mut v: Vec<u32> = entries
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.strip_prefix("cpu")?.parse().ok())
                .collect();
            v.sort_unstable();
            v
        };
        if online.is_empty() {
            return Err(TopologyError::NoCpus(cpu_dir));
        }

        // NUMA nodes; a machine without the node directory is one node.
        let node_dir = root.join("devices/system/node");
        let mut node_of: BTreeMap<u32, u32> = BTreeMap::new();
        let mut node_mem: BTreeMap<u32, u64> = BTreeMap::new();
        if let Ok(entries) = fs::read_dir(&node_dir) {
            for e in entries.flatten() {
                let Some(id) = e
                    .file_name()
                    .to_str()
                    .and_then(|n| n.strip_prefix("node")?.parse::<u32>().ok())
                else {
                    continue;
                };
                for c in read_list(&e.path().join("cpulist"))? {
                    node_of.insert(c, id);
                }
                let mem = read_opt(&e.path().join("meminfo"))
                    .and_then(|s| node_memory_mb(&s))
                    .unwrap_or(0);
                node_mem.insert(id, mem);
            }
        }
        if node_mem.is_empty() {
            node_mem.insert(0, 0);
        }

        let mut core_key: BTreeMap<u32, (u32, Vec<u32>)> = BTreeMap::new(); // cpu -> (package, siblings)
        let mut l3_of: BTreeMap<u32, (Vec<u32>, u64)> = BTreeMap::new();
        for &c in &online {
            let base = cpu_dir.join(format!("cpu{c}"));
            let topo = base.join("topology");
            let package = read_opt(&topo.join("physical_package_id"))
                .and_then(|s| s.trim().parse::<i64>().ok())
                .map_or(0, |p| p.max(0) as u32);
            let siblings = ["core_cpus_list", "thread_siblings_list"]
                .iter()
                .find_map(|f| read_opt(&topo.join(f)).and_then(|s| parse_cpulist(&s)))
                .unwrap_or_else(|| vec![c]);
            core_key.insert(c, (package, siblings));
            // L3: the cache index whose level is 3 and type is not Instruction.
            if let Ok(entries) = fs::read_dir(base.join("cache")) {
                for e in entries.flatten() {
                    let p = e.path();
                    if read_opt(&p.join("level")).is_some_and(|l| l.trim() == "3")
                        && read_opt(&p.join("type")).is_none_or(|t| t.trim() != "Instruction")
                    {
                        let shared = read_list(&p.join("shared_cpu_list"))?;
                        let size = read_opt(&p.join("size"))
                            .and_then(|s| parse_size_kb(&s))
                            .unwrap_or(0);
                        l3_of.insert(c, (shared, size));
                    }
                }
            }
        }

        // Cores keyed by their sibling set; L3 domains by their shared CPU set.
        let mut cores: Vec<Core> = Vec::new();
        let mut core_index: BTreeMap<Vec<u32>, u32> = BTreeMap::new();
        let mut l3: Vec<L3Domain> = Vec::new();
        let mut l3_index: BTreeMap<Vec<u32>, u32> = BTreeMap::new();
        let mut info = BTreeMap::new();
        for &c in &online {
            let (package, sibs) = &core_key[&c];
            let sibs: Vec<u32> = sibs
                .iter()
                .copied()
                .filter(|s| online.contains(s))
                .collect();
            let core = *core_index.entry(sibs.clone()).or_insert_with(|| {
                cores.push(Core {
                    id: cores.len() as u32,
                    package: *package,
                    cpus: sibs.clone(),
                });
                cores.len() as u32 - 1
            });
            let numa_node = node_of.get(&c).copied().unwrap_or(0);
            // Without L3 information, a NUMA node is the cache domain.
            let (shared, size) = l3_of.get(&c).cloned().unwrap_or_else(|| {
                let same: Vec<u32> = online
                    .iter()
                    .copied()
                    .filter(|o| node_of.get(o).copied().unwrap_or(0) == numa_node)
                    .collect();
                (same, 0)
            });
            let shared: Vec<u32> = shared.into_iter().filter(|s| online.contains(s)).collect();
            let l3id = *l3_index.entry(shared.clone()).or_insert_with(|| {
                l3.push(L3Domain {
                    id: l3.len() as u32,
                    cpus: shared.clone(),
                    size_kb: size,
                    numa_node,
                });
                l3.len() as u32 - 1
            });
            info.insert(
                c,
                CpuInfo {
                    id: c,
                    core,
                    package: *package,
                    numa_node,
                    l3: l3id,
                },
            );
        }
        let nodes = node_mem
            .iter()
            .map(|(&id, &memory_mb)| NumaNode {
                id,
                cpus: online
                    .iter()
                    .copied()
                    .filter(|c| info[c].numa_node == id)
                    .collect(),
                memory_mb,
            })
            .collect();
        let packages: BTreeSet<u32> = info.values().map(|i| i.package).collect();
        Ok(Self {
            cpus: online.clone(),
            online,
            info,
            nodes,
            l3,
            cores,
            packages: packages.into_iter().collect(),
        })
    }

    /// Keeps only `allowed` CPUs in every usable-CPU list.
    fn restrict(&mut self, allowed: &[u32], root: &Path) -> Result<(), TopologyError> {
        let keep = |v: &mut Vec<u32>| v.retain(|c| allowed.contains(c));
        keep(&mut self.cpus);
        if self.cpus.is_empty() {
            return Err(TopologyError::NoCpus(root.to_path_buf()));
        }
        for n in &mut self.nodes {
            keep(&mut n.cpus);
        }
        for d in &mut self.l3 {
            keep(&mut d.cpus);
        }
        for c in &mut self.cores {
            keep(&mut c.cpus);
        }
        Ok(())
    }

    /// CPUs that are online and allowed to this process: the ones corral may use.
    pub fn cpus(&self) -> &[u32] {
        &self.cpus
    }

    /// CPUs that are online, allowed or not.
    pub fn online(&self) -> &[u32] {
        &self.online
    }

    /// NUMA nodes, by id.
    pub fn numa_nodes(&self) -> &[NumaNode] {
        &self.nodes
    }

    /// L3 cache domains, ordered by first CPU.
    pub fn l3_domains(&self) -> &[L3Domain] {
        &self.l3
    }

    /// Physical cores, ordered by first CPU.
    pub fn cores(&self) -> &[Core] {
        &self.cores
    }

    /// Package (socket) ids.
    pub fn packages(&self) -> &[u32] {
        &self.packages
    }

    /// Where a CPU sits, if it is online.
    pub fn cpu(&self, cpu: u32) -> Option<&CpuInfo> {
        self.info.get(&cpu)
    }

    /// The usable hardware threads of `cpu`'s physical core, `cpu` included; empty for an unknown CPU.
    pub fn siblings(&self, cpu: u32) -> Vec<u32> {
        self.info
            .get(&cpu)
            .map(|i| self.cores[i.core as usize].cpus.clone())
            .unwrap_or_default()
    }

    /// Hardware threads per physical core (the most seen).
    pub fn threads_per_core(&self) -> usize {
        self.cores.iter().map(|c| c.cpus.len()).max().unwrap_or(1)
    }

    /// Memory on all nodes, MiB.
    pub fn memory_mb(&self) -> u64 {
        self.nodes.iter().map(|n| n.memory_mb).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpulists() {
        assert_eq!(
            parse_cpulist("0-3,8,10-11\n").unwrap(),
            vec![0, 1, 2, 3, 8, 10, 11]
        );
        assert_eq!(parse_cpulist("").unwrap(), Vec::<u32>::new());
        assert!(parse_cpulist("3-1").is_none());
        assert!(parse_cpulist("a").is_none());
        assert_eq!(format_cpulist(&[3, 0, 1, 2, 8, 10, 11]), "0-3,8,10-11");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size_kb("98304K"), Some(98304));
        assert_eq!(parse_size_kb("96M"), Some(98304));
        assert_eq!(
            node_memory_mb("Node 0 MemTotal:       32768000 kB\n"),
            Some(32000)
        );
    }

    #[test]
    fn this_machine() {
        let t = Topology::detect().unwrap();
        assert!(!t.cpus().is_empty());
        assert!(t.memory_mb() > 0);
        assert_eq!(
            t.numa_nodes().iter().map(|n| n.cpus.len()).sum::<usize>(),
            t.cpus().len()
        );
    }
}
