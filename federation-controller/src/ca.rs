//! The cluster's certificate authorities, and root rotation.
//!
//! A rotation is three steps, each saved in the state before it applies:
//! 1. `stage`: a new root joins this cluster's bundle but signs nothing, so
//!    peers and local workloads learn to trust it first;
//! 2. `promote`, once every linked peer reports holding it: it signs every
//!    new SVID, workloads renew at once, and the old root starts retiring;
//! 3. `retire_due`: after the grace period the old root leaves the bundle.
//!
//! Traffic keeps flowing throughout, because at every step each SVID in use
//! chains to a root every verifier holds.

use std::time::Duration;

use isthmus_core::identity::{self, Ca};
use rustls::pki_types::CertificateDer;

use crate::ControllerError;
use crate::state::{RootPhase, RootRecord, State};
use crate::store::Store;

/// The roots of the state, with their keys loaded.
pub(crate) struct Authority {
    roots: Vec<(RootRecord, Ca)>,
}

impl Authority {
    /// The roots of `records`, with their keys from `store`.
    pub(crate) async fn load(
        store: &Store,
        trust_domain: &str,
        records: &[RootRecord],
    ) -> Result<Self, ControllerError> {
        let mut roots = Vec::with_capacity(records.len());
        for r in records {
            let key = store.read_key(&r.key_file).await?;
            roots.push((r.clone(), Ca::load(trust_domain, &r.chain_pem, &key)?));
        }
        let signers = roots.iter().filter(|(r, _)| r.phase == RootPhase::Signing).count();
        if signers != 1 {
            return Err(ControllerError::Config(format!(
                "the state names {signers} signing roots; exactly one is needed"
            )));
        }
        Ok(Self { roots })
    }

    /// The CA that signs SVIDs now.
    pub(crate) fn signer(&self) -> &Ca {
        self.roots
            .iter()
            .find(|(r, _)| r.phase == RootPhase::Signing)
            .map(|(_, ca)| ca)
            .expect("checked at load")
    }

    /// Every trust anchor of this cluster, signing one first: its bundle.
    pub(crate) fn anchors(&self) -> Vec<CertificateDer<'static>> {
        let mut out: Vec<CertificateDer<'static>> = vec![self.signer().anchor_der().clone()];
        for (_, ca) in &self.roots {
            if !out.contains(ca.anchor_der()) {
                out.push(ca.anchor_der().clone());
            }
        }
        out
    }

    pub(crate) fn bundle_pem(&self) -> String {
        self.anchors().iter().map(identity::cert_to_pem).collect()
    }

    pub(crate) fn fingerprints(&self) -> Vec<String> {
        self.anchors().iter().map(identity::fingerprint).collect()
    }

    /// Fingerprint of a root that waits for peers before it may sign.
    pub(crate) fn staged(&self) -> Option<String> {
        self.roots
            .iter()
            .find(|(r, _)| r.phase == RootPhase::Staged)
            .map(|(_, ca)| ca.fingerprint())
    }

    pub(crate) fn records(&self) -> impl Iterator<Item = (&RootRecord, &Ca)> {
        self.roots.iter().map(|(r, ca)| (r, ca))
    }
}

/// A new cluster's first root, or the one the user supplied.
pub(crate) fn first_root(ca: &Ca) -> RootRecord {
    RootRecord {
        chain_pem: ca.chain_pem().to_string(),
        key_file: key_file(ca),
        phase: RootPhase::Signing,
        retire_unix: None,
        retire_after_secs: 0,
        staged_unix: 0,
    }
}

/// A staged root waits at least this long before it signs, even when every
/// peer already holds it: local components get the new bundle in their next
/// snapshot, and one whose config stream is being re-established gets time
/// to catch up.
pub(crate) const MIN_STAGED_SECS: i64 = 3;

/// The longest grace period accepted for an old root.
pub(crate) const MAX_RETIRE_AFTER: Duration = Duration::from_secs(365 * 24 * 3600);

/// Where a CA's private key is kept: named by its fingerprint, so that two
/// roots never share a file.
pub(crate) fn key_file(ca: &Ca) -> String {
    format!("ca-{}.key", &ca.fingerprint()[..16])
}

/// A rotation that cannot start.
#[derive(Debug, thiserror::Error)]
#[error("a rotation is already under way (root {root} is {}); wait for it to finish (`isthmus status`)", phase.as_str())]
pub(crate) struct RotationUnderWay {
    /// The first 16 hex digits of the root's fingerprint.
    root: String,
    phase: RootPhase,
}

/// Refuse a rotation while another is under way, naming it.
pub(crate) fn no_rotation_under_way(state: &State) -> Result<(), RotationUnderWay> {
    match state.roots.iter().find(|r| r.phase != RootPhase::Signing) {
        Some(r) => {
            let fp = identity::certs_from_pem(&r.chain_pem)
                .ok()
                .and_then(|c| c.first().map(identity::fingerprint))
                .unwrap_or_default();
            Err(RotationUnderWay {
                root: fp[..16.min(fp.len())].to_string(),
                phase: r.phase,
            })
        }
        None => Ok(()),
    }
}

/// Step 1: add `new` as a staged root.
pub(crate) fn stage(state: &mut State, new: &Ca, retire_after: Duration, now: i64) -> Result<(), RotationUnderWay> {
    no_rotation_under_way(state)?;
    state.roots.push(RootRecord {
        chain_pem: new.chain_pem().to_string(),
        key_file: key_file(new),
        phase: RootPhase::Staged,
        retire_unix: None,
        retire_after_secs: retire_after.min(MAX_RETIRE_AFTER).as_secs(),
        staged_unix: now,
    });
    Ok(())
}

/// Step 2: the staged root signs; the signing one retires after the grace
/// period the rotation was started with. False if nothing is staged, or it
/// was staged less than [`MIN_STAGED_SECS`] ago.
pub(crate) fn promote(state: &mut State, now: i64) -> bool {
    let Some(i) = state
        .roots
        .iter()
        .position(|r| r.phase == RootPhase::Staged && now - r.staged_unix >= MIN_STAGED_SECS)
    else {
        return false;
    };
    let grace = state.roots[i].retire_after_secs.min(MAX_RETIRE_AFTER.as_secs()) as i64;
    for r in state.roots.iter_mut() {
        if r.phase == RootPhase::Signing {
            r.phase = RootPhase::Retiring;
            r.retire_unix = Some(now.saturating_add(grace));
        }
    }
    state.roots[i].phase = RootPhase::Signing;
    true
}

/// Step 3: drop retiring roots whose time has come; returns their key files,
/// to delete once the state without them is saved.
pub(crate) fn retire_due(state: &mut State, now: i64) -> Vec<String> {
    let (gone, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut state.roots)
        .into_iter()
        .partition(|r| r.phase == RootPhase::Retiring && r.retire_unix.is_some_and(|t| t <= now));
    state.roots = keep;
    gone.into_iter().map(|r| r.key_file).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phases(s: &State) -> Vec<RootPhase> {
        s.roots.iter().map(|r| r.phase).collect()
    }

    #[test]
    fn rotation_steps() {
        isthmus_core::install_crypto_provider();
        let mut s = State::new("east", "east.mesh");
        let old = Ca::generate("east.mesh").unwrap();
        s.roots.push(first_root(&old));
        let new = Ca::generate("east.mesh").unwrap();

        stage(&mut s, &new, Duration::from_secs(60), 990).unwrap();
        assert_eq!(phases(&s), [RootPhase::Signing, RootPhase::Staged]);
        // One rotation at a time.
        let again = Ca::generate("east.mesh").unwrap();
        let err = stage(&mut s, &again, Duration::ZERO, 991).unwrap_err().to_string();
        assert!(err.contains("is staged"), "{err}");

        // Not before the minimum staging time.
        assert!(!promote(&mut s, 990 + MIN_STAGED_SECS - 1));
        assert!(promote(&mut s, 1000));
        assert_eq!(phases(&s), [RootPhase::Retiring, RootPhase::Signing]);
        assert_eq!(s.roots[0].retire_unix, Some(1060));
        assert!(!promote(&mut s, 1001), "nothing staged any more");

        assert!(retire_due(&mut s, 1059).is_empty());
        assert_eq!(retire_due(&mut s, 1060), vec![key_file(&old)]);
        assert_eq!(phases(&s), [RootPhase::Signing]);
        assert_eq!(s.roots[0].key_file, key_file(&new));
    }

    #[tokio::test]
    async fn authority_bundle_and_signer() {
        isthmus_core::install_crypto_provider();
        let tmp = tempfile::tempdir().unwrap();
        let dir = isthmus_core::local::ClusterDir::new(tmp.path());
        let store = Store::Dir(dir.clone());
        let mut s = State::new("east", "east.mesh");
        let old = Ca::generate("east.mesh").unwrap();
        let new = Ca::generate("east.mesh").unwrap();
        for ca in [&old, &new] {
            dir.write_atomic(&key_file(ca), ca.key_pem().as_bytes(), true).unwrap();
        }
        s.roots.push(first_root(&old));
        stage(&mut s, &new, Duration::ZERO, 0).unwrap();

        let a = Authority::load(&store, "east.mesh", &s.roots).await.unwrap();
        assert_eq!(a.signer().fingerprint(), old.fingerprint());
        assert_eq!(a.fingerprints(), [old.fingerprint(), new.fingerprint()]);
        assert_eq!(a.staged(), Some(new.fingerprint()));

        assert!(promote(&mut s, MIN_STAGED_SECS));
        let a = Authority::load(&store, "east.mesh", &s.roots).await.unwrap();
        assert_eq!(a.signer().fingerprint(), new.fingerprint());
        assert_eq!(a.fingerprints(), [new.fingerprint(), old.fingerprint()]);
        assert_eq!(a.staged(), None);

        // A state whose key file is gone is an error naming the file.
        std::fs::remove_file(dir.file(&key_file(&new))).unwrap();
        let err = Authority::load(&store, "east.mesh", &s.roots).await.err().unwrap();
        assert!(err.to_string().contains(&key_file(&new)), "{err}");
    }
}
