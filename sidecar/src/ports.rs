//! Service ports: with DNS on, the sidecar listens on its outbound address
//! at every port a known service serves, so a client that resolved
//! `echo.demo.svc.clusterset.local` to that address dials it unchanged.
//!
//! Each connection is HTTP (routed per request by its Host, like the proxy
//! port) or opaque TCP (routed by port, carried as is inside an end-to-end
//! mTLS session), as declared with `--opaque-port` or else detected.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use isthmus_core::naming::ServiceName;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::Sidecar;
use crate::detect::{self, Protocol};
use crate::error::ProxyError;
use crate::metrics::{Direction, RouteLabels, TcpOutcome};

/// How long a client may stay silent before its connection is taken for a
/// server-first protocol and carried opaque.
pub const DETECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Keep a listener on `ip:<port>` for each port the known services serve,
/// opening and closing them as the configuration changes.
pub(crate) async fn follow(sc: Arc<Sidecar>, ip: IpAddr, stop: CancellationToken) {
    let mut rx = sc.agent.config.clone();
    let mut open: HashMap<u16, CancellationToken> = HashMap::new();
    let mut failed: Vec<u16> = Vec::new();
    loop {
        let want: Vec<u16> = {
            let snap = rx.borrow_and_update();
            let mut ports: Vec<u16> = snap
                .services
                .iter()
                .filter_map(|s| u16::try_from(s.port).ok())
                .collect();
            ports.sort_unstable();
            ports.dedup();
            ports
        };
        open.retain(|port, token| {
            let keep = want.contains(port);
            if !keep {
                token.cancel();
                tracing::info!(port, "no service serves this port any more; its listener is closed");
            }
            keep
        });
        for port in want {
            if open.contains_key(&port) {
                continue;
            }
            match TcpListener::bind(SocketAddr::new(ip, port)).await {
                Ok(listener) => {
                    tracing::info!(addr = %SocketAddr::new(ip, port), "listening for a service port");
                    failed.retain(|p| *p != port);
                    let token = stop.child_token();
                    tokio::spawn(serve_port(sc.clone(), listener, port, token.clone()));
                    open.insert(port, token);
                }
                Err(e) if !failed.contains(&port) => {
                    // Said once; tried again at the next change.
                    tracing::warn!(addr = %SocketAddr::new(ip, port), error = %e, "cannot listen for a service port");
                    failed.push(port);
                }
                Err(_) => {}
            }
        }
        // Said tried (bound or not): DNS answers waiting on a port go on.
        let tried: std::collections::BTreeSet<u16> = open.keys().chain(failed.iter()).copied().collect();
        sc.learned.ports_tried.send_if_modified(|t| {
            let changed = *t != tried;
            *t = tried;
            changed
        });
        tokio::select! {
            _ = stop.cancelled() => return,
            r = rx.changed() => if r.is_err() { return },
        }
    }
}

async fn serve_port(sc: Arc<Sidecar>, listener: TcpListener, port: u16, stop: CancellationToken) {
    while let Some((tcp, _)) = isthmus_core::net::accept(&listener, &stop).await {
        let Some(slot) = sc.limits.admit(Direction::Outbound, &sc.metrics) else {
            continue;
        };
        tokio::spawn(carry(sc.clone(), tcp, port, None, slot));
    }
}

/// One client connection to a service port: HTTP (routed per request by
/// its Host) or opaque TCP to `name` (else the service on `port`), as
/// declared with `--opaque-port` or else detected.
pub(crate) async fn carry(
    sc: Arc<Sidecar>,
    tcp: TcpStream,
    port: u16,
    name: Option<ServiceName>,
    slot: tokio::sync::OwnedSemaphorePermit,
) {
    let _ = tcp.set_nodelay(true);
    let protocol = if sc.cfg.opaque_ports.contains(&port) {
        Protocol::Opaque
    } else {
        match detect::detect(&tcp, DETECT_TIMEOUT).await {
            Some(p) => p,
            None => return,
        }
    };
    match protocol {
        Protocol::Http => crate::outbound::serve_http(sc, tcp, slot).await,
        Protocol::Opaque => {
            let _slot = slot;
            if let Err(e) = opaque(&sc, tcp, port, name).await {
                tracing::info!(port, error = %e, "opaque connection refused");
            }
        }
    }
}

/// Carry one opaque TCP connection to `name` (if known: its virtual IP
/// said it), else to the service on `port`.
pub(crate) async fn opaque(
    sc: &Arc<Sidecar>,
    mut client: TcpStream,
    port: u16,
    name: Option<ServiceName>,
) -> Result<(), ProxyError> {
    let _open = sc.metrics.open(Direction::Outbound);
    let mut route = RouteLabels {
        direction: Direction::Outbound,
        source_cluster: sc.agent.cluster.clone(),
        destination_cluster: "unknown".into(),
        destination_service: "unknown".into(),
    };
    // Weights apply per connection for opaque TCP.
    let name = match name {
        Some(n) => Ok(n),
        None => crate::route::by_port(&sc.agent.config.borrow(), port),
    };
    let target = name.map_err(ProxyError::from).and_then(|name: ServiceName| {
        route.destination_service = name.key().to_string();
        sc.route(&name, Some(port), None, &[], &mut route)
            .map_err(ProxyError::from)
    });
    let target = match target {
        Ok(t) => t,
        Err(e) => {
            sc.metrics.tcp(&route, TcpOutcome::NoRoute);
            return Err(e);
        }
    };
    let mut upstream = match crate::pool::connect_tls(&sc.agent, &target, isthmus_core::tls::ALPN_OPAQUE).await {
        Ok(s) => s,
        Err(e) => {
            let outcome = if matches!(e, ProxyError::Refused { .. }) {
                TcpOutcome::Refused
            } else {
                TcpOutcome::ConnectFailed
            };
            sc.metrics.tcp(&route, outcome);
            return Err(e);
        }
    };
    sc.metrics.tcp(&route, TcpOutcome::Ok);
    let copied = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    let (sent, received) = copied.unwrap_or((0, 0));
    sc.metrics.bytes(&route, sent, received);
    Ok(())
}
