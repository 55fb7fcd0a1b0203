//! Service registry: which instances of which service exist, where they
//! listen and whether they are healthy.
//!
//! Reads (by id, by service) take a shard read lock and clone an `Arc`;
//! the per-service list is a cached snapshot rebuilt lazily after a change,
//! so a lookup under steady state allocates nothing. Every change bumps a
//! generation counter and is broadcast to watchers.
//!
//! ```
//! use corral_core::registry::{Instance, ServiceRegistry};
//!
//! let reg = ServiceRegistry::new();
//! reg.register(Instance::new("api", "api-1", "127.0.0.1", 8080));
//! reg.register(Instance::new("api", "api-2", "127.0.0.1", 8081));
//! reg.set_health("api-2", false);
//! assert_eq!(reg.instances("api", false).len(), 2);
//! assert_eq!(reg.instances("api", true)[0].id, "api-1");
//! assert_eq!(reg.len(), 2);
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use parking_lot::Mutex;
use tokio::sync::broadcast;

/// One running instance of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// The service it belongs to.
    pub service: String,
    /// Unique id across the registry.
    pub id: String,
    /// Address it listens on.
    pub host: String,
    /// Port it listens on (0 when it listens on none).
    pub port: u16,
    /// Free-form tags.
    pub tags: Vec<String>,
    /// Free-form string metadata.
    pub meta: BTreeMap<String, String>,
    /// Whether it passes its health checks.
    pub healthy: bool,
}

impl Instance {
    /// A healthy instance without tags or metadata.
    pub fn new(
        service: impl Into<String>,
        id: impl Into<String>,
        host: impl Into<String>,
        port: u16,
    ) -> Self {
        Self {
            service: service.into(),
            id: id.into(),
            host: host.into(),
            port,
            tags: Vec::new(),
            meta: BTreeMap::new(),
            healthy: true,
        }
    }

    /// `host:port`.
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// What happened to an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChangeKind {
    /// A new id was registered.
    Registered,
    /// An id that existed was registered again and replaced.
    Replaced,
    /// The id was removed.
    Deregistered,
    /// Its health flag flipped.
    HealthChanged,
}

impl ChangeKind {
    /// Lower-case name, as the Python face spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Registered => "registered",
            Self::Replaced => "replaced",
            Self::Deregistered => "deregistered",
            Self::HealthChanged => "health_changed",
        }
    }
}

/// One change, as broadcast to watchers.
#[derive(Debug, Clone)]
pub struct Change {
    /// The registry generation right after this change.
    pub generation: u64,
    /// What happened.
    pub kind: ChangeKind,
    /// The instance as it is after the change (as it was, for a deregistration).
    pub instance: Arc<Instance>,
}

/// An immutable list of instances, shared with readers.
type Snapshot = Arc<[Arc<Instance>]>;

/// A service's members and its cached, lazily rebuilt snapshots.
#[derive(Default)]
struct ServiceEntry {
    members: Vec<Arc<Instance>>,
    /// (all, healthy only); `None` after a change until the next lookup.
    cache: Mutex<Option<(Snapshot, Snapshot)>>,
}

impl ServiceEntry {
    fn invalidate(&mut self) {
        *self.cache.get_mut() = None;
    }

    fn snapshot(&self, healthy_only: bool) -> Arc<[Arc<Instance>]> {
        let mut cache = self.cache.lock();
        let (all, healthy) = cache.get_or_insert_with(|| {
            let all: Arc<[Arc<Instance>]> = self.members.iter().cloned().collect();
            let healthy: Arc<[Arc<Instance>]> =
                self.members.iter().filter(|i| i.healthy).cloned().collect();
            (all, healthy)
        });
        if healthy_only {
            healthy.clone()
        } else {
            all.clone()
        }
    }
}

/// Capacity of the change broadcast; a watcher that falls further behind
/// is told it lagged and should re-list.
const WATCH_CAPACITY: usize = 1024;

/// A concurrent registry of service instances.
pub struct ServiceRegistry {
    by_id: DashMap<String, Arc<Instance>>,
    by_service: DashMap<String, ServiceEntry>,
    generation: AtomicU64,
    changes: broadcast::Sender<Change>,
    /// Live watchers; lets a change skip the broadcast (and its lock) when nobody listens.
    watchers: Arc<AtomicUsize>,
}

/// A subscription to a registry's changes; see [`ServiceRegistry::subscribe`].
#[derive(Debug)]
pub struct Watcher {
    rx: broadcast::Receiver<Change>,
    count: Arc<AtomicUsize>,
}

impl Watcher {
    /// The next change; `Err(Lagged)` when changes were missed (re-list), `Err(Closed)` when the registry is gone.
    pub async fn recv(&mut self) -> Result<Change, broadcast::error::RecvError> {
        self.rx.recv().await
    }
    /// The next change if one is waiting.
    pub fn try_recv(&mut self) -> Result<Change, broadcast::error::TryRecvError> {
        self.rx.try_recv()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Default for ServiceRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for ServiceRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceRegistry")
            .field("instances", &self.by_id.len())
            .field("generation", &self.generation())
            .finish_non_exhaustive()
    }
}

impl ServiceRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        let (changes, _) = broadcast::channel(WATCH_CAPACITY);
        Self {
            by_id: DashMap::new(),
            by_service: DashMap::new(),
            generation: AtomicU64::new(0),
            changes,
            watchers: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Registers an instance; an existing id is replaced (and counted once).
    /// Returns `true` when the id was new.
    pub fn register(&self, instance: Instance) -> bool {
        let instance = Arc::new(instance);
        // The id entry stays locked while the service index is updated, so two
        // concurrent registrations of one id cannot leave a stale member behind.
        // Lock order is always by_id, then by_service.
        let old = match self.by_id.entry(instance.id.clone()) {
            dashmap::Entry::Occupied(mut o) => {
                let old = o.insert(instance.clone());
                self.remove_member(&old.service, &old.id);
                self.add_member(&instance);
                Some(old)
            }
            dashmap::Entry::Vacant(v) => {
                let guard = v.insert(instance.clone());
                self.add_member(&instance);
                drop(guard);
                None
            }
        };
        let kind = if old.is_some() {
            ChangeKind::Replaced
        } else {
            ChangeKind::Registered
        };
        self.publish(kind, instance);
        old.is_none()
    }

    fn add_member(&self, instance: &Arc<Instance>) {
        // Look up before `entry` so the common case (a known service) clones no string.
        if let Some(mut svc) = self.by_service.get_mut(&instance.service) {
            svc.members.push(instance.clone());
            svc.invalidate();
            return;
        }
        let mut svc = self.by_service.entry(instance.service.clone()).or_default();
        svc.members.push(instance.clone());
        svc.invalidate();
    }

    fn remove_member(&self, service: &str, id: &str) {
        if let Some(mut svc) = self.by_service.get_mut(service) {
            svc.members.retain(|m| m.id != id);
            svc.invalidate();
        }
        self.by_service
            .remove_if(service, |_, s| s.members.is_empty());
    }

    fn publish(&self, kind: ChangeKind, instance: Arc<Instance>) {
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        if self.watchers.load(Ordering::Acquire) > 0 {
            // An error only means every watcher went away meanwhile.
            let _ = self.changes.send(Change {
                generation,
                kind,
                instance,
            });
        }
    }

    /// Removes an instance; returns it, or `None` when the id is unknown.
    pub fn deregister(&self, id: &str) -> Option<Arc<Instance>> {
        // The service index is updated under the id's shard lock (lock order:
        // by_id, then by_service), so a concurrent re-registration of the same
        // id is never removed from its service by mistake.
        let (_, old) = self.by_id.remove_if(id, |_, old| {
            self.remove_member(&old.service, id);
            true
        })?;
        self.publish(ChangeKind::Deregistered, old.clone());
        Some(old)
    }

    /// The instance with this id.
    pub fn get(&self, id: &str) -> Option<Arc<Instance>> {
        self.by_id.get(id).map(|r| r.value().clone())
    }

    /// The instances of a service, in registration order; an empty slice for an unknown service.
    pub fn instances(&self, service: &str, healthy_only: bool) -> Arc<[Arc<Instance>]> {
        match self.by_service.get(service) {
            Some(svc) => svc.snapshot(healthy_only),
            None => Arc::from(Vec::new()),
        }
    }

    /// Sets the health flag; returns `false` when the id is unknown.
    /// Setting the flag it already has changes nothing and bumps no generation.
    pub fn set_health(&self, id: &str, healthy: bool) -> bool {
        self.update(id, |i| {
            if i.healthy == healthy {
                false
            } else {
                i.healthy = healthy;
                true
            }
        })
        .is_some()
    }

    /// Applies `f` to a copy of the instance and stores the result when `f`
    /// returns `true`. Returns `None` for an unknown id, else whether it changed.
    pub fn update(&self, id: &str, f: impl FnOnce(&mut Instance) -> bool) -> Option<bool> {
        let mut entry = self.by_id.get_mut(id)?;
        let mut copy = Instance::clone(entry.value());
        if !f(&mut copy) {
            return Some(false);
        }
        let service_changed = copy.service != entry.service;
        let new = Arc::new(copy);
        let old = std::mem::replace(entry.value_mut(), new.clone());
        if service_changed {
            self.remove_member(&old.service, id);
            self.add_member(&new);
        } else if let Some(mut svc) = self.by_service.get_mut(&new.service) {
            if let Some(slot) = svc.members.iter_mut().find(|m| m.id == id) {
                *slot = new.clone();
            }
            svc.invalidate();
        }
        drop(entry);
        let kind = if old.healthy == new.healthy {
            ChangeKind::Replaced
        } else {
            ChangeKind::HealthChanged
        };
        self.publish(kind, new);
        Some(true)
    }

    /// Names of the services that have at least one instance, sorted.
    pub fn services(&self) -> Vec<String> {
        let mut names: Vec<String> = self.by_service.iter().map(|e| e.key().clone()).collect();
        names.sort();
        names
    }

    /// Number of registered instances.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether no instance is registered.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// A counter that grows on every change.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// A watcher of every change from now on. A watcher that falls more than
    /// 1024 changes behind gets `RecvError::Lagged` and should re-list.
    pub fn subscribe(&self) -> Watcher {
        self.watchers.fetch_add(1, Ordering::AcqRel);
        Watcher {
            rx: self.changes.subscribe(),
            count: self.watchers.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_replace_counts_once() {
        let reg = ServiceRegistry::new();
        assert!(reg.register(Instance::new("a", "1", "h", 1)));
        assert!(!reg.register(Instance::new("a", "1", "h", 2)));
        assert_eq!(reg.len(), 1);
        assert_eq!(reg.instances("a", false).len(), 1);
        assert_eq!(reg.get("1").unwrap().port, 2);
        assert_eq!(reg.generation(), 2);
    }

    #[test]
    fn replace_moves_between_services() {
        let reg = ServiceRegistry::new();
        reg.register(Instance::new("a", "1", "h", 1));
        reg.register(Instance::new("b", "1", "h", 1));
        assert!(reg.instances("a", false).is_empty());
        assert_eq!(reg.instances("b", false).len(), 1);
        assert_eq!(reg.services(), vec!["b".to_string()]);
    }

    #[test]
    fn health_filter_and_generation() {
        let reg = ServiceRegistry::new();
        reg.register(Instance::new("a", "1", "h", 1));
        reg.register(Instance::new("a", "2", "h", 2));
        let g = reg.generation();
        assert!(reg.set_health("1", false));
        assert_eq!(reg.generation(), g + 1);
        // No-op health write bumps nothing.
        assert!(reg.set_health("1", false));
        assert_eq!(reg.generation(), g + 1);
        let healthy = reg.instances("a", true);
        assert_eq!(healthy.len(), 1);
        assert_eq!(healthy[0].id, "2");
        assert!(!reg.set_health("missing", true));
    }

    #[test]
    fn deregister_removes_everywhere() {
        let reg = ServiceRegistry::new();
        reg.register(Instance::new("a", "1", "h", 1));
        assert_eq!(reg.deregister("1").unwrap().id, "1");
        assert!(reg.deregister("1").is_none());
        assert!(reg.is_empty());
        assert!(reg.instances("a", false).is_empty());
        assert!(reg.services().is_empty());
    }

    #[test]
    fn watchers_see_changes_in_order() {
        let reg = ServiceRegistry::new();
        let mut rx = reg.subscribe();
        reg.register(Instance::new("a", "1", "h", 1));
        reg.set_health("1", false);
        reg.deregister("1");
        let kinds: Vec<_> = (0..3).map(|_| rx.try_recv().unwrap()).collect();
        assert_eq!(kinds[0].kind, ChangeKind::Registered);
        assert_eq!(kinds[1].kind, ChangeKind::HealthChanged);
        assert!(!kinds[1].instance.healthy);
        assert_eq!(kinds[2].kind, ChangeKind::Deregistered);
        assert_eq!(kinds[2].generation, 3);
    }

    #[test]
    fn address_brackets_ipv6() {
        assert_eq!(Instance::new("a", "1", "::1", 80).address(), "[::1]:80");
        assert_eq!(
            Instance::new("a", "1", "127.0.0.1", 80).address(),
            "127.0.0.1:80"
        );
    }
}
