//! Streams from peer gateways: accept QUIC only from linked peers' gateway
//! identities, authorize each stream (`authz.rs`), and relay it to a local
//! sidecar that serves the service.

use std::sync::Arc;
use std::time::Duration;

use isthmus_core::identity::SpiffeId;
use isthmus_core::naming::ServiceKey;
use isthmus_core::tls;
use isthmus_core::tunnel::{RefuseCode, TunnelRequest, TunnelResponse};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::counted::Counted;
use crate::metrics::Direction;
use crate::{Gateway, StreamError, authz};

/// How long a peer has to send a stream's header.
pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one local endpoint may take to accept, and all of them: within
/// the caller's answer timeout, so a slow endpoint is reported as such
/// rather than as an unreachable peer.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const UPSTREAM_BUDGET: Duration = Duration::from_secs(2);

/// QUIC handshakes in progress, at most; past this, new connections are
/// refused at once (a linked peer needs one connection, and dials again).
pub const MAX_QUIC_HANDSHAKES: usize = 64;
/// Past this many handshakes in progress, a client whose address is not
/// validated yet is sent a Retry first: a spoofed source address cannot
/// make the gateway hold handshake state, or amplify, under load.
const RETRY_ABOVE: usize = 8;
/// Connections one peer gateway may keep open to this one (it needs one;
/// a reconnect overlaps the old one for a moment).
pub const MAX_CONNECTIONS_PER_PEER: usize = 4;

pub(crate) async fn accept_quic(gw: Arc<Gateway>, stop: CancellationToken) {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_QUIC_HANDSHAKES));
    loop {
        let incoming = tokio::select! {
            _ = stop.cancelled() => return,
            i = gw.endpoint.accept() => match i { Some(i) => i, None => return },
        };
        let busy = MAX_QUIC_HANDSHAKES - handshakes.available_permits();
        if busy >= RETRY_ABOVE && !incoming.remote_address_validated() && incoming.may_retry() {
            let _ = incoming.retry();
            continue;
        }
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            tracing::warn!(remote = %incoming.remote_address(), "too many QUIC handshakes in progress: refusing a connection");
            incoming.refuse();
            continue;
        };
        let gw2 = gw.clone();
        let stop2 = stop.clone();
        tokio::spawn(async move {
            let conn = incoming.await;
            drop(permit);
            match conn {
                Ok(conn) => serve_peer(gw2, conn, stop2, false).await,
                Err(e) => tracing::debug!(error = %e, "QUIC handshake failed"),
            }
        });
    }
}

/// One connection a peer dialed, counted while it lives.
struct PeerConnSlot {
    gw: Arc<Gateway>,
    peer: String,
}

impl PeerConnSlot {
    fn take(gw: &Arc<Gateway>, peer: &str) -> Option<Self> {
        let mut n = gw.inbound_conns.lock().expect("inbound conns lock");
        let count = n.entry(peer.to_string()).or_default();
        if *count >= MAX_CONNECTIONS_PER_PEER {
            return None;
        }
        *count += 1;
        Some(Self {
            gw: gw.clone(),
            peer: peer.to_string(),
        })
    }
}

impl Drop for PeerConnSlot {
    fn drop(&mut self) {
        let mut n = self.gw.inbound_conns.lock().expect("inbound conns lock");
        if let Some(c) = n.get_mut(&self.peer) {
            *c -= 1;
            if *c == 0 {
                n.remove(&self.peer);
            }
        }
    }
}

/// Streams from one peer gateway, on a connection it dialed or (`dialed`)
/// this gateway did.
pub(crate) async fn serve_peer(gw: Arc<Gateway>, conn: quinn::Connection, stop: CancellationToken, dialed: bool) {
    let id = conn
        .peer_identity()
        .and_then(|i| i.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok())
        .and_then(|certs| tls::peer_id(Some(&certs)));
    let peer = id.as_ref().and_then(|id| {
        let snap = gw.agent.config.borrow();
        snap.peers
            .iter()
            .find(|p| p.trust_domain == id.trust_domain && *id == SpiffeId::gateway(&p.trust_domain))
            .map(|p| p.cluster.clone())
    });
    let Some(peer) = peer else {
        tracing::warn!(id = ?id.map(|i| i.to_string()), remote = %conn.remote_address(), "refusing QUIC connection: not a linked peer's gateway");
        conn.close(2u32.into(), b"not a linked peer gateway");
        return;
    };
    let _slot = if dialed {
        None
    } else {
        let Some(slot) = PeerConnSlot::take(&gw, &peer) else {
            tracing::warn!(%peer, limit = MAX_CONNECTIONS_PER_PEER, "refusing QUIC connection: too many from this peer");
            conn.close(3u32.into(), b"too many connections");
            return;
        };
        Some(slot)
    };
    // Every connection with a peer is counted, whichever side dialed it.
    let _open = gw.metrics.peer_connection(&peer);
    if !dialed {
        tracing::info!(%peer, remote = %conn.remote_address(), "QUIC connection from peer gateway");
        crate::peers::adopt(&gw, &peer, conn.clone());
    }
    let mut config = gw.agent.config.clone();
    loop {
        let (send, recv) = tokio::select! {
            _ = stop.cancelled() => return,
            // Unlinked: end the connection, and every tunnel in it, now;
            // refusing only new streams would leave pooled sessions open.
            r = config.changed() => {
                let linked = r.is_ok() && config.borrow_and_update().peers.iter().any(|p| p.cluster == peer);
                if !linked {
                    tracing::warn!(%peer, "peer unlinked: closing its QUIC connection");
                    conn.close(1u32.into(), b"unlinked");
                    return;
                }
                continue;
            }
            s = conn.accept_bi() => match s {
                Ok(s) => s,
                Err(e) => {
                    tracing::info!(%peer, reason = %e, "QUIC connection from peer closed");
                    return;
                }
            },
        };
        let gw2 = gw.clone();
        let peer2 = peer.clone();
        gw.tracker.spawn(async move {
            if let Err(e) = stream(gw2, &peer2, send, recv).await {
                tracing::debug!(peer = %peer2, error = %e, "stream ended with error");
            }
        });
    }
}

/// Authorize a peer's stream and relay it to a local sidecar.
async fn stream(
    gw: Arc<Gateway>,
    peer: &str,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Result<(), StreamError> {
    let req = tokio::time::timeout(HEADER_TIMEOUT, TunnelRequest::read(&mut recv))
        .await
        .map_err(|_| StreamError::HeaderTimeout)??;
    let decision = authz::authorize(&gw.agent.config.borrow(), &gw.cluster, peer, &req);
    let target = match decision {
        Ok(addrs) => connect_upstream(&gw.cluster, &req, &addrs).await,
        Err(r) => Err(r),
    };
    let upstream = match target {
        Ok(s) => s,
        Err(refusal) => {
            gw.metrics.stream(Direction::Inbound, peer, refusal.result());
            tracing::info!(%peer, service = %ServiceKey::new(&req.namespace, &req.service), ?refusal, "stream refused");
            let _ = refusal.write(&mut send).await;
            let _ = send.finish();
            return Ok(());
        }
    };
    let _ = upstream.set_nodelay(true);
    gw.metrics.stream(Direction::Inbound, peer, "ok");
    let _open = gw.metrics.open(Direction::Inbound);
    TunnelResponse::Ok.write(&mut send).await?;
    let (to_peer, from_peer) = gw.metrics.byte_counters(peer);
    let mut stream = Counted::new(tokio::io::join(recv, send), from_peer);
    let mut upstream = Counted::new(upstream, to_peer);
    let _ = tokio::io::copy_bidirectional(&mut stream, &mut upstream).await;
    Ok(())
}

/// A connection to one of `addrs`, tried in turn from a random one, within
/// `UPSTREAM_BUDGET`.
async fn connect_upstream(cluster: &str, req: &TunnelRequest, addrs: &[String]) -> Result<TcpStream, TunnelResponse> {
    let mut last = None;
    let start = rand::random_range(0..addrs.len());
    let deadline = tokio::time::Instant::now() + UPSTREAM_BUDGET;
    for i in 0..addrs.len() {
        let a = &addrs[(start + i) % addrs.len()];
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            break;
        }
        match tokio::time::timeout(left.min(UPSTREAM_CONNECT_TIMEOUT), TcpStream::connect(a)).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => last = Some(format!("{a}: {e}")),
            Err(_) => last = Some(format!("{a}: connect timed out")),
        }
    }
    Err(TunnelResponse::refused(
        RefuseCode::UpstreamConnect,
        format!(
            "no endpoint of {} in cluster {cluster} accepted: {}",
            ServiceKey::new(&req.namespace, &req.service),
            last.unwrap_or_default()
        ),
    ))
}
