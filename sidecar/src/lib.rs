//! The Isthmus sidecar: the proxy beside each workload.
//!
//! - Outbound (plain HTTP from the local app, on loopback): requests for
//!   `name.ns.svc.clusterset.local` are routed to the local cluster's
//!   sidecars directly, or through the local gateway to another cluster.
//!   Either way the request rides HTTP/2 inside an mTLS session that ends at
//!   the serving sidecar, pooled per destination.
//! - Inbound (mTLS only): verifies the client's SVID against the bundle of
//!   its own trust domain, and hands the request to the app with the
//!   client's SPIFFE ID in `x-isthmus-client-id`.
//! - With DNS on (`dns_addr`): answers `clusterset.local` names with the
//!   outbound address and listens there on every service port, for clients
//!   that dial the name unchanged; HTTP or opaque TCP, declared or detected.

pub mod balance;
pub mod detect;
pub mod dns;
pub mod health;
pub mod metrics;
pub mod otlp;
mod ports;
pub mod route;
pub mod trace;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Body as _, Incoming};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use isthmus_core::agent::{Agent, AgentError};
use isthmus_core::identity::{SpiffeId, validate_name};
use isthmus_core::local::ClusterDir;
use isthmus_core::naming::ServiceName;
use isthmus_core::tls::{self, ClientAuth, Expect};
use isthmus_core::tunnel::{TunnelRequest, TunnelResponse};
use isthmus_proto::{SidecarRegistration, watch_request};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::route::{RouteError, Target};

/// The verified SPIFFE ID of the calling workload, set by the inbound side.
pub const CLIENT_ID_HEADER: &str = "x-isthmus-client-id";
/// The cluster whose sidecar served a request, set on responses.
pub const SERVED_BY_HEADER: &str = "x-isthmus-cluster";
/// A machine-readable reason on responses the sidecar itself produced.
pub const ERROR_HEADER: &str = "x-isthmus-error";

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error(transparent)]
    Bind(#[from] isthmus_core::net::BindError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("{0}")]
    Config(String),
}

#[derive(Clone, Debug)]
pub struct Config {
    pub dir: std::path::PathBuf,
    /// Workload credential for this identity (else the admin token).
    pub credential: Option<String>,
    pub namespace: String,
    pub service_account: String,
    /// The service this workload serves, with the port clients call and
    /// where the workload itself listens (plain HTTP on loopback). `None`
    /// for a client-only workload.
    pub serve: Option<Serve>,
    pub inbound_addr: SocketAddr,
    pub outbound_addr: SocketAddr,
    pub instance: String,
    /// Admin endpoint (`/metrics`, `/ready`, `/live`), if any.
    pub admin_addr: Option<SocketAddr>,
    /// How long an outbound request may wait for its response headers.
    pub request_timeout: Duration,
    /// Print one JSON line per request on stdout.
    pub access_log: bool,
    /// Answer DNS for `clusterset.local` here, and listen on the outbound
    /// address's IP at every service port.
    pub dns_addr: Option<SocketAddr>,
    /// Service ports whose connections are opaque TCP without detection
    /// (server-first protocols, or to skip the detection wait).
    pub opaque_ports: Vec<u16>,
    /// Export spans over OTLP/HTTP (JSON) to this base URL, if set.
    pub otlp_endpoint: Option<String>,
    /// Client connections open at once, per direction; more are closed as
    /// they arrive.
    pub max_connections: usize,
    /// Outbound requests in flight at once to one service; more are
    /// answered 503 `overloaded` at once instead of queueing.
    pub max_requests_per_service: usize,
}

impl Config {
    /// A sidecar for `namespace`/`service_account` of the cluster at `dir`,
    /// serving `serve` if any, with every address on loopback port 0 and
    /// the command line's defaults for the rest.
    pub fn new(dir: &std::path::Path, namespace: &str, service_account: &str, serve: Option<Serve>) -> Self {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Self {
            dir: dir.to_path_buf(),
            credential: None,
            namespace: namespace.into(),
            service_account: service_account.into(),
            serve,
            inbound_addr: any,
            outbound_addr: any,
            instance: service_account.into(),
            admin_addr: Some(any),
            request_timeout: Duration::from_secs(15),
            access_log: false,
            dns_addr: None,
            opaque_ports: Vec::new(),
            otlp_endpoint: None,
            max_connections: 10_000,
            max_requests_per_service: 1_000,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Serve {
    pub service: String,
    pub port: u16,
    pub app: SocketAddr,
    /// The app speaks HTTP/2 without TLS (h2c; gRPC servers), not HTTP/1.1.
    pub app_http2: bool,
}

pub struct Running {
    pub inbound_addr: SocketAddr,
    pub outbound_addr: SocketAddr,
    pub id: SpiffeId,
    pub admin_addr: Option<SocketAddr>,
    pub dns_addr: Option<SocketAddr>,
    pub done: tokio::task::JoinHandle<()>,
}

type Body = BoxBody<Bytes, hyper::Error>;
type H2Sender = hyper::client::conn::http2::SendRequest<Body>;

struct Sidecar {
    cfg: Config,
    agent: Agent,
    app_client: hyper_util::client::legacy::Client<HttpConnector, Body>,
    /// One HTTP/2 session per destination (a local endpoint, or a remote
    /// cluster's service), shared by concurrent requests.
    pool: Mutex<HashMap<String, H2Sender>>,
    /// Endpoint choice for each local service.
    balancers: Mutex<HashMap<String, balance::Balancer>>,
    /// Shared by services without a TrafficPolicy.
    retry_budget: Mutex<balance::RetryBudget>,
    /// One per service whose policy sets its budget, by namespace/name.
    budgets: Mutex<HashMap<String, balance::RetryBudget>>,
    metrics: metrics::Metrics,
    otlp: Option<otlp::Exporter>,
    /// Connection slots: outbound (from the app), inbound (from the mesh).
    conn_slots: [Arc<tokio::sync::Semaphore>; 2],
    /// Outbound requests in flight, per destination service.
    in_flight: Mutex<HashMap<String, usize>>,
    /// Current priority level of each service route (TrafficPolicy).
    failover: Mutex<HashMap<String, route::LevelState>>,
    /// Passive outlier detection per (service, cluster), this cluster's
    /// included; ejected pairs are probed back.
    clusters: Mutex<health::ClusterHealth>,
}

/// Marks a request the serving sidecar answers itself: 200 if its app
/// accepts a connection now, else 502 `app-unavailable`.
pub const PROBE_HEADER: &str = "x-isthmus-probe";
/// How often each ejected (service, cluster) is probed.
const PROBE_INTERVAL: Duration = Duration::from_millis(250);
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

pub async fn run(cfg: Config, shutdown: CancellationToken) -> Result<Running, SidecarError> {
    let mut names = vec![&cfg.namespace, &cfg.service_account];
    names.extend(cfg.serve.as_ref().map(|s| &s.service));
    for n in names {
        validate_name(n).map_err(|e| SidecarError::Config(e.to_string()))?;
    }
    let (inbound, inbound_addr) = isthmus_core::net::bind(cfg.inbound_addr).await?;
    let (outbound, outbound_addr) = isthmus_core::net::bind(cfg.outbound_addr).await?;

    let dir = ClusterDir::new(&cfg.dir);
    let node = watch_request::Node::Sidecar(SidecarRegistration {
        namespace: cfg.namespace.clone(),
        service: cfg.serve.as_ref().map(|s| s.service.clone()).unwrap_or_default(),
        port: cfg.serve.as_ref().map(|s| u32::from(s.port)).unwrap_or_default(),
        inbound_addr: inbound_addr.to_string(),
        instance: cfg.instance.clone(),
        identity: String::new(),
        service_account: cfg.service_account.clone(),
    });
    let agent = Agent::start(
        &dir,
        cfg.credential.as_deref(),
        &cfg.namespace,
        &cfg.service_account,
        node,
        Duration::from_secs(30),
        shutdown.clone(),
    )
    .await?;
    let id = agent.id();
    let inbound_tls = tls::server_config(
        agent.svid.clone(),
        agent.bundles.clone(),
        ClientAuth::Required,
        &[tls::ALPN_H2, tls::ALPN_OPAQUE],
    )?;
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = metrics::Metrics::register(&mut registry);
    agent.svid_metrics.register(&mut registry);
    let ready = isthmus_core::metrics::Ready::default();
    let admin_addr =
        isthmus_core::metrics::serve_admin(cfg.admin_addr, registry, ready.clone(), shutdown.clone()).await?;
    let otlp = match &cfg.otlp_endpoint {
        None => None,
        Some(endpoint) => {
            let who = cfg.serve.as_ref().map_or(&cfg.service_account, |s| &s.service);
            let resource = vec![
                ("service.name", format!("{}/{who}", cfg.namespace)),
                ("service.instance.id", cfg.instance.clone()),
                ("isthmus.cluster", agent.cluster.clone()),
            ];
            let (dropped, failed) = (metrics.spans_dropped.clone(), metrics.spans_failed.clone());
            Some(
                otlp::Exporter::start(endpoint, resource, dropped, failed, shutdown.clone())
                    .map_err(SidecarError::Config)?,
            )
        }
    };
    let slots = || Arc::new(tokio::sync::Semaphore::new(cfg.max_connections));
    let sc = Arc::new(Sidecar {
        conn_slots: [slots(), slots()],
        in_flight: Mutex::new(HashMap::new()),
        failover: Mutex::new(HashMap::new()),
        clusters: Mutex::new(health::ClusterHealth::default()),
        otlp,
        metrics,
        app_client: hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .http2_only(cfg.serve.as_ref().is_some_and(|s| s.app_http2))
            .build(http),
        pool: Mutex::new(HashMap::new()),
        balancers: Mutex::new(HashMap::new()),
        retry_budget: Mutex::new(balance::RetryBudget::new(Instant::now())),
        budgets: Mutex::new(HashMap::new()),
        agent,
        cfg,
    });
    tracing::info!(%id, %inbound_addr, %outbound_addr, app = ?sc.cfg.serve.as_ref().map(|s| s.app), "sidecar ready");

    let mut dns_addr = None;
    if let Some(addr) = sc.cfg.dns_addr {
        let snap = sc.agent.config.clone();
        let known = Arc::new(move |name: &ServiceName| {
            snap.borrow()
                .services
                .iter()
                .any(|s| s.namespace == name.namespace && s.name == name.name)
        });
        dns_addr = Some(
            dns::serve(addr, outbound_addr.ip(), known, shutdown.clone())
                .await
                .map_err(|e| SidecarError::Config(format!("cannot serve DNS on {addr}: {e}")))?,
        );
        tokio::spawn(ports::follow(sc.clone(), outbound_addr.ip(), shutdown.clone()));
        tracing::info!(dns = ?dns_addr, "answering DNS for clusterset.local");
    }
    tokio::spawn(probe_ejected(sc.clone(), shutdown.clone()));
    let t1 = tokio::spawn(serve_inbound(sc.clone(), inbound, inbound_tls, shutdown.clone()));
    let t2 = tokio::spawn(serve_outbound(sc.clone(), outbound, shutdown.clone()));
    let done = tokio::spawn(async move {
        let _ = tokio::join!(t1, t2);
    });
    ready.set(true);
    Ok(Running {
        inbound_addr,
        outbound_addr,
        id,
        admin_addr,
        dns_addr,
        done,
    })
}

async fn serve_outbound(sc: Arc<Sidecar>, listener: TcpListener, stop: CancellationToken) {
    while let Some((tcp, _)) = isthmus_core::net::accept(&listener, &stop).await {
        let Some(slot) = sc.admit(OUTBOUND) else { continue };
        tokio::spawn(serve_http_outbound(sc.clone(), tcp, slot));
    }
}

/// One client connection of HTTP/1.1 or HTTP/2 requests from the app.
async fn serve_http_outbound(sc: Arc<Sidecar>, tcp: TcpStream, _slot: tokio::sync::OwnedSemaphorePermit) {
    let _open = sc.metrics.open("outbound");
    let svc = hyper::service::service_fn(move |req| {
        let sc = sc.clone();
        async move { Ok::<_, std::convert::Infallible>(outbound(sc, req).await) }
    });
    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(tcp), svc)
        .await;
}

async fn serve_inbound(
    sc: Arc<Sidecar>,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    stop: CancellationToken,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    while let Some((tcp, from)) = isthmus_core::net::accept(&listener, &stop).await {
        let Some(slot) = sc.admit(INBOUND) else { continue };
        let sc = sc.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let stream = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::info!(%from, error = %e, "inbound mTLS refused");
                    return;
                }
                Err(_) => return,
            };
            let Some(client) = tls::peer_id(stream.get_ref().1.peer_certificates()) else {
                return;
            };
            if stream.get_ref().1.alpn_protocol() == Some(tls::ALPN_OPAQUE) {
                if let Err(e) = inbound_opaque(&sc, &client, stream).await {
                    tracing::info!(%from, %client, error = %e, "inbound opaque connection refused");
                }
                return;
            }
            let _open = sc.metrics.open("inbound");
            let route = sc.inbound_route(&client);
            let remote = client.trust_domain != sc.agent.trust_domain;
            let client = HeaderValue::from_str(&client.to_string()).expect("SPIFFE IDs are ASCII");
            let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                let sc = sc.clone();
                let client = client.clone();
                let route = route.clone();
                async move {
                    let start = std::time::Instant::now();
                    let incoming = req
                        .headers()
                        .get(trace::TRACEPARENT)
                        .and_then(|v| v.to_str().ok())
                        .and_then(trace::TraceContext::parse);
                    // With spans exported, this hop is a span of its own,
                    // the app's parent; else the caller's span stays it.
                    let span = sc.otlp.as_ref().map(|_| {
                        let ctx = match incoming {
                            Some(p) => p.child(rand::random()),
                            None => trace::TraceContext::start(rand::random(), rand::random()),
                        };
                        let value = HeaderValue::from_str(&ctx.to_string()).expect("hex is ASCII");
                        req.headers_mut().insert(trace::TRACEPARENT, value);
                        (ctx, SystemTime::now(), req.method().clone())
                    });
                    let line = sc.cfg.access_log.then(|| {
                        let trace = incoming.map(|t| t.trace_id_hex()).unwrap_or_default();
                        (AccessLine::of(&req), trace)
                    });
                    let (req_bytes, resp_bytes) = sc.metrics.body_counters(&route);
                    let req = req.map(|b| metrics::CountedBody::new(b, req_bytes).boxed());
                    let resp = inbound(sc.clone(), client, remote, req)
                        .await
                        .map(|b| metrics::CountedBody::new(b, resp_bytes).boxed());
                    let elapsed = start.elapsed();
                    if let Some((line, trace)) = line {
                        line.print(&route, &resp, elapsed, &trace);
                    }
                    if let (Some(x), Some((ctx, wall, method))) = (&sc.otlp, span) {
                        x.record(span_of(
                            otlp::Kind::Server,
                            ctx,
                            incoming,
                            wall,
                            method,
                            &route,
                            &resp,
                            elapsed,
                        ));
                    }
                    sc.metrics.observe(route, resp.status().as_u16(), elapsed.as_secs_f64());
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Carry a verified opaque TCP connection to the local app, as is (the app
/// learns nothing of the caller's identity: there are no headers to put it
/// in; the policy is enforced here).
async fn inbound_opaque(
    sc: &Sidecar,
    client: &SpiffeId,
    mut stream: tokio_rustls::server::TlsStream<TcpStream>,
) -> Result<(), String> {
    let _open = sc.metrics.open("inbound");
    let remote = client.trust_domain != sc.agent.trust_domain;
    let route = sc.inbound_route(client);
    let app = sc
        .cfg
        .serve
        .as_ref()
        .map(|s| s.app)
        .ok_or("this workload serves no service")?;
    if remote && !sc.exported() {
        sc.metrics.tcp(&route, "refused");
        return Err(format!("this service is not exported by cluster {}", sc.agent.cluster));
    }
    let mut upstream = match TcpStream::connect(app).await {
        Ok(t) => t,
        Err(e) => {
            sc.metrics.tcp(&route, "app-unavailable");
            return Err(format!("the workload at {app} did not answer: {e}"));
        }
    };
    let _ = upstream.set_nodelay(true);
    sc.metrics.tcp(&route, "ok");
    let (received, sent) = tokio::io::copy_bidirectional(&mut stream, &mut upstream)
        .await
        .unwrap_or((0, 0));
    sc.metrics.bytes(&route, received, sent);
    Ok(())
}

/// Hand a verified request to the local app.
async fn inbound(sc: Arc<Sidecar>, client: HeaderValue, remote: bool, req: Request<Body>) -> Response<Body> {
    // Callers from other clusters reach only exported services, whether or
    // not they came through the gateway (which checks the same).
    if remote && !sc.exported() {
        return error(
            StatusCode::FORBIDDEN,
            "not-exported",
            format!("this service is not exported by cluster {}", sc.agent.cluster),
        );
    }
    let Some(app) = sc.cfg.serve.as_ref().map(|s| s.app) else {
        return error(
            StatusCode::NOT_FOUND,
            "no-service",
            "this workload serves no service".into(),
        );
    };
    if req.headers().contains_key(PROBE_HEADER) {
        return match tokio::time::timeout(PROBE_TIMEOUT, TcpStream::connect(app)).await {
            Ok(Ok(_)) => Response::new(full(Bytes::from_static(b"ok\n"))),
            Ok(Err(e)) => error(
                StatusCode::BAD_GATEWAY,
                "app-unavailable",
                format!("the workload at {app} refuses connections: {e}"),
            ),
            Err(_) => error(
                StatusCode::BAD_GATEWAY,
                "app-unavailable",
                format!("the workload at {app} did not accept a connection within {PROBE_TIMEOUT:?}"),
            ),
        };
    }
    let (mut parts, body) = req.into_parts();
    let authority = parts.uri.authority().map(|a| a.to_string());
    let path = path_and_query(&parts.uri);
    parts.uri = match format!("http://{app}{path}").parse() {
        Ok(u) => u,
        Err(_) => return error(StatusCode::BAD_REQUEST, "bad-request", "unparseable path".into()),
    };
    if let Some(a) = authority.and_then(|a| HeaderValue::from_str(&a).ok()) {
        parts.headers.insert(http::header::HOST, a);
    }
    // Only the sidecar may say who the caller is.
    parts.headers.insert(CLIENT_ID_HEADER, client);
    // The app speaks HTTP/1.1 on loopback whatever the mesh hop used.
    parts.version = http::Version::HTTP_11;
    let cluster = HeaderValue::from_str(&sc.agent.cluster).expect("cluster names are ASCII");
    match sc.app_client.request(Request::from_parts(parts, body)).await {
        Ok(resp) => {
            let mut resp = resp.map(|b| b.boxed());
            resp.headers_mut().insert(SERVED_BY_HEADER, cluster);
            // Only sidecars say why they failed: callers retry on it.
            resp.headers_mut().remove(ERROR_HEADER);
            resp
        }
        // Nothing reached the app: the caller may send the request again
        // elsewhere, whatever its method.
        Err(e) if e.is_connect() => error(
            StatusCode::BAD_GATEWAY,
            "app-unavailable",
            format!(
                "the workload at {app} refuses connections: {}",
                isthmus_core::local::error_chain(&e)
            ),
        ),
        Err(e) => error(
            StatusCode::BAD_GATEWAY,
            "app-failed",
            format!(
                "the workload at {app} did not answer: {}",
                isthmus_core::local::error_chain(&e)
            ),
        ),
    }
}

fn error(status: StatusCode, kind: &'static str, msg: String) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("isthmus: {msg}\n")))
            .map_err(|n| match n {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(ERROR_HEADER, HeaderValue::from_static(kind));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Why an outbound request could not be delivered.
#[derive(Debug, thiserror::Error)]
enum ProxyError {
    #[error("request has no host: send it through this sidecar as an HTTP proxy or with a Host header")]
    NoHost,
    #[error("{0} is not a mesh service name (expected <name>.<namespace>.svc.clusterset.local)")]
    NotMeshName(String),
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error("cluster {0} has no gateway running, so other clusters are unreachable")]
    NoGateway(String),
    #[error("{0}")]
    Connect(String),
    #[error("{cluster} refused the tunnel ({code}): {reason}")]
    Refused {
        cluster: String,
        code: String,
        reason: String,
    },
    #[error("upstream: {0}")]
    Upstream(String),
    #[error("reading the request body: {0}")]
    ClientBody(String),
    #[error(
        "{service} has {limit} requests in flight from this workload already (the sidecar's --max-requests-per-service)"
    )]
    Overloaded { service: String, limit: usize },
    #[error("no response within {0:?} (the sidecar's --request-timeout)")]
    Timeout(Duration),
}

impl ProxyError {
    fn response(&self) -> Response<Body> {
        let (status, kind) = match self {
            ProxyError::NoHost | ProxyError::NotMeshName(_) | ProxyError::ClientBody(_) => {
                (StatusCode::BAD_REQUEST, "bad-request")
            }
            ProxyError::Route(RouteError::UnknownService { .. }) => {
                (StatusCode::SERVICE_UNAVAILABLE, "unknown-service")
            }
            ProxyError::Route(RouteError::PortMismatch { .. }) => (StatusCode::SERVICE_UNAVAILABLE, "port-mismatch"),
            ProxyError::Route(_) => (StatusCode::SERVICE_UNAVAILABLE, "no-endpoints"),
            ProxyError::NoGateway(_) => (StatusCode::SERVICE_UNAVAILABLE, "no-gateway"),
            ProxyError::Connect(_) => (StatusCode::BAD_GATEWAY, "connect-failed"),
            ProxyError::Refused { .. } => (StatusCode::BAD_GATEWAY, "tunnel-refused"),
            ProxyError::Upstream(_) => (StatusCode::BAD_GATEWAY, "upstream-failed"),
            ProxyError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            ProxyError::Overloaded { .. } => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
        };
        error(status, kind, self.to_string())
    }
}

async fn outbound(sc: Arc<Sidecar>, mut req: Request<Incoming>) -> Response<Body> {
    let start = std::time::Instant::now();
    let mut route = metrics::RouteLabels {
        direction: "outbound",
        source_cluster: sc.agent.cluster.clone(),
        destination_cluster: "unknown".into(),
        destination_service: "unknown".into(),
    };
    // Continue the caller's trace with this hop's span, or start one.
    let parent = req
        .headers()
        .get(trace::TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(trace::TraceContext::parse);
    let ctx = match parent {
        Some(p) => p.child(rand::random()),
        None => {
            // A new trace: vendor state of a trace we do not continue goes.
            req.headers_mut().remove(trace::TRACESTATE);
            trace::TraceContext::start(rand::random(), rand::random())
        }
    };
    req.headers_mut().insert(
        trace::TRACEPARENT,
        HeaderValue::from_str(&ctx.to_string()).expect("hex is ASCII"),
    );
    let line = sc.cfg.access_log.then(|| AccessLine::of(&req));
    let span = sc.otlp.as_ref().map(|_| (SystemTime::now(), req.method().clone()));
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
    if let (Some(x), Some((wall, method))) = (&sc.otlp, span) {
        x.record(span_of(
            otlp::Kind::Client,
            ctx,
            parent,
            wall,
            method,
            &route,
            &resp,
            elapsed,
        ));
    }
    sc.metrics.observe(route, resp.status().as_u16(), elapsed.as_secs_f64());
    resp
}

/// The span of one request through this sidecar, for OTLP.
#[allow(clippy::too_many_arguments)]
fn span_of(
    kind: otlp::Kind,
    ctx: trace::TraceContext,
    parent: Option<trace::TraceContext>,
    start: SystemTime,
    method: http::Method,
    route: &metrics::RouteLabels,
    resp: &Response<Body>,
    duration: Duration,
) -> otlp::Span {
    otlp::Span {
        ctx,
        parent: parent.map(|p| p.span_id),
        name: format!("{} {method} {}", route.direction, route.destination_service),
        kind,
        start,
        duration,
        status: resp.status().as_u16(),
        error: resp
            .headers()
            .get(ERROR_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        attributes: vec![
            ("http.request.method", method.to_string()),
            ("isthmus.source_cluster", route.source_cluster.clone()),
            ("isthmus.destination_cluster", route.destination_cluster.clone()),
            ("isthmus.destination_service", route.destination_service.clone()),
        ],
    }
}

/// What the access log says of a request, taken before it is sent on.
struct AccessLine {
    method: String,
    authority: String,
    path: String,
}

impl AccessLine {
    fn of<B>(req: &Request<B>) -> Self {
        Self {
            method: req.method().to_string(),
            authority: req
                .uri()
                .authority()
                .map(|a| a.to_string())
                .or_else(|| Some(req.headers().get(http::header::HOST)?.to_str().ok()?.to_string()))
                .unwrap_or_default(),
            path: path_and_query(req.uri()),
        }
    }

    /// One JSON line on stdout.
    fn print(self, route: &metrics::RouteLabels, resp: &Response<Body>, elapsed: Duration, trace_id: &str) {
        println!("{}", self.render(route, resp, elapsed, trace_id));
    }

    fn render(
        self,
        route: &metrics::RouteLabels,
        resp: &Response<Body>,
        elapsed: Duration,
        trace_id: &str,
    ) -> serde_json::Value {
        serde_json::json!({
            "time_unix_ms": isthmus_core::unix_now_ms(),
            "direction": route.direction,
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

const OUTBOUND: usize = 0;
const INBOUND: usize = 1;

/// An outbound request counted in flight to its service until dropped.
struct Slot<'a> {
    sc: &'a Sidecar,
    service: String,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut all = self.sc.in_flight.lock().expect("in-flight lock");
        if let Some(n) = all.get_mut(&self.service) {
            *n -= 1;
            if *n == 0 {
                all.remove(&self.service);
            }
        }
    }
}

impl Sidecar {
    /// Route `name:port` by policy and health, avoiding `failed` clusters
    /// and ejected ones, and record a failover or failback it causes.
    fn route(
        &self,
        name: &ServiceName,
        port: Option<u16>,
        headers: Option<&http::HeaderMap>,
        failed: &[String],
        labels: &mut metrics::RouteLabels,
    ) -> Result<Target, ProxyError> {
        let now = Instant::now();
        let key = name.key();
        let tried = |c: &str| failed.iter().any(|f| f == c);
        let avoid = |c: &str| tried(c) || self.cluster_ejected(&key, c);
        let routed = {
            let snap = self.agent.config.borrow();
            let route_avoiding = |avoid: &dyn Fn(&str) -> bool| {
                route::route(
                    &snap,
                    name,
                    port,
                    &route::Inputs {
                        headers,
                        avoid,
                        failover: Some(&self.failover),
                        now,
                        random: rand::random(),
                    },
                )
            };
            match route_avoiding(&avoid) {
                // Everything left is ejected: use it anyway rather than
                // refuse (a probe may not have caught up; ejection must
                // never make things worse than the failures it saw).
                Err(RouteError::NoEndpoints { .. }) => route_avoiding(&tried)?,
                r => r?,
            }
        };
        if let Some(moved) = routed.moved {
            tracing::info!(service = %key, level = routed.level, cluster = %routed.target.cluster, ?moved, "traffic moved to another priority level");
            self.metrics
                .level_moved(&key, routed.level, moved == route::LevelMove::Failover);
        }
        labels.destination_cluster = routed.target.cluster.clone();
        Ok(routed.target)
    }

    /// Use the retry budget of `service` ("ns/name"), whose policy's terms
    /// `target` carries: the policy's own budget, else the shared one.
    fn budget<R>(&self, service: &str, target: &Target, f: impl FnOnce(&mut balance::RetryBudget) -> R) -> R {
        let Some((percent, floor)) = target.retry_budget else {
            return f(&mut self.retry_budget.lock().expect("budget lock"));
        };
        let params = (u64::from(percent), u64::from(floor));
        let fresh = || balance::RetryBudget::with(Instant::now(), params.0, params.1);
        let mut all = self.budgets.lock().expect("budgets lock");
        // Looked up by &str: no key is built per request once it exists.
        if !all.contains_key(service) {
            all.insert(service.to_string(), fresh());
        }
        let b = all.get_mut(service).expect("inserted");
        if b.params() != params {
            // The policy changed: a new budget with the new terms.
            *b = fresh();
        }
        f(b)
    }

    fn cluster_ejected(&self, service: &str, cluster: &str) -> bool {
        self.clusters
            .lock()
            .expect("clusters lock")
            .is_ejected(service, cluster)
    }

    /// Learn from a request to `service` in `cluster` (see `health`).
    fn cluster_outcome(&self, service: &str, cluster: &str, outcome: health::Outcome) {
        let change = self
            .clusters
            .lock()
            .expect("clusters lock")
            .outcome(service, cluster, outcome);
        match change {
            Some(health::Change::Ejected) => {
                tracing::warn!(%service, %cluster, "cluster ejected for this service (a request not delivered there, or failed answers in a row); probing it");
            }
            Some(health::Change::Restored) => {
                tracing::info!(%service, %cluster, "cluster answers this service again");
            }
            None => return,
        }
        self.metrics
            .cluster_health(service, cluster, change == Some(health::Change::Ejected));
    }

    /// A connection slot in `direction`, or `None` (the connection is
    /// closed, and counted) when all are taken.
    fn admit(&self, direction: usize) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let slot = self.conn_slots[direction].clone().try_acquire_owned().ok();
        if slot.is_none() {
            let name = if direction == OUTBOUND { "outbound" } else { "inbound" };
            tracing::warn!(
                direction = name,
                limit = self.cfg.max_connections,
                "connection limit reached; closing a new connection"
            );
            self.metrics.rejected(name, "connection-limit");
        }
        slot
    }

    /// Count a request in flight to `service`, unless it already has
    /// `max_requests_per_service`: then it is refused at once, so a slow
    /// service cannot pile up every client of this workload.
    fn reserve(&self, service: &str) -> Result<Slot<'_>, ProxyError> {
        let mut all = self.in_flight.lock().expect("in-flight lock");
        let n = all.entry(service.to_string()).or_default();
        if *n >= self.cfg.max_requests_per_service {
            drop(all);
            self.metrics.rejected("outbound", "request-limit");
            return Err(ProxyError::Overloaded {
                service: service.to_string(),
                limit: self.cfg.max_requests_per_service,
            });
        }
        *n += 1;
        Ok(Slot {
            sc: self,
            service: service.to_string(),
        })
    }

    /// Whether this workload's service is exported to linked clusters.
    fn exported(&self) -> bool {
        let Some(serve) = &self.cfg.serve else { return false };
        let snap = self.agent.config.borrow();
        snap.services
            .iter()
            .any(|s| s.namespace == self.cfg.namespace && s.name == serve.service && s.exported)
    }

    /// Metric labels of a connection from `client` to this workload.
    fn inbound_route(&self, client: &SpiffeId) -> metrics::RouteLabels {
        metrics::RouteLabels {
            direction: "inbound",
            source_cluster: self.cluster_of(&client.trust_domain),
            destination_cluster: self.agent.cluster.clone(),
            destination_service: self
                .cfg
                .serve
                .as_ref()
                .map(|s| format!("{}/{}", self.cfg.namespace, s.service))
                .unwrap_or_default(),
        }
    }

    /// The cluster a trust domain belongs to, for metric labels.
    fn cluster_of(&self, trust_domain: &str) -> String {
        let snap = self.agent.config.borrow();
        if trust_domain == snap.trust_domain {
            return snap.cluster.clone();
        }
        snap.peers
            .iter()
            .find(|p| p.trust_domain == trust_domain)
            .map(|p| p.cluster.clone())
            .unwrap_or_else(|| "unknown".into())
    }
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

async fn forward(
    sc: &Arc<Sidecar>,
    req: Request<Incoming>,
    labels: &mut metrics::RouteLabels,
) -> Result<Response<Body>, ProxyError> {
    let (host, port) = authority(&req).ok_or(ProxyError::NoHost)?;
    let name = ServiceName::parse(&host).ok_or_else(|| ProxyError::NotMeshName(host.clone()))?;
    labels.destination_service = name.key();
    let _slot = sc.reserve(&labels.destination_service)?;
    let mut failed_clusters: Vec<String> = Vec::new();
    let mut target = sc.route(&name, port, Some(req.headers()), &failed_clusters, labels)?;
    // A local service: this request's endpoint, by power of two choices
    // (a remote cluster's gateway chooses among that cluster's endpoints).
    // Within the retry budget, a request goes to another endpoint when its
    // endpoint could not be reached (nothing was sent, so any request whose
    // body is at hand can go again), and a gRPC call when it was answered
    // UNAVAILABLE without a body (the server did not take it up).
    let mut endpoints = target.addresses.clone();
    let grpc = is_grpc(req.headers());
    let head = (req.method().clone(), req.uri().clone(), req.headers().clone());
    let (req_bytes, resp_bytes) = sc.metrics.body_counters(labels);
    let (req, replay) = buffer_small_body(req).await?;
    let mut req = req.map(|b| metrics::CountedBody::new(b, req_bytes.clone()).boxed());
    let mut failed: Vec<String> = Vec::new();
    let idempotent = head.0.is_idempotent();
    sc.budget(&labels.destination_service, &target, |b| b.deposit(Instant::now()));
    let sent = loop {
        let mut in_flight = None;
        if !endpoints.is_empty() {
            in_flight = choose_endpoint(sc, &target, &endpoints, &failed);
            if let Some(f) = &in_flight {
                target.addresses = vec![f.addr.clone()];
            }
        }
        let sent = send(sc, &target, (&host, port), req, labels).await;
        // May this request go again, elsewhere? Yes if nothing reached the
        // app (the endpoint, its app, the gateway or the tunnel failed), or
        // a gRPC server answered UNAVAILABLE before taking the call up; for
        // an idempotent request also if its session died before an answer.
        let unreached = match &sent {
            Err(ProxyError::Connect(_) | ProxyError::Refused { .. }) => true,
            Err(ProxyError::Upstream(_)) => idempotent,
            Ok(r) => {
                sidecar_error(r) == Some("app-unavailable")
                    || idempotent && sidecar_error(r) == Some("app-failed")
                    || grpc && grpc_unavailable(r.headers())
            }
            Err(_) => false,
        };
        let answered = matches!(&sent, Ok(r) if !r.status().is_server_error()) && !unreached;
        let mut next_endpoint = false;
        if let Some(mut f) = in_flight {
            f.ok = answered;
            failed.push(f.addr.clone());
            next_endpoint = unreached && failed.len() < endpoints.len();
        }
        if !next_endpoint {
            // The cluster's turn is over: its health for this service
            // learns from it (502/503/504 or unreached count against it; a
            // 500 is the app's answer).
            let outcome = match &sent {
                _ if unreached => Some(health::Outcome::Unreached),
                // Failed answers count against another cluster, whose
                // endpoints only its gateway sees; here each endpoint has
                // its own outlier detection (balance.rs), and one bad
                // endpoint must not take the whole cluster out.
                Ok(r) if matches!(r.status().as_u16(), 502..=504) => {
                    (!target.is_local()).then_some(health::Outcome::Failed)
                }
                Ok(_) | Err(ProxyError::ClientBody(_)) => Some(health::Outcome::Ok),
                Err(_) => Some(health::Outcome::Unreached),
            };
            if let Some(outcome) = outcome {
                sc.cluster_outcome(&labels.destination_service, &target.cluster, outcome);
            }
        }
        let body = match replay.body() {
            Some(body)
                if unreached && sc.budget(&labels.destination_service, &target, |b| b.withdraw(Instant::now())) =>
            {
                body
            }
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
        let mut r = Request::new(metrics::CountedBody::new(full(body), req_bytes.clone()).boxed());
        *r.method_mut() = method.clone();
        *r.uri_mut() = uri.clone();
        *r.headers_mut() = headers.clone();
        req = r;
    };
    let (mut parts, body) = sent?.into_parts();
    parts.version = http::Version::HTTP_11;
    Ok(Response::from_parts(
        parts,
        metrics::CountedBody::new(body, resp_bytes).boxed(),
    ))
}

/// Request bodies of a declared length up to this are read whole before the
/// request is sent on, so its HEADERS and DATA frames leave in one TLS record
/// and one write (streamed, HEADERS goes alone first: a write, and a wake-up
/// at the peer, more per request). Larger or unsized bodies stream.
const BUFFER_BODY_MAX: u64 = 16 * 1024;

/// The request with its body read whole if it is small (see
/// `BUFFER_BODY_MAX`), and how to get that body again to resend it.
///
/// A body of unknown length (gRPC clients send none) streams as it comes:
/// waiting for its end could deadlock a streaming call whose client waits
/// for the server's first message. A copy is kept as it passes, up to the
/// same size, so a call the server did not take up can be sent again.
async fn buffer_small_body(req: Request<Incoming>) -> Result<(Request<Body>, Replay), ProxyError> {
    if req.body().is_end_stream() {
        return Ok((req.map(|_| empty()), Replay::Ready(Bytes::new())));
    }
    let declared = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let (parts, body) = req.into_parts();
    match declared {
        Some(n) if n <= BUFFER_BODY_MAX => {
            let bytes = body
                .collect()
                .await
                .map_err(|e| ProxyError::ClientBody(e.to_string()))?
                .to_bytes();
            Ok((Request::from_parts(parts, full(bytes.clone())), Replay::Ready(bytes)))
        }
        Some(_) => Ok((Request::from_parts(parts, body.boxed()), Replay::No)),
        None => {
            let (tee, recording) = Tee::new(body);
            Ok((Request::from_parts(parts, tee.boxed()), Replay::Recorded(recording)))
        }
    }
}

/// How a request's body can be had again, to resend the request.
enum Replay {
    Ready(Bytes),
    Recorded(Recording),
    No,
}

impl Replay {
    /// The whole body, if it is at hand (a recording only once it ended).
    fn body(&self) -> Option<Bytes> {
        match self {
            Replay::Ready(b) => Some(b.clone()),
            Replay::Recorded(r) => match &*r.0.lock().expect("recording lock") {
                Recorded::Done(b) => Some(b.clone()),
                _ => None,
            },
            Replay::No => None,
        }
    }
}

#[derive(Clone)]
struct Recording(Arc<Mutex<Recorded>>);

enum Recorded {
    Partial(bytes::BytesMut),
    Done(Bytes),
    /// Too large to keep, or it had trailers.
    Abandoned,
}

/// A body passed through unchanged while a copy of it is recorded.
struct Tee {
    inner: Incoming,
    rec: Recording,
}

impl Tee {
    fn new(inner: Incoming) -> (Self, Recording) {
        let rec = Recording(Arc::new(Mutex::new(Recorded::Partial(bytes::BytesMut::new()))));
        (
            Tee {
                inner,
                rec: rec.clone(),
            },
            rec,
        )
    }

    fn finish(&self) {
        let mut r = self.rec.0.lock().expect("recording lock");
        if let Recorded::Partial(buf) = &mut *r {
            *r = Recorded::Done(std::mem::take(buf).freeze());
        }
    }
}

impl hyper::body::Body for Tee {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                let mut r = self.rec.0.lock().expect("recording lock");
                match (&mut *r, frame.data_ref()) {
                    (Recorded::Partial(buf), Some(d)) if (buf.len() + d.len()) as u64 <= BUFFER_BODY_MAX => {
                        buf.extend_from_slice(d)
                    }
                    _ => *r = Recorded::Abandoned,
                }
                drop(r);
                // Whoever polls may stop at the last frame without asking
                // for the end.
                if self.inner.is_end_stream() {
                    self.finish();
                }
            }
            std::task::Poll::Ready(None) => self.finish(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|n| match n {}).boxed()
}

fn is_grpc(h: &http::HeaderMap) -> bool {
    h.get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// Probe each ejected (service, cluster) through the same path requests
/// take (a local endpoint's sidecar, or the gateways and a sidecar there);
/// the serving sidecar answers whether its app accepts connections. A
/// success puts the pair back in service (traffic returns after the
/// failback hold). Local pairs with no registered endpoints are not
/// probed: they come back when a workload registers.
async fn probe_ejected(sc: Arc<Sidecar>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(PROBE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let running: Arc<Mutex<std::collections::HashSet<(String, String)>>> = Arc::default();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let ejected = sc.clusters.lock().expect("clusters lock").ejected();
        for pair in ejected {
            // One probe per pair at a time.
            if !running.lock().expect("probes lock").insert(pair.clone()) {
                continue;
            }
            let (sc, running) = (sc.clone(), running.clone());
            tokio::spawn(async move {
                let ok = probe(&sc, &pair.0, &pair.1).await;
                if let Some(ok) = ok {
                    sc.metrics.probe(&pair.0, &pair.1, ok);
                    let outcome = if ok {
                        health::Outcome::Ok
                    } else {
                        health::Outcome::Unreached
                    };
                    sc.cluster_outcome(&pair.0, &pair.1, outcome);
                }
                running.lock().expect("probes lock").remove(&pair);
            });
        }
    }
}

/// One probe of `service` ("ns/name") in `cluster`: `None` if there is
/// nothing to probe there now.
async fn probe(sc: &Arc<Sidecar>, service: &str, cluster: &str) -> Option<bool> {
    let (namespace, name) = service.split_once('/')?;
    let svc = ServiceName {
        cluster: Some(cluster.to_string()),
        name: name.to_string(),
        namespace: namespace.to_string(),
    };
    let mut target = {
        let snap = sc.agent.config.borrow();
        route::route(&snap, &svc, None, &route::Inputs::simple(0)).ok()?.target
    };
    if target.is_local() {
        let pick = target.addresses[rand::random_range(0..target.addresses.len())].clone();
        target.addresses = vec![pick];
    }
    let host = format!("{name}.{namespace}.svc.clusterset.local");
    let mut req = Request::new(empty());
    req.headers_mut().insert(PROBE_HEADER, HeaderValue::from_static("1"));
    let labels = metrics::RouteLabels {
        direction: "outbound",
        source_cluster: sc.agent.cluster.clone(),
        destination_cluster: cluster.to_string(),
        destination_service: service.to_string(),
    };
    let sent = tokio::time::timeout(
        PROBE_TIMEOUT,
        send(sc, &target, (&host, Some(target.port)), req, &labels),
    )
    .await;
    let ok = matches!(&sent, Ok(Ok(r)) if r.status() == StatusCode::OK);
    tracing::debug!(%service, %cluster, ok, "probe");
    Some(ok)
}

/// Why the serving sidecar failed a request, if it did: `app-unavailable`
/// (its app refused the connection: nothing was delivered) or `app-failed`
/// (the app took the request but gave no answer).
fn sidecar_error<B>(r: &Response<B>) -> Option<&str> {
    if r.status() != StatusCode::BAD_GATEWAY {
        return None;
    }
    r.headers().get(ERROR_HEADER)?.to_str().ok()
}

/// A trailers-only gRPC answer of UNAVAILABLE (14): the server did not
/// take the call up, so it may go to another endpoint.
fn grpc_unavailable(h: &http::HeaderMap) -> bool {
    h.get("grpc-status").is_some_and(|v| v.as_bytes() == b"14")
}

/// Choose a local endpoint of `target` other than `failed`, and count the
/// request in flight there. Endpoints that left the service (not among
/// `endpoints`) are forgotten, with their pooled sessions.
fn choose_endpoint<'a>(
    sc: &'a Sidecar,
    target: &Target,
    endpoints: &[String],
    failed: &[String],
) -> Option<InFlight<'a>> {
    let now = Instant::now();
    let service = service_key(target);
    // Usually nothing has failed yet: no copy of the endpoint list then.
    let candidates: std::borrow::Cow<'_, [String]> = if failed.is_empty() {
        endpoints.into()
    } else {
        endpoints
            .iter()
            .filter(|e| !failed.contains(e))
            .cloned()
            .collect::<Vec<_>>()
            .into()
    };
    let (addr, gone) = {
        let mut all = sc.balancers.lock().expect("balancers lock");
        let b = all.entry(service.clone()).or_default();
        let gone = b.retain(endpoints);
        let addr = b
            .pick(&candidates, now, |n| rand::random_range(0..n))
            .map(str::to_string);
        if let Some(a) = &addr {
            b.start(a, now);
        }
        (addr, gone)
    };
    if !gone.is_empty() {
        let mut pool = sc.pool.lock().expect("pool lock");
        for g in gone {
            pool.remove(&format!("{service}@{g}"));
        }
    }
    Some(InFlight {
        sc,
        service,
        addr: addr?,
        start: now,
        ok: false,
    })
}

/// A request in flight to a local endpoint. It reports to the balancer when
/// dropped, so a request that never got an answer (timed out, or its caller
/// went away) counts as a failure and no longer as in flight.
struct InFlight<'a> {
    sc: &'a Sidecar,
    service: String,
    addr: String,
    start: Instant,
    ok: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let ejected = {
            let mut all = self.sc.balancers.lock().expect("balancers lock");
            all.get_mut(&self.service)
                .is_some_and(|b| b.finish(&self.addr, self.start.elapsed(), self.ok, Instant::now()))
        };
        if ejected {
            // The key is cluster/namespace/name/port; the label namespace/name.
            let mut parts = self.service.split('/').skip(1);
            let label = metrics::ServiceLabels {
                destination_service: format!("{}/{}", parts.next().unwrap_or(""), parts.next().unwrap_or("")),
            };
            self.sc.metrics.ejections.get_or_create(&label).inc();
        }
    }
}

/// Send `req` to `target` over a pooled session.
/// `(host, port)` is the request's authority, as `forward` parsed it.
async fn send(
    sc: &Arc<Sidecar>,
    target: &Target,
    (host, port): (&str, Option<u16>),
    req: Request<Body>,
    labels: &metrics::RouteLabels,
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
    let key = pool_key(target);
    let (sender, pooled) = session(sc, target, &key, false).await?;
    let resp = match sender.clone().send_request(Request::from_parts(parts, body)).await {
        Ok(r) => r,
        Err(e)
            if again.is_some()
                && pooled
                && sc.budget(&labels.destination_service, target, |b| b.withdraw(Instant::now())) =>
        {
            tracing::debug!(error = %e, "pooled session failed; retrying on a new one");
            sc.metrics.retries.get_or_create(labels).inc();
            let (sender, _) = session(sc, target, &key, true).await?;
            let req = again.expect("checked");
            sender
                .clone()
                .send_request(req)
                .await
                .map_err(|e| ProxyError::Upstream(isthmus_core::local::error_chain(&e)))?
        }
        Err(e) => {
            // Forget the session only if it is the one that failed and it is
            // dead: a concurrent request may have replaced it already.
            let mut pool = sc.pool.lock().expect("pool lock");
            if pool.get(&key).is_some_and(|s| s.is_closed()) {
                pool.remove(&key);
            }
            return Err(ProxyError::Upstream(isthmus_core::local::error_chain(&e)));
        }
    };
    Ok(resp)
}

fn empty() -> Body {
    http_body_util::Empty::new().map_err(|n| match n {}).boxed()
}

/// A ready HTTP/2 session for `target`: the pooled one (then `true`) unless
/// `fresh` is asked for or it is gone, else a new one.
async fn session(sc: &Sidecar, target: &Target, key: &str, fresh: bool) -> Result<(H2Sender, bool), ProxyError> {
    if !fresh {
        let pooled = sc
            .pool
            .lock()
            .expect("pool lock")
            .get(key)
            .filter(|s| !s.is_closed())
            .cloned();
        if let Some(mut s) = pooled
            && s.ready().await.is_ok()
        {
            return Ok((s, true));
        }
    }
    let s = connect(sc, target).await?;
    sc.pool.lock().expect("pool lock").insert(key.to_string(), s.clone());
    Ok((s, false))
}

fn path_and_query(uri: &http::Uri) -> String {
    uri.path_and_query().map(|p| p.as_str()).unwrap_or("/").to_string()
}

fn service_key(t: &Target) -> String {
    format!("{}/{}/{}/{}", t.cluster, t.namespace, t.service, t.port)
}

/// A session per local endpoint (the balancer chose it), or per remote
/// cluster's service.
fn pool_key(t: &Target) -> String {
    match t.addresses.as_slice() {
        [endpoint] => format!("{}@{endpoint}", service_key(t)),
        _ => service_key(t),
    }
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

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// An end-to-end mTLS session with a sidecar serving `target` (directly, or
/// through the gateway to another cluster), offering only `alpn`: `h2` for
/// pooled HTTP, `isthmus-tcp/1` for one opaque connection.
async fn connect_tls(
    sc: &Sidecar,
    target: &Target,
    alpn: &[u8],
) -> Result<tokio_rustls::client::TlsStream<Box<dyn Io>>, ProxyError> {
    let io: Box<dyn Io> = if target.is_local() {
        let addr = &target.addresses[rand::random_range(0..target.addresses.len())];
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| ProxyError::Connect(format!("connect to {addr} timed out")))?
            .map_err(|e| ProxyError::Connect(format!("connect to {addr}: {e}")))?;
        let _ = tcp.set_nodelay(true);
        Box::new(tcp)
    } else {
        Box::new(tunnel(sc, target).await?)
    };
    let identities: Vec<SpiffeId> = target
        .identities
        .iter()
        .filter_map(|i| SpiffeId::parse(i).ok())
        .collect();
    let cfg = tls::client_config(
        Some(sc.agent.svid.clone()),
        sc.agent.bundles.clone(),
        Expect::AnyOf(identities),
        &[alpn],
    )
    .map_err(|e| ProxyError::Connect(e.to_string()))?;
    let inner = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio_rustls::TlsConnector::from(cfg).connect(tls::sni(), io),
    )
    .await
    .map_err(|_| {
        ProxyError::Connect(format!(
            "mTLS handshake with {} in cluster {} timed out",
            target.service, target.cluster
        ))
    })?
    .map_err(|e| {
        ProxyError::Connect(format!(
            "mTLS handshake with {}/{} in cluster {}: {e}",
            target.namespace, target.service, target.cluster
        ))
    })?;
    Ok(inner)
}

/// Open an end-to-end mTLS session with a sidecar serving `target`, directly
/// or through the gateway, and start HTTP/2 on it.
async fn connect(sc: &Sidecar, target: &Target) -> Result<H2Sender, ProxyError> {
    let inner = connect_tls(sc, target, tls::ALPN_H2).await?;
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(hyper_util::rt::TokioTimer::new())
        // Find a dead session (a vanished peer or tunnel) in seconds, so the
        // pool does not hand it out.
        .keep_alive_interval(Duration::from_secs(2))
        .keep_alive_timeout(Duration::from_secs(2))
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(inner))
        .await
        .map_err(|e| ProxyError::Connect(format!("HTTP/2 with {}: {e}", target.service)))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream HTTP/2 session ended");
        }
    });
    Ok(sender)
}

/// A tunnel through this cluster's gateway to `target.cluster`.
async fn tunnel(sc: &Sidecar, target: &Target) -> Result<impl Io + use<>, ProxyError> {
    let gw = sc.agent.config.borrow().gateway_tunnel_addr.clone();
    if gw.is_empty() {
        return Err(ProxyError::NoGateway(sc.agent.cluster.clone()));
    }
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&gw))
        .await
        .map_err(|_| ProxyError::Connect(format!("connect to gateway {gw} timed out")))?
        .map_err(|e| ProxyError::Connect(format!("connect to gateway {gw}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let cfg = tls::client_config(
        Some(sc.agent.svid.clone()),
        sc.agent.bundles.clone(),
        Expect::Id(SpiffeId::gateway(&sc.agent.trust_domain)),
        &[],
    )
    .map_err(|e| ProxyError::Connect(e.to_string()))?;
    let mut outer = tokio_rustls::TlsConnector::from(cfg)
        .connect(tls::sni(), tcp)
        .await
        .map_err(|e| ProxyError::Connect(format!("mTLS with gateway {gw}: {e}")))?;
    let req = TunnelRequest {
        cluster: target.cluster.clone(),
        namespace: target.namespace.clone(),
        service: target.service.clone(),
        port: target.port,
        source_cluster: sc.agent.cluster.clone(),
        traceparent: None,
    };
    req.write(&mut outer)
        .await
        .map_err(|e| ProxyError::Connect(format!("gateway {gw}: {e}")))?;
    let resp = tokio::time::timeout(Duration::from_secs(15), TunnelResponse::read(&mut outer))
        .await
        .map_err(|_| ProxyError::Connect(format!("gateway {gw} did not answer")))?
        .map_err(|e| ProxyError::Connect(format!("gateway {gw}: {e}")))?;
    match resp {
        TunnelResponse::Ok => Ok(outer),
        TunnelResponse::Refused { code, reason } => Err(ProxyError::Refused {
            cluster: format!("gateway of cluster {}", sc.agent.cluster),
            code: code.as_str().to_string(),
            reason,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_line_has_the_request_and_its_outcome() {
        let req = Request::get("http://echo.demo.svc.clusterset.local:8080/a?b=1")
            .body(())
            .unwrap();
        let route = metrics::RouteLabels {
            direction: "outbound",
            source_cluster: "west".into(),
            destination_cluster: "east".into(),
            destination_service: "demo/echo".into(),
        };
        let resp = ProxyError::Timeout(Duration::from_secs(1)).response();
        let v = AccessLine::of(&req).render(&route, &resp, Duration::from_millis(12), "ab");
        assert_eq!(v["method"], "GET");
        assert_eq!(v["authority"], "echo.demo.svc.clusterset.local:8080");
        assert_eq!(v["path"], "/a?b=1");
        assert_eq!(v["status"], 504);
        assert_eq!(v["error"], "timeout");
        assert_eq!(v["destination_cluster"], "east");
        assert_eq!(v["trace_id"], "ab");
        assert_eq!(v["duration_ms"], 12.0);
    }
}
