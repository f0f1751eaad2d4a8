//! Whether a peer cluster may open a stream to a service here (pure, so
//! every rule is unit-tested): only a linked peer, only an exported
//! service, only on the port it serves, and only if it has endpoints.

use isthmus_core::naming::ServiceKey;
use isthmus_core::tunnel::{RefuseCode, TunnelRequest, TunnelResponse};
use isthmus_proto::ConfigSnapshot;

/// If `peer` may open a stream to `req`'s target in `cluster`, the local
/// sidecar addresses that serve it; else the refusal to send back.
pub fn authorize(
    snap: &ConfigSnapshot,
    cluster: &str,
    peer: &str,
    req: &TunnelRequest,
) -> Result<Vec<String>, TunnelResponse> {
    let refuse = TunnelResponse::refused;
    if !snap.peers.iter().any(|p| p.cluster == peer) {
        return Err(refuse(
            RefuseCode::UnknownPeer,
            format!("cluster {peer} is not linked with cluster {cluster}"),
        ));
    }
    if req.cluster != cluster {
        return Err(refuse(
            RefuseCode::BadRequest,
            format!("this is the gateway of cluster {cluster}, not {}", req.cluster),
        ));
    }
    let key = ServiceKey::new(&req.namespace, &req.service);
    let svc = snap
        .services
        .iter()
        .find(|s| s.namespace == req.namespace && s.name == req.service && s.exported)
        .ok_or_else(|| {
            refuse(
                RefuseCode::NotExported,
                format!("service {key} is not exported by cluster {cluster}"),
            )
        })?;
    if svc.port != u32::from(req.port) {
        return Err(refuse(
            RefuseCode::PortMismatch,
            format!(
                "service {key} in cluster {cluster} serves port {}, not {}",
                svc.port, req.port
            ),
        ));
    }
    let addrs: Vec<String> = svc
        .backends
        .iter()
        .filter(|b| b.cluster == cluster)
        .flat_map(|b| b.addresses.iter().cloned())
        .collect();
    if addrs.is_empty() {
        return Err(refuse(
            RefuseCode::NoEndpoints,
            format!("service {key} has no endpoints in cluster {cluster}"),
        ));
    }
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_proto::{Backend, Peer, Service};

    fn snap() -> ConfigSnapshot {
        ConfigSnapshot {
            cluster: "east".into(),
            peers: vec![Peer {
                cluster: "west".into(),
                trust_domain: "west.mesh".into(),
                gateway_addr: "x:1".into(),
            }],
            services: vec![
                Service {
                    namespace: "demo".into(),
                    name: "echo".into(),
                    port: 8080,
                    exported: true,
                    conditions: vec![],
                    policy: None,
                    clusterset_ips: vec![],
                    backends: vec![Backend {
                        cluster: "east".into(),
                        addresses: vec!["127.0.1.10:1".into()],
                        identities: vec![],
                        healthy_endpoints: 1,
                    }],
                },
                Service {
                    namespace: "demo".into(),
                    name: "secret".into(),
                    port: 8080,
                    exported: false,
                    conditions: vec![],
                    policy: None,
                    clusterset_ips: vec![],
                    backends: vec![Backend {
                        cluster: "east".into(),
                        addresses: vec!["127.0.1.11:1".into()],
                        identities: vec![],
                        healthy_endpoints: 1,
                    }],
                },
            ],
            ..Default::default()
        }
    }

    fn req(service: &str, port: u16) -> TunnelRequest {
        TunnelRequest {
            cluster: "east".into(),
            namespace: "demo".into(),
            service: service.into(),
            port,
            source_cluster: "west".into(),
            traceparent: None,
        }
    }

    fn code(r: Result<Vec<String>, TunnelResponse>) -> RefuseCode {
        match r {
            Err(TunnelResponse::Refused { code, .. }) => code,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn authorizes_only_exported_services_on_their_port_for_linked_peers() {
        let s = snap();
        assert_eq!(
            authorize(&s, "east", "west", &req("echo", 8080)).unwrap(),
            ["127.0.1.10:1"]
        );
        assert_eq!(
            code(authorize(&s, "east", "west", &req("secret", 8080))),
            RefuseCode::NotExported
        );
        assert_eq!(
            code(authorize(&s, "east", "west", &req("nope", 8080))),
            RefuseCode::NotExported
        );
        assert_eq!(
            code(authorize(&s, "east", "west", &req("echo", 9999))),
            RefuseCode::PortMismatch
        );
        assert_eq!(
            code(authorize(&s, "east", "north", &req("echo", 8080))),
            RefuseCode::UnknownPeer
        );
        let mut other = req("echo", 8080);
        other.cluster = "north".into();
        assert_eq!(code(authorize(&s, "east", "west", &other)), RefuseCode::BadRequest);
        let mut empty = snap();
        empty.services[0].backends[0].addresses.clear();
        assert_eq!(
            code(authorize(&empty, "east", "west", &req("echo", 8080))),
            RefuseCode::NoEndpoints
        );
    }
}
