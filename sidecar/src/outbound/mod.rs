//! Outbound: plain HTTP from the local app (an HTTP proxy, or a service
//! port with DNS on). Requests for `name.ns.svc.clusterset.local` are routed
//! by policy and health to the local cluster's sidecars directly, or through
//! the local gateway to another cluster; either way they ride HTTP/2 inside
//! an mTLS session that ends at the serving sidecar (`pool.rs`).
//!
//! A request has a time limit (its route's `timeout`, else
//! `--request-timeout`), counted from when the app finished sending it (an
//! upload takes what it takes), and each attempt its own (`retries.
//! perTryTimeout`); a gRPC call's `grpc-timeout` is a deadline from its
//! start. An attempt that fails where `retry.rs` says it may go
//! again is sent to another endpoint, then another cluster, within the
//! route's attempts and the retry budget. With `hedge`, an idempotent
//! request not answered in time gets a copy elsewhere; the first answer
//! wins. Upgrades (WebSocket) go through `upgrade.rs`.
//!
//! Over 600 lines on purpose: one request's path (admit, route, attempt,
//! hedge, retry, answer) reads top to bottom here; every decision on it is
//! a pure function elsewhere (`retry.rs`, `route.rs`, `balance.rs`,
//! `health.rs`), unit-tested there.

pub mod grpc;
pub mod retry;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use http::header::{CONNECTION, HeaderName, TE};
use http::{HeaderValue, Request, Response};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use isthmus_core::naming::{ServiceKey, ServiceName};
use prometheus_client::metrics::counter::Counter;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::admission::InFlight;
use crate::body::{self, Body, Replay, empty, full};
use crate::error::{ErrorKind, ProxyError};
use crate::inbound::CLIENT_ID_HEADER;
use crate::metrics::{CountedBody, Direction, RouteLabels};
use crate::pool::PoolKey;
use crate::route::{Hedge, Target};
use crate::{Sidecar, otlp, telemetry, trace, upgrade};

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

/// One outbound request, with its trace context, metrics, access line and
/// span; a gRPC call's failures told as gRPC statuses.
async fn observed(sc: Arc<Sidecar>, mut req: Request<Incoming>) -> Response<Body> {
    let start = std::time::Instant::now();
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
    let grpc_call = grpc::is_grpc(req.headers());
    let resp = match forward(&sc, req, &mut route).await {
        Ok(r) if grpc_call => grpc::as_grpc(r, None),
        Ok(r) => r,
        Err(e) => {
            tracing::info!(error = %e, "outbound request failed");
            let r = e.response();
            if grpc_call {
                grpc::as_grpc(r, Some(&e.to_string()))
            } else {
                r
            }
        }
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

/// Route a request and send it, again where allowed, within its deadline.
async fn forward(
    sc: &Arc<Sidecar>,
    mut req: Request<Incoming>,
    labels: &mut RouteLabels,
) -> Result<Response<Body>, ProxyError> {
    let start = Instant::now();
    if req.method() == http::Method::CONNECT {
        return Err(ProxyError::Connect405);
    }
    let (host, port) = authority(&req).ok_or(ProxyError::NoHost)?;
    let name = ServiceName::parse(&host).ok_or_else(|| ProxyError::NotMeshName(host.clone()))?;
    let key = name.key();
    labels.destination_service = key.to_string();
    sc.learn(&key).await;
    let _slot = sc
        .limits
        .reserve(&key, &sc.metrics)
        .ok_or_else(|| ProxyError::Overloaded {
            service: labels.destination_service.clone(),
            limit: sc.limits.max_requests_per_service(),
        })?;
    let target = sc.route(&name, port, Some(req.headers()), &[], labels)?;
    let settings = target.settings;
    let timeout = settings.timeout.unwrap_or(sc.cfg.request_timeout);
    let grpc_timeout = grpc::timeout(req.headers());
    let deadline = start + grpc_timeout.map_or(timeout, |g| g.min(timeout));

    if let Some(protocol) = upgrade::requested(&req) {
        let downstream = upgrade::as_connect(&mut req, &protocol);
        let mut target = target;
        if target.is_local() {
            let pick = target.addresses[rand::random_range(0..target.addresses.len())].clone();
            target.addresses = vec![pick];
        }
        let req = req.map(|b| b.boxed());
        let sent = tokio::time::timeout_at(deadline, send(sc, &target, (&host, port), req, labels))
            .await
            .map_err(|_| ProxyError::Timeout(timeout))??;
        return Ok(upgrade::switched(sent, &protocol, downstream));
    }

    let (req_bytes, resp_bytes) = sc.metrics.body_counters(labels);
    let buffered = tokio::time::timeout_at(deadline, body::buffer_small_body(req))
        .await
        .map_err(|_| ProxyError::Timeout(timeout))?;
    let (req, replay) = buffered.map_err(ProxyError::ClientBody)?;
    let (req, ended) = body::watch_end(req.map(|b| CountedBody::new(b, req_bytes.clone()).boxed()));
    let mut call = Call {
        sc,
        head: (req.method().clone(), req.uri().clone(), req.headers().clone()),
        facts: retry::Request {
            idempotent: req.method().is_idempotent(),
            grpc: grpc::is_grpc(req.headers()),
            local: false,
            retry_on: settings.retry_on,
        },
        host,
        port,
        name,
        key,
        timeout,
        ended,
        per_try: settings.per_try_timeout,
        grpc_deadline: grpc_timeout.map(|g| (start + g, g)),
        attempts: 0,
        max_attempts: settings.attempts,
        endpoints: target.addresses.clone(),
        failed_endpoints: Vec::new(),
        failed_clusters: Vec::new(),
        rounds: 0,
        req_bytes,
    };
    sc.budgets.deposit(&call.key, &target);
    let sent = call.run(target, req, &replay, settings.hedge, labels).await;
    let (mut parts, body) = sent?.into_parts();
    parts.version = http::Version::HTTP_11;
    Ok(Response::from_parts(parts, CountedBody::new(body, resp_bytes).boxed()))
}

/// One try of a request: where it went, and its endpoint's in-flight mark
/// (a local endpoint's answer teaches the balancer when the mark drops).
struct Try<'a> {
    target: Target,
    in_flight: Option<InFlight<'a>>,
}

/// A request on its way, with what its tries have taught so far.
struct Call<'a> {
    sc: &'a Arc<Sidecar>,
    head: (http::Method, http::Uri, http::HeaderMap),
    facts: retry::Request,
    host: String,
    port: Option<u16>,
    name: ServiceName,
    key: ServiceKey,
    /// The route's time limit, counted from the end of the request body.
    timeout: Duration,
    /// When the request's body ended, once it has.
    ended: body::Ended,
    per_try: Option<Duration>,
    /// The caller's `grpc-timeout`, as a deadline (and the timeout it was):
    /// each attempt carries what is left of it.
    grpc_deadline: Option<(Instant, Duration)>,
    attempts: u32,
    max_attempts: Option<u32>,
    /// The local endpoints of the cluster being tried.
    endpoints: Vec<String>,
    failed_endpoints: Vec<String>,
    failed_clusters: Vec<String>,
    /// Rounds over every cluster so far, after the first (`round_pause`).
    rounds: u32,
    req_bytes: Counter,
}

/// Pauses before each further round over every cluster, once all have
/// failed a request that may be sent again: about a second in all, the
/// time a restarted gateway or sidecar takes to listen again.
const ROUND_PAUSES: [Duration; 4] = [
    Duration::from_millis(50),
    Duration::from_millis(100),
    Duration::from_millis(250),
    Duration::from_millis(500),
];

type Sent = Result<Response<Body>, ProxyError>;

impl<'a> Call<'a> {
    async fn run(
        &mut self,
        target: Target,
        first: Request<Body>,
        replay: &Replay,
        hedge: Option<Hedge>,
        labels: &mut RouteLabels,
    ) -> Sent {
        let mut t = self.begin(target, &[]);
        let mut req = first;
        loop {
            let hedged = hedge.filter(|_| self.facts.idempotent && replay.body().is_some());
            let (sent, resend, next_endpoint, cluster) = match hedged {
                Some(h) => self.hedged(t, req, replay, h, labels).await,
                None => {
                    let sent = self.attempt(&t.target, req, self.may_resend(replay), labels).await;
                    let cluster = t.target.cluster.clone();
                    let (resend, next) = self.settle(t, &sent);
                    (sent, resend, next, cluster)
                }
            };
            let out_of_attempts = self.max_attempts.is_some_and(|m| self.attempts >= m);
            if !resend || out_of_attempts || self.expired() {
                return sent;
            }
            let Some(body) = replay.body() else { return sent };
            let target = match self.next_target(&cluster, next_endpoint, labels) {
                Some(t) => t,
                // Every cluster has failed this request, in a way that
                // allows sending it again: go round once more after a
                // pause, while the deadline allows, for a path that is
                // only restarting (a gateway, a pod) comes back within it.
                None => match self.round_pause() {
                    Some(pause) => {
                        tokio::time::sleep(pause).await;
                        self.rounds += 1;
                        self.failed_clusters.clear();
                        self.failed_endpoints.clear();
                        let Some(t) = self.next_target(&cluster, true, labels) else {
                            return sent;
                        };
                        t
                    }
                    None => return sent,
                },
            };
            if !self.sc.budgets.withdraw(&self.key, &target) {
                return sent;
            }
            tracing::debug!(from = %cluster, to = %target.cluster, "sending the request again");
            self.sc.metrics.retries.get_or_create(labels).inc();
            t = self.begin(target, &[]);
            req = self.again(body);
        }
    }

    /// A try at `target`: for a local service, the endpoint the balancer
    /// chooses among those not tried yet (nor in `also_skip`).
    fn begin(&mut self, mut target: Target, also_skip: &[String]) -> Try<'a> {
        self.attempts += 1;
        let mut in_flight = None;
        if !self.endpoints.is_empty() {
            let skip: Vec<String> = self.failed_endpoints.iter().chain(also_skip).cloned().collect();
            let mut gone = Vec::new();
            let sc: &'a Sidecar = self.sc;
            in_flight = sc
                .endpoints
                .choose(&sc.metrics, &target, &self.endpoints, &skip, &mut gone);
            if !gone.is_empty() {
                sc.pool.forget(&target.destination(), gone);
            }
            if let Some(f) = &in_flight {
                target.addresses = vec![f.addr.clone()];
            }
        }
        Try { target, in_flight }
    }

    /// The request again, with the body kept from the first try.
    fn again(&self, body: bytes::Bytes) -> Request<Body> {
        let (method, uri, headers) = &self.head;
        let mut r = Request::new(CountedBody::new(full(body), self.req_bytes.clone()).boxed());
        *r.method_mut() = method.clone();
        *r.uri_mut() = uri.clone();
        *r.headers_mut() = headers.clone();
        r
    }

    /// Whether the request is out of time.
    /// How long to wait before going round every cluster again (after
    /// `rounds` rounds), if another round may start: `ROUND_PAUSES` apart,
    /// and only if the pause ends before the request's deadline.
    fn round_pause(&self) -> Option<Duration> {
        let pause = *ROUND_PAUSES.get(self.rounds as usize)?;
        let at = Instant::now() + pause;
        let ended = self.ended.borrow().is_some_and(|e| at >= e + self.timeout);
        let grpc = self.grpc_deadline.is_some_and(|(d, _)| at >= d);
        (!ended && !grpc).then_some(pause)
    }

    fn expired(&self) -> bool {
        let now = Instant::now();
        self.ended.borrow().is_some_and(|at| now >= at + self.timeout)
            || self.grpc_deadline.is_some_and(|(d, _)| now >= d)
    }

    /// The time an attempt has: it runs out when the caller's gRPC deadline
    /// passes, or, once the request body has ended, when the attempt's
    /// per-try timeout or the request's limit does.
    fn clock(&self) -> impl Future<Output = ProxyError> + Send + 'static {
        let mut ended = self.ended.clone();
        let (per_try, timeout, grpc) = (self.per_try, self.timeout, self.grpc_deadline);
        async move {
            let grpc = async {
                match grpc {
                    Some((at, was)) => {
                        tokio::time::sleep_until(at).await;
                        ProxyError::Timeout(was)
                    }
                    None => std::future::pending().await,
                }
            };
            let route = async {
                let ended_at = match ended.wait_for(Option::is_some).await {
                    Ok(at) => at.expect("waited for it"),
                    // The body was dropped unfinished: count from now.
                    Err(_) => Instant::now(),
                };
                let now = Instant::now();
                let left = (ended_at + timeout).saturating_duration_since(now);
                match per_try {
                    Some(p) if p < left => {
                        tokio::time::sleep(p).await;
                        ProxyError::TryTimeout(p)
                    }
                    _ => {
                        tokio::time::sleep(left).await;
                        ProxyError::Timeout(timeout)
                    }
                }
            };
            tokio::select! {
                e = grpc => e,
                e = route => e,
            }
        }
    }

    /// Whether the request could go again if its answer broke off: then a
    /// small answer is read whole within the attempt (`body::whole_if_small`).
    fn may_resend(&self, replay: &Replay) -> bool {
        self.facts.idempotent && self.facts.retry_on.has(retry::RetryOn::RESET) && replay.body().is_some()
    }

    /// One attempt, within its time; a small answer read whole if `whole`.
    async fn attempt(&self, target: &Target, req: Request<Body>, whole: bool, labels: &RouteLabels) -> Sent {
        if self.expired() {
            return Err(ProxyError::Timeout(self.timeout));
        }
        let req = self.with_grpc_deadline(req);
        let clock = self.clock();
        let sending = answer(self.sc, target, (&self.host, self.port), req, whole, labels);
        tokio::select! {
            r = sending => r,
            e = clock => Err(e),
        }
    }

    /// The same attempt as a future of its own (for hedges, which race).
    fn attempt_owned(&self, target: Target, req: Request<Body>, whole: bool, labels: RouteLabels) -> AttemptFuture {
        let expired = self.expired().then_some(self.timeout);
        let req = self.with_grpc_deadline(req);
        let clock = self.clock();
        let (sc, host, port) = (self.sc.clone(), self.host.clone(), self.port);
        Box::pin(async move {
            if let Some(t) = expired {
                return Err(ProxyError::Timeout(t));
            }
            tokio::select! {
                r = answer(&sc, &target, (&host, port), req, whole, &labels) => r,
                e = clock => Err(e),
            }
        })
    }

    fn with_grpc_deadline(&self, mut req: Request<Body>) -> Request<Body> {
        if let Some((at, _)) = self.grpc_deadline {
            let left = at.saturating_duration_since(Instant::now());
            req.headers_mut().insert(grpc::GRPC_TIMEOUT, grpc::timeout_value(left));
        }
        req
    }

    /// Learn from a finished try: the balancer from its endpoint, the
    /// cluster's health once its turn is over. Returns whether the request
    /// may go again, and whether to another endpoint of the same cluster.
    fn settle(&mut self, t: Try<'a>, sent: &Sent) -> (bool, bool) {
        let verdict = retry::judge(
            attempt(sent),
            retry::Request {
                local: t.target.is_local(),
                ..self.facts
            },
        );
        let mut next_endpoint = false;
        if let Some(mut f) = t.in_flight {
            f.ok = verdict.endpoint_ok;
            self.failed_endpoints.push(f.addr.clone());
            next_endpoint = verdict.resend && self.failed_endpoints.len() < self.endpoints.len();
        }
        if !next_endpoint && let Some(outcome) = verdict.cluster {
            self.sc
                .router
                .outcome(&self.key, &t.target.cluster, outcome, &self.sc.metrics);
        }
        (verdict.resend, next_endpoint)
    }

    /// Where to go after a failure in `cluster`: another of its endpoints,
    /// or the next cluster by policy and health.
    fn next_target(&mut self, cluster: &str, next_endpoint: bool, labels: &mut RouteLabels) -> Option<Target> {
        if !next_endpoint {
            self.failed_clusters.push(cluster.to_string());
        }
        let target = self
            .sc
            .route(&self.name, self.port, Some(&self.head.2), &self.failed_clusters, labels)
            .ok()?;
        if !next_endpoint || target.cluster != cluster {
            self.endpoints = target.addresses.clone();
            self.failed_endpoints.clear();
        }
        Some(target)
    }

    /// A try raced by copies: if it has not answered `hedge.after` in, a
    /// copy goes to another endpoint or cluster (up to `hedge.max`, each
    /// drawing on the retry budget); the first answer that need not go
    /// again wins and the others are cancelled.
    async fn hedged(
        &mut self,
        first: Try<'a>,
        req: Request<Body>,
        replay: &Replay,
        hedge: Hedge,
        labels: &mut RouteLabels,
    ) -> (Sent, bool, bool, String) {
        let mut racing: FuturesUnordered<Racer> = FuturesUnordered::new();
        let mut tries: Vec<Option<Try<'a>>> = Vec::new();
        let whole = self.may_resend(replay);
        let launch = |call: &Call<'a>, i: usize, t: &Try<'a>, req: Request<Body>, labels: RouteLabels| {
            let f = call.attempt_owned(t.target.clone(), req, whole, labels);
            Box::pin(async move { (i, f.await) }) as Racer
        };
        racing.push(launch(self, 0, &first, req, labels.clone()));
        tries.push(Some(first));
        let mut copies = 0;
        let mut last: Option<(Sent, bool, bool, String)> = None;
        loop {
            let next_copy = tokio::time::sleep(hedge.after);
            tokio::pin!(next_copy);
            let can_copy = copies < hedge.max;
            tokio::select! {
                done = racing.next() => {
                    let Some((i, sent)) = done else {
                        return last.expect("a try ended");
                    };
                    let t = tries[i].take().expect("each try ends once");
                    let cluster = t.target.cluster.clone();
                    let (resend, next_endpoint) = self.settle(t, &sent);
                    if !resend || racing.is_empty() {
                        // The winner: the others are cancelled as they drop,
                        // and their endpoints learn how long they took.
                        for t in tries.iter_mut().filter_map(Option::take) {
                            if let Some(mut f) = t.in_flight {
                                f.ok = true;
                            }
                        }
                        return (sent, resend, next_endpoint, cluster);
                    }
                    last = Some((sent, resend, next_endpoint, cluster));
                }
                _ = &mut next_copy, if can_copy => {
                    copies += 1;
                    let Some(body) = replay.body() else { continue };
                    let busy: Vec<String> = tries
                        .iter()
                        .flatten()
                        .filter_map(|t| t.in_flight.as_ref().map(|f| f.addr.clone()))
                        .collect();
                    let busy_clusters: Vec<String> = tries.iter().flatten().map(|t| t.target.cluster.clone()).collect();
                    let Some(target) = self.alternative(&busy, &busy_clusters, labels) else { continue };
                    if !self.sc.budgets.withdraw(&self.key, &target) {
                        continue;
                    }
                    self.sc.metrics.hedges.get_or_create(labels).inc();
                    let t = self.begin(target, &busy);
                    let req = self.again(body);
                    racing.push(launch(self, tries.len(), &t, req, labels.clone()));
                    tries.push(Some(t));
                }
            }
        }
    }

    /// Somewhere else for a hedge: another endpoint of a local service, or
    /// another cluster, or (through its gateway, to whichever endpoint it
    /// picks) the same remote cluster.
    fn alternative(&self, busy: &[String], busy_clusters: &[String], labels: &mut RouteLabels) -> Option<Target> {
        let idle = self
            .endpoints
            .iter()
            .any(|e| !busy.contains(e) && !self.failed_endpoints.contains(e));
        let mut avoid: Vec<String> = self.failed_clusters.clone();
        if !idle {
            avoid.extend(busy_clusters.iter().cloned());
        }
        let name = &self.name;
        self.sc
            .route(name, self.port, Some(&self.head.2), &avoid, labels)
            .ok()
            .or_else(|| {
                self.sc
                    .route(name, self.port, Some(&self.head.2), &self.failed_clusters, labels)
                    .ok()
                    .filter(|t| !t.is_local() || idle)
            })
    }
}

type AttemptFuture = Pin<Box<dyn Future<Output = Sent> + Send>>;
/// A hedged try, numbered, racing the others.
type Racer = Pin<Box<dyn Future<Output = (usize, Sent)> + Send>>;

/// How an attempt ended, for the retry decision.
fn attempt(sent: &Sent) -> retry::Attempt {
    match sent {
        Ok(r) => retry::Attempt::Answered {
            status: r.status().as_u16(),
            kind: ErrorKind::of(r),
            grpc_unavailable: grpc::unavailable(r.headers()),
        },
        Err(ProxyError::Connect(_) | ProxyError::Refused { .. }) => retry::Attempt::NotSent,
        Err(ProxyError::Upstream(_)) => retry::Attempt::Lost,
        Err(ProxyError::Timeout(_) | ProxyError::TryTimeout(_)) => retry::Attempt::TimedOut,
        Err(ProxyError::ClientBody(_)) => retry::Attempt::ClientFailed,
        Err(_) => retry::Attempt::Unroutable,
    }
}

/// `send`, and a small answer read whole if `whole`: a body that breaks
/// off fails the attempt as a lost session would.
async fn answer(
    sc: &Arc<Sidecar>,
    target: &Target,
    authority: (&str, Option<u16>),
    req: Request<Body>,
    whole: bool,
    labels: &RouteLabels,
) -> Sent {
    let resp = send(sc, target, authority, req, labels).await?;
    body::whole_if_small(resp, whole).await.map_err(|e| {
        // As when the head is lost: the next try must not take the same
        // dead session from the pool.
        sc.pool.drop_if_closed(&PoolKey::of(target));
        ProxyError::Upstream(e)
    })
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

/// Remove what belongs to one hop of a message (RFC 9110 section 7.6.1):
/// `Connection` and every header it names, `Keep-Alive`,
/// `Proxy-Connection`, `Transfer-Encoding`, `Upgrade`, the proxy
/// credentials, and `TE` unless it asks for trailers (the one value that
/// means something end to end, and all HTTP/2 allows: gRPC servers refuse
/// calls without it). Nothing else.
pub(crate) fn strip_hop_by_hop(h: &mut http::HeaderMap) {
    if h.contains_key(CONNECTION) {
        let named: Vec<HeaderName> = h
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .filter(|n| *n != TE)
            .collect();
        for n in named {
            h.remove(n);
        }
    }
    for name in [
        "connection",
        "proxy-connection",
        "keep-alive",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
    ] {
        h.remove(name);
    }
    let trailers = h.get_all(TE).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',').any(|t| {
                t.split(';')
                    .next()
                    .is_some_and(|t| t.trim().eq_ignore_ascii_case("trailers"))
            })
        })
    });
    h.remove(TE);
    if trailers {
        h.insert(TE, HeaderValue::from_static("trailers"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_and_nothing_else() {
        let mut h = http::HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-hop, TE"),
            ("keep-alive", "timeout=5"),
            ("x-hop", "1"),
            ("te", "gzip, trailers;q=1"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("proxy-authorization", "Basic eA=="),
            ("x-app", "kept"),
            ("authorization", "Bearer kept"),
            ("content-type", "application/grpc"),
        ] {
            h.append(k, HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut h);
        let mut left: Vec<String> = h.keys().map(|k| k.to_string()).collect();
        left.sort();
        assert_eq!(left, ["authorization", "content-type", "te", "x-app"]);
        assert_eq!(h[TE], "trailers", "te: trailers survives, for gRPC");
        let mut h = http::HeaderMap::new();
        h.insert(TE, HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty());
    }
}
