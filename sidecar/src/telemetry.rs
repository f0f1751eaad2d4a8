//! What a sidecar says about each request: an access line (one JSON line
//! on stdout, when asked for) and a span (when spans are exported).

use std::time::{Duration, SystemTime};

use http::{HeaderValue, Request, Response};

use crate::body::Body;
use crate::error::ERROR_HEADER;
use crate::metrics::RouteLabels;
use crate::otlp;
use crate::trace::{self, TraceContext};

/// The trace context a request carries in `traceparent`, if valid.
pub fn incoming<B>(req: &Request<B>) -> Option<TraceContext> {
    req.headers()
        .get(trace::TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(TraceContext::parse)
}

/// This hop's span: a child of `parent`, or the start of a new trace.
pub fn this_hop(parent: Option<TraceContext>) -> TraceContext {
    match parent {
        Some(p) => p.child(rand::random()),
        None => TraceContext::start(rand::random(), rand::random()),
    }
}

/// Put `ctx` in the request's `traceparent`.
pub fn set_traceparent<B>(req: &mut Request<B>, ctx: &TraceContext) {
    req.headers_mut().insert(
        trace::TRACEPARENT,
        HeaderValue::from_str(&ctx.to_string()).expect("hex is ASCII"),
    );
}

/// What the access log says of a request, taken before it is sent on.
pub struct AccessLine {
    method: String,
    authority: String,
    path: String,
}

impl AccessLine {
    pub fn of<B>(req: &Request<B>) -> Self {
        Self {
            method: req.method().to_string(),
            authority: req
                .uri()
                .authority()
                .map(|a| a.to_string())
                .or_else(|| Some(req.headers().get(http::header::HOST)?.to_str().ok()?.to_string()))
                .unwrap_or_default(),
            path: crate::outbound::path_and_query(req.uri()),
        }
    }

    /// One JSON line on stdout.
    pub fn print(self, route: &RouteLabels, resp: &Response<Body>, elapsed: Duration, trace_id: &str) {
        println!("{}", self.render(route, resp, elapsed, trace_id));
    }

    fn render(
        self,
        route: &RouteLabels,
        resp: &Response<Body>,
        elapsed: Duration,
        trace_id: &str,
    ) -> serde_json::Value {
        serde_json::json!({
            "time_unix_ms": isthmus_core::unix_now_ms(),
            "direction": route.direction.as_str(),
            "method": self.method,
            "authority": self.authority,
            "path": self.path,
            "status": resp.status().as_u16(),
            "error": resp.headers().get(ERROR_HEADER).and_then(|v| v.to_str().ok()),
            "duration_ms": elapsed.as_secs_f64() * 1000.0,
            "source_cluster": route.source_cluster,
            "destination_cluster": route.destination_cluster,
            "destination_service": route.destination_service,
            "trace_id": trace_id,
        })
    }
}

/// This hop's span, when spans are exported.
pub struct Hop {
    started: otlp::Started,
    method: http::Method,
}

impl Hop {
    /// Begin this hop's span as a child of `parent` (or a new trace's root).
    pub fn begin(x: &otlp::Exporter, kind: otlp::Kind, parent: Option<TraceContext>, method: &http::Method) -> Self {
        let name = format!("{} {method}", kind_word(kind));
        Self {
            started: x.begin(kind, name, parent, SystemTime::now()),
            method: method.clone(),
        }
    }

    /// The context the next hop continues (`traceparent`).
    pub fn ctx(&self) -> TraceContext {
        self.started.ctx
    }

    /// End the span with the request's route and answer.
    pub fn end(self, x: &otlp::Exporter, route: &RouteLabels, resp: &Response<Body>) {
        let name = format!(
            "{} {} {}",
            route.direction.as_str(),
            self.method,
            route.destination_service
        );
        x.end(
            self.started,
            name,
            otlp::Ended {
                status: resp.status().as_u16(),
                error: resp
                    .headers()
                    .get(ERROR_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string),
                attributes: vec![
                    ("http.request.method", self.method.to_string()),
                    ("isthmus.source_cluster", route.source_cluster.clone()),
                    ("isthmus.destination_cluster", route.destination_cluster.clone()),
                    ("isthmus.destination_service", route.destination_service.clone()),
                ],
                at: SystemTime::now(),
            },
        );
    }
}

fn kind_word(kind: otlp::Kind) -> &'static str {
    match kind {
        otlp::Kind::Client => "outbound",
        otlp::Kind::Server => "inbound",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ProxyError;
    use crate::metrics::Direction;

    #[test]
    fn access_line_has_the_request_and_its_outcome() {
        let req = Request::get("http://echo.demo.svc.clusterset.local:8080/a?b=1")
            .body(())
            .unwrap();
        let route = RouteLabels {
            direction: Direction::Outbound,
            source_cluster: "west".into(),
            destination_cluster: "east".into(),
            destination_service: "demo/echo".into(),
        };
        let resp = ProxyError::Timeout(Duration::from_secs(1)).response();
        let v = AccessLine::of(&req).render(&route, &resp, Duration::from_millis(12), "ab");
        assert_eq!(v["method"], "GET");
        assert_eq!(v["direction"], "outbound");
        assert_eq!(v["authority"], "echo.demo.svc.clusterset.local:8080");
        assert_eq!(v["path"], "/a?b=1");
        assert_eq!(v["status"], 504);
        assert_eq!(v["error"], "timeout");
        assert_eq!(v["destination_cluster"], "east");
        assert_eq!(v["trace_id"], "ab");
        assert_eq!(v["duration_ms"], 12.0);
    }
}
