//! Root rotation as the running controller drives it: promote a staged
//! root once every linked peer holds it, retire old roots when their time
//! comes, and load what the state says (the steps themselves: `ca.rs`).

use std::sync::Arc;

use isthmus_core::identity::SpiffeId;

use crate::ca;
use crate::shared::Shared;

impl Shared {
    /// Move a root rotation on: promote a staged root once every linked
    /// peer holds it, and drop retiring roots whose time has come.
    pub async fn advance_rotation(&self) {
        // The state leads; the loaded roots follow. If loading failed after
        // a step was saved, try again rather than stall the rotation.
        let saved: Vec<_> = self.state.lock().expect("state lock").roots.clone();
        let loaded: Vec<_> = self.ca.load().records().map(|(r, _)| r.clone()).collect();
        if saved != loaded {
            self.reload_ca().await;
        }
        let Some(staged) = self.ca.load().staged() else {
            self.retire_roots().await;
            return;
        };
        let waiting: Vec<String> = {
            let state = self.state.lock().expect("state lock");
            let peers = self.peers.lock().expect("peers lock");
            state
                .links
                .keys()
                .filter(|c| !peers.get(*c).is_some_and(|p| p.holds_our_roots.contains(&staged)))
                .cloned()
                .collect()
        };
        if !waiting.is_empty() {
            return;
        }
        match self
            .update(|state| Ok(ca::promote(state, isthmus_core::unix_now())))
            .await
        {
            Ok(true) => {
                tracing::info!(root = %staged, "every peer holds the new root: it signs from now on");
                self.reload_ca().await;
            }
            Ok(false) => {}
            Err(e) => tracing::error!(error = %e.message(), "promoting the new root failed"),
        }
    }

    async fn retire_roots(&self) {
        let now = isthmus_core::unix_now();
        // Cheap check first: this runs on every tick of the lease keeper.
        let due = self
            .state
            .lock()
            .expect("state lock")
            .roots
            .iter()
            .any(|r| r.retire_unix.is_some_and(|t| t <= now));
        if !due {
            return;
        }
        match self.update(|state| Ok(ca::retire_due(state, now))).await {
            Ok(gone) if !gone.is_empty() => {
                self.reload_ca().await;
                // The state no longer names them: their keys can go.
                for f in gone {
                    tracing::info!(key = %f, "old root retired");
                    if let Err(e) = self.store.delete_key(&f).await {
                        tracing::warn!(key = %f, error = %e, "could not delete a retired root's key");
                    }
                }
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e.message(), "retiring the old root failed"),
        }
    }

    /// The roots in the state changed: load them, publish the bundle, and
    /// re-issue our own SVID if the signer moved.
    pub async fn reload_ca(&self) {
        let roots = self.state.lock().expect("state lock").roots.clone();
        let next = match ca::Authority::load(&self.store, &self.cfg.trust_domain, &roots).await {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(error = %e, "loading the cluster's roots failed");
                return;
            }
        };
        if let Err(e) = self.store.publish_bundle(&next.bundle_pem()).await {
            tracing::error!(error = %e, "publishing the bundle failed");
        }
        let moved = next.signer().fingerprint() != self.ca.load().signer().fingerprint();
        if let Ok(t) = isthmus_core::identity::not_after_of(next.signer().anchor_der()) {
            // The rotation's point: an operator alerting on this sees it move.
            self.metrics.root_expiry.set(t);
        }
        self.ca.store(Arc::new(next));
        if moved {
            self.renew_svid();
        }
        self.rebuild_bundles();
        self.changed();
    }

    pub fn renew_svid(&self) {
        let id = SpiffeId::controller(&self.cfg.trust_domain);
        match self
            .ca
            .load()
            .signer()
            .issue_local_named(&id, &self.cfg.svid_names(), self.cfg.svid_ttl)
        {
            Ok(svid) => {
                if let Err(e) = self.svid.update(&svid) {
                    tracing::error!(error = %e, "renewing the controller SVID failed");
                }
            }
            Err(e) => tracing::error!(error = %e, "renewing the controller SVID failed"),
        }
    }
}

/// Renew the controller's own SVID at half its life.
pub(crate) async fn renew_own_svid(shared: Arc<Shared>) {
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tokio::time::sleep(shared.cfg.svid_ttl / 2) => {}
        }
        shared.renew_svid();
    }
}
