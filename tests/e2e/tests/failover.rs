//! Failover with requests running throughout, three clusters of real
//! processes: west calls demo/echo, which east and north export (and, in
//! cases 1 and 4, west runs too). Each case reports requests sent, failed,
//! and how long after the fault traffic had moved:
//!
//! ```text
//! cargo test -p isthmus-e2e --test failover -- --nocapture --test-threads 1
//! ```
//!
//! The targets (docs/policy.md) are a move within 1 s and no failed
//! idempotent request in cases 1, 2 and 4. The tests assert no failure, and
//! a move within 5 s so a loaded CI machine does not fail them on timing;
//! the figures printed are the measurement.

use std::sync::Mutex;
use std::time::Duration;

use isthmus_e2e::three::{SLOW, Three, check, echo_sidecar, signal, through};
use isthmus_e2e::{Component, Impact, eventually, ok};

/// The cases measure time: one at a time, so they do not load each other.
static SERIAL: Mutex<()> = Mutex::new(());

const NETS: [&str; 3] = ["127.0.32", "127.0.33", "127.0.34"];

#[test]
fn case1_every_local_endpoint_killed() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = Three::start(NETS);
    let [mut a, mut b] = m.west_echoes([20, 21]);
    // One endpoint loses its app (its sidecar answers app-unavailable), the
    // other the whole workload (connections refused, registration gone).
    let (sent, at) = through(&m.proxy(), Duration::from_secs(3), || {
        a.app.kill();
        b.app.kill();
        b.sidecar.kill();
    });
    let impact = Impact::of(&sent, at, SLOW, |c| c == "east" || c == "north");
    check("case 1, every local endpoint killed", &impact, true);
}

#[test]
fn case2_remote_gateway_killed() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut m = Three::start(NETS);
    m.east_then_north("");
    let (sent, at) = through(&m.proxy(), Duration::from_secs(3), || m.east.gw.kill());
    let impact = Impact::of(&sent, at, SLOW, |c| c == "north");
    check("case 2, the remote gateway killed", &impact, true);
    let west_gw = isthmus_e2e::metrics(&m.west.gw.addr("admin"));
    assert_eq!(
        isthmus_e2e::sample(&west_gw, "isthmus_gateway_peer_silences_total", &[("peer", "east")]),
        Some(1.0),
        "west's gateway took east's for dead once"
    );
}

#[test]
fn case3_peer_cut_off() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = Three::start(NETS);
    m.east_then_north("");
    // Every east process stops answering, as behind a network partition:
    // no reset, no refusal, only silence.
    let east = [
        m.east.ctl.pid(),
        m.east.gw.pid(),
        m.east_echo.app.pid(),
        m.east_echo.sidecar.pid(),
    ];
    let (sent, at) = through(&m.proxy(), Duration::from_secs(3), || signal("-STOP", &east));
    let impact = Impact::of(&sent, at, SLOW, |c| c == "north");
    check("case 3, a peer cluster cut off", &impact, true);
    // Its imports go when the lease (3 s here) runs out.
    eventually("east's imports withdrawn", Duration::from_secs(20), || {
        let st: serde_json::Value = serde_json::from_str(&ok(&["status", "--dir", &m.west.dir, "--json"])).unwrap();
        let east = st["links"].as_array()?.iter().find(|l| l["cluster"] == "east")?.clone();
        (east["imports"] == 0).then_some(())
    });
    // Reconnected, east takes the traffic back.
    signal("-CONT", &east);
    m.wait_for("east to take the traffic back", |c| c == "east");
}

#[test]
fn case4_local_endpoints_come_back() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = Three::start(NETS);
    let [mut a, mut b] = m.west_echoes([20, 21]);
    let a_app = a.app.addr("listen");
    a.app.kill();
    b.app.kill();
    b.sidecar.kill();
    m.wait_for("traffic to leave west", |c| c != "west");
    let r = m.root.path();
    let mut back = Vec::new();
    let (sent, at) = through(&m.proxy(), Duration::from_secs(6), || {
        // A's app on its old address (its sidecar waited there), B anew.
        back.push(Component::start(
            r,
            "west-echo-20-app-again",
            &format!("echo --cluster west --listen {a_app}"),
        ));
        let b_app = Component::start(
            r,
            "west-echo-21-app-again",
            &format!("echo --cluster west --listen {}.21:0", NETS[0]),
        );
        back.push(echo_sidecar(
            r,
            &m.west.dir,
            &format!("{}.21", NETS[0]),
            "west-echo-21-again",
            &b_app.addr("listen"),
        ));
        back.push(b_app);
    });
    let impact = Impact::of(&sent, at, SLOW, |c| c == "west");
    check("case 4, the local endpoints come back (failback)", &impact, true);
}
