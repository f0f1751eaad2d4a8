//! Where a local-mode controller keeps what must survive it: the cluster
//! directory (state file, CA keys, and the files local components read).

use std::path::PathBuf;

use isthmus_core::identity::Ca;
use isthmus_core::local::ClusterDir;

use crate::config::Config;
use crate::state::State;
use crate::{ControllerError, ca};

/// Load or create the cluster's state and CA in `cfg.dir`.
pub(crate) fn open(cfg: &Config) -> Result<(State, ca::Authority), ControllerError> {
    isthmus_core::identity::validate_name(&cfg.cluster)
        .map_err(|e| ControllerError::Config(format!("cluster name: {e}")))?;
    isthmus_core::identity::validate_trust_domain(&cfg.trust_domain)?;
    std::fs::create_dir_all(&cfg.dir).map_err(|e| ControllerError::Io {
        path: cfg.dir.display().to_string(),
        source: e,
    })?;
    let dir = ClusterDir::new(&cfg.dir);
    let read = |p: PathBuf| {
        std::fs::read_to_string(&p).map_err(|e| ControllerError::Io {
            path: p.display().to_string(),
            source: e,
        })
    };
    let bundle_file = dir.file(isthmus_core::local::CA_FILE);
    let state = match State::load(&cfg.dir, &cfg.cluster, &cfg.trust_domain)? {
        Some(mut state) => {
            if cfg.ca_files.is_some() {
                tracing::warn!("--ca-cert/--ca-key apply on first start only; this cluster has its CA already");
            }
            if state.roots.is_empty() {
                // A cluster from before rotation existed: ca.pem and ca.key.
                let ca = Ca::load(
                    &cfg.trust_domain,
                    &read(bundle_file.clone())?,
                    &read(dir.file("ca.key"))?,
                )?;
                let mut root = ca::first_root(&ca);
                root.key_file = "ca.key".into();
                state.roots.push(root);
                state.save(&cfg.dir)?;
            }
            state
        }
        None => {
            // The bundle file is written after the state: if it is here, the
            // state was lost, and starting over would silently change the root.
            if bundle_file.exists() {
                return Err(ControllerError::Config(format!(
                    "{} exists but {} does not: refusing to start over with a new CA; restore the state file or use an empty --dir",
                    bundle_file.display(),
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
            // unused key file, and the next start begins again.
            dir.write_atomic(&ca::key_file(&ca), ca.key_pem().as_bytes(), true)?;
            let mut state = State::new(&cfg.cluster, &cfg.trust_domain);
            state.roots.push(ca::first_root(&ca));
            state.save(&cfg.dir)?;
            state
        }
    };
    let authority = ca::Authority::load(&dir, &cfg.trust_domain, &state.roots)?;
    dir.write_atomic(isthmus_core::local::CA_FILE, authority.bundle_pem().as_bytes(), false)?;
    Ok((state, authority))
}
