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

/// A stream of TLS connections for `Server::serve_with_incoming`. Each
/// handshake runs in its own task so a slow client cannot stall the others.
pub fn tls_incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    stop: CancellationToken,
) -> ReceiverStream<Result<TlsStream<TcpStream>, io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        while let Some((tcp, peer)) = crate::net::accept(&listener, &stop).await {
            let acceptor = acceptor.clone();
            let conns = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
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

/// A gRPC channel to `addr` over TLS with `config`. Connects eagerly, so an
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

fn endpoint(addr: &str, config: Arc<rustls::ClientConfig>) -> Result<(Endpoint, Connector), tonic::transport::Error> {
    let ep = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10));
    let addr = addr.to_string();
    let connector = tower::service_fn(move |_uri: http::Uri| {
        let addr = addr.clone();
        let config = config.clone();
        async move {
            let tcp = TcpStream::connect(&addr).await?;
            tcp.set_nodelay(true)?;
            let tls = TlsConnector::from(config).connect(crate::tls::sni(), tcp).await?;
            Ok::<_, io::Error>(TokioIo::new(tls))
        }
    });
    Ok((ep, tower::util::BoxCloneSyncService::new(connector)))
}
