//! `isthmus echo`: the demo workload. Answers every request with JSON naming
//! the cluster and instance that served it and the caller's identity as the
//! sidecar verified it.

use std::net::SocketAddr;
use std::path::PathBuf;

use bytes::Bytes;
use http_body_util::Full;

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
    /// Write the bound address as JSON to this file once listening.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    #[arg(long, hide = true)]
    exit_with_parent: bool,
}

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
    loop {
        let (tcp, _) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
        };
        let cluster = a.cluster.clone();
        let instance = a.instance.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let body = serde_json::json!({
                    "cluster": cluster,
                    "instance": instance,
                    "client_identity": req.headers().get(isthmus_sidecar::CLIENT_ID_HEADER).and_then(|v| v.to_str().ok()),
                    "method": req.method().as_str(),
                    "path": req.uri().path(),
                    "host": req.headers().get("host").and_then(|v| v.to_str().ok()),
                });
                let resp = hyper::Response::builder()
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body.to_string() + "\n")));
                async move { resp }
            });
            let _ = isthmus_core::http::serve_connection(tcp, svc).await;
        });
    }
}
