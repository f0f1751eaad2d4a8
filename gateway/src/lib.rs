//! The Isthmus east-west gateway.
//!
//! Local sidecars open tunnels to it over mTLS (their SVIDs, this cluster's
//! trust domain): `outbound.rs`. It carries each tunnel as one bidirectional
//! stream of a QUIC connection to the destination cluster's gateway
//! (`peers.rs`, `quic.rs`; dialling in `dial.rs`, silence in `watchdog.rs`),
//! authenticated with gateway SVIDs verified against that peer's trust
//! bundle. The receiving gateway authorizes the stream (`authz.rs`: linked
//! peer, exported service, declared port) and relays it to a local sidecar
//! (`inbound.rs`). Gateways never see plaintext: the bytes they relay are
//! the two sidecars' own end-to-end mTLS session.
//!
//! This file only wires the pieces together.

mod authz;
pub mod config;
mod counted;
mod dial;
mod inbound;
pub mod metrics;
mod outbound;
pub use inbound::{MAX_CONNECTIONS_PER_PEER, MAX_QUIC_HANDSHAKES};
pub use outbound::MAX_OPENING_TUNNELS;
mod peers;
mod quic;
mod resolve;
mod watchdog;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use isthmus_core::agent::{Agent, AgentError};
use isthmus_core::bundle::TrustBundles;
use isthmus_core::identity::{SYSTEM_NAMESPACE, SpiffeId};
use isthmus_core::local::ClusterDir;
use isthmus_core::tls::{self, ClientAuth, SharedBundles};
use isthmus_core::tunnel::HeaderError;
use isthmus_proto::{GatewayRegistration, watch_request};
use quinn::crypto::rustls::QuicServerConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use authz::authorize;
pub use config::Config;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Bind(#[from] isthmus_core::net::BindError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("QUIC configuration: {0}")]
    QuicCrypto(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    #[error("QUIC endpoint: {0}")]
    QuicEndpoint(#[source] std::io::Error),
}

/// Why a tunnel or stream ended before it could be relayed (logged).
#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("TLS handshake timed out")]
    HandshakeTimeout,
    #[error("TLS handshake: {0}")]
    Handshake(#[source] std::io::Error),
    #[error("no client identity")]
    NoIdentity,
    #[error("{0} is not of this cluster")]
    Foreign(SpiffeId),
    #[error("tunnel header timed out")]
    HeaderTimeout,
    #[error("tunnel header: {0}")]
    Header(#[from] HeaderError),
}

pub struct Running {
    pub tunnel_addr: SocketAddr,
    pub quic_addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub done: tokio::task::JoinHandle<()>,
}

/// What every task of the gateway shares.
struct Gateway {
    cluster: String,
    trust_domain: String,
    agent: Agent,
    endpoint: quinn::Endpoint,
    /// Only linked peers' roots: what QUIC clients are verified against.
    peer_bundles: SharedBundles,
    /// Only this cluster's roots: what local sidecars are verified against.
    local_bundles: SharedBundles,
    peers: peers::Peers,
    tracker: TaskTracker,
    metrics: Arc<metrics::Metrics>,
    /// Stops the gateway's tasks (the accept loops, each peer's streams).
    tasks: CancellationToken,
    peer_timeout: Duration,
    transport: Arc<quinn::TransportConfig>,
    /// Peer gateways' names to addresses, record TTLs honoured.
    resolver: resolve::Resolver,
    /// Connections each peer gateway dialed to this one, open now.
    inbound_conns: std::sync::Mutex<std::collections::HashMap<String, usize>>,
}

impl Gateway {
    /// Split the agent's bundles: peers' roots for QUIC, ours for sidecars.
    fn split_bundles(&self) {
        split_bundles(&self.agent, &self.peer_bundles, &self.local_bundles);
    }
}

fn split_bundles(agent: &Agent, peers: &SharedBundles, local: &SharedBundles) {
    let all = agent.bundles.load();
    let mut p = TrustBundles::new();
    let mut l = TrustBundles::new();
    for td in all.trust_domains() {
        let roots = all.roots(td).unwrap_or_default().to_vec();
        if td == agent.trust_domain {
            l.set(td, roots);
        } else {
            p.set(td, roots);
        }
    }
    peers.store(Arc::new(p));
    local.store(Arc::new(l));
}

pub async fn run(cfg: Config, shutdown: CancellationToken) -> Result<Running, GatewayError> {
    let (tcp, tunnel_addr) = isthmus_core::net::bind(cfg.tunnel_addr).await?;
    let (udp, quic_addr) = isthmus_core::net::bind_udp(cfg.quic_addr)?;

    let node = watch_request::Node::Gateway(GatewayRegistration {
        tunnel_addr: tunnel_addr.to_string(),
        quic_addr: cfg.advertise.clone().unwrap_or_else(|| quic_addr.to_string()),
    });
    let dir = ClusterDir::new(&cfg.dir);
    let agent = Agent::start(
        &dir,
        cfg.credential.as_ref(),
        SYSTEM_NAMESPACE,
        "gateway",
        // A gateway admits tunnels to exported services only: it holds
        // nothing of the rest.
        isthmus_core::agent::Registration {
            node,
            scope: isthmus_proto::WatchScope::Exported,
        },
        config::CONTROLLER_WAIT,
        shutdown.clone(),
    )
    .await?;

    let peer_bundles: SharedBundles = Arc::new(ArcSwap::from_pointee(TrustBundles::new()));
    let local_bundles: SharedBundles = Arc::new(ArcSwap::from_pointee(TrustBundles::new()));
    split_bundles(&agent, &peer_bundles, &local_bundles);

    let server_tls = tls::server_config(
        agent.svid.clone(),
        peer_bundles.clone(),
        ClientAuth::Required,
        &[tls::ALPN_TUNNEL],
    )?;
    let quic_server = QuicServerConfig::try_from(server_tls)?;
    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(quic_server));
    let transport = quic::transport(cfg.peer_timeout, cfg.congestion);
    server_config.transport_config(transport.clone());
    // Stateless resets are keyed by a secret of the gateway's own, kept
    // beside the cluster's files so that a restarted gateway's resets are
    // believed. Never the admin token: a WAN-facing gateway must not hold
    // the cluster's keys. Where the directory is read-only (a ConfigMap on
    // Kubernetes) the key lives as long as the process; a peer then notices
    // a restart by the silence watchdog instead, within `--peer-timeout`.
    let reset_secret = quic::reset_secret(&dir);
    let endpoint = quinn::Endpoint::new(
        quic::endpoint_config(&reset_secret),
        Some(server_config),
        udp,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(GatewayError::QuicEndpoint)?;

    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(metrics::Metrics::register(&mut registry));
    agent.svid_metrics.register(&mut registry);
    let ready = isthmus_core::metrics::Ready::default();
    let admin_addr =
        isthmus_core::metrics::serve_admin(cfg.admin_addr, registry, ready.clone(), shutdown.clone()).await?;
    let tasks = CancellationToken::new();
    let gw = Arc::new(Gateway {
        tasks: tasks.clone(),
        metrics,
        cluster: agent.cluster.clone(),
        trust_domain: agent.trust_domain.clone(),
        agent,
        endpoint,
        peer_bundles,
        local_bundles,
        peers: peers::Peers::default(),
        tracker: TaskTracker::new(),
        peer_timeout: cfg.peer_timeout,
        transport,
        resolver: resolve::Resolver::new(&cfg.dns_servers),
        inbound_conns: Default::default(),
    });
    ready.set(true);
    let tunnel_tls = tls::server_config(
        gw.agent.svid.clone(),
        gw.local_bundles.clone(),
        ClientAuth::Required,
        &[],
    )?;
    tracing::info!(cluster = %gw.cluster, %tunnel_addr, %quic_addr, "gateway ready");

    tokio::spawn(peers::follow_config(gw.clone(), tasks.clone()));
    tokio::spawn(outbound::accept_tunnels(gw.clone(), tcp, tunnel_tls, tasks.clone()));
    tokio::spawn(inbound::accept_quic(gw.clone(), tasks.clone()));
    let drain = cfg.drain;
    let done = tokio::spawn(async move {
        shutdown.cancelled().await;
        // Stop taking new work, let open streams finish, then close.
        tasks.cancel();
        gw.tracker.close();
        tracing::info!(open = gw.tracker.len(), "draining");
        if tokio::time::timeout(drain, gw.tracker.wait()).await.is_err() {
            tracing::warn!(open = gw.tracker.len(), "drain timeout; closing open streams");
        }
        gw.endpoint.close(0u32.into(), b"gateway shutting down");
    });
    Ok(Running {
        tunnel_addr,
        quic_addr,
        admin_addr,
        done,
    })
}
