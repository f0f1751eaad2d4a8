//! A session from another cluster lives only as long as the link: a caller
//! from a cluster that was since unlinked is refused on its next request,
//! and its session is closed. Two real controllers, linked, and a real
//! sidecar; the caller is a raw mTLS + HTTP/2 client holding west's SVID,
//! as a sidecar of west would.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use isthmus_core::identity::{SpiffeId, Svid};
use isthmus_core::local::{ClusterDir, LocalClient};
use isthmus_core::tls;
use isthmus_proto::{CreateTokenRequest, ExportRequest, LinkRequest, UnlinkRequest};
use tokio_util::sync::CancellationToken;

async fn controller(dir: &std::path::Path, name: &str, stop: &CancellationToken) -> LocalClient {
    isthmus_core::install_crypto_provider();
    let cfg = isthmus_controller::Config::new(dir, name, &format!("{name}.mesh"));
    isthmus_controller::run(cfg, stop.clone()).await.unwrap();
    ClusterDir::new(dir).connect().await.unwrap()
}

async fn ok_app() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let svc = hyper::service::service_fn(|_req| async {
                Ok::<_, Infallible>(hyper::Response::new(Empty::<Bytes>::new()))
            });
            tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc));
        }
    });
    addr
}

type Sender = hyper::client::conn::http2::SendRequest<Empty<Bytes>>;

/// An HTTP/2 session to `inbound` over mTLS as `svid`, trusting `east`'s
/// bundle; `None` while east's sidecar does not trust west yet.
async fn session(inbound: SocketAddr, svid: &Svid, east: &LocalClient) -> Option<Sender> {
    let cfg = tls::client_config(
        Some(tls::SvidResolver::new(svid).unwrap()),
        east.bundles.clone(),
        tls::Expect::Id(SpiffeId::parse("spiffe://east.mesh/ns/demo/sa/echo").unwrap()),
        &[tls::ALPN_H2],
    )
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(inbound).await.ok()?;
    let stream = tokio_rustls::TlsConnector::from(cfg)
        .connect(tls::sni(), tcp)
        .await
        .ok()?;
    let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(conn);
    Some(send)
}

/// The status of a GET on the session, or `None` if the session is gone.
async fn get(send: &mut Sender) -> Option<u16> {
    send.ready().await.ok()?;
    let req = hyper::Request::get("http://echo.demo.svc.clusterset.local:8080/")
        .body(Empty::new())
        .unwrap();
    Some(send.send_request(req).await.ok()?.status().as_u16())
}

#[tokio::test]
async fn a_session_from_an_unlinked_cluster_is_refused_and_closed() {
    let stop = CancellationToken::new();
    let (east_dir, west_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let east = controller(east_dir.path(), "east", &stop).await;
    let west = controller(west_dir.path(), "west", &stop).await;
    let token = east
        .admin()
        .create_token(CreateTokenRequest {
            ttl_seconds: 600,
            uses: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    west.admin().link(LinkRequest { token }).await.unwrap();

    let serve = isthmus_sidecar::Serve {
        service: "echo".into(),
        port: 8080,
        app: ok_app().await,
        app_http2: false,
    };
    let echo = isthmus_sidecar::run(
        isthmus_sidecar::Config::new(east_dir.path(), "demo", "echo", Some(serve)),
        stop.clone(),
    )
    .await
    .unwrap();
    east.admin()
        .export(ExportRequest {
            namespace: "demo".into(),
            name: "echo".into(),
        })
        .await
        .unwrap();

    // West's client identity, as west's CA issues it.
    let (svid, _) = isthmus_core::agent::request_svid(&west, "demo", "client")
        .await
        .unwrap();

    // Once east's sidecar trusts west (its config carries the link), the
    // session serves.
    let mut send = None;
    for _ in 0..200 {
        if let Some(mut s) = session(echo.inbound_addr, &svid, &east).await
            && get(&mut s).await == Some(200)
        {
            send = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut send = send.expect("west's caller was never served");

    east.admin()
        .unlink(UnlinkRequest { cluster: "west".into() })
        .await
        .unwrap();
    // The same session: refused (403 not-linked) or closed, within moments.
    let mut last = Some(200);
    for _ in 0..200 {
        last = get(&mut send).await;
        if last != Some(200) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        matches!(last, None | Some(403)),
        "a session outlived its link: {last:?}"
    );
    // And it does not stay open.
    let mut closed = false;
    for _ in 0..200 {
        if get(&mut send).await.is_none() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(closed, "the session of an unlinked cluster stayed open");
    stop.cancel();
}
