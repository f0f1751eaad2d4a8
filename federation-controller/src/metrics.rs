//! The controller's metrics (names documented in docs/metrics.md).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LinkLabels {
    pub peer: String,
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

pub const LINK_STATES: [&str; 4] = ["pending", "establishing", "active", "failing"];

#[derive(Default)]
pub struct Metrics {
    pub link_state: Family<LinkLabels, Gauge>,
    pub heartbeat_age: Family<PeerLabels, Gauge<f64, AtomicU64>>,
    pub imports: Family<PeerLabels, Gauge>,
    pub exports: Gauge,
    pub svids_issued: Counter,
    pub tokens_created: Counter,
    pub joins: Family<ResultLabels, Counter>,
    pub root_expiry: Gauge,
    pub svid_expiry: Gauge,
    pub roots: Family<StateLabels, Gauge>,
    pub token_revocations: Counter,
    pub link_attempts: Family<ResultLabels, Counter>,
    pub unlinks: Counter,
    pub policy_changes: Counter,
    pub injections: Family<ResultLabels, Counter>,
    pub config_rebuilds: Counter,
    pub config_rebuild_seconds: Counter<f64, AtomicU64>,
    pub config_messages: Family<KindLabels, Counter>,
    pub config_bytes: Family<KindLabels, Counter>,
    pub watchers: Gauge,
    pub peering_export_bytes: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: &'static str,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Metrics::default();
        registry.register(
            "isthmus_policy_changes",
            "TrafficPolicies applied or deleted (each change reaches sidecars in the next config snapshot)",
            m.policy_changes.clone(),
        );
        registry.register(
            "isthmus_link_state",
            "1 for the current state of each link (pending, establishing, active, failing)",
            m.link_state.clone(),
        );
        registry.register(
            "isthmus_link_heartbeat_age_seconds",
            "Seconds since the last heartbeat from each linked peer (-1: none yet)",
            m.heartbeat_age.clone(),
        );
        registry.register(
            "isthmus_imported_services",
            "Services imported from each linked peer (0 once its lease runs out)",
            m.imports.clone(),
        );
        registry.register(
            "isthmus_exported_services",
            "Services this cluster exports",
            m.exports.clone(),
        );
        registry.register(
            "isthmus_svids_issued",
            "Workload certificates signed",
            m.svids_issued.clone(),
        );
        registry.register(
            "isthmus_join_tokens_created",
            "Join tokens created",
            m.tokens_created.clone(),
        );
        registry.register(
            "isthmus_join_attempts",
            "Attempts to spend this cluster's join tokens, by result",
            m.joins.clone(),
        );
        registry.register(
            "isthmus_ca_root_expiry_timestamp_seconds",
            "When this cluster's root CA expires (Unix time)",
            m.root_expiry.clone(),
        );
        registry.register(
            "isthmus_controller_svid_expiry_timestamp_seconds",
            "When the controller's own SVID expires (Unix time)",
            m.svid_expiry.clone(),
        );
        registry.register(
            "isthmus_ca_roots",
            "This cluster's roots by state (staged, signing, retiring): more than one only during a rotation",
            m.roots.clone(),
        );
        registry.register(
            "isthmus_join_tokens_revoked",
            "Join tokens revoked",
            m.token_revocations.clone(),
        );
        registry.register(
            "isthmus_link_attempts",
            "Attempts of this cluster to link with a token, by result",
            m.link_attempts.clone(),
        );
        registry.register(
            "isthmus_unlinks",
            "Links ended (here or by the peer)",
            m.unlinks.clone(),
        );
        registry.register(
            "isthmus_injections",
            "Pods the admission webhook was asked about, by result (injected, skipped, error)",
            m.injections.clone(),
        );
        registry.register(
            "isthmus_config_rebuilds",
            "Rebuilds of the service table (one per burst of changes)",
            m.config_rebuilds.clone(),
        );
        registry.register(
            "isthmus_config_rebuild_seconds",
            "Time spent rebuilding the service table",
            m.config_rebuild_seconds.clone(),
        );
        registry.register(
            "isthmus_config_messages",
            "Config messages sent to sidecars and gateways, by kind (full, delta)",
            m.config_messages.clone(),
        );
        registry.register(
            "isthmus_config_message_bytes",
            "Bytes of config sent to sidecars and gateways (protobuf, before framing), by kind (full, delta)",
            m.config_bytes.clone(),
        );
        registry.register(
            "isthmus_config_streams",
            "Open config streams (registered sidecars, gateways and tools)",
            m.watchers.clone(),
        );
        registry.register(
            "isthmus_peering_export_bytes",
            "Bytes of export lists sent to linked peers (protobuf, before framing)",
            m.peering_export_bytes.clone(),
        );
        m
    }

    pub fn config_sent(&self, delta: bool, bytes: usize) {
        let kind = KindLabels {
            kind: if delta { "delta" } else { "full" },
        };
        self.config_messages.get_or_create(&kind).inc();
        self.config_bytes.get_or_create(&kind).inc_by(bytes as u64);
    }

    /// Drop the series of a link that no longer exists.
    pub fn forget_link(&self, peer: &str) {
        self.unlinks.inc();
        for s in LINK_STATES {
            self.link_state.remove(&LinkLabels {
                peer: peer.to_string(),
                state: s,
            });
        }
        let p = PeerLabels { peer: peer.to_string() };
        self.heartbeat_age.remove(&p);
        self.imports.remove(&p);
    }

    pub fn link_attempt(&self, result: &'static str) {
        self.link_attempts.get_or_create(&ResultLabels { result }).inc();
    }

    pub fn join(&self, result: &'static str) {
        self.joins.get_or_create(&ResultLabels { result }).inc();
    }

    pub fn link(&self, peer: &str, state: &str, heartbeat_age: Option<f64>, imports: usize) {
        for s in LINK_STATES {
            let v = i64::from(s == state);
            self.link_state
                .get_or_create(&LinkLabels {
                    peer: peer.to_string(),
                    state: s,
                })
                .set(v);
        }
        let p = PeerLabels { peer: peer.to_string() };
        self.heartbeat_age.get_or_create(&p).set(heartbeat_age.unwrap_or(-1.0));
        self.imports.get_or_create(&p).set(imports as i64);
    }
}
