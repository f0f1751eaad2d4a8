//! The Isthmus federation controller.
//!
//! One per cluster. It owns the cluster's root CA and signs its workloads'
//! SVIDs, keeps the registry of local services, streams config to the
//! cluster's sidecars and gateway, issues join tokens, and keeps one
//! peering stream with each linked cluster to exchange trust bundles and
//! service exports.

mod ca;
mod metrics;
mod peering;
mod service;
pub mod snapshot;
pub mod state;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use isthmus_core::bundle::TrustBundles;
use isthmus_core::identity::{Ca, SpiffeId};
use isthmus_core::local::{ClusterDir, ControllerInfo};
use isthmus_core::tls::{self, ClientAuth, SharedBundles, SvidResolver};
use isthmus_proto::{ConfigSnapshot, GatewayRegistration, Peer, SidecarRegistration, TrustBundle};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use state::{State, StateError};

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Identity(#[from] isthmus_core::identity::IdentityError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Local(#[from] isthmus_core::local::LocalError),
    #[error(transparent)]
    Bind(#[from] isthmus_core::net::BindError),
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{0}")]
    Config(String),
}

/// How to run a controller.
#[derive(Clone, Debug)]
pub struct Config {
    pub dir: PathBuf,
    pub cluster: String,
    pub trust_domain: String,
    /// Local control plane (sidecars, gateway, CLI).
    pub control_addr: SocketAddr,
    /// Peering with other clusters' controllers.
    pub peering_addr: SocketAddr,
    /// Peering address written into join tokens (defaults to the bound one);
    /// may be a DNS name.
    pub advertise_peering: Option<String>,
    pub svid_ttl: Duration,
    /// Interval between peering heartbeats.
    pub heartbeat: Duration,
    /// A peer silent for this long has its imports withdrawn.
    pub import_lease: Duration,
    /// Admin endpoint (`/metrics`, `/ready`, `/live`), if any.
    pub admin_addr: Option<SocketAddr>,
    /// A CA to use on first start instead of generating a root: PEM chain
    /// (signing certificate first, up to the root) and PEM private key.
    pub ca_files: Option<(PathBuf, PathBuf)>,
}

impl Config {
    pub fn new(dir: impl Into<PathBuf>, cluster: &str, trust_domain: &str) -> Self {
        Self {
            dir: dir.into(),
            cluster: cluster.to_string(),
            trust_domain: trust_domain.to_string(),
            control_addr: "127.0.0.1:0".parse().expect("valid"),
            peering_addr: "127.0.0.1:0".parse().expect("valid"),
            advertise_peering: None,
            svid_ttl: Duration::from_secs(3600),
            heartbeat: Duration::from_secs(1),
            import_lease: Duration::from_secs(10),
            admin_addr: None,
            ca_files: None,
        }
    }
}

/// A running controller.
pub struct Running {
    pub control_addr: SocketAddr,
    pub peering_addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub done: tokio::task::JoinHandle<()>,
}

/// Link health as peers and operators see it.
#[derive(Clone, Debug)]
struct PeerRuntime {
    connected: bool,
    ever_connected: bool,
    last_heartbeat: Option<Instant>,
    imports: snapshot::PeerImports,
    /// Fingerprints of our roots the peer last said it trusts.
    holds_our_roots: Vec<String>,
}

impl PeerRuntime {
    fn new() -> Self {
        Self {
            connected: false,
            ever_connected: false,
            last_heartbeat: None,
            imports: Default::default(),
            holds_our_roots: Vec::new(),
        }
    }
}

#[derive(Default)]
struct Registry {
    next_id: u64,
    sidecars: BTreeMap<u64, SidecarRegistration>,
    gateway: Option<(u64, GatewayRegistration)>,
}

/// What every task of the controller shares.
pub(crate) struct Shared {
    cfg: Config,
    dir: ClusterDir,
    /// This cluster's roots; replaced whole when a rotation moves on.
    ca: ArcSwap<ca::Authority>,
    /// Hash of the admin token in the cluster directory (`local.token`).
    local_token_hash: String,
    peering_advertised: String,
    state: Mutex<State>,
    registry: Mutex<Registry>,
    peers: Mutex<BTreeMap<String, PeerRuntime>>,
    /// Own root plus every linked peer's: what the peering port trusts.
    bundles: SharedBundles,
    svid: Arc<SvidResolver>,
    version: watch::Sender<u64>,
    shutdown: CancellationToken,
    metrics: metrics::Metrics,
}

impl Shared {
    /// Something sidecars, gateways or peers see has changed.
    fn changed(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    /// Change the durable state: `change` edits a copy, the copy is saved,
    /// and only then does it replace the state in memory. A change that
    /// fails, or cannot be saved, leaves no trace.
    fn update<T>(&self, change: impl FnOnce(&mut State) -> Result<T, tonic::Status>) -> Result<T, tonic::Status> {
        let mut state = self.state.lock().expect("state lock");
        let mut next = state.clone();
        let out = change(&mut next)?;
        if next != *state {
            next.save(self.dir.path()).map_err(|e| {
                tracing::error!(error = %e, "saving state failed");
                tonic::Status::internal(format!("could not save state: {e}"))
            })?;
            *state = next;
        }
        Ok(out)
    }

    fn rebuild_bundles(&self) {
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

    fn gateway_addrs(&self) -> (String, String) {
        let reg = self.registry.lock().expect("registry lock");
        reg.gateway
            .as_ref()
            .map(|(_, g)| (g.tunnel_addr.clone(), g.quic_addr.clone()))
            .unwrap_or_default()
    }

    /// The config a sidecar or gateway of this cluster receives.
    fn snapshot(&self) -> ConfigSnapshot {
        let state = self.state.lock().expect("state lock").clone();
        let imports: BTreeMap<String, snapshot::PeerImports> = self
            .peers
            .lock()
            .expect("peers lock")
            .iter()
            .filter(|(c, _)| state.links.contains_key(*c))
            .map(|(c, p)| (c.clone(), p.imports.clone()))
            .collect();
        let reg = self.registry.lock().expect("registry lock");
        let services = snapshot::services(&state, reg.sidecars.values(), &imports);
        let ca = self.ca.load();
        let mut bundles = vec![TrustBundle {
            trust_domain: self.cfg.trust_domain.clone(),
            roots_pem: ca.bundle_pem(),
        }];
        let mut peers = Vec::new();
        for link in state.links.values() {
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
        }
    }

    /// Move a root rotation on: promote a staged root once every linked
    /// peer holds it, and drop retiring roots whose time has come.
    fn advance_rotation(&self) {
        // The state leads; the loaded roots follow. If loading failed after
        // a step was saved, try again rather than stall the rotation.
        let saved: Vec<_> = self.state.lock().expect("state lock").roots.clone();
        let loaded: Vec<_> = self.ca.load().records().map(|(r, _)| r.clone()).collect();
        if saved != loaded {
            self.reload_ca();
        }
        let Some(staged) = self.ca.load().staged() else {
            self.retire_roots();
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
        match self.update(|state| Ok(ca::promote(state, isthmus_core::unix_now()))) {
            Ok(true) => {
                tracing::info!(root = %staged, "every peer holds the new root: it signs from now on");
                self.reload_ca();
            }
            Ok(false) => {}
            Err(e) => tracing::error!(error = %e.message(), "promoting the new root failed"),
        }
    }

    fn retire_roots(&self) {
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
        match self.update(|state| Ok(ca::retire_due(state, now))) {
            Ok(gone) if !gone.is_empty() => {
                self.reload_ca();
                // The state no longer names them: their keys can go.
                for f in gone {
                    tracing::info!(key = %f, "old root retired");
                    if let Err(e) = std::fs::remove_file(self.dir.file(&f)) {
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
    fn reload_ca(&self) {
        let roots = self.state.lock().expect("state lock").roots.clone();
        let next = match ca::Authority::load(&self.dir, &self.cfg.trust_domain, &roots) {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(error = %e, "loading the cluster's roots failed");
                return;
            }
        };
        if let Err(e) = self
            .dir
            .write_atomic(isthmus_core::local::CA_FILE, next.bundle_pem().as_bytes(), false)
        {
            tracing::error!(error = %e, "writing the bundle file failed");
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

    fn renew_svid(&self) {
        let id = SpiffeId::controller(&self.cfg.trust_domain);
        match self.ca.load().signer().issue_local(&id, self.cfg.svid_ttl) {
            Ok(svid) => {
                if let Err(e) = self.svid.update(&svid) {
                    tracing::error!(error = %e, "renewing the controller SVID failed");
                }
            }
            Err(e) => tracing::error!(error = %e, "renewing the controller SVID failed"),
        }
    }
}

/// Load or create the cluster's state and CA in `cfg.dir`.
fn open(cfg: &Config) -> Result<(State, ca::Authority), ControllerError> {
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

/// Start the controller: bind its ports, publish `controller.json`, serve
/// until `shutdown` is cancelled.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> Result<Running, ControllerError> {
    let (state, ca) = open(&cfg)?;
    let dir = ClusterDir::new(&cfg.dir);
    let local_token = match dir.local_token() {
        Ok(t) if !t.is_empty() => t,
        _ => {
            let (t, _) = isthmus_core::token::new_secret();
            dir.write_atomic(isthmus_core::local::LOCAL_TOKEN_FILE, t.as_bytes(), true)?;
            t
        }
    };

    let (control, control_addr) = isthmus_core::net::bind(cfg.control_addr).await?;
    let (peering, peering_addr) = isthmus_core::net::bind(cfg.peering_addr).await?;

    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = metrics::Metrics::register(&mut registry);
    if let Ok(t) = isthmus_core::identity::not_after_of(ca.signer().anchor_der()) {
        metrics.root_expiry.set(t);
    }
    metrics.exports.set(state.exports.len() as i64);
    let ready = isthmus_core::metrics::Ready::default();
    let admin_addr =
        isthmus_core::metrics::serve_admin(cfg.admin_addr, registry, ready.clone(), shutdown.clone()).await?;
    let svid = ca
        .signer()
        .issue_local(&SpiffeId::controller(&cfg.trust_domain), cfg.svid_ttl)?;
    let shared = Arc::new(Shared {
        peering_advertised: cfg
            .advertise_peering
            .clone()
            .unwrap_or_else(|| peering_addr.to_string()),
        dir: dir.clone(),
        local_token_hash: isthmus_core::token::hash_secret(local_token.as_bytes()),
        state: Mutex::new(state),
        registry: Mutex::new(Registry::default()),
        peers: Mutex::new(BTreeMap::new()),
        bundles: Arc::new(ArcSwap::from_pointee(TrustBundles::new())),
        svid: SvidResolver::new(&svid)?,
        version: watch::channel(1).0,
        shutdown: shutdown.clone(),
        metrics,
        ca: ArcSwap::from_pointee(ca),
        cfg,
    });
    shared.rebuild_bundles();

    let control_tls = tls::server_config(
        shared.svid.clone(),
        shared.bundles.clone(),
        ClientAuth::Optional,
        &[tls::ALPN_H2],
    )?;
    let peering_tls = tls::server_config(
        shared.svid.clone(),
        shared.bundles.clone(),
        ClientAuth::Optional,
        &[tls::ALPN_H2],
    )?;

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(service::serve_control(shared.clone(), control, control_tls));
    tasks.spawn(service::serve_peering(shared.clone(), peering, peering_tls));
    tasks.spawn(peering::lease_keeper(shared.clone()));
    tasks.spawn(renew_own_svid(shared.clone()));
    for link in shared.state.lock().expect("state lock").links.values() {
        if link.dial.is_some() {
            tasks.spawn(peering::dial_loop(shared.clone(), link.cluster.clone()));
        }
    }

    let info = ControllerInfo {
        cluster: shared.cfg.cluster.clone(),
        trust_domain: shared.cfg.trust_domain.clone(),
        control_addr: control_addr.to_string(),
        peering_addr: shared.peering_advertised.clone(),
        pid: std::process::id(),
    };
    dir.write_atomic(
        isthmus_core::local::CONTROLLER_FILE,
        &serde_json::to_vec_pretty(&info).expect("serializes"),
        false,
    )?;
    tracing::info!(cluster = %info.cluster, trust_domain = %info.trust_domain, %control_addr, %peering_addr,
        root = %shared.ca.load().signer().fingerprint(), "controller ready");

    let done = tokio::spawn(async move {
        shutdown.cancelled().await;
        tasks.shutdown().await;
    });
    ready.set(true);
    Ok(Running {
        control_addr,
        peering_addr,
        admin_addr,
        done,
    })
}

/// Renew the controller's own SVID at half its life.
async fn renew_own_svid(shared: Arc<Shared>) {
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tokio::time::sleep(shared.cfg.svid_ttl / 2) => {}
        }
        shared.renew_svid();
    }
}
