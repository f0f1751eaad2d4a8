//! tonic over our own rustls configurations, so that gRPC peers are
//! authenticated by SPIFFE ID like every other mesh connection.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

/// Connections in their TLS handshake at once, at most, on a gRPC
/// listener: more are closed at once, so a flood of connections that never
/// finish one holds a bounded number of tasks and descriptors.
pub const MAX_HANDSHAKING: usize = 256;
/// A client has this long to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// A stream of TLS connections for `Server::serve_with_incoming`. Each
/// handshake runs in its own task so a slow client cannot stall the others.
pub fn tls_incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    stop: CancellationToken,
) -> ReceiverStream<Result<TlsStream<TcpStream>, io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    let budget = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKING));
    tokio::spawn(async move {
        while let Some((tcp, peer)) = crate::net::accept(&listener, &stop).await {
            let Ok(permit) = budget.clone().try_acquire_owned() else {
                tracing::debug!(%peer, "too many TLS handshakes in progress: connection closed");
                continue;
            };
            let acceptor = acceptor.clone();
            let conns = tx.clone();
            tokio::spawn(async move {
                let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                drop(permit);
                match handshake {
                    Ok(Ok(tls)) => {
                        let _ = conns.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
            if tx.is_closed() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

/// A gRPC channel to `addr` (or the first of several, comma separated, that
/// answers) over TLS with `config`. Connects eagerly, so an
/// unreachable or unauthenticated server is reported here.
pub async fn connect(addr: &str, config: Arc<rustls::ClientConfig>) -> Result<Channel, tonic::transport::Error> {
    let (ep, connector) = endpoint(addr, config)?;
    ep.connect_with_connector(connector).await
}

/// Like [`connect`] but connects on first use (and reconnects after loss).
pub fn connect_lazy(addr: &str, config: Arc<rustls::ClientConfig>) -> Result<Channel, tonic::transport::Error> {
    let (ep, connector) = endpoint(addr, config)?;
    Ok(ep.connect_with_connector_lazy(connector))
}

type Connector =
    tower::util::BoxCloneSyncService<http::Uri, TokioIo<tokio_rustls::client::TlsStream<TcpStream>>, io::Error>;

/// Time for one address to accept and finish the TLS handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

fn endpoint(addr: &str, config: Arc<rustls::ClientConfig>) -> Result<(Endpoint, Connector), tonic::transport::Error> {
    // `addr` may list several addresses, comma separated (a controller's
    // replicas): each is tried in turn until one completes the handshake.
    // A standby closes connections at once, so it costs one round trip.
    let addrs: Arc<Vec<String>> = Arc::new(addr.split(',').map(|a| a.trim().to_string()).collect());
    let ep = Endpoint::from_shared(format!("http://{}", addrs[0]))?
        .connect_timeout(CONNECT_TIMEOUT * addrs.len() as u32)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10));
    let connector = tower::service_fn(move |_uri: http::Uri| {
        let addrs = addrs.clone();
        let config = config.clone();
        async move {
            let mut failure: Option<io::Error> = None;
            for addr in addrs.iter() {
                let attempt = async {
                    let tcp = TcpStream::connect(addr.as_str()).await?;
                    tcp.set_nodelay(true)?;
                    TlsConnector::from(config.clone()).connect(crate::tls::sni(), tcp).await
                };
                match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
                    Ok(Ok(tls)) => return Ok::<_, io::Error>(TokioIo::new(tls)),
                    Ok(Err(e)) => {
                        // A certificate refused says more than a closed
                        // connection: keep that one to report.
                        if failure.as_ref().is_none_or(|f| f.kind() != io::ErrorKind::InvalidData) {
                            failure = Some(e);
                        }
                    }
                    Err(_) => {
                        failure.get_or_insert_with(|| {
                            io::Error::new(io::ErrorKind::TimedOut, format!("{addr}: timed out"))
                        });
                    }
                }
            }
            Err(failure.unwrap_or_else(|| io::Error::other("no address to connect to")))
        }
    });
    Ok((ep, tower::util::BoxCloneSyncService::new(connector)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// Past `MAX_HANDSHAKING` connections still in their handshake, a new
    /// one is closed at once rather than waiting its turn.
    #[tokio::test]
    async fn handshakes_in_progress_are_capped() {
        crate::install_crypto_provider();
        let ca = crate::identity::Ca::generate("t.mesh").unwrap();
        let id = crate::identity::SpiffeId::parse("spiffe://t.mesh/ns/a/sa/b").unwrap();
        let svid = ca.issue_local(&id, Duration::from_secs(600)).unwrap();
        let tls = crate::tls::server_config(
            crate::tls::SvidResolver::new(&svid).unwrap(),
            Arc::new(arc_swap::ArcSwap::from_pointee(crate::bundle::TrustBundles::new())),
            crate::tls::ClientAuth::None,
            &[crate::tls::ALPN_H2],
        )
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let _incoming = tls_incoming(listener, tls, stop.clone());
        let mut held = Vec::new();
        for _ in 0..MAX_HANDSHAKING {
            held.push(TcpStream::connect(addr).await.unwrap());
        }
        let mut extra = TcpStream::connect(addr).await.unwrap();
        let mut b = [0u8; 1];
        let r = tokio::time::timeout(HANDSHAKE_TIMEOUT / 2, extra.read(&mut b)).await;
        assert!(
            matches!(r, Ok(Ok(0)) | Ok(Err(_))),
            "a connection past the budget was kept: {r:?}"
        );
        stop.cancel();
    }
}
