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
    let r = root.path();
    let e = r.join("east").display().to_string();
    let w = r.join("west").display().to_string();

    let _east_ctl = Component::start(
        r,
        "east-controller",
        &format!(
            "controller --dir {e} --cluster east --control-addr 127.0.18.1:0 --peering-addr 127.0.18.1:0 --admin-addr 127.0.18.1:0"
        ),
    );
    let mut east_gw = Component::start(
        r,
        "east-gateway",
        &format!("gateway --dir {e} --tunnel-addr 127.0.18.2:0 --quic-addr 127.0.18.2:0 --admin-addr 127.0.18.2:0"),
    );
    let echo = Component::start(r, "east-echo", "echo --cluster east --listen 127.0.18.20:0");
    let _east_sc = Component::start(
        r,
        "east-sidecar",
        &format!(
            "sidecar --dir {e} --namespace demo --service echo --port 8080 --app {} \
             --inbound-addr 127.0.18.20:0 --outbound-addr 127.0.18.20:0 --admin-addr 127.0.18.20:0",
            echo.addr("listen")
        ),
    );
    let _west_ctl = Component::start(
        r,
        "west-controller",
        &format!(
            "controller --dir {w} --cluster west --control-addr 127.0.19.1:0 --peering-addr 127.0.19.1:0 --admin-addr 127.0.19.1:0"
        ),
    );
    let west_gw = Component::start(
        r,
        "west-gateway",
        &format!("gateway --dir {w} --tunnel-addr 127.0.19.2:0 --quic-addr 127.0.19.2:0 --admin-addr 127.0.19.2:0"),
    );
    let client = Component::start(
        r,
        "west-client",
        &format!(
            "sidecar --dir {w} --namespace demo --service-account client \
             --inbound-addr 127.0.19.30:0 --outbound-addr 127.0.19.30:0 --admin-addr 127.0.19.30:0"
        ),
    );
    let proxy = client.addr("outbound");

    let token = ok(&["token", "create", "--dir", &e]).trim().to_string();
    ok(&["link", "--dir", &w, &token]);
    ok(&["export", "--dir", &e, "demo/echo"]);
    eventually("echo across clusters", Duration::from_secs(30), || {
        get_via(&proxy, ECHO).ok().filter(|r| r.status == 200)
    });

    // Crash east's gateway and bring it back on the same addresses.
    let (tunnel, quic) = (east_gw.addr("tunnel"), east_gw.addr("quic"));
    east_gw.kill();
    let _east_gw2 = Component::start(
        r,
        "east-gateway-2",
        &format!("gateway --dir {e} --tunnel-addr {tunnel} --quic-addr {quic} --admin-addr 127.0.18.2:0"),
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
