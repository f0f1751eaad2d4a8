//! The gateway's metrics (names documented in docs/metrics.md).

use std::sync::atomic::AtomicU64;

pub use isthmus_core::metrics::Direction;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    /// `outbound`: from a local sidecar to a peer; `inbound`: from a peer.
    pub direction: Direction,
    pub peer: String,
    /// `ok`, or the refusal code.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: Direction,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub peer: String,
    /// `to_peer` or `from_peer`.
    pub direction: &'static str,
}

/// The `peer` label of a stream to a cluster that is not linked: names a
/// local caller sends are not labels until a link vouches for them, so the
/// series stay as few as the links.
pub const UNKNOWN_PEER: &str = "unknown";

/// The `peer` label for a stream a local caller asked to send to `cluster`.
pub fn peer_label<'a>(snap: &isthmus_proto::ConfigSnapshot, cluster: &'a str) -> &'a str {
    if snap.peers.iter().any(|p| p.cluster == cluster) {
        cluster
    } else {
        UNKNOWN_PEER
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub peer: String,
}

#[derive(Default)]
pub struct Metrics {
    pub streams: Family<StreamLabels, Counter>,
    pub open_streams: Family<DirectionLabels, Gauge>,
    pub bytes: Family<BytesLabels, Counter>,
    pub rtt: Family<PeerLabels, Gauge<f64, AtomicU64>>,
    pub cwnd: Family<PeerLabels, Gauge>,
    pub lost_packets: Family<PeerLabels, Gauge>,
    pub connections: Family<PeerLabels, Gauge>,
    pub mtu: Family<PeerLabels, Gauge>,
    pub silences: Family<PeerLabels, Counter>,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Metrics::default();
        registry.register(
            "isthmus_gateway_streams",
            "Tunneled streams, by direction, peer cluster and result",
            m.streams.clone(),
        );
        registry.register(
            "isthmus_gateway_open_streams",
            "Tunneled streams open now",
            m.open_streams.clone(),
        );
        registry.register(
            "isthmus_gateway_stream_bytes",
            "Bytes relayed, by peer cluster and direction",
            m.bytes.clone(),
        );
        registry.register(
            "isthmus_gateway_peer_rtt_seconds",
            "Smoothed RTT of the QUIC connection to each peer gateway",
            m.rtt.clone(),
        );
        registry.register(
            "isthmus_gateway_peer_cwnd_bytes",
            "Congestion window of the QUIC connection to each peer gateway",
            m.cwnd.clone(),
        );
        registry.register(
            "isthmus_gateway_peer_lost_packets",
            "Packets lost on the current QUIC connection to each peer gateway",
            m.lost_packets.clone(),
        );
        registry.register(
            "isthmus_gateway_peer_connections",
            "QUIC connections open with each peer gateway (one carries tunnels both ways; two only briefly, when both sides dialed at once)",
            m.connections.clone(),
        );
        registry.register(
            "isthmus_gateway_peer_mtu_bytes",
            "Largest UDP payload the path to each peer gateway was found to carry (PMTU discovery, 1200 to 1452)",
            m.mtu.clone(),
        );
        registry.register(
            "isthmus_gateway_peer_silences",
            "QUIC connections closed because the peer gateway sent nothing for --peer-timeout (taken for dead; tunnels in them fail over)",
            m.silences.clone(),
        );
        m
    }

    pub fn silent(&self, peer: &str) {
        self.silences
            .get_or_create(&PeerLabels { peer: peer.to_string() })
            .inc();
    }

    pub fn stream(&self, direction: Direction, peer: &str, result: &'static str) {
        self.streams
            .get_or_create(&StreamLabels {
                direction,
                peer: peer.to_string(),
                result,
            })
            .inc();
    }

    /// The byte counters of a peer: (to_peer, from_peer), counted as
    /// bytes are relayed.
    pub fn byte_counters(&self, peer: &str) -> (Counter, Counter) {
        let labels = |direction| BytesLabels {
            peer: peer.to_string(),
            direction,
        };
        // One at a time: a family's guard must be dropped before the next
        // get_or_create, which may need its write lock.
        let to_peer = self.bytes.get_or_create(&labels("to_peer")).clone();
        let from_peer = self.bytes.get_or_create(&labels("from_peer")).clone();
        (to_peer, from_peer)
    }

    /// Track an open stream until the guard drops.
    pub fn open(&self, direction: Direction) -> OpenGuard {
        let g = self.open_streams.get_or_create(&DirectionLabels { direction }).clone();
        g.inc();
        OpenGuard(g)
    }

    /// Count a QUIC connection with `peer` until the guard drops.
    pub fn peer_connection(&self, peer: &str) -> OpenGuard {
        let g = self
            .connections
            .get_or_create(&PeerLabels { peer: peer.to_string() })
            .clone();
        g.inc();
        OpenGuard(g)
    }

    pub fn path(&self, peer: &str, conn: &quinn::Connection) {
        let l = PeerLabels { peer: peer.to_string() };
        let stats = conn.stats();
        self.rtt.get_or_create(&l).set(conn.rtt().as_secs_f64());
        self.cwnd.get_or_create(&l).set(stats.path.cwnd as i64);
        self.lost_packets.get_or_create(&l).set(stats.path.lost_packets as i64);
        self.mtu.get_or_create(&l).set(i64::from(stats.path.current_mtu));
    }
}

pub struct OpenGuard(Gauge);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_linked_clusters_become_labels() {
        let snap = isthmus_proto::ConfigSnapshot {
            peers: vec![isthmus_proto::Peer {
                cluster: "east".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(peer_label(&snap, "east"), "east");
        let long = "x".repeat(4096);
        assert_eq!(peer_label(&snap, &long), UNKNOWN_PEER);
        assert_eq!(peer_label(&snap, "west"), UNKNOWN_PEER);
    }
}
