//! Inbound: mTLS only. The caller's SVID is verified against the bundle of
//! its own trust domain; HTTP requests reach the app with the caller's
//! SPIFFE ID in `x-isthmus-client-id`, opaque connections as they are.
//! Callers from other clusters reach only an exported service, whether or
//! not they came through the gateway (which checks the same).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderValue, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use isthmus_core::identity::SpiffeId;
use isthmus_core::local::error_chain;
use isthmus_core::tls;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::body::Body;
use crate::error::{ERROR_HEADER, ErrorKind};
use crate::metrics::{self, Direction, RouteLabels, TcpOutcome};
use crate::{Sidecar, otlp, probe, telemetry};

/// The verified SPIFFE ID of the calling workload, set by the inbound side.
pub const CLIENT_ID_HEADER: &str = "x-isthmus-client-id";
/// The cluster whose sidecar served a request, set on responses.
pub const SERVED_BY_HEADER: &str = "x-isthmus-cluster";
/// How long a caller has to finish its mTLS handshake (across clusters it
/// takes a few round trips through the gateways).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections still in their handshake, at most. They wait here, not in
/// the connection slots (`--max-connections`): a flood of connections that
/// never finish a handshake cannot lock verified callers out.
const MAX_HANDSHAKING: usize = 256;

pub(crate) type AppClient = hyper_util::client::legacy::Client<HttpConnector, Body>;

/// The client the sidecar reaches its app with: HTTP/1.1, or h2c for apps
/// declared to speak it.
pub(crate) fn app_client(http2: bool) -> AppClient {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(http2)
        .build(http)
}

pub(crate) async fn serve(
    sc: Arc<Sidecar>,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    stop: CancellationToken,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let handshaking = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKING));
    while let Some((tcp, from)) = isthmus_core::net::accept(&listener, &stop).await {
        let Ok(handshake) = handshaking.clone().try_acquire_owned() else {
            sc.metrics.rejected(Direction::Inbound, "handshake-limit");
            continue;
        };
        let sc = sc.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::info!(%from, error = %e, "inbound mTLS refused");
                    return;
                }
                Err(_) => return,
            };
            drop(handshake);
            let Some(client) = tls::peer_id(stream.get_ref().1.peer_certificates()) else {
                return;
            };
            // A slot for a verified caller only.
            let Some(_slot) = sc.limits.admit(Direction::Inbound, &sc.metrics) else {
                return;
            };
            if stream.get_ref().1.alpn_protocol() == Some(tls::ALPN_OPAQUE) {
                if let Err(e) = opaque(&sc, &client, stream).await {
                    tracing::info!(%from, %client, error = %e, "inbound opaque connection refused");
                }
                return;
            }
            serve_http(sc, client, stream).await;
        });
    }
}

/// The caller's trust domain if it is another cluster's.
fn remote_domain(sc: &Sidecar, client: &SpiffeId) -> Option<Arc<str>> {
    (client.trust_domain != sc.agent.trust_domain).then(|| client.trust_domain.as_str().into())
}

/// Whether this cluster still trusts `trust_domain` (its cluster is linked).
fn trusts(sc: &Sidecar, trust_domain: &str) -> bool {
    sc.agent
        .config
        .borrow()
        .bundles
        .iter()
        .any(|b| b.trust_domain == trust_domain)
}

/// Resolves once the caller's cluster is unlinked (never for a caller of
/// this cluster): its open sessions end then, not when it next reconnects.
async fn unlinked(sc: &Sidecar, remote: Option<Arc<str>>) {
    let Some(td) = remote else {
        return std::future::pending().await;
    };
    let mut config = sc.agent.config.clone();
    loop {
        if !config
            .borrow_and_update()
            .bundles
            .iter()
            .any(|b| *b.trust_domain == *td)
        {
            return;
        }
        if config.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// HTTP/2 requests from one verified caller.
async fn serve_http(sc: Arc<Sidecar>, client: SpiffeId, stream: tokio_rustls::server::TlsStream<TcpStream>) {
    let _open = sc.metrics.open(Direction::Inbound);
    let route = sc.inbound_route(&client);
    let remote = remote_domain(&sc, &client);
    let id = HeaderValue::from_str(&client.to_string()).expect("SPIFFE IDs are ASCII");
    let svc = {
        let (sc, remote) = (sc.clone(), remote.clone());
        hyper::service::service_fn(move |req: Request<Incoming>| {
            let (sc, id, route, remote) = (sc.clone(), id.clone(), route.clone(), remote.clone());
            async move { Ok::<_, std::convert::Infallible>(observed(sc, id, remote, route, req).await) }
        })
    };
    tokio::select! {
        _ = isthmus_core::http::serve_connection(stream, svc) => {}
        _ = unlinked(&sc, remote) => tracing::info!(%client, "the caller's cluster was unlinked: session closed"),
    }
}

/// One inbound request, with its metrics, access line and span.
async fn observed(
    sc: Arc<Sidecar>,
    client: HeaderValue,
    remote: Option<Arc<str>>,
    route: RouteLabels,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let start = Instant::now();
    let incoming = telemetry::incoming(&req);
    // With spans exported, this hop is a span of its own, the app's parent;
    // else the caller's span stays it.
    let span = sc.otlp.as_ref().map(|x| {
        let hop = telemetry::Hop::begin(x, otlp::Kind::Server, incoming, req.method());
        telemetry::set_traceparent(&mut req, &hop.ctx());
        hop
    });
    let line = sc.cfg.access_log.then(|| {
        let trace = incoming.map(|t| t.trace_id_hex()).unwrap_or_default();
        (telemetry::AccessLine::of(&req), trace)
    });
    let (req_bytes, resp_bytes) = sc.metrics.body_counters(&route);
    let req = req.map(|b| metrics::CountedBody::new(b, req_bytes).boxed());
    let resp = to_app(&sc, client, remote, req)
        .await
        .map(|b| metrics::CountedBody::new(b, resp_bytes).boxed());
    let elapsed = start.elapsed();
    if let Some((line, trace)) = line {
        line.print(&route, &resp, elapsed, &trace);
    }
    if let (Some(x), Some(span)) = (&sc.otlp, span) {
        span.end(x, &route, &resp);
    }
    sc.metrics.observe(route, resp.status().as_u16(), elapsed.as_secs_f64());
    resp
}

/// Hand a verified request to the local app.
async fn to_app(sc: &Sidecar, client: HeaderValue, remote: Option<Arc<str>>, req: Request<Body>) -> Response<Body> {
    // Checked on every request: a session outliving its link gets nothing.
    if let Some(td) = &remote
        && !trusts(sc, td)
    {
        return ErrorKind::NotLinked.response(&format!(
            "trust domain {td} is not linked with cluster {}",
            sc.agent.cluster
        ));
    }
    if remote.is_some() && !sc.exported() {
        return ErrorKind::NotExported
            .response(&format!("this service is not exported by cluster {}", sc.agent.cluster));
    }
    let Some(app) = sc.cfg.serve.as_ref().map(|s| s.app) else {
        return ErrorKind::NoService.response("this workload serves no service");
    };
    if req.headers().contains_key(probe::PROBE_HEADER) {
        let http2 = sc.cfg.serve.as_ref().is_some_and(|s| s.app_http2);
        return probe::answer(&sc.app_client, app, http2).await;
    }
    if req.method() == http::Method::CONNECT {
        // An upgrade (WebSocket) from the calling sidecar.
        let mut extra = http::HeaderMap::new();
        extra.insert(CLIENT_ID_HEADER, client);
        let mut resp = crate::upgrade::to_app(req, app, extra).await;
        resp.headers_mut().insert(
            SERVED_BY_HEADER,
            HeaderValue::from_str(&sc.agent.cluster).expect("cluster names are ASCII"),
        );
        return resp;
    }
    let (mut parts, body) = req.into_parts();
    let authority = parts.uri.authority().map(|a| a.to_string());
    let path = crate::outbound::path_and_query(&parts.uri);
    parts.uri = match format!("http://{app}{path}").parse() {
        Ok(u) => u,
        Err(_) => return ErrorKind::BadRequest.response("unparseable path"),
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
        Err(e) if e.is_connect() => ErrorKind::AppUnavailable.response(&format!(
            "the workload at {app} refuses connections: {}",
            error_chain(&e)
        )),
        Err(e) => ErrorKind::AppFailed.response(&format!("the workload at {app} did not answer: {}", error_chain(&e))),
    }
}

#[derive(Debug, thiserror::Error)]
enum OpaqueError {
    #[error("this workload serves no service")]
    NoService,
    #[error("this service is not exported by cluster {0}")]
    NotExported(String),
    #[error("trust domain {0} is not linked")]
    NotLinked(String),
    #[error("the workload at {app} did not answer: {source}")]
    App { app: SocketAddr, source: std::io::Error },
}

/// Carry a verified opaque TCP connection to the local app, as is (the app
/// learns nothing of the caller's identity: there are no headers to put it
/// in; the policy is enforced here).
async fn opaque(
    sc: &Sidecar,
    client: &SpiffeId,
    mut stream: tokio_rustls::server::TlsStream<TcpStream>,
) -> Result<(), OpaqueError> {
    let _open = sc.metrics.open(Direction::Inbound);
    let remote = remote_domain(sc, client);
    let route = sc.inbound_route(client);
    let app = sc.cfg.serve.as_ref().map(|s| s.app).ok_or(OpaqueError::NoService)?;
    if remote.as_ref().is_some_and(|td| !trusts(sc, td)) {
        sc.metrics.tcp(&route, TcpOutcome::Refused);
        return Err(OpaqueError::NotLinked(client.trust_domain.clone()));
    }
    if remote.is_some() && !sc.exported() {
        sc.metrics.tcp(&route, TcpOutcome::Refused);
        return Err(OpaqueError::NotExported(sc.agent.cluster.clone()));
    }
    let mut upstream = match TcpStream::connect(app).await {
        Ok(t) => t,
        Err(source) => {
            sc.metrics.tcp(&route, TcpOutcome::AppUnavailable);
            return Err(OpaqueError::App { app, source });
        }
    };
    let _ = upstream.set_nodelay(true);
    sc.metrics.tcp(&route, TcpOutcome::Ok);
    let (received, sent) = tokio::select! {
        r = tokio::io::copy_bidirectional(&mut stream, &mut upstream) => r.unwrap_or((0, 0)),
        _ = unlinked(sc, remote) => {
            tracing::info!(%client, "the caller's cluster was unlinked: opaque connection closed");
            (0, 0)
        }
    };
    sc.metrics.bytes(&route, received, sent);
    Ok(())
}
