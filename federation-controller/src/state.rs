//! The controller's durable state: links, exports and join tokens.
//!
//! One JSON file, rewritten whole and crash-safely (temp file, fsync,
//! rename). A file that does not parse is an error that names it; it is never
//! silently replaced, because it holds the links to other clusters.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use isthmus_core::naming::ServiceKey;
use serde::{Deserialize, Serialize};

pub const STATE_FILE: &str = "state.json";
const FORMAT_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(
        "state file {path} is corrupt ({reason}); it was left untouched. Restore it from a backup, or move it away to start this cluster afresh (which forgets its links)"
    )]
    Corrupt { path: String, reason: String },
    #[error("state file {path} was written by format version {found}, this controller reads version {FORMAT_VERSION}")]
    Version { path: String, found: u32 },
    #[error(
        "state file {path} belongs to cluster {found:?} (trust domain {found_td:?}), not {want:?} ({want_td:?}); use another --dir"
    )]
    WrongCluster {
        path: String,
        found: String,
        found_td: String,
        want: String,
        want_td: String,
    },
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct State {
    pub format: u32,
    pub cluster: String,
    pub trust_domain: String,
    #[serde(default)]
    pub links: BTreeMap<String, LinkRecord>,
    #[serde(default)]
    pub exports: BTreeMap<ServiceKey, ExportRecord>,
    #[serde(default)]
    pub tokens: BTreeMap<String, TokenRecord>,
    /// Workload credentials by id, each bound to one identity.
    #[serde(default)]
    pub workloads: BTreeMap<String, WorkloadRecord>,
    /// This cluster's roots, oldest first (several only during a rotation).
    #[serde(default)]
    pub roots: Vec<RootRecord>,
    /// TrafficPolicies by service, each its protobuf encoding in base64
    /// (the exact form sidecars get; validated before it is stored).
    #[serde(default)]
    pub policies: BTreeMap<ServiceKey, String>,
}

/// A credential that lets a workload ask for SVIDs of one identity; kept
/// only as a hash of its secret.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct WorkloadRecord {
    pub id: String,
    pub namespace: String,
    pub service_account: String,
    /// The service it may serve (register as a backend of).
    #[serde(default)]
    pub service: String,
    pub secret_hash: String,
    pub created_unix: i64,
}

/// One of this cluster's CAs. The private key lives in its own 0600 file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RootRecord {
    /// The signing certificate, then its issuers up to the trust anchor.
    pub chain_pem: String,
    /// File name of the private key, in the cluster directory.
    pub key_file: String,
    pub phase: RootPhase,
    /// For a retiring root: when it leaves the bundle.
    #[serde(default)]
    pub retire_unix: Option<i64>,
    /// For a staged root: how long the root it replaces stays trusted.
    #[serde(default)]
    pub retire_after_secs: u64,
    /// For a staged root: when it was staged.
    #[serde(default)]
    pub staged_unix: i64,
}

/// Where a root is in its life. A rotation takes a new root from `Staged`
/// (trusted, not signing) to `Signing` once every peer holds it; the old
/// one is then `Retiring` until it is dropped.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RootPhase {
    Staged,
    Signing,
    Retiring,
}

impl RootPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            RootPhase::Staged => "staged",
            RootPhase::Signing => "signing",
            RootPhase::Retiring => "retiring",
        }
    }
}

/// A link to a peer cluster.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LinkRecord {
    pub cluster: String,
    pub trust_domain: String,
    pub roots_pem: String,
    pub gateway_addr: String,
    /// Set on the joining side, which dials the peering stream.
    pub dial: Option<String>,
    /// Failover priority of this peer, from the join token (lower is
    /// preferred).
    #[serde(default)]
    pub priority: Option<u32>,
    pub created_unix: i64,
    /// Which of the peer's exports this cluster accepts
    /// (`naming::ImportPattern`s). Empty: any service that does not run
    /// in this cluster or is exported from it too; a local service that is
    /// not exported takes a peer's endpoints only if a pattern names it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub imports: Vec<String>,
    /// Set on the issuing side until the joiner confirms the link by
    /// opening its peering stream (which it does only once it has stored
    /// the link too). Until then the peer's roots are trusted on the
    /// peering port alone, not by sidecars or the gateway; unconfirmed by
    /// the deadline, the link is rolled back and the token's use returned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unconfirmed: Option<Unconfirmed>,
}

/// A link the joiner has not confirmed yet.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Unconfirmed {
    /// Rolled back after this time.
    pub until_unix: i64,
    /// The token it spent, whose use a rollback returns.
    pub token_id: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ExportRecord {
    pub namespace: String,
    pub name: String,
    pub created_unix: i64,
}

/// A join token, as the issuer keeps it: the secret only as a hash.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TokenRecord {
    pub id: String,
    pub secret_hash: String,
    pub created_unix: i64,
    pub expires_unix: i64,
    pub uses_left: u32,
    #[serde(default)]
    pub used_by: Vec<String>,
    #[serde(default)]
    pub revoked: bool,
    /// Fingerprint of the root the token pins.
    #[serde(default)]
    pub root_fingerprint: String,
}

impl TokenRecord {
    /// "usable", "revoked", "used", "expired", or "stale" (it pins a root
    /// that no longer signs, so the issuer cannot be verified with it),
    /// judged at `now` with `signing_root` the current signer's fingerprint.
    pub fn state(&self, now: i64, signing_root: &str) -> &'static str {
        if self.revoked {
            "revoked"
        } else if self.uses_left == 0 {
            "used"
        } else if now >= self.expires_unix {
            "expired"
        } else if !self.root_fingerprint.is_empty() && self.root_fingerprint != signing_root {
            "stale"
        } else {
            "usable"
        }
    }
}

impl State {
    pub fn new(cluster: &str, trust_domain: &str) -> Self {
        Self {
            format: FORMAT_VERSION,
            cluster: cluster.to_string(),
            trust_domain: trust_domain.to_string(),
            links: BTreeMap::new(),
            exports: BTreeMap::new(),
            tokens: BTreeMap::new(),
            workloads: BTreeMap::new(),
            roots: Vec::new(),
            policies: BTreeMap::new(),
        }
    }

    pub fn path(dir: &Path) -> PathBuf {
        dir.join(STATE_FILE)
    }

    /// Load the state of `dir`, or `None` if this directory is new.
    pub fn load(dir: &Path, cluster: &str, trust_domain: &str) -> Result<Option<Self>, StateError> {
        let path = Self::path(dir);
        let p = path.display().to_string();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StateError::Io { path: p, source: e }),
        };
        let state: State = serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
            path: p.clone(),
            reason: e.to_string(),
        })?;
        if state.format != FORMAT_VERSION {
            return Err(StateError::Version {
                path: p,
                found: state.format,
            });
        }
        if state.cluster != cluster || state.trust_domain != trust_domain {
            return Err(StateError::WrongCluster {
                path: p,
                found: state.cluster,
                found_td: state.trust_domain,
                want: cluster.to_string(),
                want_td: trust_domain.to_string(),
            });
        }
        Ok(Some(state))
    }

    pub fn save(&self, dir: &Path) -> Result<(), StateError> {
        let path = Self::path(dir);
        let bytes = serde_json::to_vec_pretty(self).expect("state serializes");
        isthmus_core::local::write_atomic(&path, &bytes, true).map_err(|e| StateError::Io {
            path: path.display().to_string(),
            source: e,
        })
    }
}

impl State {
    /// The TrafficPolicy of `namespace/service`, if one was applied.
    pub fn policy(&self, key: &ServiceKey) -> Option<isthmus_proto::TrafficPolicy> {
        use base64::Engine as _;
        use prost::Message as _;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(self.policies.get(key)?)
            .ok()?;
        isthmus_proto::TrafficPolicy::decode(raw.as_slice()).ok()
    }

    pub fn set_policy(&mut self, p: &isthmus_proto::TrafficPolicy) {
        use base64::Engine as _;
        use prost::Message as _;
        let key = ServiceKey::new(&p.namespace, &p.service);
        self.policies
            .insert(key, base64::engine::general_purpose::STANDARD.encode(p.encode_to_vec()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_survives_the_state_file() {
        let p = isthmus_proto::TrafficPolicy {
            namespace: "demo".into(),
            service: "echo".into(),
            failover_threshold: 0.5,
            retry_budget_percent: 20,
            retry_budget_min_per_second: 10,
            requests: None,
            routes: vec![isthmus_proto::PolicyRoute {
                headers: Default::default(),
                split: vec![isthmus_proto::WeightedCluster {
                    cluster: "east".into(),
                    weight: 3,
                }],
                failover: vec!["north".into()],
                requests: None,
            }],
        };
        let mut st = State::new("west", "west.mesh");
        st.set_policy(&p);
        let text = serde_json::to_string(&st).unwrap();
        let back: State = serde_json::from_str(&text).unwrap();
        assert_eq!(back.policy(&ServiceKey::new("demo", "echo")), Some(p));
        assert_eq!(back.policy(&ServiceKey::new("demo", "other")), None);
    }

    #[test]
    fn round_trip_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        assert!(State::load(dir.path(), "east", "east.mesh").unwrap().is_none());
        let mut s = State::new("east", "east.mesh");
        s.exports.insert(
            ServiceKey::new("demo", "echo"),
            ExportRecord {
                namespace: "demo".into(),
                name: "echo".into(),
                created_unix: 1,
            },
        );
        s.save(dir.path()).unwrap();
        assert_eq!(State::load(dir.path(), "east", "east.mesh").unwrap().unwrap(), s);

        assert!(matches!(
            State::load(dir.path(), "west", "west.mesh"),
            Err(StateError::WrongCluster { .. })
        ));

        // A torn or garbled file is reported and left as it is.
        let garbage = b"{\"format\":1,\"cluster\":\"ea";
        std::fs::write(State::path(dir.path()), garbage).unwrap();
        let err = State::load(dir.path(), "east", "east.mesh").unwrap_err();
        assert!(err.to_string().contains("corrupt"), "{err}");
        assert_eq!(std::fs::read(State::path(dir.path())).unwrap(), garbage);
    }
}
