//! Components started one by one, then east's gateway is killed and
//! restarted on the same address while west keeps calling: west must notice
//! at once (QUIC stateless reset with a key that survives restarts) and lose
//! no request.

use std::time::Duration;

use isthmus_e2e::{Component, ECHO, Pair, eventually, get_via};

#[test]
fn calls_survive_a_peer_gateway_restart() {
    let root = tempfile::tempdir().unwrap();
    let mut p = Pair::start(root.path(), "127.0.18", "127.0.19", "");
    p.link_and_export();
    let proxy = p.proxy();

    // Crash east's gateway and bring it back on the same addresses.
    let (tunnel, quic) = (p.east_gw.addr("tunnel"), p.east_gw.addr("quic"));
    p.east_gw.kill();
    let _east_gw2 = Component::start(
        root.path(),
        "east-gateway-2",
        &format!(
            "gateway --dir {} --tunnel-addr {tunnel} --quic-addr {quic} --admin-addr 127.0.18.2:0",
            p.east_dir
        ),
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
        p.west_gw.log_text().contains("reset by peer").then_some(())
    });
}
