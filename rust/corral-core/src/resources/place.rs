//! Placement of exclusive cores: which NUMA node, which L3 domain, which SMT threads.
//!
//! The rule, in order: the node the request prefers; a node where one L3 domain holds
//! every core asked for; the tightest fit, so large free nodes stay whole for large
//! requests. Inside a domain, whole physical cores (all SMT siblings) go before threads of
//! cores already partly taken, and those before a free core is split.

use super::{CachePolicy, L3Info, Ledger, NumaPolicy, ResourceManager, ResourceRequest};
use crate::cpuset::CpuSet;
use crate::error::ResourceError;

/// Where a request's exclusive cores go.
#[derive(Debug, Default)]
pub(super) struct Placed {
    /// The CPUs, ascending (none for a memory-only request).
    pub(super) cpus: Vec<u32>,
    /// The node they (and pinned memory) are on, when one was chosen.
    pub(super) node: Option<u32>,
}

/// A node with free memory.
struct NodeFree {
    node: u32,
    free_mb: u64,
}

/// A node that can hold a request's cores.
struct NodeFit {
    node: u32,
    /// One of its L3 domains holds all the cores.
    l3_fits: bool,
    /// Its free CPUs.
    pool: CpuSet,
}

/// An L3 domain and how many of its CPUs are in the pool.
struct DomainFree<'a> {
    domain: &'a L3Info,
    free: usize,
}

impl ResourceManager {
    /// Every node with the memory it has free now.
    fn nodes_free<'a>(&'a self, l: &'a Ledger) -> impl Iterator<Item = NodeFree> + 'a {
        self.pre.nodes.iter().map(move |n| NodeFree {
            node: n.id,
            free_mb: self.node_capacity(n.id).saturating_sub(l.node_used(n.id)),
        })
    }

    /// The CPUs `req` names, when each is free (a grant restored as it was).
    pub(super) fn place_exact(
        &self,
        l: &Ledger,
        req: &ResourceRequest,
    ) -> Result<Placed, ResourceError> {
        let mut cpus = req.exact_cpus.clone();
        cpus.sort_unstable();
        cpus.dedup();
        if cpus.len() != req.cores as usize {
            return Err(ResourceError::InvalidRequest(format!(
                "exact_cpus names {} CPUs for {} cores",
                cpus.len(),
                req.cores
            )));
        }
        if let Some(&busy) = cpus.iter().find(|&&c| !l.free.contains(c)) {
            return Err(ResourceError::Insufficient(format!(
                "cpu: CPU {busy} is not free (held, reserved or not usable)"
            )));
        }
        let node = req.numa_node.or_else(|| {
            let first = self.topology.cpu(cpus[0])?.numa_node;
            cpus.iter()
                .all(|&c| self.topology.cpu(c).is_some_and(|i| i.numa_node == first))
                .then_some(first)
        });
        Ok(Placed { cpus, node })
    }

    /// Chooses exclusive CPUs and the NUMA node for `req`.
    pub(super) fn place(&self, l: &Ledger, req: &ResourceRequest) -> Result<Placed, ResourceError> {
        let k = req.cores as usize;
        let pins_memory = req.numa != NumaPolicy::None;
        let mem_fits = |node: u32| {
            !pins_memory || l.node_used(node) + req.memory_mb <= self.node_capacity(node)
        };
        if k == 0 {
            if !pins_memory {
                return Ok(Placed::default());
            }
            // Memory only: the chosen node, else the node with the most free memory that fits.
            let mut cands: Vec<NodeFree> =
                self.nodes_free(l).filter(|c| mem_fits(c.node)).collect();
            cands.sort_by_key(|c| (Some(c.node) != req.numa_node, std::cmp::Reverse(c.free_mb)));
            return match cands.first() {
                Some(c) => Ok(Placed {
                    cpus: Vec::new(),
                    node: Some(c.node),
                }),
                None if req.numa == NumaPolicy::Require => Err(self.node_memory_shortage(l, req)),
                None => Ok(Placed::default()),
            };
        }
        // Nodes that can hold all k cores (and the memory, when pinned): the preferred one,
        // then one where a single L3 domain holds them, then the tightest fit, so large
        // free nodes stay whole for large requests.
        let mut fitting: Vec<NodeFit> = self
            .pre
            .nodes
            .iter()
            .filter(|n| n.cpus.count_and(&l.free) >= k && mem_fits(n.id))
            .map(|n| {
                let pool = n.cpus.and(&l.free);
                let l3_fits = self.pre.l3.iter().any(|d| d.cpus.count_and(&pool) >= k);
                NodeFit {
                    node: n.id,
                    l3_fits,
                    pool,
                }
            })
            .collect();
        fitting.sort_by_key(|f| {
            (
                Some(f.node) != req.numa_node,
                !f.l3_fits,
                f.pool.len(),
                f.node,
            )
        });
        if let Some(best) = fitting.into_iter().next() {
            return Ok(Placed {
                cpus: self.pick_in_l3(&best.pool, k, req.cache),
                node: Some(best.node),
            });
        }
        if req.numa == NumaPolicy::Require {
            let any_cpu_fit = self
                .pre
                .nodes
                .iter()
                .any(|n| n.cpus.count_and(&l.free) >= k);
            if any_cpu_fit {
                return Err(self.node_memory_shortage(l, req));
            }
            let per_node: Vec<String> = self
                .pre
                .nodes
                .iter()
                .map(|n| format!("node {}: {}", n.id, n.cpus.count_and(&l.free)))
                .collect();
            return Err(ResourceError::Insufficient(format!(
                "cpu: asked {k} exclusive cores on one NUMA node, no node has that many free ({})",
                per_node.join(", ")
            )));
        }
        // Spread over nodes: fill from the L3 domains with the most free CPUs.
        Ok(Placed {
            cpus: self.pick_in_l3(&l.free, k, req.cache),
            node: None,
        })
    }

    fn node_memory_shortage(&self, l: &Ledger, req: &ResourceRequest) -> ResourceError {
        let best = self
            .nodes_free(l)
            .min_by_key(|c| (std::cmp::Reverse(c.free_mb), c.node))
            .unwrap_or(NodeFree {
                node: 0,
                free_mb: 0,
            });
        ResourceError::Insufficient(format!(
            "memory: asked {} MiB, {} MiB free on node {}, {} MiB free in total",
            req.memory_mb,
            best.free_mb,
            best.node,
            self.pre
                .memory_capacity
                .saturating_sub(l.memory_used + l.elsewhere.memory_mb)
        ))
    }

    /// Picks k CPUs from `pool`: one L3 domain when one fits, else across domains.
    fn pick_in_l3(&self, pool: &CpuSet, k: usize, cache: CachePolicy) -> Vec<u32> {
        let mut doms: Vec<DomainFree<'_>> = self
            .pre
            .l3
            .iter()
            .map(|d| DomainFree {
                domain: d,
                free: d.cpus.count_and(pool),
            })
            .filter(|d| d.free > 0)
            .collect();
        match cache {
            CachePolicy::PreferLarge => {
                doms.sort_by_key(|d| {
                    (
                        d.free < k,
                        std::cmp::Reverse(d.domain.size_kb),
                        d.free,
                        d.domain.id,
                    )
                });
            }
            CachePolicy::Any => doms.sort_by_key(|d| (d.free < k, d.free, d.domain.id)),
        }
        if doms.first().is_some_and(|d| d.free < k) {
            // Nothing holds all k: spread, biggest free blocks first (largest caches first when asked).
            match cache {
                CachePolicy::PreferLarge => doms.sort_by_key(|d| {
                    (
                        std::cmp::Reverse(d.domain.size_kb),
                        std::cmp::Reverse(d.free),
                        d.domain.id,
                    )
                }),
                CachePolicy::Any => doms.sort_by_key(|d| (std::cmp::Reverse(d.free), d.domain.id)),
            }
        }
        let mut out = Vec::with_capacity(k);
        for d in doms {
            if out.len() == k {
                break;
            }
            let dpool = d.domain.cpus.and(pool);
            self.pick_smt(&dpool, k - out.len(), &mut out);
        }
        out.sort_unstable();
        out
    }

    /// Picks up to `want` CPUs of `pool` into `out`: whole free physical cores
    /// first, then threads of cores already partly taken, then splits a free core.
    fn pick_smt(&self, pool: &CpuSet, want: usize, out: &mut Vec<u32>) {
        let mut whole: Vec<usize> = Vec::new();
        let mut partial: Vec<(usize, usize)> = Vec::new();
        let mut last_core = usize::MAX;
        for c in pool.iter() {
            let core = self.pre.core_of[&c];
            if core == last_core {
                continue;
            }
            last_core = core;
            let threads = &self.pre.cores[core];
            let free_here = threads.iter().filter(|t| pool.contains(**t)).count();
            if free_here == threads.len() {
                whole.push(core);
            } else if free_here > 0 {
                partial.push((core, free_here));
            }
        }
        // Cores are not contiguous in CPU numbering (siblings are often n and n+8): dedup.
        whole.sort_unstable();
        whole.dedup();
        partial.sort_unstable();
        partial.dedup();
        let mut need = want;
        let mut used_whole = vec![false; whole.len()];
        for (i, &core) in whole.iter().enumerate() {
            let t = &self.pre.cores[core];
            if need >= t.len() {
                out.extend(t.iter().copied());
                need -= t.len();
                used_whole[i] = true;
            }
        }
        partial.sort_by_key(|&(core, free)| (free, core));
        for &(core, _) in &partial {
            for &t in &self.pre.cores[core] {
                if need > 0 && pool.contains(t) {
                    out.push(t);
                    need -= 1;
                }
            }
        }
        for (i, &core) in whole.iter().enumerate() {
            if used_whole[i] {
                continue;
            }
            for &t in &self.pre.cores[core] {
                if need > 0 {
                    out.push(t);
                    need -= 1;
                }
            }
        }
    }
}
