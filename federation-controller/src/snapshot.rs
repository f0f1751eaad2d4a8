//! Builds what sidecars, gateways and peers are told (pure functions),
//! from the state, the registrations and the imports `imports.rs` accepted.

use std::collections::BTreeMap;

use isthmus_core::naming::ServiceKey;
use isthmus_proto::{Backend, ExportedService, Service, SidecarRegistration};

use crate::imports::PeerImports;
use crate::state::State;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imports::{first_seen, imported};
    use crate::state::{ExportRecord, LinkRecord};

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
