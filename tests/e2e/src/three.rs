//! Three clusters of real processes for the failure tests: west calls
//! demo/echo, which east and north run and export; west may run it too.
//! Each test passes its own three loopback /24s, so tests do not collide.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::{Component, ECHO, Impact, Load, Pair, Sent, eventually, get_via, ok};

/// A request slower than this (loopback calls take milliseconds) was held
/// up by the fault.
pub const SLOW: Duration = Duration::from_millis(250);

/// One workload serving demo/echo: the app and its sidecar.
pub struct Echo {
    pub app: Component,
    pub sidecar: Component,
}

pub fn echo(root: &Path, dir: &str, cluster: &str, ip: &str, name: &str) -> Echo {
    echo_with(root, dir, cluster, ip, name, "")
}

/// As `echo`, with more flags for the app (`--delay 2s`).
pub fn echo_with(root: &Path, dir: &str, cluster: &str, ip: &str, name: &str, flags: &str) -> Echo {
    let app = Component::start(
        root,
        &format!("{name}-app"),
        &format!("echo --cluster {cluster} --listen {ip}:0 {flags}"),
    );
    let sidecar = echo_sidecar(root, dir, ip, name, &app.addr("listen"));
    Echo { app, sidecar }
}

pub fn echo_sidecar(root: &Path, dir: &str, ip: &str, name: &str, app: &str) -> Component {
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
pub struct Cluster {
    pub dir: String,
    pub ctl: Component,
    pub gw: Component,
}

pub fn cluster(root: &Path, name: &str, net: &str) -> Cluster {
    let dir = root.join(name).display().to_string();
    let ctl = Pair::controller(root, name, &dir, net, "--import-lease 3s");
    let gw = Pair::gateway(root, name, &dir, net);
    Cluster { dir, ctl, gw }
}

/// West linked to east and north, which both run and export demo/echo.
pub struct Three {
    pub root: tempfile::TempDir,
    /// The three loopback /24s: west, east, north.
    pub nets: [String; 3],
    pub west: Cluster,
    pub east: Cluster,
    pub north: Cluster,
    pub east_echo: Echo,
    pub north_echo: Echo,
    pub client: Component,
}

impl Three {
    /// The clusters on `nets` (west, east, north: `127.0.N` each).
    pub fn start(nets: [&str; 3]) -> Self {
        Self::start_with(nets, "")
    }

    /// As `start`, with more flags for west's client sidecar.
    pub fn start_with(nets: [&str; 3], client_flags: &str) -> Self {
        let [w, e, n] = nets;
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let west = cluster(r, "west", w);
        let east = cluster(r, "east", e);
        let north = cluster(r, "north", n);
        let east_echo = echo(r, &east.dir, "east", &format!("{e}.20"), "east-echo");
        let north_echo = echo(r, &north.dir, "north", &format!("{n}.20"), "north-echo");
        let client = Component::start(
            r,
            "west-client",
            &format!(
                "sidecar --dir {} --namespace demo --service-account client \
                 --inbound-addr {w}.30:0 --outbound-addr {w}.30:0 --admin-addr {w}.30:0 {client_flags}",
                west.dir
            ),
        );
        for (c, name) in [(&east, "east"), (&north, "north")] {
            let token = ok(&["token", "create", "--dir", &c.dir]).trim().to_string();
            ok(&["link", "--dir", &west.dir, &token]);
            ok(&["export", "--dir", &c.dir, "demo/echo"]);
            // West's own echo (when it runs one) is not exported: it takes
            // the peers' endpoints because west imports them by name.
            ok(&["imports", "--dir", &west.dir, name, "demo/echo"]);
        }
        let m = Three {
            root,
            nets: nets.map(str::to_string),
            west,
            east,
            north,
            east_echo,
            north_echo,
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

    pub fn proxy(&self) -> String {
        self.client.addr("outbound")
    }

    /// Wait (at most 30 s) until 10 calls in a row are answered by clusters
    /// that satisfy `want`.
    pub fn wait_for(&self, what: &str, want: impl Fn(&str) -> bool) {
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

    /// West runs demo/echo too: an endpoint on each of `hosts` (.20, .21).
    pub fn west_echoes<const N: usize>(&self, hosts: [u8; N]) -> [Echo; N] {
        let r = self.root.path();
        let net = &self.nets[0];
        let e = hosts.map(|h| {
            echo(
                r,
                &self.west.dir,
                "west",
                &format!("{net}.{h}"),
                &format!("west-echo-{h}"),
            )
        });
        self.wait_for("west's own echo to take every call", |c| c == "west");
        e
    }

    /// Apply a TrafficPolicy for demo/echo in west: `spec` is its YAML.
    pub fn west_policy(&self, spec: &str) {
        let file = self.root.path().join("policy.yaml");
        std::fs::write(
            &file,
            format!(
                "apiVersion: isthmus.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{ name: echo, namespace: demo }}\nspec:\n{spec}"
            ),
        )
        .unwrap();
        ok(&["apply", "--dir", &self.west.dir, "-f", file.to_str().unwrap()]);
    }

    /// West's policy for demo/echo: east, then north, with `extra` spec
    /// lines (two spaces of indent).
    pub fn east_then_north(&self, extra: &str) {
        self.west_policy(&format!(
            "  routes:\n    - split: [{{ cluster: east }}]\n      failover: [north]\n{extra}"
        ));
        self.wait_for("the policy to send every call to east", |c| c == "east");
    }
}

/// Requests throughout: 4 workers, one call each per 40 ms (100 calls/s).
pub fn load(proxy: &str) -> Load {
    Load::start(proxy, ECHO, 4, Duration::from_millis(40))
}

/// Run `fault` with requests running for a second before and `after` it.
pub fn through(proxy: &str, after: Duration, fault: impl FnOnce()) -> (Vec<Sent>, Instant) {
    let l = load(proxy);
    std::thread::sleep(Duration::from_secs(1));
    let at = Instant::now();
    fault();
    std::thread::sleep(after);
    (l.finish(), at)
}

/// Send `sig` (`-STOP`, `-CONT`) to every process of `pids`.
pub fn signal(sig: &str, pids: &[u32]) {
    for pid in pids {
        let st = Command::new("kill").args([sig, &pid.to_string()]).status().unwrap();
        assert!(st.success(), "kill {sig} {pid}");
    }
}

/// Print a case's figures; fail it on a lost call (if `fail_free`), on a
/// move slower than 5 s (loose: a loaded CI machine must not fail it on
/// timing; the printed figures are the measurement), or if nothing moved.
pub fn check(case: &str, impact: &Impact, fail_free: bool) {
    println!("{}", impact.report(case));
    if fail_free {
        assert_eq!(impact.failed, 0, "{case}: {impact:?}");
    }
    assert!(impact.moved_after < Duration::from_secs(5), "{case}: {impact:?}");
    assert!(!impact.after.is_empty(), "{case}: no calls after the move: {impact:?}");
}
