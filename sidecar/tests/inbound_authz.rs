//! A workload of a linked cluster that skips the gateway and dials a
//! sidecar's inbound port directly still reaches only exported services.
//! Real controllers (linked by token), a real sidecar, a real west SVID.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use isthmus_core::bundle::TrustBundles;
use isthmus_core::identity::{SpiffeId, Svid};
use isthmus_core::local::ClusterDir;
use isthmus_core::tls::{self, Expect, SvidResolver};
use isthmus_proto::{CreateTokenRequest, ExportRequest, LinkRequest};
use tokio_util::sync::CancellationToken;

async fn controller(dir: &std::path::Path, name: &str, stop: &CancellationToken) -> isthmus_core::local::LocalClient {
    let cfg = isthmus_controller::Config::new(dir, name, &format!("{name}.mesh"));
    isthmus_controller::run(cfg, stop.clone()).await.unwrap();
    ClusterDir::new(dir).connect().await.unwrap()
}

/// mTLS to east's echo sidecar at `inbound` as `svid`, offering `alpn`.
async fn connect(
    inbound: std::net::SocketAddr,
    svid: &Svid,
    east_roots: &str,
    alpn: &[u8],
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let mut bundles = TrustBundles::new();
    bundles.set_pem("east.mesh", east_roots).unwrap();
    let cfg = tls::client_config(
        Some(SvidResolver::new(svid).unwrap()),
        Arc::new(ArcSwap::from_pointee(bundles)),
        Expect::Id(SpiffeId::new("east.mesh", "demo", "echo").unwrap()),
        &[alpn],
    )
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(inbound)
        .await
        .map_err(|e| e.to_string())?;
    tokio_rustls::TlsConnector::from(cfg)
        .connect(tls::sni(), tcp)
        .await
        .map_err(|e| e.to_string())
}

/// An opaque TCP connection to `inbound` with `svid`: what comes back for
/// "ping" before the connection closes.
async fn opaque(inbound: std::net::SocketAddr, svid: &Svid, east_roots: &str) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tls = connect(inbound, svid, east_roots, tls::ALPN_OPAQUE).await?;
    tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf))
        .await
        .map_err(|_| "no answer".to_string())?
        .unwrap_or(0);
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// A TCP echo server: what the sidecar's app is here. It is no HTTP server,
/// so an HTTP request that reaches it fails as app-failed (it was
/// delivered, so it is not app-unavailable, which callers may retry).
async fn echo_app() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                if let Ok(n) = tcp.read(&mut buf).await {
                    let _ = tcp.write_all(&buf[..n]).await;
                }
            });
        }
    });
    addr
}

/// GET / on `inbound` with `svid`, over mTLS and HTTP/2; the status and the
/// `x-isthmus-error` header.
async fn call(inbound: std::net::SocketAddr, svid: &Svid, east_roots: &str) -> Result<(u16, Option<String>), String> {
    let tls = connect(inbound, svid, east_roots, tls::ALPN_H2).await?;
    let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = hyper::Request::get("http://echo.demo.svc.clusterset.local:8080/")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let kind = resp
        .headers()
        .get(isthmus_sidecar::ERROR_HEADER)
        .map(|v| v.to_str().unwrap().to_string());
    Ok((resp.status().as_u16(), kind))
}

#[tokio::test]
async fn remote_callers_reach_only_exported_services() {
    isthmus_core::install_crypto_provider();
    let stop = CancellationToken::new();
    let east_dir = tempfile::tempdir().unwrap();
    let west_dir = tempfile::tempdir().unwrap();
    let east = controller(east_dir.path(), "east", &stop).await;
    let west = controller(west_dir.path(), "west", &stop).await;

    // East's echo sidecar (its app speaks no HTTP: a request that passes
    // authorization gets 502 app-failed, one that does not gets 403;
    // an opaque connection that passes gets its bytes echoed).
    let app = echo_app().await;
    let sidecar = isthmus_sidecar::run(
        isthmus_sidecar::Config {
            instance: "echo-1".into(),
            admin_addr: None,
            ..isthmus_sidecar::Config::new(
                east_dir.path(),
                "demo",
                "echo",
                Some(isthmus_sidecar::Serve {
                    service: "echo".into(),
                    port: 8080,
                    app,
                    app_http2: false,
                }),
            )
        },
        stop.clone(),
    )
    .await
    .unwrap();

    // Link west to east, and get a genuine west workload SVID.
    let token = east
        .admin()
        .create_token(CreateTokenRequest {
            ttl_seconds: 60,
            uses: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    west.admin().link(LinkRequest { token: token.token }).await.unwrap();
    let (svid, _) = isthmus_core::agent::request_svid(&west, "demo", "client")
        .await
        .unwrap();
    let east_roots = ClusterDir::new(east_dir.path()).roots_pem().unwrap();

    // Once east's sidecar trusts west (the link reached its config), a
    // direct call is authenticated (until then the handshake fails) but
    // refused: echo is not exported.
    let mut seen = Err(String::new());
    for _ in 0..100 {
        seen = call(sidecar.inbound_addr, &svid, &east_roots).await;
        if seen.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(seen, Ok((403, Some("not-exported".to_string()))));
    // An opaque connection is closed before it reaches the app.
    assert_eq!(
        opaque(sidecar.inbound_addr, &svid, &east_roots).await,
        Ok(String::new())
    );

    // After the export, the same caller passes (and meets the absent app).
    east.admin()
        .export(ExportRequest {
            namespace: "demo".into(),
            name: "echo".into(),
        })
        .await
        .unwrap();
    let mut status = None;
    for _ in 0..100 {
        let r = call(sidecar.inbound_addr, &svid, &east_roots).await.unwrap();
        if r.0 != 403 {
            status = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, Some((502, Some("app-failed".to_string()))));
    assert_eq!(
        opaque(sidecar.inbound_addr, &svid, &east_roots).await,
        Ok("ping".into())
    );
    stop.cancel();
}
