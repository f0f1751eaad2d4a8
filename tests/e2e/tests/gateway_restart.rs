//! Components started one by one (as deploy/local/two-clusters.sh does),
//! then east's gateway is killed and restarted on the same address while
//! west keeps calling: west must notice at once (QUIC stateless reset with
//! a key that survives restarts) and lose no request.

use std::time::Duration;

use isthmus_e2e::{Component, eventually, get_via, ok};

const ECHO: &str = "http://echo.demo.svc.clusterset.local:8080/";

#[test]
fn calls_survive_a_peer_gateway_restart() {
    let root = tempfile::tempdir().unwrap();
    let east_dir = root.path().join("east");
    let west_dir = root.path().join("west");
    let (e, w) = (east_dir.to_str().unwrap(), west_dir.to_str().unwrap());

    let _east_ctl = Component::start(
        root.path(),
        "east-controller",
        &[
            "controller",
            "--dir",
            e,
            "--cluster",
            "east",
            "--control-addr",
            "127.0.18.1:0",
            "--peering-addr",
            "127.0.18.1:0",
        ],
    );
    let mut east_gw = Component::start(
        root.path(),
        "east-gateway",
        &[
            "gateway",
            "--dir",
            e,
            "--tunnel-addr",
            "127.0.18.2:0",
            "--quic-addr",
            "127.0.18.2:0",
        ],
    );
    let echo = Component::start(
        root.path(),
        "east-echo",
        &["echo", "--cluster", "east", "--listen", "127.0.18.20:0"],
    );
    let app = echo.addr("listen");
    let _east_sc = Component::start(
        root.path(),
        "east-sidecar",
        &[
            "sidecar",
            "--dir",
            e,
            "--namespace",
            "demo",
            "--service",
            "echo",
            "--port",
            "8080",
            "--app",
            &app,
            "--inbound-addr",
            "127.0.18.20:0",
            "--outbound-addr",
            "127.0.18.20:0",
        ],
    );
    let _west_ctl = Component::start(
        root.path(),
        "west-controller",
        &[
            "controller",
            "--dir",
            w,
            "--cluster",
            "west",
            "--control-addr",
            "127.0.19.1:0",
            "--peering-addr",
            "127.0.19.1:0",
        ],
    );
    let west_gw = Component::start(
        root.path(),
        "west-gateway",
        &[
            "gateway",
            "--dir",
            w,
            "--tunnel-addr",
            "127.0.19.2:0",
            "--quic-addr",
            "127.0.19.2:0",
        ],
    );
    let client = Component::start(
        root.path(),
        "west-client",
        &[
            "sidecar",
            "--dir",
            w,
            "--namespace",
            "demo",
            "--service-account",
            "client",
            "--inbound-addr",
            "127.0.19.30:0",
            "--outbound-addr",
            "127.0.19.30:0",
        ],
    );
    let proxy = client.addr("outbound");

    let token = ok(&["token", "create", "--dir", e]).trim().to_string();
    ok(&["link", "--dir", w, &token]);
    ok(&["export", "--dir", e, "demo/echo"]);
    eventually("echo across clusters", Duration::from_secs(30), || {
        get_via(&proxy, ECHO).ok().filter(|r| r.status == 200)
    });

    // Crash east's gateway and bring it back on the same addresses.
    let (tunnel, quic) = (east_gw.addr("tunnel"), east_gw.addr("quic"));
    east_gw.kill();
    let _east_gw2 = Component::start(
        root.path(),
        "east-gateway-2",
        &["gateway", "--dir", e, "--tunnel-addr", &tunnel, "--quic-addr", &quic],
    );

    // Every request succeeds: the dead pooled session is retried on a new
    // one, over a new QUIC connection.
    for i in 0..20 {
        let r = get_via(&proxy, ECHO).unwrap();
        assert_eq!(r.status, 200, "request {i} after the restart: {r:?}");
        assert_eq!(r.json()["cluster"], "east");
    }
    // West learned of the restart from a stateless reset, not a timeout.
    eventually("west's gateway to log the reset", Duration::from_secs(10), || {
        west_gw.log_text().contains("reset by peer").then_some(())
    });
}
