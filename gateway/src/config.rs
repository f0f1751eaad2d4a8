//! How a gateway runs. Every default lives here once; the command line
//! (`isthmus gateway`) reads these constants for its own defaults.

use std::net::SocketAddr;
use std::time::Duration;

/// TCP address where local sidecars open tunnels (mTLS).
pub const DEFAULT_TUNNEL_ADDR: &str = "127.0.0.1:15008";
/// UDP address where peer gateways connect (QUIC).
pub const DEFAULT_QUIC_ADDR: &str = "127.0.0.1:15443";
/// Admin endpoint: `/metrics`, `/ready`, `/live`.
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:15021";
/// How long open streams may finish at shutdown.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(10);
/// A peer gateway silent this long is taken for dead (four keep-alives
/// lost in a row): failover within a second is the target.
pub const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_millis(600);
/// The peer timeout may be set within this range: keep-alives go every
/// quarter of it, so 100 ms sends one every 25 ms.
pub const PEER_TIMEOUT_RANGE: std::ops::RangeInclusive<Duration> = Duration::from_millis(100)..=Duration::from_secs(60);
/// How long a starting gateway waits for its controller to come up.
pub const CONTROLLER_WAIT: Duration = Duration::from_secs(30);

/// QUIC congestion control between gateways (see docs/architecture.md,
/// "WAN settings", for what each measured).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Congestion {
    /// Loss-based, the default of QUIC stacks and of Linux TCP.
    #[default]
    Cubic,
    /// Model-based: paces at the measured bottleneck rate and does not read
    /// every loss as congestion (lossy WAN paths).
    Bbr,
    /// RFC 9002's reference controller.
    NewReno,
}

impl Congestion {
    pub const ALL: [Congestion; 3] = [Congestion::Cubic, Congestion::Bbr, Congestion::NewReno];

    pub fn as_str(self) -> &'static str {
        match self {
            Congestion::Cubic => "cubic",
            Congestion::Bbr => "bbr",
            Congestion::NewReno => "newreno",
        }
    }
}

/// A `--congestion` value that names no controller.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not one of cubic, bbr, newreno")]
pub struct UnknownCongestion(String);

impl std::str::FromStr for Congestion {
    type Err = UnknownCongestion;
    fn from_str(s: &str) -> Result<Self, UnknownCongestion> {
        Self::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| UnknownCongestion(s.to_string()))
    }
}

impl std::fmt::Display for Congestion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub dir: std::path::PathBuf,
    /// Workload credential for the gateway identity (else the admin token).
    pub credential: Option<isthmus_core::local::Credential>,
    /// TCP address for local sidecars' tunnels.
    pub tunnel_addr: SocketAddr,
    /// UDP address for peer gateways.
    pub quic_addr: SocketAddr,
    /// QUIC address told to peers (may be a DNS name); defaults to the bound one.
    pub advertise: Option<String>,
    /// How long open streams may finish after shutdown begins.
    pub drain: Duration,
    /// Admin endpoint (`/metrics`, `/ready`, `/live`), if any.
    pub admin_addr: Option<SocketAddr>,
    /// A peer gateway silent this long is taken for dead: its connection is
    /// closed, so tunnels in it fail now (callers fail over) instead of at
    /// QUIC's idle timeout. Keep-alives go every quarter of it.
    pub peer_timeout: Duration,
    /// DNS servers for peer gateways' names; empty: the system's
    /// (`/etc/resolv.conf`).
    pub dns_servers: Vec<SocketAddr>,
    /// Congestion control of the QUIC connections to peers.
    pub congestion: Congestion,
}

impl Config {
    /// A gateway of the cluster at `dir`, every address on loopback port 0,
    /// and the defaults above for the rest.
    pub fn new(dir: impl Into<std::path::PathBuf>) -> Self {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Self {
            dir: dir.into(),
            credential: None,
            tunnel_addr: any,
            quic_addr: any,
            advertise: None,
            drain: DEFAULT_DRAIN,
            admin_addr: Some(any),
            peer_timeout: DEFAULT_PEER_TIMEOUT,
            dns_servers: Vec::new(),
            congestion: Congestion::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn congestion_names_round_trip_and_others_are_refused() {
        for c in Congestion::ALL {
            assert_eq!(c.to_string().parse::<Congestion>(), Ok(c));
        }
        assert_eq!(Congestion::default(), Congestion::Cubic);
        let e = "bbr2".parse::<Congestion>().unwrap_err();
        assert!(e.to_string().contains("cubic, bbr, newreno"), "{e}");
    }
}
