//! HTTP plumbing shared by every component, the demo and the tests: one
//! way to serve a connection (HTTP/1.1 or HTTP/2, upgrades allowed), and a
//! small client for one request through a sidecar's HTTP proxy port.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An HTTP/1.1 client has this long to send a request's head (from the
/// connection, or the previous response): a slow-header (slowloris) client
/// cannot hold a connection open forever, nor does an idle keep-alive one
/// outstay it. HTTP/2 connections are not affected.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Serve HTTP/1.1 or HTTP/2 (told apart by the first bytes) on `io` until
/// the client closes, with `svc` answering each request. Upgrades (HTTP/1.1
/// `Upgrade`, WebSocket) are allowed, for services that take them up.
pub async fn serve_connection<I, S, B>(io: I, svc: S) -> Result<(), BoxError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // Extended CONNECT (RFC 8441): how sidecars carry an upgrade between them.
    builder.http2().enable_connect_protocol();
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder.serve_connection_with_upgrades(TokioIo::new(io), svc).await
}

/// An answer as the demo and the tests look at it.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// From the connect to the end of the body.
    pub latency: Duration,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("connect to {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    #[error("{0} is not a URL")]
    BadUrl(String),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
}

/// GET `url` (absolute: `http://host[:port]/path`) through the HTTP proxy
/// at `proxy`, on a connection of its own.
pub async fn get_via(proxy: &str, url: &str) -> Result<Answer, HttpError> {
    let req = Request::get(url)
        .body(Empty::<Bytes>::new())
        .map_err(|_| HttpError::BadUrl(url.to_string()))?;
    send_via(proxy, req).await
}

/// Send `req` (absolute-form URI) to the HTTP proxy at `proxy` over
/// HTTP/1.1, on a connection of its own, and read the whole answer.
pub async fn send_via<B>(proxy: &str, req: Request<B>) -> Result<Answer, HttpError>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let start = Instant::now();
    let tcp = tokio::net::TcpStream::connect(proxy)
        .await
        .map_err(|source| HttpError::Connect {
            addr: proxy.to_string(),
            source,
        })?;
    let _ = tcp.set_nodelay(true);
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let resp = send.send_request(req).await?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Answer {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
        latency: start.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A client that sends half a request head and stalls is cut off.
    #[tokio::test(start_paused = true)]
    async fn a_stalled_request_head_is_cut_off() {
        let (mut client, server) = tokio::io::duplex(1024);
        let svc = hyper::service::service_fn(|_req: Request<Incoming>| async {
            Ok::<_, std::convert::Infallible>(Response::new(Empty::<Bytes>::new()))
        });
        let served = tokio::spawn(serve_connection(server, svc));
        client.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n").await.unwrap();
        // The paused clock jumps ahead whenever everything waits.
        let closed = tokio::time::timeout(HEADER_READ_TIMEOUT * 2, served).await;
        assert!(closed.is_ok(), "a stalled request head held the connection");
        let mut rest = Vec::new();
        let _ = client.read_to_end(&mut rest).await;
    }
}
