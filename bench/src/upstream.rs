//! The application every path ends at: a small HTTP/1.1 server that echoes
//! a request's body (`POST /echo`) or streams `n` bytes (`GET /bulk?bytes=n`).
//! It runs in its own process so its CPU is not counted against a proxy.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use tokio::net::TcpListener;

type Body = BoxBody<Bytes, Infallible>;

const CHUNK: usize = 64 * 1024;

/// How late the server answers: always `delay`, and `slow_delay` more for
/// a `slow_share` of requests (at random).
#[derive(Clone, Copy, Debug, Default)]
pub struct Lateness {
    pub delay: Duration,
    pub slow_share: f64,
    pub slow_delay: Duration,
}

pub async fn serve(listen: SocketAddr, ready: Option<std::path::PathBuf>, late: Lateness) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    if let Some(path) = ready {
        std::fs::write(path, serde_json::json!({ "listen": addr.to_string() }).to_string())?;
    }
    loop {
        let (tcp, _) = listener.accept().await?;
        tcp.set_nodelay(true)?;
        tokio::spawn(async move {
            let svc = service_fn(move |req| async move {
                let mut wait = late.delay;
                if late.slow_share > 0.0 && rand::random::<f64>() < late.slow_share {
                    wait += late.slow_delay;
                }
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
                handle(req).await
            });
            let _ = isthmus_core::http::serve_connection(tcp, svc).await;
        });
    }
}

async fn handle(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    if req.uri().path() == "/bulk" {
        let n = req
            .uri()
            .query()
            .and_then(|q| q.strip_prefix("bytes="))
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0);
        return Ok(Response::new(bulk(n)));
    }
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(status(StatusCode::BAD_REQUEST)),
    };
    Ok(Response::new(Full::new(body).boxed()))
}

fn status(code: StatusCode) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::new()).boxed());
    *r.status_mut() = code;
    r
}

/// `n` bytes in 64 KiB frames that all share one buffer, so the server
/// costs next to nothing and the path under test is what is measured.
fn bulk(n: usize) -> Body {
    let chunk = Bytes::from(vec![b'x'; CHUNK]);
    let frames = (0..n.div_ceil(CHUNK)).map(move |i| {
        let len = CHUNK.min(n - i * CHUNK);
        Ok::<_, Infallible>(Frame::data(chunk.slice(..len)))
    });
    BoxBody::new(StreamBody::new(futures::stream::iter(frames)))
}
