//! Routing decisions for outbound requests (pure).

use isthmus_core::naming::ServiceName;
use isthmus_proto::ConfigSnapshot;

/// Where one request goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub cluster: String,
    /// Direct sidecar addresses (local cluster) or empty (through the gateway).
    pub addresses: Vec<String>,
    /// SPIFFE IDs the serving sidecar may present.
    pub identities: Vec<String>,
    pub namespace: String,
    pub service: String,
    pub port: u16,
}

impl Target {
    pub fn is_local(&self) -> bool {
        !self.addresses.is_empty()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error(
        "service {name} is not known in cluster {cluster}: no local workload serves it and no linked cluster exports it"
    )]
    UnknownService { name: String, cluster: String },
    #[error("service {name} serves port {want}, not {got}")]
    PortMismatch { name: String, want: u32, got: u16 },
    #[error("service {name} has no endpoints in cluster {target}")]
    NoEndpoints { name: String, target: String },
    #[error(
        "service {name} is not available from cluster {target} here (not exported there, or that cluster is not linked)"
    )]
    UnknownCluster { name: String, target: String },
    #[error("no known service serves port {port}")]
    NoServiceOnPort { port: u16 },
    #[error(
        "port {port} is served by several services ({names}): an opaque connection cannot name one, so declare it HTTP or give the services distinct ports"
    )]
    AmbiguousPort { port: u16, names: String },
}

/// The one service serving `port`: what an opaque connection, which names
/// no host, is for.
pub fn by_port(snap: &ConfigSnapshot, port: u16) -> Result<ServiceName, RouteError> {
    let on_port: Vec<_> = snap.services.iter().filter(|s| s.port == u32::from(port)).collect();
    match on_port.as_slice() {
        [] => Err(RouteError::NoServiceOnPort { port }),
        [s] => Ok(ServiceName {
            cluster: None,
            name: s.name.clone(),
            namespace: s.namespace.clone(),
        }),
        many => Err(RouteError::AmbiguousPort {
            port,
            names: many
                .iter()
                .map(|s| format!("{}/{}", s.namespace, s.name))
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// Pick the cluster that serves `name:port`. With no policy yet: the local
/// cluster when it has endpoints, else a linked cluster that exports the
/// service and reports healthy endpoints (`pick` breaks ties among those).
pub fn route(snap: &ConfigSnapshot, name: &ServiceName, port: Option<u16>, pick: usize) -> Result<Target, RouteError> {
    let svc = snap
        .services
        .iter()
        .find(|s| s.namespace == name.namespace && s.name == name.name)
        .ok_or_else(|| RouteError::UnknownService {
            name: name.to_string(),
            cluster: snap.cluster.clone(),
        })?;
    if let Some(p) = port.filter(|p| u32::from(*p) != svc.port) {
        return Err(RouteError::PortMismatch {
            name: name.to_string(),
            want: svc.port,
            got: p,
        });
    }
    let usable = |b: &&isthmus_proto::Backend| {
        if b.cluster == snap.cluster {
            !b.addresses.is_empty()
        } else {
            b.healthy_endpoints > 0
        }
    };
    let backend = match &name.cluster {
        Some(c) => {
            let b = svc
                .backends
                .iter()
                .find(|b| &b.cluster == c)
                .ok_or_else(|| RouteError::UnknownCluster {
                    name: name.to_string(),
                    target: c.clone(),
                })?;
            if !usable(&b) {
                return Err(RouteError::NoEndpoints {
                    name: name.to_string(),
                    target: c.clone(),
                });
            }
            b
        }
        None => match svc.backends.iter().find(|b| b.cluster == snap.cluster).filter(usable) {
            Some(local) => local,
            None => {
                let remote: Vec<_> = svc
                    .backends
                    .iter()
                    .filter(|b| b.cluster != snap.cluster)
                    .filter(usable)
                    .collect();
                if remote.is_empty() {
                    return Err(RouteError::NoEndpoints {
                        name: name.to_string(),
                        target: "any cluster".into(),
                    });
                }
                remote[pick % remote.len()]
            }
        },
    };
    Ok(Target {
        cluster: backend.cluster.clone(),
        addresses: if backend.cluster == snap.cluster {
            backend.addresses.clone()
        } else {
            Vec::new()
        },
        identities: backend.identities.clone(),
        namespace: svc.namespace.clone(),
        service: svc.name.clone(),
        port: svc.port as u16,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_opaque_port_names_its_one_service() {
        let mut s = snap(vec!["127.0.0.1:1".into()]);
        assert_eq!(by_port(&s, 8080).unwrap().key(), "demo/echo");
        assert_eq!(by_port(&s, 9090), Err(RouteError::NoServiceOnPort { port: 9090 }));
        let mut other = s.services[0].clone();
        other.name = "other".into();
        s.services.push(other);
        assert!(matches!(
            by_port(&s, 8080),
            Err(RouteError::AmbiguousPort { port: 8080, .. })
        ));
    }
    use isthmus_proto::{Backend, Service};

    fn snap(local_addrs: Vec<String>) -> ConfigSnapshot {
        ConfigSnapshot {
            cluster: "west".into(),
            services: vec![Service {
                namespace: "demo".into(),
                name: "echo".into(),
                port: 8080,
                exported: false,
                conditions: vec![],
                backends: vec![
                    Backend {
                        cluster: "east".into(),
                        addresses: vec![],
                        identities: vec!["spiffe://east.mesh/ns/demo/sa/echo".into()],
                        healthy_endpoints: 1,
                    },
                    Backend {
                        cluster: "west".into(),
                        healthy_endpoints: local_addrs.len() as u32,
                        addresses: local_addrs,
                        identities: vec!["spiffe://west.mesh/ns/demo/sa/echo".into()],
                    },
                ],
            }],
            ..Default::default()
        }
    }

    fn name(s: &str) -> ServiceName {
        ServiceName::parse(s).unwrap()
    }

    #[test]
    fn prefers_local_then_remote() {
        let t = route(
            &snap(vec!["127.0.2.10:1".into()]),
            &name("echo.demo.svc.clusterset.local"),
            Some(8080),
            0,
        )
        .unwrap();
        assert!(t.is_local());
        assert_eq!(t.cluster, "west");
        let t = route(&snap(vec![]), &name("echo.demo.svc.clusterset.local"), None, 0).unwrap();
        assert_eq!(t.cluster, "east");
        assert!(!t.is_local());
        assert_eq!(t.identities, ["spiffe://east.mesh/ns/demo/sa/echo"]);
    }

    #[test]
    fn cluster_pinned_name() {
        let t = route(
            &snap(vec!["127.0.2.10:1".into()]),
            &name("east.echo.demo.svc.clusterset.local"),
            None,
            0,
        )
        .unwrap();
        assert_eq!(t.cluster, "east");
        assert!(matches!(
            route(&snap(vec![]), &name("north.echo.demo.svc.clusterset.local"), None, 0),
            Err(RouteError::UnknownCluster { .. })
        ));
    }

    #[test]
    fn errors() {
        let s = snap(vec![]);
        assert!(matches!(
            route(&s, &name("nope.demo.svc.clusterset.local"), None, 0),
            Err(RouteError::UnknownService { .. })
        ));
        assert!(matches!(
            route(&s, &name("echo.demo.svc.clusterset.local"), Some(1), 0),
            Err(RouteError::PortMismatch { .. })
        ));
        let mut down = snap(vec![]);
        down.services[0].backends[0].healthy_endpoints = 0;
        assert!(matches!(
            route(&down, &name("echo.demo.svc.clusterset.local"), None, 0),
            Err(RouteError::NoEndpoints { .. })
        ));
    }
}
