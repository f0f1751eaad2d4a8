//! Outbound behaviour with real sidecars beside a real controller: endpoint
//! choice and outlier ejection, request timeouts, and trace context.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use isthmus_core::local::ClusterDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// An HTTP/1.1 app answering `status` with `body` after `delay`; it echoes
/// the `traceparent` it received in `x-seen-traceparent`.
async fn app(status: u16, body: &'static str, delay: Duration) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| async move {
                    tokio::time::sleep(delay).await;
                    let mut resp = hyper::Response::new(Full::new(Bytes::from_static(body.as_bytes())));
                    *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                    if let Some(t) = req.headers().get("traceparent") {
                        resp.headers_mut().insert("x-seen-traceparent", t.clone());
                    }
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

async fn sidecar(dir: &std::path::Path, app: Option<SocketAddr>, stop: &CancellationToken) -> isthmus_sidecar::Running {
    sidecar_with(dir, app, Duration::from_secs(15), stop).await
}

async fn sidecar_with(
    dir: &std::path::Path,
    app: Option<SocketAddr>,
    request_timeout: Duration,
    stop: &CancellationToken,
) -> isthmus_sidecar::Running {
    isthmus_sidecar::run(config(dir, app, request_timeout), stop.clone())
        .await
        .unwrap()
}

fn config(dir: &std::path::Path, app: Option<SocketAddr>, request_timeout: Duration) -> isthmus_sidecar::Config {
    let serve = app.map(|app| isthmus_sidecar::Serve {
        service: "echo".into(),
        port: 8080,
        app,
        app_http2: false,
    });
    let sa = if app.is_some() { "echo" } else { "client" };
    isthmus_sidecar::Config {
        instance: app.map(|a| a.to_string()).unwrap_or_else(|| "client".into()),
        request_timeout,
        ..isthmus_sidecar::Config::new(dir, "demo", sa, serve)
    }
}

/// GET echo through the client sidecar's proxy: status and body.
async fn get(proxy: SocketAddr) -> (u16, String) {
    let (status, _, body) = get_with(proxy, "").await;
    (status, body)
}

/// GET echo with `extra` header lines: status, response head, body.
async fn get_with(proxy: SocketAddr, extra: &str) -> (u16, String, String) {
    let mut tcp = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let req = format!(
        "GET http://echo.demo.svc.clusterset.local:8080/ HTTP/1.1\r\nhost: echo.demo.svc.clusterset.local:8080\r\n{extra}connection: close\r\n\r\n"
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    tcp.read_to_string(&mut raw).await.unwrap();
    let status = raw[9..12].parse().unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    (status, head.to_lowercase(), body.to_string())
}

/// A controller for cluster east in `dir`.
async fn east(dir: &std::path::Path, stop: &CancellationToken) {
    isthmus_core::install_crypto_provider();
    let cfg = isthmus_controller::Config::new(dir, "east", "east.mesh");
    isthmus_controller::run(cfg, stop.clone()).await.unwrap();
    ClusterDir::new(dir).connect().await.unwrap();
}

/// Poll `f` until it holds (at most 10 s).
async fn until_ok<F: std::future::Future<Output = bool>>(mut f: impl FnMut() -> F) {
    for _ in 0..500 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("condition not met in 10 s");
}

#[tokio::test]
async fn fast_failing_endpoint_is_ejected_and_the_healthy_one_serves() {
    let stop = CancellationToken::new();
    let dir = tempfile::tempdir().unwrap();
    east(dir.path(), &stop).await;

    let healthy = app(200, "healthy", Duration::from_millis(5)).await;
    let broken = app(503, "broken", Duration::ZERO).await;
    let _a = sidecar(dir.path(), Some(healthy), &stop).await;
    let _b = sidecar(dir.path(), Some(broken), &stop).await;
    let client = sidecar(dir.path(), None, &stop).await;

    // Wait until the client's config holds both endpoints.
    let both = std::collections::BTreeSet::from(["broken".to_string(), "healthy".to_string()]);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..200 {
        let (status, body) = get(client.outbound_addr).await;
        if status == 200 || status == 503 && body == "broken" {
            seen.insert(body);
        }
        if seen == both {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(seen, both, "both endpoints should answer at first");

    // From here: at most EJECT_AFTER more failures, then only the healthy one.
    let mut failed = 0;
    let mut last_failure = 0;
    for i in 0..60 {
        let (status, body) = get(client.outbound_addr).await;
        if status != 200 {
            failed += 1;
            last_failure = i;
        } else {
            assert_eq!(body, "healthy");
        }
    }
    assert!(
        failed <= isthmus_sidecar::balance::ENDPOINT_EJECT_AFTER as usize,
        "{failed} failures: the broken endpoint should be ejected after {} in a row",
        isthmus_sidecar::balance::ENDPOINT_EJECT_AFTER
    );
    assert!(
        last_failure < 20,
        "failures should stop early, last at request {last_failure}"
    );
    // The ejection shows in the client sidecar's metrics.
    let admin = client.admin_addr.unwrap();
    let mut tcp = tokio::net::TcpStream::connect(admin).await.unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    tcp.read_to_string(&mut text).await.unwrap();
    assert!(
        text.contains("isthmus_endpoint_ejections_total{destination_service=\"demo/echo\"} 1"),
        "{text}"
    );
    stop.cancel();
}

/// An app slower than the sidecar's request timeout gets the caller a 504
/// that says so, in about the timeout.
#[tokio::test]
async fn slow_answer_times_out_with_504() {
    let stop = CancellationToken::new();
    let dir = tempfile::tempdir().unwrap();
    east(dir.path(), &stop).await;
    let slow = app(200, "slow", Duration::from_secs(5)).await;
    let _echo = sidecar(dir.path(), Some(slow), &stop).await;
    let client = sidecar_with(dir.path(), None, Duration::from_millis(300), &stop).await;
    // Until the client knows echo, it answers 503 unknown-service at once.
    until_ok(|| async { get(client.outbound_addr).await.0 != 503 }).await;
    let t = std::time::Instant::now();
    let (status, head, _) = get_with(client.outbound_addr, "").await;
    assert_eq!(status, 504, "{head}");
    assert!(head.contains("x-isthmus-error: timeout"), "{head}");
    assert!(t.elapsed() < Duration::from_secs(3), "took {:?}", t.elapsed());
    stop.cancel();
}

/// The app sees the caller's trace continued under the sidecar's span, or a
/// new valid trace when the caller sent none.
#[tokio::test]
async fn trace_context_is_continued_or_started() {
    let stop = CancellationToken::new();
    let dir = tempfile::tempdir().unwrap();
    east(dir.path(), &stop).await;
    let echo = app(200, "ok", Duration::ZERO).await;
    let _echo = sidecar(dir.path(), Some(echo), &stop).await;
    let client = sidecar(dir.path(), None, &stop).await;
    until_ok(|| async { get(client.outbound_addr).await.0 == 200 }).await;

    let seen = |head: &str| -> isthmus_sidecar::trace::TraceContext {
        let v = head
            .lines()
            .find_map(|l| l.strip_prefix("x-seen-traceparent: "))
            .expect("the app saw a traceparent");
        isthmus_sidecar::trace::TraceContext::parse(v).expect("a valid traceparent")
    };
    let sent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let (_, head, _) = get_with(client.outbound_addr, &format!("traceparent: {sent}\r\n")).await;
    let got = seen(&head);
    assert_eq!(got.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_ne!(got.to_string(), sent, "the sidecar's own span is the new parent");

    let (_, head, _) = get_with(client.outbound_addr, "").await;
    let fresh = seen(&head);
    assert_ne!(fresh.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
    stop.cancel();
}

/// An endpoint that is registered but refuses connections (its process is
/// gone before the controller noticed): idempotent requests that pick it are
/// sent to the other endpoint, so none fails.
/// Register a demo/echo endpoint whose inbound address refuses connections;
/// it stays registered while the returned stream is held.
async fn dead_endpoint(dir: &std::path::Path) -> tonic::Streaming<isthmus_proto::ConfigSnapshot> {
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let ctl = ClusterDir::new(dir).connect().await.unwrap();
    ctl.control()
        .watch_config(tokio_stream::once(isthmus_proto::WatchRequest {
            node: Some(isthmus_proto::watch_request::Node::Sidecar(
                isthmus_proto::SidecarRegistration {
                    namespace: "demo".into(),
                    service: "echo".into(),
                    port: 8080,
                    inbound_addr: dead_addr.to_string(),
                    instance: "dead".into(),
                    identity: String::new(),
                    service_account: "echo".into(),
                },
            )),
            resume: false,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
}

/// Cluster east with two demo/echo endpoints: one healthy (answers
/// "healthy"), one whose address refuses connections.
async fn healthy_and_dead(
    dir: &std::path::Path,
    stop: &CancellationToken,
) -> (
    isthmus_sidecar::Running,
    tonic::Streaming<isthmus_proto::ConfigSnapshot>,
) {
    east(dir, stop).await;
    let healthy = app(200, "healthy", Duration::ZERO).await;
    (sidecar(dir, Some(healthy), stop).await, dead_endpoint(dir).await)
}

#[tokio::test]
async fn unreachable_endpoint_is_retried_on_another() {
    let stop = CancellationToken::new();
    let dir = tempfile::tempdir().unwrap();
    let _endpoints = healthy_and_dead(dir.path(), &stop).await;
    let client = sidecar(dir.path(), None, &stop).await;
    // Until the client's config has echo, it answers 503 unknown-service.
    until_ok(|| async { get(client.outbound_addr).await.0 != 503 }).await;

    let mut failures = Vec::new();
    for _ in 0..40 {
        let (status, head, body) = get_with(client.outbound_addr, "").await;
        if status != 200 {
            failures.push(format!("{status} {head}"));
        } else {
            assert_eq!(body, "healthy");
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
    stop.cancel();
}

/// An HTTP/1.1 app that answers 200 with `content-length: 100`, sends ten
/// bytes of the body and hangs up: an answer broken off after its head, as
/// when a path dies mid-answer. It counts the requests it got.
async fn breaking_app(hits: Arc<AtomicUsize>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let hits = hits.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if tcp.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                hits.fetch_add(1, Ordering::SeqCst);
                let _ = tcp
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nbroken off")
                    .await;
            });
        }
    });
    addr
}

/// An endpoint whose answers break off after their head (200 and part of
/// the body): a GET, which may go again, is answered whole by the other
/// endpoint every time; the caller never sees a broken answer.
#[tokio::test]
async fn an_answer_broken_off_mid_body_is_sent_again() {
    let stop = CancellationToken::new();
    let dir = tempfile::tempdir().unwrap();
    east(dir.path(), &stop).await;
    let hits = Arc::new(AtomicUsize::new(0));
    let _healthy = sidecar(dir.path(), Some(app(200, "healthy", Duration::ZERO).await), &stop).await;
    let _breaking = sidecar(dir.path(), Some(breaking_app(hits.clone()).await), &stop).await;
    let client = sidecar(dir.path(), None, &stop).await;
    until_ok(|| async { get(client.outbound_addr).await.0 != 503 }).await;

    let mut broken = Vec::new();
    for _ in 0..40 {
        let (status, head, body) = get_with(client.outbound_addr, "").await;
        if status != 200 || body != "healthy" {
            broken.push(format!("{status} {head} {body:?}"));
        }
    }
    assert!(broken.is_empty(), "{broken:?}");
    assert!(hits.load(Ordering::SeqCst) > 0, "the breaking endpoint was never tried");
    stop.cancel();
}

/// An h2c app speaking gRPC's framing: one "ok" message then `grpc-status:
/// 0` in trailers; or, if `unavailable`, a trailers-only UNAVAILABLE. It
/// counts the calls it got.
async fn grpc_app(unavailable: bool, hits: Arc<AtomicUsize>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let hits = hits.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let hits = hits.clone();
                    async move {
                        let msg = req.into_body().collect().await.unwrap().to_bytes();
                        assert_eq!(&msg[..], b"\0\0\0\0\x02hi", "the whole request message");
                        hits.fetch_add(1, Ordering::SeqCst);
                        let resp = hyper::Response::builder().header("content-type", "application/grpc");
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                        let frames = if unavailable {
                            vec![]
                        } else {
                            vec![
                                Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"\0\0\0\0\x02ok"))),
                                Ok(Frame::trailers(trailers)),
                            ]
                        };
                        let resp = if unavailable {
                            resp.header("grpc-status", "14")
                        } else {
                            resp
                        };
                        Ok::<_, Infallible>(resp.body(StreamBody::new(futures::stream::iter(frames))).unwrap())
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

type GrpcBody = StreamBody<futures::stream::Iter<std::array::IntoIter<Result<Frame<Bytes>, Infallible>, 1>>>;

/// An HTTP/2 (prior knowledge) connection to the client sidecar, as a gRPC
/// client opens it.
async fn grpc_client(proxy: SocketAddr) -> hyper::client::conn::http2::SendRequest<GrpcBody> {
    let tcp = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

/// A unary gRPC call, with no content-length (as gRPC clients send it):
/// the `grpc-status` it ended with, from the trailers or a trailers-only
/// answer.
async fn grpc_call(send: &mut hyper::client::conn::http2::SendRequest<GrpcBody>) -> String {
    let body = StreamBody::new(futures::stream::iter([Ok::<_, Infallible>(Frame::data(
        Bytes::from_static(b"\0\0\0\0\x02hi"),
    ))]));
    let req = hyper::Request::post("http://echo.demo.svc.clusterset.local:8080/demo.Echo/Say")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    if let Some(s) = resp.headers().get("grpc-status") {
        return s.to_str().unwrap().to_string();
    }
    let all = resp.into_body().collect().await.unwrap();
    let trailers = all.trailers().cloned().unwrap_or_default();
    assert_eq!(&all.to_bytes()[..], b"\0\0\0\0\x02ok");
    trailers
        .get("grpc-status")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_else(|| "no grpc-status".into())
}

/// gRPC over HTTP/2 end to end (h2c app, trailers through both sidecars,
/// many calls on one pooled session), and a call answered UNAVAILABLE goes
/// to another endpoint: none fails.
#[tokio::test]
async fn grpc_unavailable_is_retried_on_another_endpoint() {
    let stop = CancellationToken::new();
    let dir = tempfile::tempdir().unwrap();
    east(dir.path(), &stop).await;
    let (good_hits, bad_hits) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let grpc_sidecar = |app| {
        let mut cfg = config(dir.path(), Some(app), Duration::from_secs(15));
        cfg.serve.as_mut().unwrap().app_http2 = true;
        isthmus_sidecar::run(cfg, stop.clone())
    };
    grpc_sidecar(grpc_app(false, good_hits.clone()).await).await.unwrap();
    let client = sidecar(dir.path(), None, &stop).await;
    let mut grpc = grpc_client(client.outbound_addr).await;
    until_ok(|| {
        let mut grpc = grpc.clone();
        async move { grpc_call(&mut grpc).await == "0" }
    })
    .await;
    // More calls than h2 allows empty DATA frames on a connection (100):
    // a client's empty closing frame must not be forwarded as one.
    for _ in 0..120 {
        assert_eq!(grpc_call(&mut grpc).await, "0");
    }
    // An endpoint that answers UNAVAILABLE joins: calls that land on it are
    // sent again to the good one.
    grpc_sidecar(grpc_app(true, bad_hits.clone()).await).await.unwrap();
    let mut calls = 0;
    while bad_hits.load(Ordering::SeqCst) < 3 {
        assert_eq!(grpc_call(&mut grpc).await, "0");
        calls += 1;
        assert!(calls < 1000, "the UNAVAILABLE endpoint was never chosen");
    }
    stop.cancel();
}

type Spans = Arc<std::sync::Mutex<Vec<opentelemetry_proto::tonic::trace::v1::Span>>>;

/// An OTLP collector on the official protobuf definitions, over both
/// transports: gRPC (`TraceService/Export`) and HTTP/protobuf (`POST
/// /v1/traces`). Returns both base URLs and the spans received.
async fn collector() -> (String, String, Spans) {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
    use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
    use prost::Message as _;

    fn keep(got: &Spans, req: ExportTraceServiceRequest) {
        let spans = req
            .resource_spans
            .into_iter()
            .flat_map(|rs| rs.scope_spans)
            .flat_map(|ss| ss.spans);
        got.lock().unwrap().extend(spans);
    }

    struct Grpc(Spans);
    #[tonic::async_trait]
    impl TraceService for Grpc {
        async fn export(
            &self,
            req: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            keep(&self.0, req.into_inner());
            Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
        }
    }

    let got: Spans = Arc::default();
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc_url = format!("http://{}", grpc.local_addr().unwrap());
    let g = got.clone();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Grpc(g)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(grpc)),
    );

    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_url = format!("http://{}", http.local_addr().unwrap());
    let g = got.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = http.accept().await.unwrap();
            let g = g.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let g = g.clone();
                    async move {
                        assert_eq!(req.uri().path(), "/v1/traces");
                        assert_eq!(req.headers()["content-type"], "application/x-protobuf");
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        keep(&g, ExportTraceServiceRequest::decode(body).unwrap());
                        let answer = ExportTraceServiceResponse::default().encode_to_vec();
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(answer))))
                    }
                });
                let _ = isthmus_core::http::serve_connection(tcp, svc).await;
            });
        }
    });
    (grpc_url, http_url, got)
}

/// Both sidecars export a span of the request to an OTLP collector (the
/// serving one over gRPC, the calling one over HTTP/protobuf): the client's
/// (kind CLIENT) a child of the caller's span, the server's (kind SERVER) a
/// child of the client's and the parent of what the app sees.
#[tokio::test]
async fn spans_are_exported_over_otlp() {
    use isthmus_sidecar::otlp::Protocol;
    let stop = CancellationToken::new();
    let dir = tempfile::tempdir().unwrap();
    east(dir.path(), &stop).await;
    let (grpc_url, http_url, got) = collector().await;
    let echo = app(200, "ok", Duration::ZERO).await;
    let mut server = config(dir.path(), Some(echo), Duration::from_secs(15));
    server.otlp_endpoint = Some(grpc_url);
    server.otlp_protocol = Protocol::Grpc;
    isthmus_sidecar::run(server, stop.clone()).await.unwrap();
    let mut client = config(dir.path(), None, Duration::from_secs(15));
    client.otlp_endpoint = Some(http_url);
    client.otlp_protocol = Protocol::HttpProtobuf;
    let client = isthmus_sidecar::run(client, stop.clone()).await.unwrap();
    until_ok(|| async { get(client.outbound_addr).await.0 == 200 }).await;

    let caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let (status, head, _) = get_with(client.outbound_addr, &format!("traceparent: {caller}\r\n")).await;
    assert_eq!(status, 200);
    let app_saw = head
        .lines()
        .find_map(|l| l.strip_prefix("x-seen-traceparent: "))
        .and_then(isthmus_sidecar::trace::TraceContext::parse)
        .expect("the app saw a traceparent");

    // Spans of our trace, as they arrive in batches.
    let trace_id = isthmus_sidecar::trace::TraceContext::parse(caller).unwrap().trace_id;
    let spans_of_trace = || -> Vec<opentelemetry_proto::tonic::trace::v1::Span> {
        got.lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect()
    };
    until_ok(|| async { spans_of_trace().len() == 2 }).await;
    let spans = spans_of_trace();
    let client_span = spans.iter().find(|s| s.kind == 3).expect("a client span");
    let server_span = spans.iter().find(|s| s.kind == 2).expect("a server span");
    assert_eq!(
        isthmus_sidecar::trace::to_hex(&client_span.parent_span_id),
        "b7ad6b7169203331"
    );
    assert_eq!(server_span.parent_span_id, client_span.span_id);
    assert_eq!(server_span.span_id, app_saw.span_id.to_vec());
    assert_eq!(client_span.status.as_ref().map(|s| s.code), Some(1), "OK");
    assert_eq!(client_span.name, "outbound GET demo/echo");
    stop.cancel();
}

/// Past the per-service request limit a request is answered 503 overloaded
/// at once; past the connection limit a new connection is closed.
#[tokio::test]
async fn limits_refuse_at_once_instead_of_queueing() {
    let stop = CancellationToken::new();
    let dir = tempfile::tempdir().unwrap();
    east(dir.path(), &stop).await;
    let slow = app(200, "slow", Duration::from_millis(800)).await;
    let _echo = sidecar(dir.path(), Some(slow), &stop).await;
    let mut cfg = config(dir.path(), None, Duration::from_secs(15));
    cfg.max_requests_per_service = 2;
    // One more than the calls below, for a connection still closing.
    cfg.max_connections = 4;
    let client = isthmus_sidecar::run(cfg, stop.clone()).await.unwrap();
    until_ok(|| async { get(client.outbound_addr).await.0 == 200 }).await;

    let t = std::time::Instant::now();
    let calls: Vec<_> = (0..3)
        .map(|_| tokio::spawn(get_with(client.outbound_addr, "")))
        .collect();
    let mut statuses = Vec::new();
    for c in calls {
        let (status, head, _) = c.await.unwrap();
        if status == 503 {
            assert!(head.contains("x-isthmus-error: overloaded"), "{head}");
        }
        statuses.push(status);
    }
    statuses.sort();
    assert_eq!(statuses, vec![200, 200, 503]);
    assert!(t.elapsed() < Duration::from_secs(3));

    // Four connections held open; a fifth is closed without an answer.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(tokio::net::TcpStream::connect(client.outbound_addr).await.unwrap());
    }
    let mut fifth = tokio::net::TcpStream::connect(client.outbound_addr).await.unwrap();
    let _ = fifth
        .write_all(b"GET http://echo.demo.svc.clusterset.local:8080/ HTTP/1.1\r\nhost: x\r\n\r\n")
        .await;
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), fifth.read_to_end(&mut buf)).await;
    assert!(
        matches!(n, Ok(Ok(0)) | Ok(Err(_))),
        "the fifth connection was served: {buf:?}"
    );
    drop(held);
    stop.cancel();
}

/// Connections that never start a handshake wait in a budget of their own:
/// with every connection slot's worth of them open, a verified caller
/// still gets in.
#[tokio::test]
async fn idle_connections_do_not_lock_verified_callers_out() {
    let stop = CancellationToken::new();
    let dir = tempfile::tempdir().unwrap();
    east(dir.path(), &stop).await;
    let ok = app(200, "ok", Duration::ZERO).await;
    let mut cfg = config(dir.path(), Some(ok), Duration::from_secs(15));
    cfg.max_connections = 4;
    let echo = isthmus_sidecar::run(cfg, stop.clone()).await.unwrap();
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(tokio::net::TcpStream::connect(echo.inbound_addr).await.unwrap());
    }
    // A client started now knows echo from its first config, and has no
    // connection to it yet.
    let client = sidecar(dir.path(), None, &stop).await;
    let mut statuses = Vec::new();
    for _ in 0..10 {
        let (status, _) = get(client.outbound_addr).await;
        statuses.push(status);
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(statuses.last(), Some(&200), "{statuses:?}");
    drop(idle);
    stop.cancel();
}

/// A TrafficPolicy's retry budget is the service's own: with none (0% and
/// no floor) the requests that met the dead endpoint fail instead of going
/// to the healthy one, as they do with the default budget (test above).
#[tokio::test]
async fn a_policy_without_retry_budget_stops_retries() {
    let stop = CancellationToken::new();
    let dir = tempfile::tempdir().unwrap();
    let _endpoints = healthy_and_dead(dir.path(), &stop).await;
    let ctl = ClusterDir::new(dir.path()).connect().await.unwrap();
    ctl.admin()
        .apply_policy(isthmus_proto::ApplyPolicyRequest {
            policy: Some(isthmus_proto::TrafficPolicy {
                namespace: "demo".into(),
                service: "echo".into(),
                failover_threshold: 0.5,
                retry_budget_percent: 0,
                retry_budget_min_per_second: 0,
                requests: None,
                routes: vec![isthmus_proto::PolicyRoute {
                    headers: Default::default(),
                    split: vec![isthmus_proto::WeightedCluster {
                        cluster: "east".into(),
                        weight: 1,
                    }],
                    failover: Vec::new(),
                    requests: None,
                }],
            }),
            delete: false,
        })
        .await
        .unwrap();
    let client = sidecar(dir.path(), None, &stop).await;
    until_ok(|| async { get(client.outbound_addr).await.0 != 503 }).await;
    let mut failed = 0;
    for _ in 0..40 {
        if get(client.outbound_addr).await.0 != 200 {
            failed += 1;
        }
    }
    assert!(failed > 0, "no retries allowed, yet every request succeeded");
    stop.cancel();
}

/// With `hedge: { after: 20ms }`, a request its endpoint has not answered
/// in 20 ms gets a copy to the other endpoint, and the first answer wins:
/// no call waits for the slow endpoint. Without the policy, the first calls
/// the balancer sends there wait its 400 ms.
#[tokio::test]
async fn a_slow_endpoint_is_hedged_around() {
    let stop = CancellationToken::new();
    let dir = tempfile::tempdir().unwrap();
    east(dir.path(), &stop).await;
    sidecar(dir.path(), Some(app(200, "fast", Duration::ZERO).await), &stop).await;
    sidecar(
        dir.path(),
        Some(app(200, "slow", Duration::from_millis(400)).await),
        &stop,
    )
    .await;
    let ctl = ClusterDir::new(dir.path()).connect().await.unwrap();
    hedge_policy(&ctl, 100, 100).await;
    let client = sidecar(dir.path(), None, &stop).await;
    until_ok(|| async { get(client.outbound_addr).await.0 == 200 }).await;
    let mut slowest = Duration::ZERO;
    let mut bodies = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let t = std::time::Instant::now();
        let (status, body) = get(client.outbound_addr).await;
        assert_eq!(status, 200);
        bodies.insert(body);
        slowest = slowest.max(t.elapsed());
    }
    assert!(
        slowest < Duration::from_millis(300),
        "a call waited {slowest:?} for the slow endpoint"
    );
    let hedges = hedges_sent(client.admin_addr.unwrap()).await;
    assert!(hedges >= 1.0, "no hedge was sent");
    stop.cancel();
}

/// demo/echo's policy: a hedge after 20 ms, and this retry budget.
async fn hedge_policy(ctl: &isthmus_core::local::LocalClient, percent: u32, floor: u32) {
    ctl.admin()
        .apply_policy(isthmus_proto::ApplyPolicyRequest {
            policy: Some(isthmus_proto::TrafficPolicy {
                namespace: "demo".into(),
                service: "echo".into(),
                failover_threshold: 0.5,
                retry_budget_percent: percent,
                retry_budget_min_per_second: floor,
                requests: Some(isthmus_proto::RequestPolicy {
                    hedge_after_ms: 20,
                    hedge_max: 1,
                    ..Default::default()
                }),
                routes: Vec::new(),
            }),
            delete: false,
        })
        .await
        .unwrap();
}

/// The hedges a sidecar has sent, by its metrics.
async fn hedges_sent(admin: std::net::SocketAddr) -> f64 {
    let m = isthmus_core::http::get_via(&admin.to_string(), &format!("http://{admin}/metrics"))
        .await
        .unwrap()
        .text();
    m.lines()
        .filter(|l| l.starts_with("isthmus_hedges_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Hedges draw on the retry budget: with none left, a call that is late
/// gets no copy, however the hedge is set; with budget, the same calls do.
#[tokio::test]
async fn hedges_draw_on_the_retry_budget() {
    let stop = CancellationToken::new();
    let dir = tempfile::tempdir().unwrap();
    east(dir.path(), &stop).await;
    // Both endpoints answer after 100 ms: every call is late for a 20 ms
    // hedge, wherever it goes.
    for name in ["one", "two"] {
        sidecar(
            dir.path(),
            Some(app(200, name, Duration::from_millis(100)).await),
            &stop,
        )
        .await;
    }
    let ctl = ClusterDir::new(dir.path()).connect().await.unwrap();
    hedge_policy(&ctl, 0, 0).await;
    let client = sidecar(dir.path(), None, &stop).await;
    let admin = client.admin_addr.unwrap();
    until_ok(|| async { get(client.outbound_addr).await.0 == 200 }).await;
    for _ in 0..10 {
        assert_eq!(get(client.outbound_addr).await.0, 200);
    }
    assert_eq!(hedges_sent(admin).await, 0.0, "a hedge was sent with no budget");
    hedge_policy(&ctl, 100, 100).await;
    // The new budget reaches the sidecar with the next config.
    until_ok(|| async {
        get(client.outbound_addr).await;
        hedges_sent(admin).await >= 1.0
    })
    .await;
    stop.cancel();
}
