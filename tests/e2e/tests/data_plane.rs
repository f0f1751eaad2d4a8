//! An unchanged client in west resolves clusterset.local names with its
//! sidecar's DNS and dials them: HTTP, and an opaque TCP service exported by
//! east, both across the gateways' QUIC tunnel. Real processes throughout.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use isthmus_e2e::{Component, ECHO, Pair, dns_a as resolve, eventually, get_via, metrics, ok, sample, upper_echo};

#[test]
fn unchanged_client_dials_http_and_opaque_tcp_across_clusters() {
    let root = tempfile::tempdir().unwrap();
    let p = Pair::start(root.path(), "127.0.26", "127.0.27", "");
    p.link_and_export();

    // East serves demo/store, a TCP protocol, and exports it.
    let app = upper_echo("127.0.26.21:0", None);
    let _store = Component::start(
        root.path(),
        "east-store",
        &format!(
            "sidecar --dir {} --namespace demo --service store --port 7379 --app {app} \
             --inbound-addr 127.0.26.22:0 --outbound-addr 127.0.26.22:0 --admin-addr 127.0.26.22:0",
            p.east_dir
        ),
    );
    ok(&["export", "--dir", &p.east_dir, "demo/store"]);

    // West's workload has a sidecar answering DNS.
    let client = Component::start(
        root.path(),
        "west-dns-client",
        &format!(
            "sidecar --dir {} --namespace demo --service-account client --inbound-addr 127.0.27.31:0 \
             --outbound-addr 127.0.27.31:0 --admin-addr 127.0.27.31:0 --dns-addr 127.0.27.31:0",
            p.west_dir
        ),
    );
    let dns = client.addr("dns");
    let ip = eventually("demo/store to resolve", Duration::from_secs(30), || {
        resolve(&dns, "store.demo.svc.clusterset.local").ok()
    });
    assert_eq!(ip, [127, 0, 27, 31]);
    assert_eq!(resolve(&dns, "nothing.demo.svc.clusterset.local"), Err(3), "NXDOMAIN");
    assert_eq!(resolve(&dns, "example.com"), Err(5), "REFUSED");

    // Opaque TCP, through both gateways, answered by east's app.
    let mut s = eventually("the store port", Duration::from_secs(30), || {
        let mut s = TcpStream::connect("127.0.27.31:7379").ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"*1\r\n$4\r\nping\r\n").ok()?;
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).ok()?;
        (&buf[..n] == b"*1\r\n$4\r\nPING\r\n").then_some(s)
    });
    s.write_all(b"more bytes").unwrap();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"MORE BYTES");
    drop(s);

    // HTTP to the echo name's port, as an unchanged client sends it: it
    // looks the name up first, which is when the sidecar learns the
    // service and opens its port.
    assert_eq!(resolve(&dns, "echo.demo.svc.clusterset.local"), Ok([127, 0, 27, 31]));
    let mut s = TcpStream::connect("127.0.27.31:8080").unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: echo.demo.svc.clusterset.local:8080\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    assert!(raw.to_lowercase().contains("x-isthmus-cluster: east"), "{raw}");

    // The client sidecar counted the opaque connection and its bytes.
    let m = metrics(&client.addr("admin"));
    let labels = [("destination_service", "demo/store"), ("destination_cluster", "east")];
    let outcome = [labels[0], labels[1], ("outcome", "ok")];
    assert!(
        sample(&m, "isthmus_tcp_connections_total", &outcome).unwrap_or(0.0) >= 1.0,
        "{m}"
    );
    let sent = sample(&m, "isthmus_request_bytes_total", &labels);
    assert!(sent.is_some_and(|b| b >= 24.0), "{m}");
}

/// Tunnels both ways between two clusters ride one QUIC connection: the
/// gateway that was dialed tunnels back on the connection it accepted.
#[test]
fn one_quic_connection_carries_tunnels_both_ways() {
    let root = tempfile::tempdir().unwrap();
    let p = Pair::start(root.path(), "127.0.28", "127.0.29", "");
    p.link_and_export();

    // West serves demo/hello and exports it; east gets a client.
    let hello = Component::start(root.path(), "west-hello", "echo --cluster west --listen 127.0.29.20:0");
    let _hello_sidecar = Component::start(
        root.path(),
        "west-hello-sidecar",
        &format!(
            "sidecar --dir {} --namespace demo --service hello --port 8080 --app {} \
             --inbound-addr 127.0.29.20:0 --outbound-addr 127.0.29.20:0 --admin-addr 127.0.29.20:0",
            p.west_dir,
            hello.addr("listen")
        ),
    );
    ok(&["export", "--dir", &p.west_dir, "demo/hello"]);
    let east_client = Pair::client_sidecar(root.path(), &p.east_dir, "127.0.28", "east-client");
    let proxy = east_client.addr("outbound");
    let r = eventually("hello from east", Duration::from_secs(30), || {
        get_via(&proxy, "http://hello.demo.svc.clusterset.local:8080/")
            .ok()
            .filter(|r| r.status == 200)
    });
    assert_eq!(r.json()["cluster"], "west");
    // And west to east still works, on the same connection.
    let r = get_via(&p.proxy(), ECHO).unwrap();
    assert_eq!(r.status, 200);

    for (gw, peer) in [(&p.east_gw, "west"), (&p.west_gw, "east")] {
        let m = metrics(&gw.addr("admin"));
        assert_eq!(
            sample(&m, "isthmus_gateway_peer_connections", &[("peer", peer)]),
            Some(1.0),
            "{m}"
        );
    }
}
