//! Outbound: plain HTTP from the local app (an HTTP proxy, or a service
//! port with DNS on). Requests for `name.ns.svc.clusterset.local` are routed
//! by policy and health to the local cluster's sidecars directly, or through
//! the local gateway to another cluster; either way they ride HTTP/2 inside
//! an mTLS session that ends at the serving sidecar (`pool.rs`).

pub mod retry;

use std::sync::Arc;
use std::time::Instant;

use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use isthmus_core::naming::{ServiceKey, ServiceName};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use crate::body::{self, Body, empty, full};
use crate::error::{ErrorKind, ProxyError};
use crate::inbound::CLIENT_ID_HEADER;
use crate::metrics::{CountedBody, Direction, RouteLabels};
use crate::pool::PoolKey;
use crate::route::Target;
use crate::{Sidecar, otlp, telemetry, trace};

pub(crate) async fn serve(sc: Arc<Sidecar>, listener: TcpListener, stop: CancellationToken) {
    while let Some((tcp, _)) = isthmus_core::net::accept(&listener, &stop).await {
        let Some(slot) = sc.limits.admit(Direction::Outbound, &sc.metrics) else {
            continue;
        };
        tokio::spawn(serve_http(sc.clone(), tcp, slot));
    }
}

/// One client connection of HTTP/1.1 or HTTP/2 requests from the app.
pub(crate) async fn serve_http(sc: Arc<Sidecar>, tcp: TcpStream, _slot: OwnedSemaphorePermit) {
    let _open = sc.metrics.open(Direction::Outbound);
    let svc = hyper::service::service_fn(move |req| {
        let sc = sc.clone();
        async move { Ok::<_, std::convert::Infallible>(observed(sc, req).await) }
    });
    let _ = isthmus_core::http::serve_connection(tcp, svc).await;
}

/// One outbound request, with its timeout, trace context, metrics, access
/// line and span.
async fn observed(sc: Arc<Sidecar>, mut req: Request<Incoming>) -> Response<Body> {
    let start = Instant::now();
    let mut route = RouteLabels {
        direction: Direction::Outbound,
        source_cluster: sc.agent.cluster.clone(),
        destination_cluster: "unknown".into(),
        destination_service: "unknown".into(),
    };
    // Continue the caller's trace with this hop's span, or start one.
    let parent = telemetry::incoming(&req);
    if parent.is_none() {
        // A new trace: vendor state of a trace we do not continue goes.
        req.headers_mut().remove(trace::TRACESTATE);
    }
    let span = sc
        .otlp
        .as_ref()
        .map(|x| telemetry::Hop::begin(x, otlp::Kind::Client, parent, req.method()));
    let ctx = span.as_ref().map_or_else(|| telemetry::this_hop(parent), |s| s.ctx());
    telemetry::set_traceparent(&mut req, &ctx);
    let line = sc.cfg.access_log.then(|| telemetry::AccessLine::of(&req));
    let timeout = sc.cfg.request_timeout;
    let resp = match tokio::time::timeout(timeout, forward(&sc, req, &mut route)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            tracing::info!(error = %e, "outbound request failed");
            e.response()
        }
        Err(_) => ProxyError::Timeout(timeout).response(),
    };
    let elapsed = start.elapsed();
    if let Some(line) = line {
        line.print(&route, &resp, elapsed, &ctx.trace_id_hex());
    }
    if let (Some(x), Some(span)) = (&sc.otlp, span) {
        span.end(x, &route, &resp);
    }
    sc.metrics.observe(route, resp.status().as_u16(), elapsed.as_secs_f64());
    resp
}

/// The target host and port of a request: absolute-form URI (HTTP proxy
/// style), else the Host header.
fn authority<B>(req: &Request<B>) -> Option<(String, Option<u16>)> {
    let auth = req
        .uri()
        .authority()
        .cloned()
        .or_else(|| req.headers().get(http::header::HOST)?.to_str().ok()?.parse().ok())?;
    Some((auth.host().to_string(), auth.port_u16()))
}

/// Route and send a request, and send it again elsewhere when `retry`
/// says it may go and its body is at hand, within the retry budget: to
/// another endpoint of a local service first, then to the next cluster.
/// (A remote cluster's gateway chooses among that cluster's endpoints.)
async fn forward(
    sc: &Arc<Sidecar>,
    req: Request<Incoming>,
    labels: &mut RouteLabels,
) -> Result<Response<Body>, ProxyError> {
    let (host, port) = authority(&req).ok_or(ProxyError::NoHost)?;
    let name = ServiceName::parse(&host).ok_or_else(|| ProxyError::NotMeshName(host.clone()))?;
    let key = name.key();
    labels.destination_service = key.to_string();
    let _slot = sc
        .limits
        .reserve(&key, &sc.metrics)
        .ok_or_else(|| ProxyError::Overloaded {
            service: labels.destination_service.clone(),
            limit: sc.limits.max_requests_per_service(),
        })?;
    let mut failed_clusters: Vec<String> = Vec::new();
    let mut target = sc.route(&name, port, Some(req.headers()), &failed_clusters, labels)?;
    let mut endpoints = target.addresses.clone();
    let facts = retry::Request {
        idempotent: req.method().is_idempotent(),
        grpc: is_grpc(req.headers()),
        local: false,
    };
    let head = (req.method().clone(), req.uri().clone(), req.headers().clone());
    let (req_bytes, resp_bytes) = sc.metrics.body_counters(labels);
    let (req, replay) = body::buffer_small_body(req).await.map_err(ProxyError::ClientBody)?;
    let mut req = req.map(|b| CountedBody::new(b, req_bytes.clone()).boxed());
    let mut failed: Vec<String> = Vec::new();
    sc.budgets.deposit(&key, &target);
    let sent = loop {
        let mut in_flight = None;
        if !endpoints.is_empty() {
            let mut gone = Vec::new();
            in_flight = sc
                .endpoints
                .choose(&sc.metrics, &target, &endpoints, &failed, &mut gone);
            if !gone.is_empty() {
                sc.pool.forget(&target.destination(), gone);
            }
            if let Some(f) = &in_flight {
                target.addresses = vec![f.addr.clone()];
            }
        }
        let sent = send(sc, &target, (&host, port), req, labels).await;
        let verdict = retry::judge(
            attempt(&sent),
            retry::Request {
                local: target.is_local(),
                ..facts
            },
        );
        let mut next_endpoint = false;
        if let Some(mut f) = in_flight {
            f.ok = verdict.endpoint_ok;
            failed.push(f.addr.clone());
            next_endpoint = verdict.resend && failed.len() < endpoints.len();
        }
        // Once the cluster's turn is over, its health for this service
        // learns from it.
        if !next_endpoint && let Some(outcome) = verdict.cluster {
            sc.router.outcome(&key, &target.cluster, outcome, &sc.metrics);
        }
        let body = match replay.body() {
            Some(body) if verdict.resend && sc.budgets.withdraw(&key, &target) => body,
            _ => break sent,
        };
        if next_endpoint {
            tracing::debug!(endpoint = %failed.last().expect("pushed"), "trying another endpoint");
        } else {
            failed_clusters.push(target.cluster.clone());
            let Ok(next) = sc.route(&name, port, Some(&head.2), &failed_clusters, labels) else {
                break sent;
            };
            tracing::debug!(from = %target.cluster, to = %next.cluster, "cluster unreachable; trying the next");
            target = next;
            endpoints = target.addresses.clone();
            failed.clear();
        }
        sc.metrics.retries.get_or_create(labels).inc();
        let (method, uri, headers) = &head;
        let mut r = Request::new(CountedBody::new(full(body), req_bytes.clone()).boxed());
        *r.method_mut() = method.clone();
        *r.uri_mut() = uri.clone();
        *r.headers_mut() = headers.clone();
        req = r;
    };
    let (mut parts, body) = sent?.into_parts();
    parts.version = http::Version::HTTP_11;
    Ok(Response::from_parts(parts, CountedBody::new(body, resp_bytes).boxed()))
}

/// How an attempt ended, for the retry decision.
fn attempt(sent: &Result<Response<Incoming>, ProxyError>) -> retry::Attempt {
    match sent {
        Ok(r) => retry::Attempt::Answered {
            status: r.status().as_u16(),
            kind: ErrorKind::of(r),
            grpc_unavailable: grpc_unavailable(r.headers()),
        },
        Err(ProxyError::Connect(_) | ProxyError::Refused { .. }) => retry::Attempt::NotSent,
        Err(ProxyError::Upstream(_)) => retry::Attempt::Lost,
        Err(ProxyError::ClientBody(_)) => retry::Attempt::ClientFailed,
        Err(_) => retry::Attempt::Unroutable,
    }
}

/// Send `req` to `target` over a pooled session.
/// `(host, port)` is the request's authority, as `forward` parsed it.
pub(crate) async fn send(
    sc: &Arc<Sidecar>,
    target: &Target,
    (host, port): (&str, Option<u16>),
    req: Request<Body>,
    labels: &RouteLabels,
) -> Result<Response<Incoming>, ProxyError> {
    let (mut parts, body) = req.into_parts();
    let path = path_and_query(&parts.uri);
    let authority = match port {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    };
    parts.uri = format!("http://{authority}{path}")
        .parse()
        .map_err(|_| ProxyError::NotMeshName(host.to_string()))?;
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(http::header::HOST);
    parts.headers.remove(CLIENT_ID_HEADER);
    parts.version = http::Version::HTTP_2;

    // A request with no body and an idempotent method can be sent again if
    // its session dies under it (a pooled session to a peer that restarted).
    let retryable = parts.method.is_idempotent() && body.is_end_stream();
    let again = retryable.then(|| {
        let mut r = Request::new(empty());
        *r.method_mut() = parts.method.clone();
        *r.uri_mut() = parts.uri.clone();
        *r.version_mut() = parts.version;
        *r.headers_mut() = parts.headers.clone();
        r
    });
    let key = PoolKey::of(target);
    let (sender, pooled) = sc.pool.session(&sc.agent, target, &key, false).await?;
    let resp = match sender.clone().send_request(Request::from_parts(parts, body)).await {
        Ok(r) => r,
        Err(e)
            if again.is_some()
                && pooled
                && sc
                    .budgets
                    .withdraw(&ServiceKey::new(&target.namespace, &target.service), target) =>
        {
            tracing::debug!(error = %e, "pooled session failed; retrying on a new one");
            sc.metrics.retries.get_or_create(labels).inc();
            let (sender, _) = sc.pool.session(&sc.agent, target, &key, true).await?;
            let req = again.expect("checked");
            sender.clone().send_request(req).await.map_err(ProxyError::Upstream)?
        }
        Err(e) => {
            sc.pool.drop_if_closed(&key);
            return Err(ProxyError::Upstream(e));
        }
    };
    Ok(resp)
}

pub(crate) fn path_and_query(uri: &http::Uri) -> String {
    uri.path_and_query().map(|p| p.as_str()).unwrap_or("/").to_string()
}

fn strip_hop_by_hop(h: &mut http::HeaderMap) {
    for name in [
        "connection",
        "proxy-connection",
        "keep-alive",
        "te",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
    ] {
        h.remove(name);
    }
}

fn is_grpc(h: &http::HeaderMap) -> bool {
    h.get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// A trailers-only gRPC answer of UNAVAILABLE (14): the server did not
/// take the call up, so it may go to another endpoint.
fn grpc_unavailable(h: &http::HeaderMap) -> bool {
    h.get("grpc-status").is_some_and(|v| v.as_bytes() == b"14")
}
