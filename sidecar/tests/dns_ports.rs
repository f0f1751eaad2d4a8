//! An unchanged client: it resolves `*.svc.clusterset.local` with the
//! sidecar's DNS and dials the name's service port, speaking HTTP or an
//! opaque TCP protocol (client-first, detected; server-first, after the
//! detection wait), through real sidecars and a real controller.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use bytes::Bytes;
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use isthmus_core::local::ClusterDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;

/// The client sidecar's own loopback address (its service-port listeners
/// bind well-known ports, so not 127.0.0.1).
const CLIENT_IP: &str = "127.0.77.30";

async fn http_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(b"hello over http"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

/// A TCP app: says `greeting` first (if any), then echoes in upper case.
async fn tcp_app(greeting: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                if tcp.write_all(greeting).await.is_err() {
                    return;
                }
                let mut buf = [0u8; 1024];
                while let Ok(n) = tcp.read(&mut buf).await {
                    if n == 0 || tcp.write_all(&buf[..n].to_ascii_uppercase()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn config(dir: &std::path::Path, sa: &str, serve: Option<(&str, u16, SocketAddr)>) -> isthmus_sidecar::Config {
    let serve = serve.map(|(service, port, app)| isthmus_sidecar::Serve {
        service: service.into(),
        port,
        app,
        app_http2: false,
    });
    isthmus_sidecar::Config::new(dir, "demo", sa, serve)
}

async fn resolve(dns: SocketAddr, name: &str) -> Message {
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut q = Message::query();
    q.add_query(Query::query(Name::from_str(name).unwrap(), RecordType::A));
    udp.send_to(&q.to_vec().unwrap(), dns).await.unwrap();
    let mut buf = [0u8; 512];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), udp.recv_from(&mut buf))
        .await
        .expect("a DNS answer")
        .unwrap();
    Message::from_vec(&buf[..n]).unwrap()
}

/// Connect to `addr` once something listens there (at most 10 s).
async fn dial(addr: &str) -> TcpStream {
    for _ in 0..500 {
        if let Ok(s) = TcpStream::connect(addr).await {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("nothing listens on {addr}");
}

async fn read_some(s: &mut TcpStream) -> String {
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("an answer in time")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn unchanged_clients_resolve_names_and_dial_http_and_opaque_ports() {
    isthmus_core::install_crypto_provider();
    let stop = CancellationToken::new();
    let dir = tempfile::tempdir().unwrap();
    let cfg = isthmus_controller::Config::new(dir.path(), "east", "east.mesh");
    isthmus_controller::run(cfg, stop.clone()).await.unwrap();
    ClusterDir::new(dir.path()).connect().await.unwrap();

    let (http, store, smtp) = (http_app().await, tcp_app(b"").await, tcp_app(b"220 ready\r\n").await);
    for (sa, port, app) in [("echo", 8080, http), ("store", 7379, store), ("mail", 2525, smtp)] {
        isthmus_sidecar::run(config(dir.path(), sa, Some((sa, port, app))), stop.clone())
            .await
            .unwrap();
    }
    let mut client = config(dir.path(), "client", None);
    client.outbound_addr = format!("{CLIENT_IP}:0").parse().unwrap();
    client.dns_addr = Some(format!("{CLIENT_IP}:0").parse().unwrap());
    let client = isthmus_sidecar::run(client, stop.clone()).await.unwrap();
    let dns = client.dns_addr.expect("DNS is on");

    // Names of known services resolve to the client sidecar; others do not.
    let r = resolve(dns, "echo.demo.svc.clusterset.local.").await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert_eq!(
        r.answers[0].data,
        RData::A(hickory_proto::rr::rdata::A(CLIENT_IP.parse().unwrap()))
    );
    let r = resolve(dns, "nothing.demo.svc.clusterset.local.").await;
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);

    // HTTP on the service port, routed by Host.
    let mut s = dial(&format!("{CLIENT_IP}:8080")).await;
    s.write_all(b"GET / HTTP/1.1\r\nhost: echo.demo.svc.clusterset.local:8080\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    assert!(raw.ends_with("hello over http"), "{raw}");

    // A client-first protocol that is not HTTP: carried opaque, by port.
    // A service's port listens once its name was first looked up (the
    // sidecar learns services as they are used).
    for name in ["store", "mail"] {
        let r = resolve(dns, &format!("{name}.demo.svc.clusterset.local.")).await;
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    }
    let mut s = dial(&format!("{CLIENT_IP}:7379")).await;
    s.write_all(b"*1\r\n$4\r\nping\r\n").await.unwrap();
    assert_eq!(read_some(&mut s).await, "*1\r\n$4\r\nPING\r\n");
    s.write_all(b"again").await.unwrap();
    assert_eq!(read_some(&mut s).await, "AGAIN");

    // A server-first protocol: the client says nothing, so after the
    // detection wait the connection is opaque and the greeting arrives.
    let mut s = dial(&format!("{CLIENT_IP}:2525")).await;
    assert_eq!(read_some(&mut s).await, "220 ready\r\n");
    s.write_all(b"helo x\r\n").await.unwrap();
    assert_eq!(read_some(&mut s).await, "HELO X\r\n");
    stop.cancel();
}
