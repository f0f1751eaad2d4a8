//! Endpoint choice with real sidecars: two endpoints of one service, one
//! of which answers fast with server errors. Power of two choices prefers
//! it at first (it is the faster), outlier ejection takes it out after
//! `EJECT_AFTER` failures in a row, and the healthy one serves the rest.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use isthmus_core::local::ClusterDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// An HTTP/1.1 app answering `status` with `body` after `delay`.
async fn app(status: u16, body: &'static str, delay: Duration) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| async move {
                    tokio::time::sleep(delay).await;
                    let mut resp = hyper::Response::new(Full::new(Bytes::from_static(body.as_bytes())));
                    *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
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
    isthmus_sidecar::run(
        isthmus_sidecar::Config {
            dir: dir.to_path_buf(),
            credential: None,
            namespace: "demo".into(),
            service_account: if app.is_some() { "echo" } else { "client" }.into(),
            serve: app.map(|app| isthmus_sidecar::Serve {
                service: "echo".into(),
                port: 8080,
                app,
            }),
            inbound_addr: "127.0.0.1:0".parse().unwrap(),
            outbound_addr: "127.0.0.1:0".parse().unwrap(),
            instance: app.map(|a| a.to_string()).unwrap_or_else(|| "client".into()),
            admin_addr: None,
        },
        stop.clone(),
    )
    .await
    .unwrap()
}

/// GET echo through the client sidecar's proxy: status and body.
async fn get(proxy: SocketAddr) -> (u16, String) {
    let mut tcp = tokio::net::TcpStream::connect(proxy).await.unwrap();
    tcp.write_all(
        b"GET http://echo.demo.svc.clusterset.local:8080/ HTTP/1.1\r\nhost: echo.demo.svc.clusterset.local:8080\r\nconnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut raw = String::new();
    tcp.read_to_string(&mut raw).await.unwrap();
    let status = raw[9..12].parse().unwrap();
    let body = raw.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
    (status, body)
}

#[tokio::test]
async fn fast_failing_endpoint_is_ejected_and_the_healthy_one_serves() {
    isthmus_core::install_crypto_provider();
    let stop = CancellationToken::new();
    let dir = tempfile::tempdir().unwrap();
    let cfg = isthmus_controller::Config::new(dir.path(), "east", "east.mesh");
    isthmus_controller::run(cfg, stop.clone()).await.unwrap();
    ClusterDir::new(dir.path()).connect().await.unwrap();

    let healthy = app(200, "healthy", Duration::from_millis(5)).await;
    let broken = app(503, "broken", Duration::ZERO).await;
    let _a = sidecar(dir.path(), Some(healthy), &stop).await;
    let _b = sidecar(dir.path(), Some(broken), &stop).await;
    let client = sidecar(dir.path(), None, &stop).await;

    // Wait until the client's config holds both endpoints.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..200 {
        seen.insert(get(client.outbound_addr).await.1);
        if seen.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(seen.len(), 2, "both endpoints should answer at first: {seen:?}");

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
        failed <= isthmus_sidecar::balance::EJECT_AFTER as usize,
        "{failed} failures: the broken endpoint should be ejected after {} in a row",
        isthmus_sidecar::balance::EJECT_AFTER
    );
    assert!(
        last_failure < 20,
        "failures should stop early, last at request {last_failure}"
    );
    stop.cancel();
}
