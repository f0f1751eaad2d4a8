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

use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use isthmus_e2e::{Component, ECHO, Impact, Load, Pair, eventually, get_via, ok};

/// The cases measure time: one at a time, so they do not load each other.
static SERIAL: Mutex<()> = Mutex::new(());

const WEST: &str = "127.0.32";
const EAST: &str = "127.0.33";
const NORTH: &str = "127.0.34";
/// A request slower than this (loopback calls take milliseconds) was held
/// up by the fault.
const SLOW: Duration = Duration::from_millis(250);

/// One workload serving demo/echo: the app and its sidecar.
struct Echo {
    app: Component,
    sidecar: Component,
}

fn echo(root: &Path, dir: &str, cluster: &str, ip: &str, name: &str) -> Echo {
    let app = Component::start(
        root,
        &format!("{name}-app"),
        &format!("echo --cluster {cluster} --listen {ip}:0"),
    );
    let sidecar = echo_sidecar(root, dir, ip, name, &app.addr("listen"));
    Echo { app, sidecar }
}

fn echo_sidecar(root: &Path, dir: &str, ip: &str, name: &str, app: &str) -> Component {
    Component::start(
        root,
        &format!("{name}-sidecar"),
        &format!(
            "sidecar --dir {dir} --namespace demo --service echo --port 8080 --app {app} \
             --inbound-addr {ip}:0 --outbound-addr {ip}:0 --admin-addr {ip}:0"
        ),
    )
}

/// A cluster's controller (3 s import lease, so case 3 runs in seconds)
/// and gateway.
struct Cluster {
    dir: String,
    ctl: Component,
    gw: Component,
}

fn cluster(root: &Path, name: &str, net: &str) -> Cluster {
    let dir = root.join(name).display().to_string();
    let ctl = Pair::controller(root, name, &dir, net, "--import-lease 3s");
    let gw = Pair::gateway(root, name, &dir, net);
    Cluster { dir, ctl, gw }
}

/// West linked to east and north, which both run and export demo/echo.
struct Mesh {
    root: tempfile::TempDir,
    west: Cluster,
    east: Cluster,
    _north: Cluster,
    east_echo: Echo,
    _north_echo: Echo,
    client: Component,
}

impl Mesh {
    fn start() -> Self {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let west = cluster(r, "west", WEST);
        let east = cluster(r, "east", EAST);
        let north = cluster(r, "north", NORTH);
        let east_echo = echo(r, &east.dir, "east", &format!("{EAST}.20"), "east-echo");
        let north_echo = echo(r, &north.dir, "north", &format!("{NORTH}.20"), "north-echo");
        let client = Pair::client_sidecar(r, &west.dir, WEST, "west-client");
        for c in [&east, &north] {
            let token = ok(&["token", "create", "--dir", &c.dir]).trim().to_string();
            ok(&["link", "--dir", &west.dir, &token]);
            ok(&["export", "--dir", &c.dir, "demo/echo"]);
        }
        let m = Mesh {
            root,
            west,
            east,
            _north: north,
            east_echo,
            _north_echo: north_echo,
            client,
        };
        let proxy = m.proxy();
        eventually("east and north to answer", Duration::from_secs(30), || {
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..20 {
                let r = get_via(&proxy, ECHO).ok().filter(|r| r.status == 200)?;
                seen.insert(r.header("x-isthmus-cluster").unwrap_or_default().to_string());
            }
            (seen.len() == 2).then_some(())
        });
        m
    }

    fn proxy(&self) -> String {
        self.client.addr("outbound")
    }

    /// Wait (at most 30 s) until 10 calls in a row are answered by clusters
    /// that satisfy `want`.
    fn wait_for(&self, what: &str, want: impl Fn(&str) -> bool) {
        let proxy = self.proxy();
        eventually(what, Duration::from_secs(30), || {
            (0..10)
                .all(|_| {
                    get_via(&proxy, ECHO)
                        .ok()
                        .filter(|r| r.status == 200)
                        .is_some_and(|r| want(r.header("x-isthmus-cluster").unwrap_or_default()))
                })
                .then_some(())
        });
    }

    /// West runs demo/echo too: two endpoints, on .20 and .21.
    fn west_echoes(&self) -> [Echo; 2] {
        let r = self.root.path();
        let e = [20, 21].map(|h| {
            echo(
                r,
                &self.west.dir,
                "west",
                &format!("{WEST}.{h}"),
                &format!("west-echo-{h}"),
            )
        });
        self.wait_for("west's own echo to take every call", |c| c == "west");
        e
    }

    /// West's policy for demo/echo: east, then north.
    fn east_then_north(&self) {
        let file = self.root.path().join("policy.yaml");
        std::fs::write(
            &file,
            "apiVersion: isthmus.dev/v1alpha1
kind: TrafficPolicy
metadata: { name: echo, namespace: demo }
spec:
  routes:
    - split: [{ cluster: east }]
      failover: [north]
",
        )
        .unwrap();
        ok(&["apply", "--dir", &self.west.dir, "-f", file.to_str().unwrap()]);
        self.wait_for("the policy to send every call to east", |c| c == "east");
    }
}

/// Requests throughout: 4 workers, one call each per 40 ms (100 calls/s).
fn load(proxy: &str) -> Load {
    Load::start(proxy, ECHO, 4, Duration::from_millis(40))
}

/// Run `fault` with requests running for a second before and `after` it.
fn through(proxy: &str, after: Duration, fault: impl FnOnce()) -> (Vec<isthmus_e2e::Sent>, Instant) {
    let l = load(proxy);
    std::thread::sleep(Duration::from_secs(1));
    let at = Instant::now();
    fault();
    std::thread::sleep(after);
    (l.finish(), at)
}

fn signal(sig: &str, pids: &[u32]) {
    for pid in pids {
        let st = Command::new("kill").args([sig, &pid.to_string()]).status().unwrap();
        assert!(st.success(), "kill {sig} {pid}");
    }
}

fn check(case: &str, impact: &Impact, fail_free: bool) {
    println!("{}", impact.report(case));
    if fail_free {
        assert_eq!(impact.failed, 0, "{case}: {impact:?}");
    }
    assert!(impact.moved_after < Duration::from_secs(5), "{case}: {impact:?}");
    assert!(!impact.after.is_empty(), "{case}: no calls after the move: {impact:?}");
}

#[test]
fn case1_every_local_endpoint_killed() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = Mesh::start();
    let [mut a, mut b] = m.west_echoes();
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
    let mut m = Mesh::start();
    m.east_then_north();
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
    let m = Mesh::start();
    m.east_then_north();
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
    let m = Mesh::start();
    let [mut a, mut b] = m.west_echoes();
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
            &format!("echo --cluster west --listen {WEST}.21:0"),
        );
        back.push(echo_sidecar(
            r,
            &m.west.dir,
            &format!("{WEST}.21"),
            "west-echo-21-again",
            &b_app.addr("listen"),
        ));
        back.push(b_app);
    });
    let impact = Impact::of(&sent, at, SLOW, |c| c == "west");
    check("case 4, the local endpoints come back (failback)", &impact, true);
}
