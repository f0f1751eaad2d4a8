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

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use isthmus_core::naming::ServiceKey;
use isthmus_proto::{ConfigSnapshot, Service, WatchScope};
use tokio::sync::{Notify, watch};

use crate::shared::Shared;

/// The most subscriptions one config stream may hold.
pub const MAX_SUBSCRIPTIONS: usize = 10_000;

/// The service table as of one rebuild.
#[derive(Default)]
pub(crate) struct Published {
    /// The `Shared::version` it was built from.
    pub source: u64,
    /// Every service (sorted by key), and the cluster-wide fields.
    pub snapshot: ConfigSnapshot,
    /// ClusterSet IP to service, for `ip:` subscriptions.
    by_ip: HashMap<String, ServiceKey>,
}

impl Published {
    pub fn service(&self, key: &ServiceKey) -> Option<&Service> {
        isthmus_core::delta::find(&self.snapshot, &key.namespace, &key.name)
    }
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
    subs: Mutex<Subs>,
}

impl Default for Hub {
    fn default() -> Self {
        Self {
            current: watch::channel(Arc::new(Published::default())).0,
            subs: Mutex::new(Subs::default()),
        }
    }
}

impl Hub {
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
        let current = self.current.borrow().clone();
        let mut keys = Vec::new();
        for item in items {
            let key = match item.strip_prefix("ip:") {
                Some(ip) => current.by_ip.get(ip).cloned(),
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

/// Rebuild and publish the service table after every change, until shutdown.
pub(crate) async fn publisher(shared: Arc<Shared>) {
    let mut version = shared.version.subscribe();
    let mut workloads: Vec<String> = Vec::new();
    loop {
        let source = *version.borrow_and_update();
        let started = std::time::Instant::now();
        let snapshot = shared.snapshot();
        let before = shared.hub.current.borrow().clone();
        let d = isthmus_core::delta::diff(&before.snapshot, &snapshot);
        let mut keys: Vec<ServiceKey> = d
            .services
            .iter()
            .map(|s| ServiceKey::new(&s.namespace, &s.name))
            .collect();
        keys.extend(d.removed.iter().filter_map(|k| ServiceKey::parse(k).ok()));
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
        let revoked = workloads.iter().any(|w| !now.contains(w));
        workloads = now;
        let by_ip = snapshot
            .services
            .iter()
            .flat_map(|s| {
                s.clusterset_ips
                    .iter()
                    .map(|ip| (ip.clone(), ServiceKey::new(&s.namespace, &s.name)))
            })
            .collect();
        shared.hub.current.send_replace(Arc::new(Published {
            source,
            snapshot,
            by_ip,
        }));
        shared.hub.notify(&keys, d.cluster_changed || revoked);
        shared.metrics.config_rebuilds.inc();
        shared.metrics.config_rebuild_seconds.inc_by(started.elapsed().as_secs_f64());
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            r = version.changed() => if r.is_err() { return },
        }
    }
}
