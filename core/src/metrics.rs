//! Prometheus metrics and the admin endpoint every component serves:
//! `/metrics` (OpenMetrics text), `/ready` and `/live`.
//!
//! Metric names are documented in docs/metrics.md; keep the two in step.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// Which way a connection or request goes through a component.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    /// Sidecar: from the local app out to the mesh. Gateway: from a local
    /// sidecar to a peer cluster.
    Outbound,
    /// Sidecar: from the mesh to the local app. Gateway: from a peer
    /// cluster to a local sidecar.
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

impl EncodeLabelValue for Direction {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

/// Latency buckets from 100 µs to about 13 s, doubling.
pub fn latency_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0001, 2.0, 18,
    ))
}

/// Readiness a component flips once it can serve.
#[derive(Clone, Default)]
pub struct Ready(Arc<AtomicBool>);

impl Ready {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Relaxed);
    }

    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Serve the admin endpoint on `addr` (if any) until `stop`; returns the
/// bound address.
pub async fn serve_admin(
    addr: Option<SocketAddr>,
    registry: Registry,
    ready: Ready,
    stop: CancellationToken,
) -> Result<Option<SocketAddr>, crate::net::BindError> {
    let Some(addr) = addr else { return Ok(None) };
    let (listener, bound) = crate::net::bind(addr).await?;
    let registry = Arc::new(registry);
    tokio::spawn(async move {
        while let Some((tcp, _)) = crate::net::accept(&listener, &stop).await {
            let registry = registry.clone();
            let ready = ready.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let resp = respond(req.uri().path(), &registry, &ready);
                    async move { Ok::<_, std::convert::Infallible>(resp) }
                });
                let _ = crate::http::serve_connection(tcp, svc).await;
            });
        }
    });
    Ok(Some(bound))
}

fn respond(path: &str, registry: &Registry, ready: &Ready) -> hyper::Response<Full<Bytes>> {
    let (status, ctype, body) = match path {
        "/metrics" => {
            let mut s = String::new();
            match prometheus_client::encoding::text::encode(&mut s, registry) {
                Ok(()) => (200, "application/openmetrics-text; version=1.0.0; charset=utf-8", s),
                Err(e) => (500, "text/plain", format!("encoding metrics failed: {e}\n")),
            }
        }
        "/ready" if ready.get() => (200, "text/plain", "ready\n".into()),
        "/ready" => (503, "text/plain", "not ready\n".into()),
        "/live" => (200, "text/plain", "live\n".into()),
        _ => (404, "text/plain", "try /metrics, /ready or /live\n".into()),
    };
    hyper::Response::builder()
        .status(status)
        .header("content-type", ctype)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_metrics_and_readiness() {
        let mut registry = Registry::default();
        let c = Counter::<u64>::default();
        registry.register("isthmus_test_things", "Things", c.clone());
        c.inc_by(3);
        let ready = Ready::default();
        let stop = CancellationToken::new();
        let addr = serve_admin(
            Some("127.0.0.1:0".parse().unwrap()),
            registry,
            ready.clone(),
            stop.clone(),
        )
        .await
        .unwrap()
        .expect("an address was given");
        assert!(get(addr, "/metrics").await.contains("isthmus_test_things_total 3"));
        assert!(get(addr, "/ready").await.starts_with("HTTP/1.1 503"));
        ready.set(true);
        assert!(get(addr, "/ready").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
        stop.cancel();
    }
}
