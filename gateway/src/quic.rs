//! QUIC settings of the tunnel between gateways (the WAN table in
//! docs/architecture.md gives each value's reason).

use std::sync::Arc;
use std::time::Duration;

use crate::config::Congestion;

/// The most PMTU discovery tries: a 1500-byte Ethernet frame's UDP payload
/// (IPv4). Jumbo datagrams (8952) were tried and dropped: with them a
/// burst of large WebSocket frames across clusters lost runs of datagrams
/// on loopback (no kernel drop counter moved), quinn backed off for over
/// the peer timeout and the watchdog closed a healthy connection, in about
/// a third of the interop suite's runs; none in runs at 1452.
pub const MAX_UDP_PAYLOAD: u16 = 1452;
/// Tunnels open at once on one connection, per direction: one per
/// tunneled connection.
const MAX_STREAMS: u32 = 4096;
/// Only the backstop: the watchdog closes a silent connection long before.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// One tunneled connection may have this much in flight: 160 Mbit/s at
/// 100 ms RTT.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
/// All tunnels to a peer together: 1.3 Gbit/s at 100 ms.
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;

/// The file in the cluster directory holding the gateway's reset secret.
pub const RESET_KEY_FILE: &str = "gateway-reset.key";

/// The gateway's own secret for stateless resets: read from the cluster
/// directory, or made there (0600, created new) on first start; per
/// process where the directory cannot be written.
pub fn reset_secret(dir: &isthmus_core::local::ClusterDir) -> String {
    let path = dir.file(RESET_KEY_FILE);
    if let Ok(s) = std::fs::read_to_string(&path)
        && s.trim().len() >= 32
    {
        return s.trim().to_string();
    }
    let fresh = isthmus_core::token::new_secret().0;
    match isthmus_core::local::write_atomic(&path, fresh.as_bytes(), true) {
        Ok(()) => fresh,
        Err(e) => {
            tracing::info!(path = %path.display(), error = %e, "reset key kept in memory: a restart is noticed by peers' watchdogs");
            fresh
        }
    }
}

/// QUIC endpoint settings that survive a restart. The stateless-reset key
/// and the key that validates connection IDs are derived from the gateway's
/// own secret (`reset_secret`), so a restarted gateway recognises its predecessor's
/// connection IDs and answers with a reset that peers accept at once,
/// instead of them waiting out the idle timeout on a connection that no
/// longer exists. Only holders of the secret can forge such a reset.
pub fn endpoint_config(secret: &str) -> quinn::EndpointConfig {
    let derive = |label: &str| {
        ring::digest::digest(
            &ring::digest::SHA256,
            format!("isthmus quic {label}\0{secret}").as_bytes(),
        )
    };
    let reset = derive("stateless reset");
    let cid = derive("connection id");
    let cid_key = u64::from_le_bytes(cid.as_ref()[..8].try_into().expect("8 bytes"));
    let mut cfg = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, reset.as_ref())));
    cfg.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
    // Accept datagrams as large as PMTU discovery may probe (see transport()).
    cfg.max_udp_payload_size(MAX_UDP_PAYLOAD).expect("within QUIC's limits");
    cfg
}

pub fn transport(peer_timeout: Duration, congestion: Congestion) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    match congestion {
        Congestion::Cubic => t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default())),
        Congestion::Bbr => t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default())),
        Congestion::NewReno => t.congestion_controller_factory(Arc::new(quinn::congestion::NewRenoConfig::default())),
    };
    t.max_concurrent_bidi_streams(MAX_STREAMS.into());
    t.max_concurrent_uni_streams(0u32.into());
    // Keep-alives (acknowledged by the peer) keep packets coming even when
    // no tunnel is busy, so silence means a dead peer or path (watchdog.rs).
    t.keep_alive_interval(Some(peer_timeout / 4));
    t.max_idle_timeout(Some(IDLE_TIMEOUT.try_into().expect("valid")));
    t.stream_receive_window(STREAM_WINDOW.into());
    t.receive_window(CONNECTION_WINDOW.into());
    t.send_window(u64::from(CONNECTION_WINDOW));
    // Probe for a path MTU up to a full Ethernet frame: quinn starts at
    // 1200, and a probe that is lost costs nothing but the probe.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD);
    t.mtu_discovery_config(Some(mtu));
    Arc::new(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_reset_secret_is_the_gateways_own_and_survives_a_restart() {
        let root = tempfile::tempdir().unwrap();
        let dir = isthmus_core::local::ClusterDir::new(root.path());
        std::fs::write(dir.file(isthmus_core::local::LOCAL_TOKEN_FILE), "the-admin-token").unwrap();
        let first = reset_secret(&dir);
        assert!(!first.contains("the-admin-token") && first.len() >= 32);
        assert_eq!(reset_secret(&dir), first, "a restarted gateway keys resets the same");
        let mode = std::fs::metadata(dir.file(RESET_KEY_FILE))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        // Nothing the gateway derives depends on the admin token.
        std::fs::remove_file(dir.file(isthmus_core::local::LOCAL_TOKEN_FILE)).unwrap();
        assert_eq!(reset_secret(&dir), first);
    }
}
