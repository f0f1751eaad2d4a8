//! Config deltas (sans-IO): what an incremental config stream changed,
//! applied to the config a component holds, and computed between two.
//!
//! A delta carries the services that changed or came into scope, the keys
//! that left it, and the cluster-wide fields only when they changed (see
//! `ConfigSnapshot.delta` in the proto). Services are kept sorted by
//! `namespace/name`, as the controller builds them, so a delta costs
//! O(change · log held), not a rebuild of everything held.

use std::cmp::Ordering;

use isthmus_proto::{ConfigSnapshot, Service};

use crate::naming::ServiceKey;

fn by_key(s: &Service, ns: &str, name: &str) -> Ordering {
    (s.namespace.as_str(), s.name.as_str()).cmp(&(ns, name))
}

/// Apply `update` to `held`: a full snapshot replaces it; a delta edits it.
pub fn apply(held: &mut ConfigSnapshot, update: ConfigSnapshot) {
    if !update.delta {
        *held = ConfigSnapshot {
            delta: false,
            removed: Vec::new(),
            cluster_changed: false,
            answered: Vec::new(),
            ..update
        };
        held.services.sort_by(|a, b| by_key(a, &b.namespace, &b.name));
        return;
    }
    held.version = update.version;
    held.cluster = update.cluster;
    held.trust_domain = update.trust_domain;
    if update.cluster_changed {
        held.bundles = update.bundles;
        held.gateway_tunnel_addr = update.gateway_tunnel_addr;
        held.peers = update.peers;
        held.signing_root = update.signing_root;
    }
    for key in update.removed.iter().filter_map(|k| ServiceKey::parse(k).ok()) {
        if let Ok(i) = held.services.binary_search_by(|s| by_key(s, &key.namespace, &key.name)) {
            held.services.remove(i);
        }
    }
    for svc in update.services {
        match held.services.binary_search_by(|s| by_key(s, &svc.namespace, &svc.name)) {
            Ok(i) => held.services[i] = svc,
            Err(i) => held.services.insert(i, svc),
        }
    }
}

/// The delta that turns `from` into `to` (both sorted by key).
pub fn diff(from: &ConfigSnapshot, to: &ConfigSnapshot) -> ConfigSnapshot {
    let mut services = Vec::new();
    let mut removed = Vec::new();
    let (mut a, mut b) = (from.services.iter().peekable(), to.services.iter().peekable());
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => break,
            (Some(x), Some(y)) => match by_key(x, &y.namespace, &y.name) {
                Ordering::Less => {
                    removed.push(key_of(x));
                    a.next();
                }
                Ordering::Greater => {
                    services.push((*y).clone());
                    b.next();
                }
                Ordering::Equal => {
                    if x != y {
                        services.push((*y).clone());
                    }
                    a.next();
                    b.next();
                }
            },
            (Some(x), None) => {
                removed.push(key_of(x));
                a.next();
            }
            (None, Some(y)) => {
                services.push((*y).clone());
                b.next();
            }
        }
    }
    let cluster_changed = from.bundles != to.bundles
        || from.gateway_tunnel_addr != to.gateway_tunnel_addr
        || from.peers != to.peers
        || from.signing_root != to.signing_root;
    let mut d = message(to, cluster_changed, services, removed);
    d.delta = true;
    d
}

/// A message of `snap`'s cluster with `services` and `removed`: the
/// cluster-wide fields (bundles, gateway, peers, signing root) are carried
/// only when `with_cluster`; the caller sets `delta`, `cluster_changed`
/// and `answered` as its message needs.
pub fn message(
    snap: &ConfigSnapshot,
    with_cluster: bool,
    services: Vec<Service>,
    removed: Vec<String>,
) -> ConfigSnapshot {
    let pick = |s: &String| if with_cluster { s.clone() } else { String::new() };
    ConfigSnapshot {
        version: snap.version,
        cluster: snap.cluster.clone(),
        trust_domain: snap.trust_domain.clone(),
        delta: false,
        cluster_changed: with_cluster,
        bundles: if with_cluster { snap.bundles.clone() } else { vec![] },
        gateway_tunnel_addr: pick(&snap.gateway_tunnel_addr),
        peers: if with_cluster { snap.peers.clone() } else { vec![] },
        signing_root: pick(&snap.signing_root),
        services,
        removed,
        answered: Vec::new(),
    }
}

/// Whether a delta changes nothing (and answers nothing).
pub fn is_empty(d: &ConfigSnapshot) -> bool {
    d.delta && !d.cluster_changed && d.services.is_empty() && d.removed.is_empty() && d.answered.is_empty()
}

fn key_of(s: &Service) -> String {
    ServiceKey::new(&s.namespace, &s.name).to_string()
}

/// Find a held service by key (binary search: `services` is sorted).
pub fn find<'a>(snap: &'a ConfigSnapshot, namespace: &str, name: &str) -> Option<&'a Service> {
    snap.services
        .binary_search_by(|s| by_key(s, namespace, name))
        .ok()
        .map(|i| &snap.services[i])
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_proto::{Peer, TrustBundle};

    fn svc(ns: &str, name: &str, port: u32) -> Service {
        Service {
            namespace: ns.into(),
            name: name.into(),
            port,
            ..Default::default()
        }
    }

    fn snap(services: Vec<Service>) -> ConfigSnapshot {
        ConfigSnapshot {
            version: 1,
            cluster: "east".into(),
            trust_domain: "east.example".into(),
            bundles: vec![TrustBundle {
                trust_domain: "east.example".into(),
                roots_pem: "pem".into(),
            }],
            services,
            ..Default::default()
        }
    }

    #[test]
    fn a_diff_applied_gives_the_target() {
        let from = snap(vec![svc("a", "x", 1), svc("b", "y", 2), svc("c", "z", 3)]);
        let mut to = snap(vec![
            svc("a", "w", 9),
            svc("b", "y", 20),
            svc("c", "z", 3),
            svc("d", "v", 4),
        ]);
        to.version = 7;
        to.peers = vec![Peer {
            cluster: "west".into(),
            ..Default::default()
        }];
        let d = diff(&from, &to);
        assert_eq!(d.removed, vec!["a/x".to_string()]);
        // Unchanged c/z is not sent.
        let names: Vec<&str> = d.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["w", "y", "v"]);
        assert!(d.cluster_changed);
        let mut held = from.clone();
        apply(&mut held, d);
        assert_eq!(held, to);
    }

    #[test]
    fn a_delta_without_cluster_fields_keeps_them() {
        let from = snap(vec![svc("a", "x", 1)]);
        let mut to = from.clone();
        to.services[0].port = 2;
        let d = diff(&from, &to);
        assert!(!d.cluster_changed);
        assert!(d.bundles.is_empty());
        let mut held = from.clone();
        apply(&mut held, d);
        assert_eq!(held.bundles, from.bundles);
        assert_eq!(held.services[0].port, 2);
        assert!(is_empty(&diff(&to, &to)));
    }

    #[test]
    fn a_full_snapshot_replaces_and_sorts() {
        let mut held = snap(vec![svc("a", "x", 1)]);
        apply(&mut held, snap(vec![svc("z", "z", 1), svc("b", "b", 2)]));
        let names: Vec<&str> = held.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["b", "z"]);
        assert!(find(&held, "z", "z").is_some());
        assert!(find(&held, "a", "x").is_none());
    }
}
