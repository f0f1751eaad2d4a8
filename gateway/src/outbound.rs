//! Tunnels from local sidecars: authenticate the sidecar (this cluster's
//! trust domain only), forward its header to the destination cluster's
//! gateway on the peer's QUIC connection (`peers.rs`), and relay.

use std::sync::Arc;

use isthmus_core::naming::ServiceKey;
use isthmus_core::tls;
use isthmus_core::tunnel::{TunnelRequest, TunnelResponse};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::counted::Counted;
use crate::inbound::HEADER_TIMEOUT;
use crate::metrics::Direction;
use crate::{Gateway, StreamError, peers};

pub(crate) async fn accept_tunnels(
    gw: Arc<Gateway>,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    stop: CancellationToken,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let opening = Arc::new(Semaphore::new(MAX_OPENING_TUNNELS));
    while let Some((tcp, from)) = isthmus_core::net::accept(&listener, &stop).await {
        let Ok(permit) = opening.clone().try_acquire_owned() else {
            gw.metrics.stream(Direction::Outbound, "unknown", "opening_limit");
            continue;
        };
        let gw2 = gw.clone();
        let acceptor = acceptor.clone();
        gw.tracker.spawn(async move {
            if let Err(e) = tunnel(gw2, acceptor, tcp, permit).await {
                tracing::debug!(%from, error = %e, "tunnel ended with error");
            }
        });
    }
}

/// Tunnels still in their handshake or header, at most: connections that
/// never get through one are closed at once past this, rather than each
/// holding memory and a descriptor for `HEADER_TIMEOUT`. Open tunnels are
/// not counted.
pub const MAX_OPENING_TUNNELS: usize = 256;

/// One local sidecar's tunnel.
async fn tunnel(
    gw: Arc<Gateway>,
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    opening: OwnedSemaphorePermit,
) -> Result<(), StreamError> {
    let mut tls = tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(tcp))
        .await
        .map_err(|_| StreamError::HandshakeTimeout)?
        .map_err(StreamError::Handshake)?;
    let client = tls::peer_id(tls.get_ref().1.peer_certificates()).ok_or(StreamError::NoIdentity)?;
    if client.trust_domain != gw.trust_domain {
        return Err(StreamError::Foreign(client));
    }
    let req = tokio::time::timeout(HEADER_TIMEOUT, TunnelRequest::read(&mut tls))
        .await
        .map_err(|_| StreamError::HeaderTimeout)??;
    drop(opening);
    let quic = match peers::open_stream(&gw, &req).await {
        Ok(s) => s,
        Err(refusal) => {
            let label = crate::metrics::peer_label(&gw.agent.config.borrow(), &req.cluster);
            gw.metrics.stream(Direction::Outbound, label, refusal.result());
            let _ = refusal.write(&mut tls).await;
            let _ = tls.shutdown().await;
            return Ok(());
        }
    };
    gw.metrics.stream(Direction::Outbound, &req.cluster, "ok");
    let _open = gw.metrics.open(Direction::Outbound);
    TunnelResponse::Ok.write(&mut tls).await?;
    tracing::debug!(%client, to = %req.cluster, service = %ServiceKey::new(&req.namespace, &req.service), "tunnel open");
    let (to_peer, from_peer) = gw.metrics.byte_counters(&req.cluster);
    let mut tls = Counted::new(tls, to_peer);
    let mut quic = Counted::new(quic, from_peer);
    let _ = tokio::io::copy_bidirectional(&mut tls, &mut quic).await;
    Ok(())
}
