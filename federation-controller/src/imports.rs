//! What this cluster accepts of a linked peer's export list (pure
//! functions): whole lists and deltas applied, sanitized, held to the
//! per-peer limits, and stamped with when this cluster first saw each
//! export. `snapshot.rs` builds config from what is accepted here.

use std::collections::BTreeMap;

use isthmus_core::naming::ServiceKey;
use isthmus_proto::{ExportList, ExportedService};

/// Imports received from one peer.
#[derive(Clone, Debug, Default)]
pub struct PeerImports {
    /// The peer's export list as accepted: sanitized, within the limits,
    /// and each `exported_unix` the time this cluster first saw that
    /// export (never the peer's clock, which would let it claim to be
    /// oldest and win every port conflict).
    pub services: Vec<ExportedService>,
    /// False once the lease has run out without a heartbeat.
    pub live: bool,
    /// Why the peer's last export list was refused (over a limit), if it
    /// was; the list before it stays.
    pub problem: Option<ImportProblem>,
    /// The peer's list as it sent it (whole, then deltas applied), before
    /// sanitizing and limits: what its next delta applies to.
    pub received: Vec<ExportedService>,
}

/// The longest list `apply_exports` builds: past the limit a list is
/// refused anyway; this bounds what a peer's deltas can make us hold.
const MAX_RECEIVED: usize = 2 * MAX_IMPORTED_SERVICES;

fn export_key(e: &ExportedService) -> (&str, &str) {
    (e.namespace.as_str(), e.name.as_str())
}

/// The delta from export list `before` to `after` (both sorted by key, as
/// `exports` builds them).
pub fn export_delta(before: &[ExportedService], after: &[ExportedService]) -> ExportList {
    let old: BTreeMap<(&str, &str), &ExportedService> = before.iter().map(|e| (export_key(e), e)).collect();
    let new: BTreeMap<(&str, &str), &ExportedService> = after.iter().map(|e| (export_key(e), e)).collect();
    ExportList {
        services: after
            .iter()
            .filter(|e| old.get(&export_key(e)) != Some(e))
            .cloned()
            .collect(),
        delta: true,
        withdrawn: before
            .iter()
            .filter(|e| !new.contains_key(&export_key(e)))
            .map(|e| ServiceKey::new(&e.namespace, &e.name).to_string())
            .collect(),
    }
}

/// The services whose export differs between `old` and `new`.
pub fn changed_keys(old: &[ExportedService], new: &[ExportedService]) -> Vec<ServiceKey> {
    let before: BTreeMap<(&str, &str), &ExportedService> = old.iter().map(|e| (export_key(e), e)).collect();
    let after: BTreeMap<(&str, &str), &ExportedService> = new.iter().map(|e| (export_key(e), e)).collect();
    let mut keys: Vec<ServiceKey> = after
        .iter()
        .filter(|(k, e)| before.get(*k) != Some(*e))
        .chain(before.iter().filter(|(k, _)| !after.contains_key(*k)))
        .map(|((ns, name), _)| ServiceKey::new(*ns, *name))
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

fn by_export_key(e: &ExportedService, ns: &str, name: &str) -> std::cmp::Ordering {
    (e.namespace.as_str(), e.name.as_str()).cmp(&(ns, name))
}

/// A peer's accepted export of `key` (`imports` is sorted by key).
pub fn find_import<'a>(imports: &'a [ExportedService], key: &ServiceKey) -> Option<&'a ExportedService> {
    imports
        .binary_search_by(|x| by_export_key(x, &key.namespace, &key.name))
        .ok()
        .map(|i| &imports[i])
}

/// Put `e` in `list` (sorted by key) in place of its key's entry.
fn upsert(list: &mut Vec<ExportedService>, e: ExportedService) {
    match list.binary_search_by(|x| by_export_key(x, &e.namespace, &e.name)) {
        Ok(i) => list[i] = e,
        Err(i) => list.insert(i, e),
    }
}

fn remove_key(list: &mut Vec<ExportedService>, ns: &str, name: &str) -> Option<ExportedService> {
    let i = list.binary_search_by(|x| by_export_key(x, ns, name)).ok()?;
    Some(list.remove(i))
}

/// `list` with the entries of `keys` replaced by `fresh` (the entries those
/// keys have now), and the delta that makes: O(keys · log list).
pub fn patch_exports(
    list: &[ExportedService],
    keys: &std::collections::BTreeSet<ServiceKey>,
    fresh: Vec<ExportedService>,
) -> (Vec<ExportedService>, ExportList) {
    let mut next = list.to_vec();
    let mut delta = ExportList {
        delta: true,
        ..Default::default()
    };
    for key in keys {
        let now = fresh
            .iter()
            .find(|e| e.namespace == key.namespace && e.name == key.name);
        match now {
            Some(e) => {
                if find_import(&next, key) != Some(e) {
                    upsert(&mut next, e.clone());
                    delta.services.push(e.clone());
                }
            }
            None => {
                if remove_key(&mut next, &key.namespace, &key.name).is_some() {
                    delta.withdrawn.push(key.to_string());
                }
            }
        }
    }
    (next, delta)
}

/// Take in a peer's export list (whole, or a delta on the last one): what
/// it sent is kept as sent (`received`, what its next delta applies to),
/// and what is accepted from it (`services`: sanitized, within the
/// limits, each stamped with when this cluster first saw it) follows.
/// Returns the services whose import changed; over a limit, the reason,
/// and the accepted list stays as it was. A delta costs what it carries;
/// only a whole list, or a delta after a refusal, is checked whole.
pub fn accept_exports(
    imports: &mut PeerImports,
    peer_trust_domain: &str,
    list: ExportList,
    now: i64,
) -> Result<Vec<ServiceKey>, ImportProblem> {
    if !list.delta {
        let mut received = list.services;
        received.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        received.dedup_by(|a, b| a.namespace == b.namespace && a.name == b.name);
        imports.received = received;
        return accept_whole(imports, peer_trust_domain, now);
    }
    // Withdrawn keys are the peer's text: one that is no valid key names
    // nothing held.
    let withdrawn: Vec<ServiceKey> = list
        .withdrawn
        .iter()
        .filter_map(|k| ServiceKey::parse(k).ok())
        .collect();
    for key in &withdrawn {
        remove_key(&mut imports.received, &key.namespace, &key.name);
    }
    for e in &list.services {
        let known = imports
            .received
            .binary_search_by(|x| by_export_key(x, &e.namespace, &e.name))
            .is_ok();
        if known || imports.received.len() < MAX_RECEIVED {
            upsert(&mut imports.received, e.clone());
        }
    }
    if imports.problem.is_some() {
        return accept_whole(imports, peer_trust_domain, now);
    }
    // The limits, checked on what the delta brings before anything moves:
    // each entry's own, and the count it leaves.
    let sanitized: Vec<(String, String, Option<ExportedService>)> = list
        .services
        .into_iter()
        .map(|e| {
            let (ns, name) = (e.namespace.clone(), e.name.clone());
            (ns, name, sanitize_imports(peer_trust_domain, vec![e]).pop())
        })
        .collect();
    let fresh: Vec<ExportedService> = sanitized.iter().filter_map(|(_, _, e)| e.clone()).collect();
    let held = |ns: &str, name: &str| {
        imports
            .services
            .binary_search_by(|x| by_export_key(x, ns, name))
            .is_ok()
    };
    let gone = withdrawn.iter().filter(|k| held(&k.namespace, &k.name)).count();
    let added = fresh.iter().filter(|e| !held(&e.namespace, &e.name)).count();
    if check_limits(&fresh).is_err() || (imports.services.len() + added).saturating_sub(gone) > MAX_IMPORTED_SERVICES {
        return accept_whole(imports, peer_trust_domain, now);
    }
    let next = &mut imports.services;
    let mut keys = Vec::new();
    for key in withdrawn {
        if remove_key(next, &key.namespace, &key.name).is_some() {
            keys.push(key);
        }
    }
    for (ns, name, valid) in sanitized {
        let at = next.binary_search_by(|x| by_export_key(x, &ns, &name));
        let Some(e) = valid else {
            // Sanitizing dropped it: no import now.
            if remove_key(next, &ns, &name).is_some() {
                keys.push(ServiceKey::new(ns, name));
            }
            continue;
        };
        let e = ExportedService {
            exported_unix: at.map(|i| next[i].exported_unix).unwrap_or(now),
            ..e
        };
        if at.is_ok_and(|i| next[i] == e) {
            continue;
        }
        upsert(next, e);
        keys.push(ServiceKey::new(ns, name));
    }
    keys.sort();
    keys.dedup();
    Ok(keys)
}

/// Accept the whole of what the peer sent, or refuse it over a limit.
fn accept_whole(
    imports: &mut PeerImports,
    peer_trust_domain: &str,
    now: i64,
) -> Result<Vec<ServiceKey>, ImportProblem> {
    let services = sanitize_imports(peer_trust_domain, imports.received.clone());
    check_limits(&services)?;
    let services = first_seen(&imports.services, services, now);
    let keys = changed_keys(&imports.services, &services);
    imports.services = services;
    Ok(keys)
}

/// The most services one peer may export to this cluster.
pub const MAX_IMPORTED_SERVICES: usize = 10_000;
/// The most distinct identities one imported service may claim.
pub const MAX_IMPORTED_IDENTITIES: usize = 32;
/// The most endpoints one imported service may count (the count only
/// weighs failover; its endpoints stay behind the peer's gateway).
pub const MAX_IMPORTED_ENDPOINTS: u32 = 100_000;

/// Why a peer's export list was refused whole (its previous list is kept).
/// The text starts with the reason the link and its condition show.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ImportProblem {
    #[error(
        "TooManyServices: the peer exports {count} services, over the limit of {MAX_IMPORTED_SERVICES}; its previous list is kept"
    )]
    Services { count: usize },
    #[error(
        "TooManyIdentities: {service} claims {count} identities, over the limit of {MAX_IMPORTED_IDENTITIES}; the previous list is kept"
    )]
    Identities { service: ServiceKey, count: usize },
    #[error(
        "TooManyEndpoints: {service} counts {count} endpoints, over the limit of {MAX_IMPORTED_ENDPOINTS}; the previous list is kept"
    )]
    Endpoints { service: ServiceKey, count: u32 },
}

impl ImportProblem {
    /// Every reason, as the text of a problem starts.
    pub const REASONS: [&'static str; 3] = ["TooManyServices", "TooManyIdentities", "TooManyEndpoints"];

    pub fn reason(&self) -> &'static str {
        match self {
            ImportProblem::Services { .. } => Self::REASONS[0],
            ImportProblem::Identities { .. } => Self::REASONS[1],
            ImportProblem::Endpoints { .. } => Self::REASONS[2],
        }
    }
}

/// Whether a peer's (sanitized) export list is within the limits, and if
/// not, why.
pub fn check_limits(services: &[ExportedService]) -> Result<(), ImportProblem> {
    if services.len() > MAX_IMPORTED_SERVICES {
        return Err(ImportProblem::Services { count: services.len() });
    }
    let key = |e: &ExportedService| ServiceKey::new(&e.namespace, &e.name);
    if let Some(e) = services.iter().find(|e| e.identities.len() > MAX_IMPORTED_IDENTITIES) {
        return Err(ImportProblem::Identities {
            service: key(e),
            count: e.identities.len(),
        });
    }
    if let Some(e) = services.iter().find(|e| e.healthy_endpoints > MAX_IMPORTED_ENDPOINTS) {
        return Err(ImportProblem::Endpoints {
            service: key(e),
            count: e.healthy_endpoints,
        });
    }
    Ok(())
}

/// Stamp each export with when this cluster first saw it: kept from
/// `before` for exports it already had, `now` for new ones.
pub fn first_seen(before: &[ExportedService], mut services: Vec<ExportedService>, now: i64) -> Vec<ExportedService> {
    let seen: BTreeMap<(&str, &str), i64> = before
        .iter()
        .map(|e| ((e.namespace.as_str(), e.name.as_str()), e.exported_unix))
        .collect();
    for e in &mut services {
        e.exported_unix = seen
            .get(&(e.namespace.as_str(), e.name.as_str()))
            .copied()
            .unwrap_or(now);
    }
    services
}

/// The part of a peer's export list that can be trusted: valid names and
/// ports, and only identities of the peer's own trust domain (a peer cannot
/// vouch for another cluster's workloads).
pub fn sanitize_imports(peer_trust_domain: &str, services: Vec<ExportedService>) -> Vec<ExportedService> {
    services
        .into_iter()
        .filter(|e| {
            let ok = isthmus_core::identity::validate_name(&e.namespace).is_ok()
                && isthmus_core::identity::validate_name(&e.name).is_ok()
                && (1..=u32::from(u16::MAX)).contains(&e.port);
            if !ok {
                tracing::warn!(namespace = %e.namespace, name = %e.name, port = e.port, "ignoring invalid import");
            }
            ok
        })
        .map(|mut e| {
            e.identities.retain(|id| {
                isthmus_core::identity::SpiffeId::parse(id).is_ok_and(|id| id.trust_domain == peer_trust_domain)
            });
            e
        })
        .collect()
}

/// An export of `demo/<name>` by cluster west (for tests here and in
/// `snapshot.rs`).
#[cfg(test)]
pub(crate) fn imported(name: &str, port: u32, since: i64) -> ExportedService {
    ExportedService {
        namespace: "demo".into(),
        name: name.into(),
        port,
        identities: vec![format!("spiffe://west.mesh/ns/demo/sa/{name}")],
        healthy_endpoints: 1,
        exported_unix: since,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export(name: &str, endpoints: u32) -> ExportedService {
        ExportedService {
            namespace: "demo".into(),
            name: name.into(),
            port: 8080,
            healthy_endpoints: endpoints,
            ..Default::default()
        }
    }

    /// A peer sends its list whole once, then only what changed; applying
    /// the deltas rebuilds the list exactly.
    #[test]
    fn export_deltas_carry_the_change_only() {
        let before = vec![export("a", 1), export("b", 1), export("c", 1)];
        let after = vec![export("b", 2), export("c", 1), export("d", 1)];
        let d = export_delta(&before, &after);
        assert!(d.delta);
        let names: Vec<&str> = d.services.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["b", "d"]);
        assert_eq!(d.withdrawn, ["demo/a"]);
        let whole = ExportList {
            services: before.clone(),
            ..Default::default()
        };
        let mut imports = PeerImports {
            received: vec![export("stale", 9)],
            ..Default::default()
        };
        let keys = accept_exports(&mut imports, "east.mesh", whole, 5).unwrap();
        assert_eq!(imports.received, before);
        assert_eq!(keys.len(), 3);
        let keys = accept_exports(&mut imports, "east.mesh", d, 9).unwrap();
        assert_eq!(imports.received, after);
        let names: Vec<&str> = keys.iter().map(|k| k.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "d"]);
        // First seen: kept for b, now for d.
        let seen: Vec<(&str, i64)> = imports
            .services
            .iter()
            .map(|e| (e.name.as_str(), e.exported_unix))
            .collect();
        assert_eq!(seen, [("b", 5), ("c", 5), ("d", 9)]);
        // The same delta again changes nothing.
        let again = export_delta(&before, &after);
        assert_eq!(accept_exports(&mut imports, "east.mesh", again, 11).unwrap(), vec![]);
        // Deltas cannot grow what is held without bound, and a delta over
        // the limit is refused whole.
        let flood = ExportList {
            services: (0..3 * MAX_IMPORTED_SERVICES)
                .map(|i| export(&format!("s{i}"), 1))
                .collect(),
            delta: true,
            withdrawn: vec![],
        };
        assert!(accept_exports(&mut imports, "east.mesh", flood, 12).is_err());
        assert_eq!(imports.received.len(), MAX_RECEIVED);
        assert_eq!(imports.services.len(), 3);
    }

    #[test]
    fn export_lists_over_the_limits_are_refused() {
        let many: Vec<ExportedService> = (0..=MAX_IMPORTED_SERVICES)
            .map(|i| imported(&format!("s{i}"), 80, 1))
            .collect();
        assert!(check_limits(&many[1..]).is_ok());
        assert!(
            check_limits(&many)
                .unwrap_err()
                .to_string()
                .starts_with("TooManyServices")
        );
        let mut ids = imported("echo", 80, 1);
        ids.identities = (0..=MAX_IMPORTED_IDENTITIES)
            .map(|i| format!("spiffe://west.mesh/ns/demo/sa/s{i}"))
            .collect();
        assert!(check_limits(&[ids]).unwrap_err().reason() == "TooManyIdentities");
        let mut eps = imported("echo", 80, 1);
        eps.healthy_endpoints = MAX_IMPORTED_ENDPOINTS + 1;
        assert!(check_limits(&[eps]).unwrap_err().reason() == "TooManyEndpoints");
    }

    #[test]
    fn imports_are_sanitized() {
        let mut bad_port = imported("a", 70000, 1);
        bad_port.name = "a".into();
        let mut bad_name = imported("b", 80, 1);
        bad_name.name = "B!".into();
        let mut foreign = imported("c", 80, 1);
        foreign.identities.push("spiffe://east.mesh/ns/demo/sa/c".into());
        let kept = sanitize_imports("west.mesh", vec![bad_port, bad_name, foreign]);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].identities, ["spiffe://west.mesh/ns/demo/sa/c"]);
    }
}
