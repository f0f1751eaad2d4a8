//! Transparent mode (`--transparent`): the workload's TCP arrives at the
//! outbound port redirected (`redirect.rs` rules), and where each
//! connection was going (`SO_ORIGINAL_DST`) says what to do with it:
//!
//! - to the outbound port itself: the app uses the sidecar as its HTTP
//!   proxy, as without redirection;
//! - to a service's virtual IP (what the sidecar's DNS answered) or
//!   ClusterSet IP (Kubernetes): the mesh, HTTP routed per request by its
//!   Host, or opaque TCP to that service;
//! - anywhere else: passed through to where it was going, untouched (the
//!   sidecar's own connection is not redirected again, by its user).

use std::net::SocketAddr;
use std::sync::Arc;

use isthmus_core::naming::ServiceName;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::Sidecar;
use crate::metrics::{Direction, RouteLabels, TcpOutcome};

/// What to do with one redirected connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dest {
    /// Sent to the outbound port on purpose: the HTTP proxy.
    Proxy,
    Mesh {
        name: ServiceName,
        port: u16,
    },
    Passthrough(SocketAddr),
}

/// Decide by the original destination (pure).
pub fn classify(
    original: Option<SocketAddr>,
    listener: SocketAddr,
    service_at: impl Fn(std::net::IpAddr) -> Option<ServiceName>,
) -> Dest {
    match original {
        None => Dest::Proxy,
        Some(o) if o == listener || (o.port() == listener.port() && o.ip().is_loopback()) => Dest::Proxy,
        Some(o) => match service_at(o.ip()) {
            Some(name) => Dest::Mesh { name, port: o.port() },
            None => Dest::Passthrough(o),
        },
    }
}

/// Where a redirected connection was going, if it was redirected.
fn original_dst(tcp: &TcpStream) -> Option<SocketAddr> {
    let sock = socket2::SockRef::from(tcp);
    let addr = match tcp.local_addr().ok()? {
        SocketAddr::V4(_) => sock.original_dst_v4(),
        SocketAddr::V6(_) => sock.original_dst_v6(),
    };
    addr.ok()?.as_socket()
}

pub(crate) async fn serve(sc: Arc<Sidecar>, listener: TcpListener, stop: CancellationToken) {
    let Ok(local) = listener.local_addr() else { return };
    while let Some((tcp, _)) = isthmus_core::net::accept(&listener, &stop).await {
        let Some(slot) = sc.limits.admit(Direction::Outbound, &sc.metrics) else {
            continue;
        };
        let sc = sc.clone();
        tokio::spawn(async move {
            let original = original_dst(&tcp);
            // An address not held yet may be a ClusterSet IP: ask first.
            let learned = match original {
                Some(o) if !o.ip().is_loopback() => sc.service_at_learning(o.ip()).await,
                _ => None,
            };
            let dest = classify(original, local, |_| learned.clone());
            match dest {
                Dest::Proxy => crate::outbound::serve_http(sc, tcp, slot).await,
                Dest::Mesh { name, port } => crate::ports::carry(sc, tcp, port, Some(name), slot).await,
                Dest::Passthrough(to) => {
                    let _slot = slot;
                    passthrough(&sc, tcp, to).await;
                }
            }
        });
    }
}

/// Carry a connection that is not for the mesh to where it was going.
async fn passthrough(sc: &Sidecar, mut client: TcpStream, to: SocketAddr) {
    let _open = sc.metrics.open(Direction::Outbound);
    let route = RouteLabels {
        direction: Direction::Outbound,
        source_cluster: sc.agent.cluster.clone(),
        destination_cluster: "external".into(),
        destination_service: "external".into(),
    };
    match TcpStream::connect(to).await {
        Ok(mut upstream) => {
            sc.metrics.tcp(&route, TcpOutcome::Passthrough);
            let (sent, received) = tokio::io::copy_bidirectional(&mut client, &mut upstream)
                .await
                .unwrap_or((0, 0));
            sc.metrics.bytes(&route, sent, received);
        }
        Err(e) => {
            tracing::debug!(%to, error = %e, "passthrough connection failed");
            sc.metrics.tcp(&route, TcpOutcome::ConnectFailed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo() -> ServiceName {
        ServiceName {
            cluster: None,
            namespace: "demo".into(),
            name: "echo".into(),
        }
    }

    fn lookup(ip: std::net::IpAddr) -> Option<ServiceName> {
        (ip == "240.240.3.4".parse::<std::net::IpAddr>().unwrap()).then(echo)
    }

    #[test]
    fn each_connection_goes_where_its_original_destination_says() {
        let listener: SocketAddr = "127.0.0.1:15001".parse().unwrap();
        assert_eq!(classify(None, listener, lookup), Dest::Proxy, "not redirected");
        assert_eq!(
            classify(Some(listener), listener, lookup),
            Dest::Proxy,
            "dialled on purpose"
        );
        assert_eq!(
            classify(Some("240.240.3.4:8080".parse().unwrap()), listener, lookup),
            Dest::Mesh {
                name: echo(),
                port: 8080
            }
        );
        let out: SocketAddr = "93.184.216.34:443".parse().unwrap();
        assert_eq!(classify(Some(out), listener, lookup), Dest::Passthrough(out));
    }
}
