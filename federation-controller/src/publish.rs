//! How a change reaches the sidecars and gateway that hold it, and only
//! them.
//!
//! One task (`publisher`) rebuilds the cluster's service table after each
//! change (coalescing a burst into one rebuild) and works out which
//! services changed. Each config stream is a `Watcher` that names the
//! services it holds; the publisher marks a changed service dirty on the
//! watchers that hold it, and wakes only those. A watcher then sends the
//! services that changed, not the whole table: what a change costs on the
//! wire grows with the change, not with the mesh (docs/architecture.md,
//! "Config distribution").

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use isthmus_core::naming::ServiceKey;
use isthmus_proto::{ConfigSnapshot, ExportedService, Service, WatchScope};
use tokio::sync::{Notify, watch};

use crate::shared::Shared;

/// The most subscriptions one config stream may hold.
pub const MAX_SUBSCRIPTIONS: usize = 10_000;

/// The cluster-wide part of the config as of one rebuild; the services
/// are in `Hub::table`, edited in place (a rebuild touches only the
/// services that changed).
#[derive(Default)]
pub(crate) struct Published {
    /// The `Shared::version` it was built from.
    pub source: u64,
    /// Cluster, trust domain, bundles, peers, gateway, signing root (no services).
    pub cluster: ConfigSnapshot,
    /// What this cluster exports, as peers are told (one build for all
    /// peering streams).
    pub exports: Arc<Vec<ExportedService>>,
    /// The export list this one was changed from, and the delta between
    /// them (so each peering stream need not work it out).
    pub exports_delta: Option<(Arc<Vec<ExportedService>>, isthmus_proto::ExportList)>,
}

/// Every service sidecars of this cluster can call.
#[derive(Default)]
pub(crate) struct Table {
    pub services: BTreeMap<ServiceKey, Arc<Service>>,
    /// ClusterSet IP to service, for `ip:` subscriptions.
    by_ip: HashMap<String, ServiceKey>,
}

impl Table {
    /// Put (or with `None`, remove) `key`'s service; whether it changed.
    fn set(&mut self, key: &ServiceKey, svc: Option<Service>) -> bool {
        let old = self.services.get(key);
        if old.map(|s| s.as_ref()) == svc.as_ref() {
            return false;
        }
        if let Some(old) = old {
            for ip in &old.clusterset_ips {
                self.by_ip.remove(ip);
            }
        }
        match svc {
            Some(s) => {
                for ip in &s.clusterset_ips {
                    self.by_ip.insert(ip.clone(), key.clone());
                }
                self.services.insert(key.clone(), Arc::new(s));
            }
            None => {
                self.services.remove(key);
            }
        }
        true
    }
}

/// What the next rebuild redoes: everything, or the services named.
struct Pending {
    all: bool,
    keys: BTreeSet<ServiceKey>,
}

/// What changed for one watcher since it last sent.
#[derive(Default)]
pub(crate) struct Dirty {
    pub keys: BTreeSet<ServiceKey>,
    pub cluster: bool,
    /// Subscriptions to answer, as asked.
    pub answered: Vec<String>,
}

/// One config stream's side of the hub.
pub(crate) struct Watcher {
    pub scope: WatchScope,
    dirty: Mutex<Dirty>,
    pub wake: Notify,
    /// Keys subscribed to (scope Subscribed).
    subscribed: Mutex<HashSet<ServiceKey>>,
}

impl Watcher {
    pub fn take(&self) -> Dirty {
        std::mem::take(&mut *self.dirty.lock().expect("dirty lock"))
    }

    fn mark(&self, f: impl FnOnce(&mut Dirty)) {
        f(&mut self.dirty.lock().expect("dirty lock"));
        self.wake.notify_one();
    }

    pub fn subscribed(&self) -> Vec<ServiceKey> {
        self.subscribed
            .lock()
            .expect("subscribed lock")
            .iter()
            .cloned()
            .collect()
    }

    pub fn holds(&self, key: &ServiceKey) -> bool {
        self.subscribed.lock().expect("subscribed lock").contains(key)
    }
}

#[derive(Default)]
struct Subs {
    by_key: HashMap<ServiceKey, HashMap<u64, Arc<Watcher>>>,
    /// Watchers of scope All or Exported: every changed key may concern them.
    wide: HashMap<u64, Arc<Watcher>>,
    all: HashMap<u64, Arc<Watcher>>,
}

/// The published table and who holds what of it.
pub(crate) struct Hub {
    pub current: watch::Sender<Arc<Published>>,
    pub table: RwLock<Table>,
    pending: Mutex<Pending>,
    subs: Mutex<Subs>,
}

impl Default for Hub {
    fn default() -> Self {
        Self {
            current: watch::channel(Arc::new(Published::default())).0,
            table: RwLock::default(),
            // The first rebuild is whole.
            pending: Mutex::new(Pending {
                all: true,
                keys: BTreeSet::new(),
            }),
            subs: Mutex::new(Subs::default()),
        }
    }
}

impl Hub {
    pub fn dirty_all(&self) {
        self.pending.lock().expect("pending lock").all = true;
    }

    pub fn dirty_keys(&self, keys: impl IntoIterator<Item = ServiceKey>) {
        self.pending.lock().expect("pending lock").keys.extend(keys);
    }

    fn take_pending(&self) -> Pending {
        std::mem::replace(
            &mut *self.pending.lock().expect("pending lock"),
            Pending {
                all: false,
                keys: BTreeSet::new(),
            },
        )
    }

    pub fn service(&self, key: &ServiceKey) -> Option<Arc<Service>> {
        self.table.read().expect("table lock").services.get(key).cloned()
    }

    pub fn add(&self, id: u64, scope: WatchScope) -> Arc<Watcher> {
        let w = Arc::new(Watcher {
            scope,
            dirty: Mutex::default(),
            wake: Notify::new(),
            subscribed: Mutex::default(),
        });
        let mut subs = self.subs.lock().expect("subs lock");
        if scope != WatchScope::Subscribed {
            subs.wide.insert(id, w.clone());
        }
        subs.all.insert(id, w.clone());
        w
    }

    pub fn remove(&self, id: u64) {
        let mut subs = self.subs.lock().expect("subs lock");
        subs.wide.remove(&id);
        if let Some(w) = subs.all.remove(&id) {
            for key in w.subscribed.lock().expect("subscribed lock").iter() {
                if let Some(m) = subs.by_key.get_mut(key) {
                    m.remove(&id);
                    if m.is_empty() {
                        subs.by_key.remove(key);
                    }
                }
            }
        }
    }

    /// Subscribe watcher `id` to `items` (`namespace/name` or `ip:ADDR`)
    /// and have each answered in its next message. Past
    /// `MAX_SUBSCRIPTIONS`, further items are answered but not followed.
    pub fn subscribe(&self, id: u64, w: &Arc<Watcher>, items: &[String]) {
        let mut keys = Vec::new();
        for item in items {
            let key = match item.strip_prefix("ip:") {
                Some(ip) => self.table.read().expect("table lock").by_ip.get(ip).cloned(),
                None => ServiceKey::parse(item).ok(),
            };
            if let Some(key) = key {
                keys.push(key);
            }
        }
        {
            let mut subs = self.subs.lock().expect("subs lock");
            let mut held = w.subscribed.lock().expect("subscribed lock");
            for key in &keys {
                if held.len() >= MAX_SUBSCRIPTIONS && !held.contains(key) {
                    tracing::warn!(service = %key, "config stream over {MAX_SUBSCRIPTIONS} subscriptions; not followed");
                    continue;
                }
                held.insert(key.clone());
                subs.by_key.entry(key.clone()).or_default().insert(id, w.clone());
            }
        }
        w.mark(|d| {
            d.keys.extend(keys);
            d.answered.extend(items.iter().cloned());
        });
    }

    /// Wake the watchers that hold any of `keys`, and all of them if the
    /// cluster-wide fields changed.
    fn notify(&self, keys: &[ServiceKey], cluster: bool) {
        let subs = self.subs.lock().expect("subs lock");
        if cluster {
            for w in subs.all.values() {
                w.mark(|d| d.cluster = true);
            }
        }
        if keys.is_empty() {
            return;
        }
        for w in subs.wide.values() {
            w.mark(|d| d.keys.extend(keys.iter().cloned()));
        }
        for key in keys {
            for w in subs.by_key.get(key).into_iter().flat_map(|m| m.values()) {
                w.mark(|d| {
                    d.keys.insert(key.clone());
                });
            }
        }
    }

    pub fn watchers(&self) -> usize {
        self.subs.lock().expect("subs lock").all.len()
    }
}

/// Whether `svc` belongs in a stream of `scope` (Subscribed streams
/// decide by their subscriptions, before this).
pub(crate) fn in_scope(scope: WatchScope, svc: &Service) -> bool {
    scope != WatchScope::Exported || svc.exported
}

/// Rebuild and publish the service table after every change, until
/// shutdown: whole after a change of anything cluster-wide, else only the
/// services that changed. Peering streams follow what it publishes too.
pub(crate) async fn publisher(shared: Arc<Shared>) {
    let mut version = shared.version.subscribe();
    let mut workloads: Vec<String> = Vec::new();
    loop {
        let source = *version.borrow_and_update();
        let started = std::time::Instant::now();
        let pending = shared.hub.take_pending();
        let before = shared.hub.current.borrow().clone();
        let mut keys: Vec<ServiceKey> = Vec::new();
        let mut cluster = ConfigSnapshot {
            version: source,
            ..before.cluster.clone()
        };
        let mut cluster_changed = false;
        let mut local: BTreeSet<ServiceKey> = BTreeSet::new();
        if pending.all {
            let mut snap = shared.snapshot();
            let services: BTreeMap<ServiceKey, Service> = std::mem::take(&mut snap.services)
                .into_iter()
                .map(|s| (ServiceKey::new(&s.namespace, &s.name), s))
                .collect();
            let mut table = shared.hub.table.write().expect("table lock");
            let gone: Vec<ServiceKey> = table
                .services
                .keys()
                .filter(|k| !services.contains_key(*k))
                .cloned()
                .collect();
            for key in gone {
                table.set(&key, None);
                keys.push(key);
            }
            for (key, svc) in services {
                if table.set(&key, Some(svc)) {
                    keys.push(key);
                }
            }
            drop(table);
            cluster_changed = !isthmus_core::delta::is_empty(&isthmus_core::delta::diff(&before.cluster, &snap));
            cluster = snap;
        } else if !pending.keys.is_empty() {
            // Keys of services this cluster exports: their export entry
            // may have changed too.
            {
                let state = shared.state.lock().expect("state lock");
                local = pending
                    .keys
                    .iter()
                    .filter(|k| state.exports.contains_key(*k))
                    .cloned()
                    .collect();
            }
            let services = shared.services(Some(&pending.keys));
            let mut table = shared.hub.table.write().expect("table lock");
            for key in pending.keys {
                let svc = services
                    .iter()
                    .find(|s| s.namespace == key.namespace && s.name == key.name)
                    .cloned();
                if table.set(&key, svc) {
                    keys.push(key);
                }
            }
        }
        // A revoked workload credential ends its streams: every watcher
        // looks at its own when woken for the cluster-wide fields.
        let now: Vec<String> = shared
            .state
            .lock()
            .expect("state lock")
            .workloads
            .keys()
            .cloned()
            .collect();
        cluster_changed |= workloads.iter().any(|w| !now.contains(w));
        workloads = now;
        // The export list is rebuilt when a service of this cluster may
        // have changed; an import changing elsewhere leaves it (the same
        // Arc: peering streams see at once that there is nothing to send).
        let (exports, exports_delta) = if pending.all || !local.is_empty() {
            let state = shared.state.lock().expect("state lock");
            let reg = shared.registry.lock().expect("registry lock");
            let (list, delta) = if pending.all {
                let list = crate::snapshot::exports(&state, reg.sidecars.values());
                let delta = crate::imports::export_delta(&before.exports, &list);
                (list, delta)
            } else {
                let fresh = crate::snapshot::exports_of(&state, reg.serving(&local), &local);
                crate::imports::patch_exports(&before.exports, &local, fresh)
            };
            if list == *before.exports {
                (before.exports.clone(), None)
            } else {
                (Arc::new(list), Some((before.exports.clone(), delta)))
            }
        } else {
            (before.exports.clone(), None)
        };
        shared.hub.current.send_replace(Arc::new(Published {
            source,
            cluster,
            exports,
            exports_delta,
        }));
        shared.hub.notify(&keys, cluster_changed);
        shared.metrics.config_rebuilds.inc();
        shared
            .metrics
            .config_rebuild_seconds
            .inc_by(started.elapsed().as_secs_f64());
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            r = version.changed() => if r.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, ips: &[&str]) -> Service {
        Service {
            namespace: "demo".into(),
            name: name.into(),
            port: 8080,
            clusterset_ips: ips.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    /// A redirected connection to a ClusterSet IP is subscribed to as
    /// `ip:ADDR`: the table finds its service by the IP, and forgets an IP
    /// its service no longer has.
    #[test]
    fn clusterset_ips_find_their_service_and_follow_changes() {
        let mut t = Table::default();
        let echo = ServiceKey::new("demo", "echo");
        assert!(t.set(&echo, Some(svc("echo", &["10.96.0.10"]))));
        assert!(!t.set(&echo, Some(svc("echo", &["10.96.0.10"]))), "unchanged");
        assert_eq!(t.by_ip.get("10.96.0.10"), Some(&echo));
        assert!(t.set(&echo, Some(svc("echo", &["10.96.0.11"]))));
        assert_eq!(t.by_ip.get("10.96.0.10"), None, "an old IP names nothing");
        assert_eq!(t.by_ip.get("10.96.0.11"), Some(&echo));
        assert!(t.set(&echo, None));
        assert!(t.by_ip.is_empty() && t.services.is_empty());
    }
}
