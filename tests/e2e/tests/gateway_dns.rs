//! A peer gateway addressed by DNS name, as behind a cloud load balancer:
//! east's gateway advertises `gw.east.isthmus.test:<port>`, answered by a
//! real DNS server (Debian's dnsmasq, TTL 1 s) that west's gateway asks.
//! The name first has two addresses, one dead: west must try both. Then
//! east's gateway moves to another IP and the record changes with it:
//! west must follow without a restart.

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use isthmus_e2e::{Component, ECHO, Pair, eventually, get_via, ok};

const NAME: &str = "gw.east.isthmus.test";
const EAST: &str = "127.0.71";
const WEST: &str = "127.0.72";

/// A UDP port free on `ip` now (a fixed port is what a load balancer
/// gives: the address changes, the port does not).
fn free_udp_port(ip: &str) -> u16 {
    UdpSocket::bind(format!("{ip}:0")).unwrap().local_addr().unwrap().port()
}

struct Dnsmasq {
    child: Child,
    hosts: std::path::PathBuf,
    addr: SocketAddr,
}

impl Dnsmasq {
    fn start(dir: &Path, ips: &[&str]) -> Self {
        let hosts = dir.join("gateways.hosts");
        // The port is chosen free just before: retry if another test took it.
        for _ in 0..5 {
            let port = free_udp_port("127.0.0.1");
            Self::write(&hosts, ips);
            let child = Command::new("dnsmasq")
                .args([
                    "--keep-in-foreground",
                    "--no-resolv",
                    "--no-hosts",
                    "--bind-interfaces",
                    "--listen-address=127.0.0.1",
                    "--except-interface=nonexistent",
                    "--pid-file=",
                    "--user=root",
                    "--local-ttl=1",
                    "--log-queries",
                    "--log-facility=-",
                ])
                .arg(format!("--port={port}"))
                .arg(format!("--addn-hosts={}", hosts.display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join("dnsmasq.log")).unwrap())
                .spawn()
                .expect("dnsmasq (Debian's dnsmasq-base; tests/interop/setup.sh installs it)");
            let mut d = Dnsmasq {
                child,
                hosts: hosts.clone(),
                addr: format!("127.0.0.1:{port}").parse().unwrap(),
            };
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = d.child.try_wait() {
                    break; // the port was taken: next one
                }
                if d.answers() {
                    return d;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = d.child.kill();
        }
        panic!(
            "dnsmasq did not start: {}",
            std::fs::read_to_string(dir.join("dnsmasq.log")).unwrap_or_default()
        );
    }

    fn write(hosts: &Path, ips: &[&str]) {
        let text: String = ips.iter().map(|ip| format!("{ip} {NAME}\n")).collect();
        let tmp = hosts.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, hosts).unwrap();
    }

    /// Whether the server answers: a bare A query for the name, matched
    /// by its ID.
    fn answers(&self) -> bool {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let mut q = vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in NAME.split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        let _ = sock.send_to(&q, self.addr);
        let mut buf = [0u8; 512];
        matches!(sock.recv_from(&mut buf), Ok((n, _)) if n > 12 && buf[0] == 0x12 && buf[1] == 0x34)
    }

    /// Point the name at `ips` (dnsmasq rereads its hosts files on SIGHUP).
    fn point_at(&self, ips: &[&str]) {
        Self::write(&self.hosts, ips);
        isthmus_e2e::signal(self.child.id(), "HUP");
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn east_gateway(root: &Path, dir: &str, name: &str, ip: &str, port: u16) -> Component {
    Component::start(
        root,
        name,
        &format!(
            "gateway --dir {dir} --tunnel-addr {EAST}.2:0 --quic-addr {ip}:{port} --admin-addr {ip}:0 \
             --advertise {NAME}:{port}"
        ),
    )
}

#[test]
fn a_peer_gateway_is_reached_by_name_and_followed_when_it_moves() {
    isthmus_e2e::binary();
    isthmus_e2e::interop_python(); // installs dnsmasq where missing
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let e = root.join("east").display().to_string();
    let w = root.join("west").display().to_string();
    let port = free_udp_port(&format!("{EAST}.2"));

    // The name has two addresses; nothing listens on the first.
    let dns = Dnsmasq::start(root, &[&format!("{EAST}.9"), &format!("{EAST}.2")]);

    let _east_ctl = Pair::controller(root, "east", &e, EAST, "");
    let mut east_gw = east_gateway(root, &e, "east-gateway", &format!("{EAST}.2"), port);
    let (_echo, _east_sc) = Pair::echo(root, &e, EAST);
    let _west_ctl = Pair::controller(root, "west", &w, WEST, "");
    let west_gw = Component::start(
        root,
        "west-gateway",
        &format!(
            "gateway --dir {w} --tunnel-addr {WEST}.2:0 --quic-addr {WEST}.2:0 --admin-addr {WEST}.2:0 \
             --dns-server {}",
            dns.addr
        ),
    );
    let client = Pair::client_sidecar(root, &w, WEST, "west-client");
    let proxy = client.addr("outbound");

    // The join token carries the name, not an address.
    let token = ok(&["token", "create", "--dir", &e]).trim().to_string();
    ok(&["link", "--dir", &w, &token]);
    ok(&["export", "--dir", &e, "demo/echo"]);
    let first = Instant::now();
    eventually(
        "a call through the gateway found by name",
        Duration::from_secs(30),
        || get_via(&proxy, ECHO).ok().filter(|r| r.status == 200),
    );
    println!(
        "first call through {NAME} (one dead address of two) after {:?}",
        first.elapsed()
    );
    let log = west_gw.log_text();
    assert!(
        log.contains(&format!("{EAST}.2:{port}")) && log.contains("QUIC connection to peer gateway up"),
        "west's gateway did not dial the live address:\n{log}"
    );

    // The load balancer moves: east's gateway comes back on another IP,
    // the record follows, west's gateway is not restarted.
    east_gw.kill();
    let moved = format!("{EAST}.3");
    let _east_gw2 = east_gateway(root, &e, "east-gateway-moved", &moved, port);
    dns.point_at(&[&moved]);
    let t = Instant::now();
    let r = eventually(
        "calls to follow the gateway to its new IP",
        Duration::from_secs(30),
        || get_via(&proxy, ECHO).ok().filter(|r| r.status == 200),
    );
    assert_eq!(r.json()["cluster"], "east");
    println!(
        "calls reached east's gateway at its new IP {:?} after the move",
        t.elapsed()
    );
    eventually("west's gateway to dial the new address", Duration::from_secs(5), || {
        west_gw.log_text().contains(&format!("{moved}:{port}")).then_some(())
    });
    // And keep working.
    for i in 0..10 {
        let r = get_via(&proxy, ECHO).unwrap();
        assert_eq!(r.status, 200, "call {i} after the move: {r:?}");
    }
}
