//! `isthmus echo`: the demo workload. Answers every request with JSON naming
//! the cluster and instance that served it and the caller's identity as the
//! sidecar verified it. A few paths exist for tests of the data path:
//! `GET /bulk?bytes=N` streams N bytes, `POST /upload` reads the whole body
//! and says how long it was, `GET /stream?chunks=N&interval_ms=M` sends a
//! chunk every M ms, each as soon as it is written.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};

use crate::error::CliError;
use crate::exit;

#[derive(clap::Args)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Cluster name to report.
    #[arg(long)]
    cluster: String,
    /// Instance name to report.
    #[arg(long, default_value = "echo-1")]
    instance: String,
    /// Answer every request this late (a slow app, for tests).
    #[arg(long, default_value = "0s")]
    delay: humantime::Duration,
    /// Answer at once until SIGUSR1, then `--delay` late: an app that turns
    /// slow while it runs, on the same address and connections (for tests).
    #[arg(long)]
    slow_on_sigusr1: bool,
    /// Write the bound address as JSON to this file once listening.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    #[arg(long, hide = true)]
    exit_with_parent: bool,
}

type Body = BoxBody<Bytes, Infallible>;

const CHUNK: usize = 64 * 1024;

pub async fn run(a: Args) -> Result<(), CliError> {
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .map_err(|e| CliError::new(exit::FAILURE, format!("cannot listen on {}: {e}", a.listen)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| CliError::new(exit::FAILURE, e.to_string()))?;
    if let Some(p) = &a.ready_file {
        isthmus_core::local::write_atomic(
            p,
            serde_json::json!({"listen": addr.to_string()}).to_string().as_bytes(),
            false,
        )
        .map_err(|e| CliError::new(exit::FAILURE, e.to_string()))?;
    }
    let shutdown = crate::components::shutdown_token(a.exit_with_parent);
    let delay: Duration = a.delay.into();
    let slow = Arc::new(AtomicBool::new(!a.slow_on_sigusr1));
    if a.slow_on_sigusr1 {
        let mut usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
            .map_err(|e| CliError::new(exit::FAILURE, format!("cannot watch SIGUSR1: {e}")))?;
        let slow = slow.clone();
        tokio::spawn(async move {
            if usr1.recv().await.is_some() {
                slow.store(true, Ordering::Relaxed);
            }
        });
    }
    loop {
        let (tcp, _) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
        };
        let cluster = a.cluster.clone();
        let instance = a.instance.clone();
        let slow = slow.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                let (cluster, instance) = (cluster.clone(), instance.clone());
                let delay = if slow.load(Ordering::Relaxed) {
                    delay
                } else {
                    Duration::ZERO
                };
                async move {
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    Ok::<_, Infallible>(answer(req, &cluster, &instance).await)
                }
            });
            let _ = isthmus_core::http::serve_connection(tcp, svc).await;
        });
    }
}

async fn answer(req: hyper::Request<Incoming>, cluster: &str, instance: &str) -> hyper::Response<Body> {
    let query = |key: &str| -> Option<u64> {
        req.uri()
            .query()?
            .split('&')
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
    };
    match req.uri().path() {
        "/bulk" => {
            let n = query("bytes").unwrap_or(0) as usize;
            let chunks = futures::stream::iter(
                (0..n)
                    .step_by(CHUNK)
                    .map(move |at| Ok::<_, Infallible>(Frame::data(Bytes::from(vec![b'x'; CHUNK.min(n - at)])))),
            );
            let mut r = hyper::Response::new(BodyExt::boxed(StreamBody::new(chunks)));
            r.headers_mut()
                .insert("content-length", hyper::header::HeaderValue::from(n as u64));
            r
        }
        "/stream" => {
            let chunks = query("chunks").unwrap_or(3);
            let interval = Duration::from_millis(query("interval_ms").unwrap_or(500));
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
            tokio::spawn(async move {
                for i in 0..chunks {
                    if i > 0 {
                        tokio::time::sleep(interval).await;
                    }
                    let line = Bytes::from(format!("chunk {i}\n"));
                    if tx.send(Ok(Frame::data(line))).await.is_err() {
                        return;
                    }
                }
            });
            let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
            hyper::Response::new(BodyExt::boxed(StreamBody::new(stream)))
        }
        "/upload" => {
            let mut body = req.into_body();
            let mut n: u64 = 0;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => n += f.data_ref().map_or(0, |d| d.len() as u64),
                    Err(e) => return text(400, format!("upload broke off after {n} bytes: {e}\n")),
                }
            }
            text(200, format!("{{\"received\":{n}}}\n"))
        }
        _ => {
            let body = serde_json::json!({
                "cluster": cluster,
                "instance": instance,
                "client_identity": req.headers().get(isthmus_sidecar::CLIENT_ID_HEADER).and_then(|v| v.to_str().ok()),
                "method": req.method().as_str(),
                "path": req.uri().path(),
                "host": req.headers().get("host").and_then(|v| v.to_str().ok()),
                "version": format!("{:?}", req.version()),
                "headers": req
                    .headers()
                    .iter()
                    .map(|(k, v)| (k.to_string(), serde_json::Value::from(String::from_utf8_lossy(v.as_bytes()))))
                    .collect::<serde_json::Map<_, _>>(),
            });
            let mut r = text(200, body.to_string() + "\n");
            r.headers_mut().insert(
                "content-type",
                hyper::header::HeaderValue::from_static("application/json"),
            );
            r
        }
    }
}

fn text(status: u16, s: String) -> hyper::Response<Body> {
    let mut r = hyper::Response::new(BodyExt::boxed(Full::new(Bytes::from(s))));
    *r.status_mut() = hyper::StatusCode::from_u16(status).expect("a status");
    r
}
