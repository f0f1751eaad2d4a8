//! Spans exported over OTLP/HTTP with JSON encoding (`POST <endpoint>/v1/traces`),
//! when an endpoint is configured: a client span for each outbound request
//! and a server span for each inbound one, in the W3C trace the request
//! carries. Encoding is a pure function; one task batches and sends.
//!
//! JSON over HTTP is one of OTLP's standard transports, taken by every
//! OpenTelemetry Collector; it needs no protobuf or gRPC client beside the
//! ones the sidecar has.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use prometheus_client::metrics::counter::Counter;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::trace::{TraceContext, to_hex};

/// Spans waiting to be sent beyond this are dropped (and counted): the
/// data path never waits for the collector.
const QUEUE: usize = 4096;
const BATCH: usize = 512;
const FLUSH_EVERY: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Server = 2,
    Client = 3,
}

#[derive(Clone, Debug)]
pub struct Span {
    pub ctx: TraceContext,
    pub parent: Option<[u8; 8]>,
    pub name: String,
    pub kind: Kind,
    pub start: SystemTime,
    pub duration: Duration,
    pub status: u16,
    /// `x-isthmus-error` of a response the sidecar made itself.
    pub error: Option<String>,
    pub attributes: Vec<(&'static str, String)>,
}

/// The OTLP/JSON `ExportTraceServiceRequest` for `spans` of one resource.
pub fn encode(resource: &[(&str, String)], spans: &[Span]) -> Value {
    let attrs = |kv: &[(&str, String)]| -> Vec<Value> {
        kv.iter()
            .map(|(k, v)| json!({ "key": k, "value": { "stringValue": v } }))
            .collect()
    };
    let nanos = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos().to_string();
    let spans: Vec<Value> = spans
        .iter()
        .map(|s| {
            let mut a = attrs(&s.attributes);
            a.push(json!({ "key": "http.response.status_code", "value": { "intValue": s.status.to_string() } }));
            if let Some(e) = &s.error {
                a.push(json!({ "key": "isthmus.error", "value": { "stringValue": e } }));
            }
            // OTLP status: 1 OK, 2 ERROR; a server error or one the
            // sidecar answered itself is an error.
            let failed = s.status >= 500 || s.error.is_some();
            json!({
                "traceId": to_hex(&s.ctx.trace_id),
                "spanId": to_hex(&s.ctx.span_id),
                "parentSpanId": s.parent.map(|p| to_hex(&p)).unwrap_or_default(),
                "name": s.name,
                "kind": s.kind as u8,
                "startTimeUnixNano": nanos(s.start),
                "endTimeUnixNano": nanos(s.start + s.duration),
                "attributes": a,
                "status": { "code": if failed { 2 } else { 1 } },
            })
        })
        .collect();
    json!({
        "resourceSpans": [{
            "resource": { "attributes": attrs(resource) },
            "scopeSpans": [{ "scope": { "name": "isthmus-sidecar" }, "spans": spans }],
        }]
    })
}

/// Hands spans to the sending task.
#[derive(Clone)]
pub struct Exporter {
    tx: mpsc::Sender<Span>,
    dropped: Counter,
}

impl Exporter {
    /// Start sending to `endpoint` (a base URL such as
    /// `http://127.0.0.1:4318`; `/v1/traces` is appended).
    pub fn start(
        endpoint: &str,
        resource: Vec<(&'static str, String)>,
        dropped: Counter,
        failed: Counter,
        stop: CancellationToken,
    ) -> Result<Self, String> {
        let url: http::Uri = format!("{}/v1/traces", endpoint.trim_end_matches('/'))
            .parse()
            .map_err(|e| format!("OTLP endpoint {endpoint}: {e}"))?;
        if url.scheme_str() != Some("http") {
            return Err(format!(
                "OTLP endpoint {endpoint}: only http:// is supported (run a collector beside the sidecar)"
            ));
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(send_batches(url, resource, rx, failed, stop));
        Ok(Self { tx, dropped })
    }

    /// Queue a span if it is sampled; never waits.
    pub fn record(&self, span: Span) {
        if span.ctx.flags & 1 == 1 && self.tx.try_send(span).is_err() {
            self.dropped.inc();
        }
    }
}

async fn send_batches(
    url: http::Uri,
    resource: Vec<(&'static str, String)>,
    mut rx: mpsc::Receiver<Span>,
    failed: Counter,
    stop: CancellationToken,
) {
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let deadline = tokio::time::sleep(FLUSH_EVERY);
        tokio::pin!(deadline);
        let mut closed = false;
        while batch.len() < BATCH {
            tokio::select! {
                _ = &mut deadline => break,
                _ = stop.cancelled() => { closed = true; break }
                s = rx.recv() => match s {
                    Some(s) => batch.push(s),
                    None => { closed = true; break }
                },
            }
        }
        if !batch.is_empty() {
            let body = encode(&resource, &batch).to_string();
            let req = http::Request::post(url.clone())
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body)))
                .expect("valid request");
            let ok = matches!(
                tokio::time::timeout(Duration::from_secs(5), client.request(req)).await,
                Ok(Ok(r)) if r.status().is_success()
            );
            if !ok {
                failed.inc_by(batch.len() as u64);
                tracing::debug!(spans = batch.len(), %url, "OTLP export failed; spans dropped");
            }
            batch.clear();
        }
        if closed {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_otlp_json() {
        let ctx = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        let span = Span {
            ctx,
            parent: Some([1, 2, 3, 4, 5, 6, 7, 8]),
            name: "outbound demo/echo".into(),
            kind: Kind::Client,
            start: UNIX_EPOCH + Duration::from_secs(2),
            duration: Duration::from_millis(3),
            status: 503,
            error: Some("no-endpoints".into()),
            attributes: vec![("isthmus.destination_cluster", "east".into())],
        };
        let v = encode(&[("service.name", "demo/client".into())], &[span]);
        let rs = &v["resourceSpans"][0];
        assert_eq!(rs["resource"]["attributes"][0]["value"]["stringValue"], "demo/client");
        let s = &rs["scopeSpans"][0]["spans"][0];
        assert_eq!(s["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(s["spanId"], "00f067aa0ba902b7");
        assert_eq!(s["parentSpanId"], "0102030405060708");
        assert_eq!(s["kind"], 3);
        assert_eq!(s["startTimeUnixNano"], "2000000000");
        assert_eq!(s["endTimeUnixNano"], "2003000000");
        assert_eq!(s["status"]["code"], 2);
        assert_eq!(s["attributes"][0]["key"], "isthmus.destination_cluster");
    }
}
