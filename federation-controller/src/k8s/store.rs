//! The controller's state in the Kubernetes API, so a restarted or
//! rescheduled controller carries on where the last one stopped:
//!
//! - Secret `isthmus-state`: links (peers, their roots and gateways) and
//!   this cluster's roots, as `state.json` (the local mode's file, without
//!   what the API holds elsewhere);
//! - Secret `isthmus-ca-keys`: each root's private key, by file name;
//! - Secrets `isthmus-token-<id>` (label `isthmus.dev/join-token`): each
//!   join token's record, its secret only as a hash. `isthmus token create`
//!   writes them; the controller spends them, one write guarded by the
//!   Secret's resourceVersion, so two joins cannot spend one use twice;
//! - ConfigMap `isthmus-cluster`: what components and the CLI read, as the
//!   cluster directory's files are in local mode (`controller.json`,
//!   `ca.pem`), the status (`status.pb`, `status-time`) and what join tokens
//!   say about the cluster (`join.json`).
//!
//! Exports and policies are not stored: they are the `ServiceExport` and
//! `TrafficPolicy` objects themselves.

use std::collections::BTreeMap;
use std::sync::Mutex;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};

use crate::state::{State, TokenRecord};

pub const STATE_SECRET: &str = "isthmus-state";
pub const KEYS_SECRET: &str = "isthmus-ca-keys";
pub const CLUSTER_CONFIGMAP: &str = "isthmus-cluster";
pub const TOKEN_PREFIX: &str = "isthmus-token-";
pub const TOKEN_LABEL: &str = "isthmus.dev/join-token";
/// Keys of the cluster ConfigMap besides `controller.json` and `ca.pem`.
pub const JOIN_FILE: &str = "join.json";
pub const STATUS_FILE: &str = "status.pb";
pub const STATUS_TIME: &str = "status-time";
/// Field manager for server-side apply.
pub const MANAGER: &str = "isthmus-controller";

#[derive(Debug, thiserror::Error)]
pub enum KubeStoreError {
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
    #[error("Secret {name}: {reason}")]
    Corrupt { name: String, reason: String },
    #[error("join token {0} changed under this controller (spent or revoked at the same moment): try again")]
    TokenRace(String),
}

pub struct KubeStore {
    pub client: kube::Client,
    /// The controller's own namespace.
    pub namespace: String,
    /// What was last written (or read), to write only what changed, and
    /// each token Secret's resourceVersion, to spend a token once.
    written: Mutex<Written>,
}

#[derive(Default)]
struct Written {
    state: Option<String>,
    tokens: BTreeMap<String, (TokenRecord, Option<String>)>,
}

fn secret_data(s: &Secret, key: &str) -> Option<Vec<u8>> {
    s.data.as_ref()?.get(key).map(|b| b.0.clone())
}

impl KubeStore {
    pub fn new(client: kube::Client, namespace: &str) -> Self {
        Self {
            client,
            namespace: namespace.to_string(),
            written: Mutex::new(Written::default()),
        }
    }

    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// The stored state, with every join token, or `None` on a first start.
    pub async fn load(&self) -> Result<Option<State>, KubeStoreError> {
        let Some(secret) = self.secrets().get_opt(STATE_SECRET).await? else {
            return Ok(None);
        };
        let text = secret_data(&secret, "state.json").ok_or_else(|| KubeStoreError::Corrupt {
            name: STATE_SECRET.into(),
            reason: "no state.json".into(),
        })?;
        let mut state: State = serde_json::from_slice(&text).map_err(|e| KubeStoreError::Corrupt {
            name: STATE_SECRET.into(),
            reason: e.to_string(),
        })?;
        self.written.lock().expect("store lock").state = Some(String::from_utf8_lossy(&text).into_owned());
        state.tokens = self.load_tokens().await?;
        Ok(Some(state))
    }

    /// Every join token's record, as its Secret holds it.
    pub async fn load_tokens(&self) -> Result<BTreeMap<String, TokenRecord>, KubeStoreError> {
        let list = self
            .secrets()
            .list(&ListParams::default().labels(&format!("{TOKEN_LABEL}=true")))
            .await?;
        let mut out = BTreeMap::new();
        let mut written = self.written.lock().expect("store lock");
        for s in list.items {
            let name = s.metadata.name.clone().unwrap_or_default();
            let Some(rec) = secret_data(&s, "record.json").and_then(|b| serde_json::from_slice::<TokenRecord>(&b).ok())
            else {
                tracing::warn!(secret = %name, "ignoring a join token Secret without a readable record.json");
                continue;
            };
            written
                .tokens
                .insert(rec.id.clone(), (rec.clone(), s.metadata.resource_version.clone()));
            out.insert(rec.id.clone(), rec);
        }
        Ok(out)
    }

    /// Write what changed: each changed join token (guarded by its
    /// resourceVersion, so a use is spent once), then the state Secret.
    pub async fn save(&self, state: &State) -> Result<(), KubeStoreError> {
        let changed: Vec<(TokenRecord, Option<String>)> = {
            let written = self.written.lock().expect("store lock");
            state
                .tokens
                .values()
                .filter(|t| written.tokens.get(&t.id).is_none_or(|(w, _)| w != *t))
                .map(|t| (t.clone(), written.tokens.get(&t.id).and_then(|(_, rv)| rv.clone())))
                .collect()
        };
        for (rec, rv) in changed {
            let rv = self.write_token(&rec, rv).await?;
            self.written
                .lock()
                .expect("store lock")
                .tokens
                .insert(rec.id.clone(), (rec, rv));
        }
        let mut stored = state.clone();
        stored.tokens.clear();
        stored.exports.clear();
        stored.policies.clear();
        stored.workloads.clear();
        let text = serde_json::to_string_pretty(&stored).expect("state serializes");
        if self.written.lock().expect("store lock").state.as_deref() == Some(text.as_str()) {
            return Ok(());
        }
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(STATE_SECRET.into()),
                labels: Some([("app.kubernetes.io/part-of".to_string(), "isthmus".to_string())].into()),
                ..Default::default()
            },
            data: Some([("state.json".to_string(), ByteString(text.clone().into_bytes()))].into()),
            ..Default::default()
        };
        self.secrets()
            .patch(
                STATE_SECRET,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&secret),
            )
            .await?;
        self.written.lock().expect("store lock").state = Some(text);
        Ok(())
    }

    /// Create or replace a join token's Secret: a replace names the
    /// resourceVersion last seen, and fails if anyone wrote it since.
    async fn write_token(&self, rec: &TokenRecord, rv: Option<String>) -> Result<Option<String>, KubeStoreError> {
        let name = format!("{TOKEN_PREFIX}{}", rec.id);
        let mut secret = token_secret(rec);
        let api = self.secrets();
        let written = match rv {
            None => api.create(&PostParams::default(), &secret).await,
            Some(rv) => {
                secret.metadata.resource_version = Some(rv);
                api.replace(&name, &PostParams::default(), &secret).await
            }
        };
        match written {
            Ok(s) => Ok(s.metadata.resource_version),
            Err(kube::Error::Api(e)) if e.code == 409 => Err(KubeStoreError::TokenRace(rec.id.clone())),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn read_key(&self, file: &str) -> Result<Option<String>, KubeStoreError> {
        let Some(s) = self.secrets().get_opt(KEYS_SECRET).await? else {
            return Ok(None);
        };
        Ok(secret_data(&s, file).map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    pub async fn write_key(&self, file: &str, pem: &str) -> Result<(), KubeStoreError> {
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(KEYS_SECRET.into()),
                ..Default::default()
            },
            data: Some([(file.to_string(), ByteString(pem.as_bytes().to_vec()))].into()),
            ..Default::default()
        };
        // Server-side apply with this field manager owns each key it wrote:
        // other keys in the Secret stay.
        self.secrets()
            .patch(
                KEYS_SECRET,
                &PatchParams::apply(&format!("{MANAGER}-{file}")).force(),
                &Patch::Apply(&secret),
            )
            .await?;
        Ok(())
    }

    pub async fn delete_key(&self, file: &str) -> Result<(), KubeStoreError> {
        let patch = serde_json::json!({ "data": { file: null } });
        self.secrets()
            .patch(KEYS_SECRET, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        Ok(())
    }

    /// Publish `files` (`controller.json`, `ca.pem`, `status.json`) in the
    /// cluster's ConfigMap, for components and the CLI.
    pub async fn publish(&self, files: &[(&str, String)]) -> Result<(), KubeStoreError> {
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(CLUSTER_CONFIGMAP.into()),
                labels: Some([("app.kubernetes.io/part-of".to_string(), "isthmus".to_string())].into()),
                ..Default::default()
            },
            data: Some(files.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()),
            ..Default::default()
        };
        let keys: Vec<&str> = files.iter().map(|(k, _)| *k).collect();
        Api::<ConfigMap>::namespaced(self.client.clone(), &self.namespace)
            .patch(
                CLUSTER_CONFIGMAP,
                &PatchParams::apply(&format!("{MANAGER}-{}", keys.join("-"))).force(),
                &Patch::Apply(&cm),
            )
            .await?;
        Ok(())
    }
}

impl KubeStore {
    /// The cluster's status (`status.pb`, a `StatusResponse`), when it was
    /// taken (`status-time`, unix seconds), and what tokens say about the
    /// cluster (`join.json`), in the cluster's ConfigMap.
    pub async fn publish_status(&self, join_json: String, status: Vec<u8>, at: i64) -> Result<(), KubeStoreError> {
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(CLUSTER_CONFIGMAP.into()),
                ..Default::default()
            },
            data: Some(
                [
                    (JOIN_FILE.to_string(), join_json),
                    (STATUS_TIME.to_string(), at.to_string()),
                ]
                .into(),
            ),
            binary_data: Some([(STATUS_FILE.to_string(), ByteString(status))].into()),
            ..Default::default()
        };
        Api::<ConfigMap>::namespaced(self.client.clone(), &self.namespace)
            .patch(
                CLUSTER_CONFIGMAP,
                &PatchParams::apply(&format!("{MANAGER}-status")).force(),
                &Patch::Apply(&cm),
            )
            .await?;
        Ok(())
    }
}

/// A join token's Secret: its record, never its secret.
pub fn token_secret(rec: &TokenRecord) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(format!("{TOKEN_PREFIX}{}", rec.id)),
            labels: Some(
                [
                    (TOKEN_LABEL.to_string(), "true".to_string()),
                    ("app.kubernetes.io/part-of".to_string(), "isthmus".to_string()),
                ]
                .into(),
            ),
            ..Default::default()
        },
        data: Some(
            [(
                "record.json".to_string(),
                ByteString(serde_json::to_vec(rec).expect("a token record serializes")),
            )]
            .into(),
        ),
        type_: Some("Opaque".into()),
        ..Default::default()
    }
}
