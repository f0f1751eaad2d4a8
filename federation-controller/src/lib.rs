//! The Isthmus federation controller.
//!
//! One per cluster. It owns the cluster's root CA and signs its workloads'
//! SVIDs (`ca.rs`, `rotation.rs`), keeps the registry of local services and
//! streams config to the cluster's sidecars and gateway (`control.rs`,
//! `snapshot.rs`), serves the operator (`admin.rs`, with `auth.rs` deciding
//! who may do what), issues join tokens and keeps one peering stream with
//! each linked cluster to exchange trust bundles and service exports
//! (`join.rs`, `peering.rs`, `peering_service.rs`). Its durable state is
//! one file in the cluster directory (`state.rs`, `store.rs`).
//!
//! This file only wires the pieces together.

mod admin;
mod auth;
mod ca;
pub mod config;
mod control;
pub mod imports;
pub mod join;
pub mod k8s;
pub mod metrics;
mod peering;
mod peering_service;
mod publish;
mod rotation;
mod shared;
pub mod snapshot;
pub mod state;
mod store;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use isthmus_core::bundle::TrustBundles;
use isthmus_core::identity::SpiffeId;
use isthmus_core::local::ClusterDir;
use isthmus_core::tls::{self, ClientAuth, SvidResolver};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use state::{State, StateError};

use crate::shared::{Registry, Shared};
use crate::store::Store;

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
    #[error(transparent)]
    Store(#[from] store::StoreError),
}

/// A running controller.
pub struct Running {
    pub control_addr: SocketAddr,
    pub peering_addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub done: tokio::task::JoinHandle<()>,
}

/// The control and peering listeners, bound before the controller serves.
pub(crate) struct Ports {
    pub control: TcpListener,
    pub peering: TcpListener,
    pub control_addr: SocketAddr,
    pub peering_addr: SocketAddr,
}

/// Start the controller: bind its ports, and serve until `shutdown` is
/// cancelled. In local mode it serves at once from its directory; on
/// Kubernetes it serves once it leads (a standby closes connections at
/// once, so components try the next address).
pub async fn run(cfg: Config, shutdown: CancellationToken) -> Result<Running, ControllerError> {
    isthmus_core::identity::validate_name(&cfg.cluster)
        .map_err(|e| ControllerError::Config(format!("cluster name: {e}")))?;
    isthmus_core::identity::validate_trust_domain(&cfg.trust_domain)?;
    let (control, control_addr) = isthmus_core::net::bind(cfg.control_addr).await?;
    let (peering, peering_addr) = isthmus_core::net::bind(cfg.peering_addr).await?;
    let ports = Ports {
        control,
        peering,
        control_addr,
        peering_addr,
    };
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = metrics::Metrics::register(&mut registry);
    let ready = isthmus_core::metrics::Ready::default();
    let admin_addr =
        isthmus_core::metrics::serve_admin(cfg.admin_addr, registry, ready.clone(), shutdown.clone()).await?;
    let done = match cfg.kube.clone() {
        None => {
            let dir = ClusterDir::new(&cfg.dir);
            // 0700, and refused if someone else could read or swap it.
            dir.create()?;
            let local_token = match dir.local_token() {
                Ok(t) if !t.is_empty() => t,
                _ => {
                    let (t, _) = isthmus_core::token::new_secret();
                    dir.write_atomic(isthmus_core::local::LOCAL_TOKEN_FILE, t.as_bytes(), true)?;
                    t
                }
            };
            let hash = isthmus_core::token::hash_secret(local_token.as_bytes());
            let (_, mut tasks) =
                start(cfg, Store::Dir(dir), Some(hash), None, ports, metrics, shutdown.clone()).await?;
            ready.set(true);
            tokio::spawn(async move {
                shutdown.cancelled().await;
                tasks.shutdown().await;
            })
        }
        Some(k) => {
            let client = k8s::client(&k)
                .await
                .map_err(|e| ControllerError::Config(e.to_string()))?;
            tokio::spawn(k8s::lead(cfg, k, client, ports, metrics, ready, shutdown))
        }
    };
    Ok(Running {
        control_addr,
        peering_addr,
        admin_addr,
        done,
    })
}

/// Open the store and serve: control and peering ports, the lease keeper,
/// SVID renewal, peering streams to dial. Publishes `controller.json`.
pub(crate) async fn start(
    cfg: Config,
    store: Store,
    local_token_hash: Option<String>,
    kube: Option<kube::Client>,
    ports: Ports,
    metrics: metrics::Metrics,
    shutdown: CancellationToken,
) -> Result<(Arc<Shared>, tokio::task::JoinSet<()>), ControllerError> {
    let Ports {
        control,
        peering,
        control_addr,
        peering_addr,
    } = ports;
    let (state, ca) = store::open(&cfg, &store).await?;
    if let Ok(t) = isthmus_core::identity::not_after_of(ca.signer().anchor_der()) {
        metrics.root_expiry.set(t);
    }
    metrics.exports.set(state.exports.len() as i64);
    let svid = ca.signer().issue_local_named(
        &SpiffeId::controller(&cfg.trust_domain),
        &cfg.svid_names(),
        cfg.svid_ttl,
    )?;
    let shared = Arc::new(Shared {
        peering_advertised: cfg
            .advertise_peering
            .clone()
            .unwrap_or_else(|| peering_addr.to_string()),
        control_advertised: cfg
            .advertise_control
            .clone()
            .unwrap_or_else(|| control_addr.to_string()),
        store,
        writer: tokio::sync::Mutex::new(()),
        local_token_hash,
        state: Mutex::new(state),
        registry: Mutex::new(Registry::default()),
        peers: Mutex::new(BTreeMap::new()),
        bundles: Arc::new(ArcSwap::from_pointee(TrustBundles::new())),
        svid: SvidResolver::new(&svid)?,
        version: watch::channel(1).0,
        shutdown: shutdown.clone(),
        metrics,
        kube: kube.map(crate::k8s::auth::Reviewer::new),
        started: tokio::time::Instant::now(),
        clusterset_ips: Mutex::new(BTreeMap::new()),
        hub: Default::default(),
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
    tasks.spawn(publish::publisher(shared.clone()));
    tasks.spawn(control::serve_control(shared.clone(), control, control_tls));
    tasks.spawn(peering_service::serve_peering(shared.clone(), peering, peering_tls));
    tasks.spawn(peering::lease_keeper(shared.clone()));
    tasks.spawn(rotation::renew_own_svid(shared.clone()));
    for link in shared.state.lock().expect("state lock").links.values() {
        if link.dial.is_some() {
            tasks.spawn(peering::dial_loop(shared.clone(), link.cluster.clone()));
        }
    }

    let info = shared.controller_info();
    shared.store.publish_info(&info).await?;
    tracing::info!(cluster = %info.cluster, trust_domain = %info.trust_domain, %control_addr, %peering_addr,
        root = %shared.ca.load().signer().fingerprint(), "controller ready");
    Ok((shared, tasks))
}
