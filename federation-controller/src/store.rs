//! Where a controller keeps what must survive it: in local mode the
//! cluster directory (state file, CA keys, and the files local components
//! read), on Kubernetes the API (`k8s/store.rs`). The rest of the
//! controller sees one `Store`.

use std::path::PathBuf;

use isthmus_core::identity::Ca;
use isthmus_core::local::{ClusterDir, ControllerInfo};

use crate::config::Config;
use crate::k8s::store::{KubeStore, KubeStoreError};
use crate::state::{State, StateError};
use crate::{ControllerError, ca};

pub(crate) enum Store {
    Dir(ClusterDir),
    Kube(KubeStore),
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Local(#[from] isthmus_core::local::LocalError),
    #[error(transparent)]
    Kube(#[from] KubeStoreError),
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("the key of a root, {0}, is missing from the store")]
    MissingKey(String),
}

impl Store {
    pub async fn save(&self, state: &State) -> Result<(), StoreError> {
        match self {
            Store::Dir(dir) => Ok(state.save(dir.path())?),
            Store::Kube(k) => Ok(k.save(state).await?),
        }
    }

    /// A root's private key, by its file name.
    pub async fn read_key(&self, file: &str) -> Result<String, StoreError> {
        match self {
            Store::Dir(dir) => {
                let path = dir.file(file);
                std::fs::read_to_string(&path).map_err(|source| StoreError::Io {
                    path: path.display().to_string(),
                    source,
                })
            }
            Store::Kube(k) => k
                .read_key(file)
                .await?
                .ok_or_else(|| StoreError::MissingKey(file.into())),
        }
    }

    pub async fn write_key(&self, file: &str, pem: &str) -> Result<(), StoreError> {
        match self {
            Store::Dir(dir) => Ok(dir.write_atomic(file, pem.as_bytes(), true)?),
            Store::Kube(k) => Ok(k.write_key(file, pem).await?),
        }
    }

    pub async fn delete_key(&self, file: &str) -> Result<(), StoreError> {
        match self {
            Store::Dir(dir) => std::fs::remove_file(dir.file(file)).map_err(|source| StoreError::Io {
                path: dir.file(file).display().to_string(),
                source,
            }),
            Store::Kube(k) => Ok(k.delete_key(file).await?),
        }
    }

    /// Publish the cluster's trust bundle, where components find it.
    pub async fn publish_bundle(&self, pem: &str) -> Result<(), StoreError> {
        match self {
            Store::Dir(dir) => Ok(dir.write_atomic(isthmus_core::local::CA_FILE, pem.as_bytes(), false)?),
            Store::Kube(k) => Ok(k.publish(&[(isthmus_core::local::CA_FILE, pem.to_string())]).await?),
        }
    }

    /// Publish how to reach this controller.
    pub async fn publish_info(&self, info: &ControllerInfo) -> Result<(), StoreError> {
        let text = String::from_utf8(serde_json::to_vec_pretty(info).expect("serializes")).expect("JSON is UTF-8");
        match self {
            Store::Dir(dir) => Ok(dir.write_atomic(isthmus_core::local::CONTROLLER_FILE, text.as_bytes(), false)?),
            Store::Kube(k) => Ok(k.publish(&[(isthmus_core::local::CONTROLLER_FILE, text)]).await?),
        }
    }

    /// The stored state, or `None` on a first start.
    async fn load(&self, cfg: &Config) -> Result<Option<State>, ControllerError> {
        match self {
            Store::Dir(_) => Ok(State::load(&cfg.dir, &cfg.cluster, &cfg.trust_domain)?),
            Store::Kube(k) => {
                let state = k.load().await.map_err(StoreError::from)?;
                if let Some(s) = &state
                    && (s.cluster != cfg.cluster || s.trust_domain != cfg.trust_domain)
                {
                    return Err(ControllerError::Config(format!(
                        "the state in Secret {}/{} belongs to cluster {:?} ({:?}), not {:?} ({:?})",
                        k.namespace,
                        crate::k8s::store::STATE_SECRET,
                        s.cluster,
                        s.trust_domain,
                        cfg.cluster,
                        cfg.trust_domain
                    )));
                }
                Ok(state)
            }
        }
    }

    /// On a first start, whether a trust bundle was published already:
    /// then the state was lost, and starting over would change the root.
    fn bundle_without_state(&self) -> Option<PathBuf> {
        match self {
            Store::Dir(dir) => Some(dir.file(isthmus_core::local::CA_FILE)).filter(|f| f.exists()),
            Store::Kube(_) => None,
        }
    }
}

/// Load or create the cluster's state and CA.
pub(crate) async fn open(cfg: &Config, store: &Store) -> Result<(State, ca::Authority), ControllerError> {
    isthmus_core::identity::validate_name(&cfg.cluster)
        .map_err(|e| ControllerError::Config(format!("cluster name: {e}")))?;
    isthmus_core::identity::validate_trust_domain(&cfg.trust_domain)?;
    if let Store::Dir(_) = store {
        isthmus_core::local::ClusterDir::new(&cfg.dir).create()?;
    }
    let read = |p: PathBuf| {
        std::fs::read_to_string(&p).map_err(|e| ControllerError::Io {
            path: p.display().to_string(),
            source: e,
        })
    };
    let state = match store.load(cfg).await? {
        Some(mut state) => {
            if cfg.ca_files.is_some() {
                tracing::warn!("--ca-cert/--ca-key apply on first start only; this cluster has its CA already");
            }
            if state.roots.is_empty() {
                // A cluster from before rotation existed: ca.pem and ca.key.
                let dir = ClusterDir::new(&cfg.dir);
                let ca = Ca::load(
                    &cfg.trust_domain,
                    &read(dir.file(isthmus_core::local::CA_FILE))?,
                    &read(dir.file("ca.key"))?,
                )?;
                let mut root = ca::first_root(&ca);
                root.key_file = "ca.key".into();
                state.roots.push(root);
                store.save(&state).await?;
            }
            state
        }
        None => {
            // The bundle file is written after the state: if it is here, the
            // state was lost, and starting over would silently change the root.
            if let Some(bundle) = store.bundle_without_state() {
                return Err(ControllerError::Config(format!(
                    "{} exists but {} does not: refusing to start over with a new CA; restore the state file or use an empty --dir",
                    bundle.display(),
                    State::path(&cfg.dir).display()
                )));
            }
            let ca = match &cfg.ca_files {
                Some((cert, key)) => {
                    Ca::load(&cfg.trust_domain, &read(cert.clone())?, &read(key.clone())?).map_err(|e| {
                        ControllerError::Config(format!(
                            "--ca-cert {} / --ca-key {}: {e}",
                            cert.display(),
                            key.display()
                        ))
                    })?
                }
                None => Ca::generate(&cfg.trust_domain)?,
            };
            // Key first: a crash before the state is saved leaves only an
            // unused key, and the next start begins again.
            store.write_key(&ca::key_file(&ca), &ca.key_pem()).await?;
            let mut state = State::new(&cfg.cluster, &cfg.trust_domain);
            state.roots.push(ca::first_root(&ca));
            store.save(&state).await?;
            state
        }
    };
    let authority = ca::Authority::load(store, &cfg.trust_domain, &state.roots).await?;
    store.publish_bundle(&authority.bundle_pem()).await?;
    Ok((state, authority))
}
