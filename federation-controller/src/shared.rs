//! What every task of the controller shares: its configuration, CA, state
//! and registry, the peers' runtime state, and how a change reaches
//! sidecars, gateways and peers (a version bump, then a fresh snapshot).

use std::collections::{BTreeMap, BTreeSet};

use isthmus_core::naming::ServiceKey;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;
use isthmus_core::bundle::TrustBundles;
use isthmus_core::identity;
use isthmus_core::tls::{SharedBundles, SvidResolver};
use isthmus_proto::{
    ConfigSnapshot, GatewayRegistration, LinkStatus, Peer, RootStatus, SidecarRegistration, StatusResponse, TrustBundle,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::state::State;
use crate::store::Store;
use crate::{ca, imports, metrics, peering, snapshot};

/// Link health as peers and operators see it.
#[derive(Clone, Debug)]
pub(crate) struct PeerRuntime {
    pub connected: bool,
    pub ever_connected: bool,
    pub last_heartbeat: Option<Instant>,
    pub imports: imports::PeerImports,
    /// Fingerprints of our roots the peer last said it trusts.
    pub holds_our_roots: Vec<String>,
}

impl PeerRuntime {
    pub fn new() -> Self {
        Self {
            connected: false,
            ever_connected: false,
            last_heartbeat: None,
            imports: Default::default(),
            holds_our_roots: Vec::new(),
        }
    }
}

/// The cluster's live sidecars and gateway: each registration lives as
/// long as its config stream.
#[derive(Default)]
pub(crate) struct Registry {
    pub next_id: u64,
    pub sidecars: BTreeMap<u64, SidecarRegistration>,
    /// Registrations by the service they serve (a rebuild of one service
    /// looks at its own endpoints only).
    by_service: BTreeMap<ServiceKey, BTreeSet<u64>>,
    pub gateway: Option<(u64, GatewayRegistration)>,
}

impl Registry {
    pub fn add_sidecar(&mut self, id: u64, s: SidecarRegistration) {
        if !s.service.is_empty() {
            self.by_service
                .entry(ServiceKey::new(&s.namespace, &s.service))
                .or_default()
                .insert(id);
        }
        self.sidecars.insert(id, s);
    }

    pub fn remove(&mut self, id: u64) {
        if let Some(s) = self.sidecars.remove(&id) {
            let key = ServiceKey::new(&s.namespace, &s.service);
            if let Some(ids) = self.by_service.get_mut(&key) {
                ids.remove(&id);
                if ids.is_empty() {
                    self.by_service.remove(&key);
                }
            }
        }
        if self.gateway.as_ref().is_some_and(|(g, _)| *g == id) {
            self.gateway = None;
        }
    }

    /// The registrations serving any of `keys`.
    pub fn serving<'a>(&'a self, keys: &'a BTreeSet<ServiceKey>) -> impl Iterator<Item = &'a SidecarRegistration> {
        keys.iter()
            .filter_map(|k| self.by_service.get(k))
            .flatten()
            .filter_map(|id| self.sidecars.get(id))
    }

    pub fn serves(&self, key: &ServiceKey) -> bool {
        self.by_service.contains_key(key)
    }
}

/// What every task of the controller shares.
pub(crate) struct Shared {
    pub cfg: Config,
    pub store: Store,
    /// One change of the durable state at a time (each waits for its save).
    pub writer: tokio::sync::Mutex<()>,
    /// This cluster's roots; replaced whole when a rotation moves on.
    pub ca: ArcSwap<ca::Authority>,
    /// Hash of the admin token in the cluster directory (`local.token`);
    /// on Kubernetes there is none (the API's own access control applies).
    pub local_token_hash: Option<String>,
    pub peering_advertised: String,
    /// Control addresses components are told (`controller.json`).
    pub control_advertised: String,
    pub state: Mutex<State>,
    pub registry: Mutex<Registry>,
    pub peers: Mutex<BTreeMap<String, PeerRuntime>>,
    /// Own root plus every linked peer's: what the peering port trusts.
    pub bundles: SharedBundles,
    pub svid: Arc<SvidResolver>,
    pub version: watch::Sender<u64>,
    pub shutdown: CancellationToken,
    pub metrics: metrics::Metrics,
    /// On Kubernetes: who workloads are (TokenReview), and the API.
    pub kube: Option<crate::k8s::auth::Reviewer>,
    /// On Kubernetes: each import's ClusterSet IPs (its derived Service's
    /// ClusterIP), which transparent sidecars route by.
    pub clusterset_ips: Mutex<BTreeMap<isthmus_core::naming::ServiceKey, Vec<String>>>,
    /// When this controller started serving (`Config::settle`).
    pub started: tokio::time::Instant,
    /// The published service table and who holds what of it.
    pub hub: crate::publish::Hub,
}

impl Shared {
    /// When the registry can be believed: components have had
    /// `Config::settle` to reconnect.
    pub fn settled_at(&self) -> tokio::time::Instant {
        self.started + self.cfg.settle
    }

    pub fn settled(&self) -> bool {
        tokio::time::Instant::now() >= self.settled_at()
    }

    /// Something sidecars, gateways or peers see has changed: the next
    /// rebuild of the service table is whole.
    pub fn changed(&self) {
        self.hub.dirty_all();
        self.version.send_modify(|v| *v += 1);
    }

    /// What changed concerns only the services `keys` (a registration, a
    /// peer's export delta): the next rebuild may redo just those.
    pub fn changed_services(&self, keys: impl IntoIterator<Item = ServiceKey>) {
        self.hub.dirty_keys(keys);
        self.version.send_modify(|v| *v += 1);
    }

    /// Change the durable state: `change` edits a copy, the copy is saved,
    /// and only then does it replace the state in memory. A change that
    /// fails, or cannot be saved, leaves no trace.
    pub async fn update<T>(
        &self,
        change: impl FnOnce(&mut State) -> Result<T, tonic::Status>,
    ) -> Result<T, tonic::Status> {
        let _one = self.writer.lock().await;
        let mut next = self.state.lock().expect("state lock").clone();
        let out = change(&mut next)?;
        if next != *self.state.lock().expect("state lock") {
            self.store.save(&next).await.map_err(|e| {
                tracing::error!(error = %e, "saving state failed");
                tonic::Status::internal(format!("could not save state: {e}"))
            })?;
            *self.state.lock().expect("state lock") = next;
        }
        Ok(out)
    }

    /// Take in what the Kubernetes API holds (exports, policies): it is
    /// stored there already, so nothing is saved. `change` says whether it
    /// changed anything; only then do sidecars and peers hear of it.
    pub async fn absorb(&self, change: impl FnOnce(&mut State) -> bool) -> bool {
        // Under the writer's lock: an update in flight replaces the state
        // whole when its save is done, and would undo this change.
        let _one = self.writer.lock().await;
        let changed = change(&mut self.state.lock().expect("state lock"));
        if changed {
            self.changed();
        }
        changed
    }

    /// Read the join tokens again from the store, where the CLI writes them
    /// on Kubernetes (in local mode the controller made them itself).
    pub async fn refresh_tokens(&self) -> Result<(), tonic::Status> {
        let Store::Kube(k) = &self.store else {
            return Ok(());
        };
        let _one = self.writer.lock().await;
        let tokens = k
            .load_tokens()
            .await
            .map_err(|e| tonic::Status::unavailable(format!("cannot read join tokens: {e}")))?;
        self.state.lock().expect("state lock").tokens = tokens;
        Ok(())
    }

    /// What `isthmus status` shows, as of now.
    pub fn status(&self) -> StatusResponse {
        let snap = self.snapshot();
        let ca = self.ca.load();
        let ours = ca.fingerprints();
        let state = self.state.lock().expect("state lock").clone();
        let peers = self.peers.lock().expect("peers lock").clone();
        let links = state
            .links
            .values()
            .map(|l| {
                let rt = peers.get(&l.cluster);
                let age = rt
                    .and_then(|p| p.last_heartbeat)
                    .map(|t| t.elapsed().as_millis() as i64)
                    .unwrap_or(-1);
                let fp = identity::certs_from_pem(&l.roots_pem)
                    .ok()
                    .and_then(|c| c.first().map(identity::fingerprint))
                    .unwrap_or_default();
                LinkStatus {
                    cluster: l.cluster.clone(),
                    trust_domain: l.trust_domain.clone(),
                    state: peering::link_state(rt, self.cfg.import_lease).to_string(),
                    heartbeat_age_ms: age,
                    gateway_addr: l.gateway_addr.clone(),
                    bundle_fingerprint: fp,
                    priority: l.priority.unwrap_or(0),
                    peer_has_our_roots: rt.is_some_and(|p| ours.iter().all(|f| p.holds_our_roots.contains(f))),
                    imports: rt
                        .filter(|p| p.imports.live)
                        .map(|p| p.imports.services.len() as u32)
                        .unwrap_or(0),
                    import_scope: l.imports.clone(),
                    import_problem: rt
                        .and_then(|p| p.imports.problem.as_ref())
                        .map(ToString::to_string)
                        .unwrap_or_default(),
                }
            })
            .collect();
        let roots = ca
            .records()
            .map(|(r, c)| RootStatus {
                fingerprint: c.fingerprint(),
                state: r.phase.as_str().to_string(),
                not_after_unix: identity::not_after_of(c.anchor_der()).unwrap_or_default(),
                retire_unix: r.retire_unix.unwrap_or_default(),
            })
            .collect();
        let (tunnel, quic) = self.gateway_addrs();
        StatusResponse {
            cluster: self.cfg.cluster.clone(),
            trust_domain: self.cfg.trust_domain.clone(),
            root_fingerprint: ca.signer().fingerprint(),
            links,
            services: snap.services,
            gateway_tunnel_addr: tunnel,
            gateway_quic_addr: quic,
            roots,
            svid_expires_unix: self.svid.not_after().unwrap_or_default(),
        }
    }

    /// What components read to find this controller (`controller.json`).
    pub fn controller_info(&self) -> isthmus_core::local::ControllerInfo {
        isthmus_core::local::ControllerInfo {
            cluster: self.cfg.cluster.clone(),
            trust_domain: self.cfg.trust_domain.clone(),
            control_addr: self.control_advertised.clone(),
            peering_addr: self.peering_advertised.clone(),
            pid: std::process::id(),
        }
    }

    /// What a join token issued now says about this cluster.
    pub fn join_info(&self) -> crate::join::JoinInfo {
        let (_, quic) = self.gateway_addrs();
        crate::join::JoinInfo {
            cluster: self.cfg.cluster.clone(),
            trust_domain: self.cfg.trust_domain.clone(),
            peering: self.peering_advertised.split(',').map(str::to_string).collect(),
            gateway: if quic.is_empty() { vec![] } else { vec![quic] },
            root_fingerprint: self.ca.load().signer().fingerprint(),
        }
    }

    pub fn rebuild_bundles(&self) {
        let state = self.state.lock().expect("state lock");
        let mut b = TrustBundles::new();
        b.set(&self.cfg.trust_domain, self.ca.load().anchors());
        for link in state.links.values() {
            if let Err(e) = b.set_pem(&link.trust_domain, &link.roots_pem) {
                tracing::warn!(peer = %link.cluster, error = %e, "peer bundle unusable");
            }
        }
        self.bundles.store(Arc::new(b));
    }

    pub fn gateway_addrs(&self) -> (String, String) {
        let reg = self.registry.lock().expect("registry lock");
        reg.gateway
            .as_ref()
            .map(|(_, g)| (g.tunnel_addr.clone(), g.quic_addr.clone()))
            .unwrap_or_default()
    }

    /// The services `only` names (all of them if `None`), as sidecars of
    /// this cluster are told them; sorted by key. A partial build looks
    /// only at those services' endpoints and imports (both indexed).
    pub fn services(&self, only: Option<&BTreeSet<ServiceKey>>) -> Vec<isthmus_proto::Service> {
        // Locks in the order state, peers, registry, as everywhere.
        let state = self.state.lock().expect("state lock");
        let imports: BTreeMap<String, imports::PeerImports> = self
            .peers
            .lock()
            .expect("peers lock")
            .iter()
            .filter(|(c, _)| state.links.contains_key(*c))
            .map(|(c, p)| {
                let services = match only {
                    None => p.imports.services.clone(),
                    Some(keys) => keys
                        .iter()
                        .filter_map(|k| imports::find_import(&p.imports.services, k).cloned())
                        .collect(),
                };
                (
                    c.clone(),
                    imports::PeerImports {
                        services,
                        live: p.imports.live,
                        ..Default::default()
                    },
                )
            })
            .collect();
        let reg = self.registry.lock().expect("registry lock");
        let mut services = match only {
            None => snapshot::services(&state, reg.sidecars.values(), &imports),
            Some(keys) => snapshot::services(&state, reg.serving(keys), &imports),
        };
        drop((reg, state));
        let ips = self.clusterset_ips.lock().expect("clusterset ips lock");
        for s in &mut services {
            if let Some(v) = ips.get(&ServiceKey::new(&s.namespace, &s.name)) {
                s.clusterset_ips = v.clone();
            }
        }
        services
    }

    /// The config a sidecar or gateway of this cluster receives.
    pub fn snapshot(&self) -> ConfigSnapshot {
        let services = self.services(None);
        let state = self.state.lock().expect("state lock").clone();
        let reg = self.registry.lock().expect("registry lock");
        let ca = self.ca.load();
        let mut bundles = vec![TrustBundle {
            trust_domain: self.cfg.trust_domain.clone(),
            roots_pem: ca.bundle_pem(),
        }];
        let mut peers = Vec::new();
        // An unconfirmed link is trusted on the peering port only.
        for link in state.links.values().filter(|l| l.unconfirmed.is_none()) {
            bundles.push(TrustBundle {
                trust_domain: link.trust_domain.clone(),
                roots_pem: link.roots_pem.clone(),
            });
            peers.push(Peer {
                cluster: link.cluster.clone(),
                trust_domain: link.trust_domain.clone(),
                gateway_addr: link.gateway_addr.clone(),
            });
        }
        ConfigSnapshot {
            version: *self.version.borrow(),
            cluster: self.cfg.cluster.clone(),
            trust_domain: self.cfg.trust_domain.clone(),
            bundles,
            services,
            gateway_tunnel_addr: reg
                .gateway
                .as_ref()
                .map(|(_, g)| g.tunnel_addr.clone())
                .unwrap_or_default(),
            peers,
            signing_root: ca.signer().fingerprint(),
            ..Default::default()
        }
    }
}

/// The controller's gRPC services (Control and Admin on the control port,
/// Peering on the peering port), each a handle on what is shared.
#[derive(Clone)]
pub(crate) struct Svc(pub Arc<Shared>);
