//! Transparent redirection of a workload's TCP through its sidecar: the
//! rules `isthmus redirect` installs in the workload's network namespace
//! (a pod's init step, or a local-mode namespace), as text for `nft -f -`
//! or, where nftables is absent, `iptables-restore`. Pure: unit-tested
//! here, applied for real by tests/e2e/tests/transparent.rs.
//!
//! - Outbound (`output` hook): every TCP connection the workload opens goes
//!   to the sidecar's outbound port, which reads where it was going
//!   (`SO_ORIGINAL_DST`), except the sidecar's own (by its UID), loopback,
//!   and the excluded ports and networks.
//! - Inbound (`prerouting` hook): every TCP connection arriving goes to the
//!   sidecar's inbound port (mTLS only), except that port itself, the
//!   sidecar's admin port and the excluded ports (probes kubelet sends the
//!   app directly, for example).

use std::fmt::Write as _;

/// The nftables table (and iptables chain prefix) the rules live in:
/// replaced whole on each run, so running twice changes nothing.
pub const TABLE: &str = "isthmus";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redirect {
    pub outbound_port: u16,
    pub inbound_port: u16,
    /// The sidecar's user: its own connections go out untouched.
    pub uid: u32,
    pub exclude_inbound_ports: Vec<u16>,
    pub exclude_outbound_ports: Vec<u16>,
    /// Destinations reached directly (CIDRs, IPv4 or IPv6).
    pub exclude_outbound_cidrs: Vec<String>,
}

fn set<T: ToString>(items: &[T]) -> String {
    items.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", ")
}

impl Redirect {
    /// Inbound ports never redirected: the sidecar's own and the excluded.
    fn inbound_passthrough(&self) -> Vec<u16> {
        let mut ports = vec![self.inbound_port];
        ports.extend(&self.exclude_inbound_ports);
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    /// The ruleset, for `nft -f -` (IPv4 and IPv6 in one `inet` table).
    pub fn nftables(&self) -> String {
        let mut s = String::new();
        // Declaring then deleting makes the run idempotent on any state.
        let _ = writeln!(
            s,
            "table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{"
        );
        let _ = writeln!(
            s,
            "  chain prerouting {{\n    type nat hook prerouting priority -100; policy accept;"
        );
        let _ = writeln!(s, "    tcp dport {{ {} }} return", set(&self.inbound_passthrough()));
        let _ = writeln!(s, "    meta l4proto tcp redirect to :{}\n  }}", self.inbound_port);
        let _ = writeln!(
            s,
            "  chain output {{\n    type nat hook output priority -100; policy accept;"
        );
        let _ = writeln!(s, "    meta skuid {} return", self.uid);
        let _ = writeln!(s, "    ip daddr 127.0.0.0/8 return\n    ip6 daddr ::1 return");
        if !self.exclude_outbound_ports.is_empty() {
            let _ = writeln!(s, "    tcp dport {{ {} }} return", set(&self.exclude_outbound_ports));
        }
        let (v6, v4): (Vec<&String>, Vec<&String>) = self.exclude_outbound_cidrs.iter().partition(|c| c.contains(':'));
        if !v4.is_empty() {
            let _ = writeln!(s, "    ip daddr {{ {} }} return", set(&v4));
        }
        if !v6.is_empty() {
            let _ = writeln!(s, "    ip6 daddr {{ {} }} return", set(&v6));
        }
        let _ = writeln!(s, "    meta l4proto tcp redirect to :{}\n  }}\n}}", self.outbound_port);
        s
    }

    /// The same rules for `iptables-restore` (`ipv6`: for `ip6tables-restore`).
    pub fn iptables(&self, ipv6: bool) -> String {
        let (pre, out) = ("ISTHMUS_INBOUND", "ISTHMUS_OUTBOUND");
        let loopback = if ipv6 { "::1/128" } else { "127.0.0.0/8" };
        let mut s = String::from("*nat\n");
        let _ = writeln!(s, ":{pre} - [0:0]\n:{out} - [0:0]");
        let _ = writeln!(s, "-A PREROUTING -p tcp -j {pre}\n-A OUTPUT -p tcp -j {out}");
        for p in self.inbound_passthrough() {
            let _ = writeln!(s, "-A {pre} -p tcp --dport {p} -j RETURN");
        }
        let _ = writeln!(s, "-A {pre} -p tcp -j REDIRECT --to-ports {}", self.inbound_port);
        let _ = writeln!(s, "-A {out} -m owner --uid-owner {} -j RETURN", self.uid);
        let _ = writeln!(s, "-A {out} -d {loopback} -j RETURN");
        for p in &self.exclude_outbound_ports {
            let _ = writeln!(s, "-A {out} -p tcp --dport {p} -j RETURN");
        }
        for c in self.exclude_outbound_cidrs.iter().filter(|c| c.contains(':') == ipv6) {
            let _ = writeln!(s, "-A {out} -d {c} -j RETURN");
        }
        let _ = writeln!(
            s,
            "-A {out} -p tcp -j REDIRECT --to-ports {}\nCOMMIT",
            self.outbound_port
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r() -> Redirect {
        Redirect {
            outbound_port: 15001,
            inbound_port: 15006,
            uid: 1337,
            exclude_inbound_ports: vec![15020, 8081],
            exclude_outbound_ports: vec![],
            exclude_outbound_cidrs: vec!["10.96.0.1/32".into(), "fd00::/8".into()],
        }
    }

    #[test]
    fn nftables_sends_the_apps_tcp_through_the_sidecar_but_not_the_sidecars_own() {
        let text = r().nftables();
        let output = &text[text.find("chain output").unwrap()..];
        // Order matters: exemptions before the redirect.
        let uid = output.find("meta skuid 1337 return").unwrap();
        let redirect = output.find("redirect to :15001").unwrap();
        assert!(uid < redirect, "{text}");
        assert!(output.contains("ip daddr 127.0.0.0/8 return"));
        assert!(output.contains("ip daddr { 10.96.0.1/32 } return"));
        assert!(output.contains("ip6 daddr { fd00::/8 } return"));
        let pre = &text[text.find("chain prerouting").unwrap()..text.find("chain output").unwrap()];
        assert!(pre.contains("tcp dport { 8081, 15006, 15020 } return"), "{pre}");
        assert!(pre.contains("redirect to :15006"));
        assert!(
            text.starts_with("table inet isthmus\ndelete table inet isthmus\n"),
            "idempotent"
        );
    }

    #[test]
    fn iptables_says_the_same() {
        let v4 = r().iptables(false);
        assert!(v4.contains("-A ISTHMUS_OUTBOUND -m owner --uid-owner 1337 -j RETURN"));
        assert!(v4.contains("-A ISTHMUS_OUTBOUND -d 10.96.0.1/32 -j RETURN"));
        assert!(!v4.contains("fd00::/8"));
        assert!(v4.contains("-A ISTHMUS_INBOUND -p tcp --dport 15020 -j RETURN"));
        assert!(v4.trim_end().ends_with("COMMIT"));
        let v6 = r().iptables(true);
        assert!(v6.contains("-d ::1/128 -j RETURN") && v6.contains("-d fd00::/8 -j RETURN"));
    }
}
