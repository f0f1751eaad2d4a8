//! Builds what sidecars, gateways and peers are told (pure functions).

use std::collections::BTreeMap;

use isthmus_core::naming::ServiceKey;
use isthmus_proto::{Backend, ExportList, ExportedService, Service, SidecarRegistration};

use crate::state::State;

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
    pub problem: Option<String>,
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
            .map(|e| format!("{}/{}", e.namespace, e.name))
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
) -> Result<Vec<ServiceKey>, String> {
    if !list.delta {
        let mut received = list.services;
        received.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        received.dedup_by(|a, b| a.namespace == b.namespace && a.name == b.name);
        imports.received = received;
        return accept_whole(imports, peer_trust_domain, now);
    }
    for key in &list.withdrawn {
        if let Some((ns, name)) = key.split_once('/') {
            remove_key(&mut imports.received, ns, name);
        }
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
    let gone = list
        .withdrawn
        .iter()
        .filter_map(|k| k.split_once('/'))
        .filter(|(ns, name)| held(ns, name))
        .count();
    let added = fresh.iter().filter(|e| !held(&e.namespace, &e.name)).count();
    if check_limits(&fresh).is_err() || (imports.services.len() + added).saturating_sub(gone) > MAX_IMPORTED_SERVICES {
        return accept_whole(imports, peer_trust_domain, now);
    }
    let next = &mut imports.services;
    let mut keys = Vec::new();
    for key in &list.withdrawn {
        if let Some((ns, name)) = key.split_once('/')
            && remove_key(next, ns, name).is_some()
        {
            keys.push(ServiceKey::new(ns, name));
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
fn accept_whole(imports: &mut PeerImports, peer_trust_domain: &str, now: i64) -> Result<Vec<ServiceKey>, String> {
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

/// Whether a peer's (sanitized) export list is within the limits, and if
/// not, why, as the link reports it.
pub fn check_limits(services: &[ExportedService]) -> Result<(), String> {
    if services.len() > MAX_IMPORTED_SERVICES {
        return Err(format!(
            "TooManyServices: the peer exports {} services, over the limit of {MAX_IMPORTED_SERVICES}; its previous list is kept",
            services.len()
        ));
    }
    if let Some(e) = services.iter().find(|e| e.identities.len() > MAX_IMPORTED_IDENTITIES) {
        return Err(format!(
            "TooManyIdentities: {}/{} claims {} identities, over the limit of {MAX_IMPORTED_IDENTITIES}; the previous list is kept",
            e.namespace,
            e.name,
            e.identities.len()
        ));
    }
    if let Some(e) = services.iter().find(|e| e.healthy_endpoints > MAX_IMPORTED_ENDPOINTS) {
        return Err(format!(
            "TooManyEndpoints: {}/{} counts {} endpoints, over the limit of {MAX_IMPORTED_ENDPOINTS}; the previous list is kept",
            e.namespace, e.name, e.healthy_endpoints
        ));
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

/// Whether a link accepts a peer's export of `key`: by its scope if it has
/// one; else any service that does not run here, or runs here and is
/// exported from here too (this cluster declared it one service across
/// the cluster set). `local`: whether it runs here, and if so exported.
fn in_scope(scope: &[String], key: &ServiceKey, local: Option<bool>) -> bool {
    if scope.is_empty() {
        return local != Some(false);
    }
    scope
        .iter()
        .filter_map(|p| isthmus_core::naming::ImportPattern::parse(p).ok())
        .any(|p| p.matches(key))
}

/// Services of this cluster from its sidecars' registrations.
fn local_services<'a>(
    regs: impl Iterator<Item = &'a SidecarRegistration>,
) -> BTreeMap<ServiceKey, (u32, Vec<&'a SidecarRegistration>)> {
    let mut out: BTreeMap<ServiceKey, (u32, Vec<&SidecarRegistration>)> = BTreeMap::new();
    for r in regs.filter(|r| !r.service.is_empty()) {
        let e = out
            .entry(ServiceKey::new(&r.namespace, &r.service))
            .or_insert((r.port, Vec::new()));
        e.1.push(r);
    }
    out
}

/// The distinct SPIFFE IDs a service's local endpoints serve with, sorted.
fn identities(eps: &[&SidecarRegistration]) -> Vec<String> {
    let mut ids: Vec<String> = eps.iter().map(|r| r.identity.clone()).collect();
    ids.sort();
    ids.dedup();
    ids
}

/// Every service a sidecar of this cluster can call: local ones and those
/// imported from live peers. Same namespace and name across clusters is one
/// service (KEP-1645). When clusters disagree on the port, a service that
/// runs in this cluster keeps its own port; between imports, the oldest
/// export wins; conflicting backends are left out of the service.
pub fn services<'a>(
    state: &State,
    regs: impl Iterator<Item = &'a SidecarRegistration>,
    imports: &BTreeMap<String, PeerImports>,
) -> Vec<Service> {
    let mut out: BTreeMap<ServiceKey, (Service, i64)> = BTreeMap::new();
    for (key, (port, eps)) in local_services(regs) {
        let mut addresses: Vec<String> = eps.iter().map(|r| r.inbound_addr.clone()).collect();
        addresses.sort();
        let identities = identities(&eps);
        let exported = state.exports.get(&key);
        let svc = Service {
            clusterset_ips: vec![],
            namespace: eps[0].namespace.clone(),
            name: eps[0].service.clone(),
            port,
            exported: exported.is_some(),
            conditions: Vec::new(),
            policy: None,
            backends: vec![Backend {
                cluster: state.cluster.clone(),
                healthy_endpoints: addresses.len() as u32,
                addresses,
                identities,
            }],
        };
        // A service that runs here is defined here: no import can change its
        // port or displace its endpoints.
        out.insert(key, (svc, i64::MIN));
    }
    // Imports grouped by service, then each service's port decided once:
    // the local one if it runs here, else the oldest export's (KEP-1645).
    // Exporters on any other port are left out, and reported. Only what
    // each link's scope accepts is merged: a peer cannot join a service
    // that runs here, unexported, unless imported from that peer.
    let mut by_service: BTreeMap<ServiceKey, Vec<(&String, &ExportedService)>> = BTreeMap::new();
    for (peer, imp) in imports.iter().filter(|(_, i)| i.live) {
        let scope = state.links.get(peer).map(|l| l.imports.as_slice()).unwrap_or_default();
        for e in &imp.services {
            let key = ServiceKey::new(&e.namespace, &e.name);
            if in_scope(scope, &key, out.get(&key).map(|(s, _)| s.exported)) {
                by_service.entry(key).or_default().push((peer, e));
            } else if let Some((svc, _)) = out.get_mut(&key) {
                svc.conditions.push(format!(
                    "NotImported: cluster {peer} exports it too, but it runs in this cluster, unexported, and the \
                     link does not import it from {peer}, so {peer}'s endpoints are left out (`isthmus imports {peer} {key}` merges them)"
                ));
            }
        }
    }
    for (key, exporters) in by_service {
        let (svc, reason) = match out.get_mut(&key) {
            Some((svc, _)) => (svc, "it runs in this cluster on that port".to_string()),
            None => {
                // First seen here, then by name: the same answer on
                // every run, whatever the peers' clocks say.
                let (oldest, e) = *exporters
                    .iter()
                    .min_by_key(|(p, e)| (e.exported_unix, *p))
                    .expect("non-empty");
                let svc = Service {
                    clusterset_ips: vec![],
                    namespace: e.namespace.clone(),
                    name: e.name.clone(),
                    port: e.port,
                    exported: false,
                    backends: Vec::new(),
                    conditions: Vec::new(),
                    policy: None,
                };
                let reason = format!("the oldest export, from {oldest}, sets it (KEP-1645)");
                (&mut out.entry(key).or_insert((svc, e.exported_unix)).0, reason)
            }
        };
        for (peer, e) in exporters {
            if e.port == svc.port {
                svc.backends.push(Backend {
                    cluster: peer.clone(),
                    addresses: Vec::new(),
                    identities: e.identities.clone(),
                    healthy_endpoints: e.healthy_endpoints,
                });
            } else {
                svc.conditions.push(format!(
                    "PortConflict: cluster {peer} exports port {}, but the service uses port {}: {reason}; {peer}'s endpoints are left out",
                    e.port, svc.port
                ));
            }
        }
    }
    out.into_iter()
        .map(|(key, (mut s, _))| {
            s.policy = state.policy(&key);
            s
        })
        .collect()
}

/// What this cluster tells its peers it exports.
pub fn exports<'a>(state: &State, regs: impl Iterator<Item = &'a SidecarRegistration>) -> Vec<ExportedService> {
    let local = local_services(regs);
    state
        .exports
        .iter()
        .filter_map(|(key, rec)| export_entry(rec, local.get(key)))
        .collect()
}

/// The export entries of `keys` only (`regs`: the registrations serving
/// them), for a partial rebuild.
pub fn exports_of<'a>(
    state: &State,
    regs: impl Iterator<Item = &'a SidecarRegistration>,
    keys: &std::collections::BTreeSet<ServiceKey>,
) -> Vec<ExportedService> {
    let local = local_services(regs);
    keys.iter()
        .filter_map(|k| export_entry(state.exports.get(k)?, local.get(k)))
        .collect()
}

/// What peers are told of one export: its port and identities from the
/// endpoints registered here. An export whose workloads are all gone is
/// left out until one registers again; peers keep nothing routable for it.
fn export_entry(
    rec: &crate::state::ExportRecord,
    local: Option<&(u32, Vec<&SidecarRegistration>)>,
) -> Option<ExportedService> {
    let (port, eps) = local?;
    Some(ExportedService {
        namespace: rec.namespace.clone(),
        name: rec.name.clone(),
        port: *port,
        identities: identities(eps),
        healthy_endpoints: eps.len() as u32,
        exported_unix: rec.created_unix,
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{ExportRecord, LinkRecord};

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

    /// A live peer's imports.
    fn live(services: Vec<ExportedService>) -> PeerImports {
        PeerImports {
            services,
            live: true,
            ..Default::default()
        }
    }

    fn names(svcs: &[Service]) -> Vec<&str> {
        svcs.iter().map(|s| s.name.as_str()).collect()
    }

    /// demo/echo exported from this cluster.
    fn export_echo(state: &mut State) {
        state.exports.insert(
            ServiceKey::new("demo", "echo"),
            ExportRecord {
                namespace: "demo".into(),
                name: "echo".into(),
                created_unix: 10,
            },
        );
    }

    /// A link to `peer` with this import scope.
    fn link(state: &mut State, peer: &str, scope: &[&str]) {
        state.links.insert(
            peer.into(),
            LinkRecord {
                cluster: peer.into(),
                trust_domain: format!("{peer}.mesh"),
                roots_pem: String::new(),
                gateway_addr: String::new(),
                dial: None,
                priority: None,
                created_unix: 0,
                imports: scope.iter().map(|s| s.to_string()).collect(),
                unconfirmed: None,
            },
        );
    }

    fn reg(ns: &str, svc: &str, port: u32, addr: &str) -> SidecarRegistration {
        SidecarRegistration {
            namespace: ns.into(),
            service: svc.into(),
            port,
            inbound_addr: addr.into(),
            instance: addr.into(),
            identity: format!("spiffe://east.mesh/ns/{ns}/sa/{svc}"),
            service_account: svc.into(),
        }
    }

    fn imported(name: &str, port: u32, since: i64) -> ExportedService {
        ExportedService {
            namespace: "demo".into(),
            name: name.into(),
            port,
            identities: vec![format!("spiffe://west.mesh/ns/demo/sa/{name}")],
            healthy_endpoints: 1,
            exported_unix: since,
        }
    }

    #[test]
    fn merges_local_and_imported_backends() {
        let mut state = State::new("east", "east.mesh");
        export_echo(&mut state);
        link(&mut state, "west", &["demo/echo", "demo/db"]);
        let regs = [
            reg("demo", "echo", 8080, "127.0.1.10:1"),
            reg("demo", "echo", 8080, "127.0.1.11:1"),
        ];
        let mut imports = BTreeMap::new();
        imports.insert(
            "west".to_string(),
            live(vec![imported("echo", 8080, 5), imported("db", 5432, 5)]),
        );
        imports.insert(
            "north".to_string(),
            PeerImports {
                services: vec![imported("cache", 6379, 5)],
                live: false,
                ..Default::default()
            },
        );

        let svcs = services(&state, regs.iter(), &imports);
        assert_eq!(
            names(&svcs),
            ["db", "echo"],
            "north's lease ran out, so cache is withdrawn"
        );
        let echo = &svcs[1];
        assert!(echo.exported);
        assert_eq!(echo.backends.len(), 2);
        assert_eq!(echo.backends[0].addresses, ["127.0.1.10:1", "127.0.1.11:1"]);
        assert_eq!(echo.backends[1].cluster, "west");

        let ex = exports(&state, regs.iter());
        assert_eq!(ex.len(), 1);
        assert_eq!((ex[0].port, ex[0].healthy_endpoints), (8080, 2));
    }

    #[test]
    fn imports_cannot_displace_a_local_service() {
        // db runs here, unexported; a peer exports db on another port with an
        // ancient timestamp. Local callers keep the local db.
        let state = State::new("east", "east.mesh");
        let regs = [reg("demo", "db", 5432, "127.0.1.10:1")];
        let mut imports = BTreeMap::new();
        imports.insert("west".to_string(), live(vec![imported("db", 5433, 0)]));
        let svcs = services(&state, regs.iter(), &imports);
        assert_eq!(svcs[0].port, 5432);
        assert_eq!(svcs[0].backends.len(), 1);
        assert_eq!(svcs[0].backends[0].cluster, "east");
    }

    #[test]
    fn by_default_a_peer_cannot_join_an_unexported_local_service() {
        let mut state = State::new("east", "east.mesh");
        link(&mut state, "west", &[]);
        let regs = [reg("demo", "echo", 8080, "127.0.1.10:1")];
        let imports = BTreeMap::from([(
            "west".to_string(),
            live(vec![imported("echo", 8080, 1), imported("db", 5432, 1)]),
        )]);
        let svcs = services(&state, regs.iter(), &imports);
        assert_eq!(
            names(&svcs),
            ["db", "echo"],
            "a service that does not run here is imported"
        );
        let echo = &svcs[1];
        assert_eq!(echo.backends.len(), 1, "{echo:?}");
        assert_eq!(echo.backends[0].cluster, "east");
        assert!(
            echo.conditions[0].starts_with("NotImported: cluster west"),
            "{:?}",
            echo.conditions
        );

        // Exported from here too, it is one service across the cluster set.
        export_echo(&mut state);
        let svcs = services(&state, regs.iter(), &imports);
        assert_eq!(svcs[1].backends.len(), 2, "{:?}", svcs[1]);
        state.exports.clear();

        // A scope names what the peer may provide, and nothing else.
        link(&mut state, "west", &["demo/echo"]);
        let svcs = services(&state, regs.iter(), &imports);
        assert_eq!(names(&svcs), ["echo"]);
        assert_eq!(svcs[0].backends.len(), 2);
        assert!(svcs[0].conditions.is_empty(), "{:?}", svcs[0].conditions);
    }

    #[test]
    fn the_oldest_export_is_the_first_one_seen_here() {
        // north claims to have exported echo in 1970; east saw west's first.
        let west = first_seen(&[], vec![imported("echo", 9090, 1_700_000_000)], 100);
        let north = first_seen(&[], vec![imported("echo", 8080, 0)], 200);
        assert_eq!((west[0].exported_unix, north[0].exported_unix), (100, 200));
        // A later list keeps the time first seen, whatever it claims.
        let north = first_seen(&north, vec![imported("echo", 8080, 0)], 300);
        assert_eq!(north[0].exported_unix, 200);
        let imports = BTreeMap::from([("west".to_string(), live(west)), ("north".to_string(), live(north))]);
        let svcs = services(&State::new("east", "east.mesh"), std::iter::empty(), &imports);
        assert_eq!(svcs[0].port, 9090);
        assert_eq!(svcs[0].backends[0].cluster, "west");
    }

    #[test]
    fn export_lists_over_the_limits_are_refused() {
        let many: Vec<ExportedService> = (0..=MAX_IMPORTED_SERVICES)
            .map(|i| imported(&format!("s{i}"), 80, 1))
            .collect();
        assert!(check_limits(&many[1..]).is_ok());
        assert!(check_limits(&many).unwrap_err().starts_with("TooManyServices"));
        let mut ids = imported("echo", 80, 1);
        ids.identities = (0..=MAX_IMPORTED_IDENTITIES)
            .map(|i| format!("spiffe://west.mesh/ns/demo/sa/s{i}"))
            .collect();
        assert!(check_limits(&[ids]).unwrap_err().starts_with("TooManyIdentities"));
        let mut eps = imported("echo", 80, 1);
        eps.healthy_endpoints = MAX_IMPORTED_ENDPOINTS + 1;
        assert!(check_limits(&[eps]).unwrap_err().starts_with("TooManyEndpoints"));
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

    #[test]
    fn port_conflict_oldest_export_wins() {
        // Two peers export echo on different ports: the older export wins.
        let state = State::new("east", "east.mesh");
        let mut imports = BTreeMap::new();
        imports.insert("west".to_string(), live(vec![imported("echo", 9090, 50)]));
        imports.insert("north".to_string(), live(vec![imported("echo", 8080, 100)]));
        let svcs = services(&state, std::iter::empty(), &imports);
        assert_eq!(svcs[0].port, 9090);
        assert_eq!(svcs[0].backends.len(), 1);
        assert_eq!(svcs[0].backends[0].cluster, "west");
        // The loser is reported as a condition of the service.
        assert_eq!(svcs[0].conditions.len(), 1);
        assert!(
            svcs[0].conditions[0]
                .starts_with("PortConflict: cluster north exports port 8080, but the service uses port 9090"),
            "{:?}",
            svcs[0].conditions
        );

        // The winner is decided before anyone is left out: an exporter seen
        // before the oldest one, on the oldest one's port, is kept.
        let mut imports = BTreeMap::new();
        for (peer, port, since) in [("a", 80, 100), ("b", 90, 50), ("c", 80, 10)] {
            imports.insert(peer.to_string(), live(vec![imported("echo", port, since)]));
        }
        let svcs = services(&state, std::iter::empty(), &imports);
        assert_eq!(svcs[0].port, 80);
        let kept: Vec<&str> = svcs[0].backends.iter().map(|b| b.cluster.as_str()).collect();
        assert_eq!(kept, ["a", "c"]);
        assert_eq!(svcs[0].conditions.len(), 1);
        assert!(svcs[0].conditions[0].contains("cluster b exports port 90"));
    }
}
