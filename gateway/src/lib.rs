//! The Isthmus east-west gateway.
//!
//! Local sidecars open tunnels to it over mTLS (their SVIDs, this cluster's
//! trust domain). It carries each tunnel as one bidirectional stream of a
//! QUIC connection to the destination cluster's gateway, authenticated with
//! gateway SVIDs verified against that peer's trust bundle. The receiving
//! gateway authorizes the stream (linked peer, exported service, declared
//! port) and relays it to a local sidecar. Gateways never see plaintext: the
//! bytes they relay are the two sidecars' own end-to-end mTLS session.

mod counted;
mod metrics;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use isthmus_core::agent::{Agent, AgentError};
use isthmus_core::bundle::TrustBundles;
use isthmus_core::identity::{SYSTEM_NAMESPACE, SpiffeId};
use isthmus_core::local::ClusterDir;
use isthmus_core::tls::{self, ClientAuth, Expect, SharedBundles};
use isthmus_core::tunnel::{RefuseCode, TunnelRequest, TunnelResponse};
use isthmus_proto::{ConfigSnapshot, GatewayRegistration, watch_request};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::counted::Counted;
use tokio_util::task::TaskTracker;

/// How long a peer has to send a stream's header or answer ours.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a peer gateway has to accept or refuse a stream. It answers
/// after one local TCP connect, so a silent peer is a dead connection.
const STREAM_ANSWER_TIMEOUT: Duration = Duration::from_secs(4);
/// How long a receiving gateway tries one local endpoint, and all of them:
/// within the caller's answer timeout, so a slow endpoint is reported as
/// such rather than as an unreachable peer.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const UPSTREAM_BUDGET: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Bind(#[from] isthmus_core::net::BindError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("QUIC configuration: {0}")]
    Quic(String),
}

#[derive(Clone, Debug)]
pub struct Config {
    pub dir: std::path::PathBuf,
    /// Workload credential for the gateway identity (else the admin token).
    pub credential: Option<String>,
    /// TCP address for local sidecars' tunnels.
    pub tunnel_addr: SocketAddr,
    /// UDP address for peer gateways.
    pub quic_addr: SocketAddr,
    /// QUIC address told to peers (may be a DNS name); defaults to the bound one.
    pub advertise: Option<String>,
    /// How long open streams may finish after shutdown begins.
    pub drain: Duration,
    /// Admin endpoint (`/metrics`, `/ready`, `/live`), if any.
    pub admin_addr: Option<SocketAddr>,
    /// A peer gateway silent this long is taken for dead: its connection is
    /// closed, so tunnels in it fail now (callers fail over) instead of at
    /// QUIC's idle timeout. Keep-alives go every quarter of it.
    pub peer_timeout: Duration,
}

pub struct Running {
    pub tunnel_addr: SocketAddr,
    pub quic_addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub done: tokio::task::JoinHandle<()>,
}

struct Gateway {
    cluster: String,
    trust_domain: String,
    agent: Agent,
    endpoint: quinn::Endpoint,
    /// Only linked peers' roots: what QUIC clients are verified against.
    peer_bundles: SharedBundles,
    /// Only this cluster's roots: what local sidecars are verified against.
    local_bundles: SharedBundles,
    /// One QUIC connection per linked peer, whichever side dialed it:
    /// tunnels go both ways on it.
    conns: Mutex<HashMap<String, quinn::Connection>>,
    /// Per peer: one dial at a time, and when the next may be tried.
    dials: Mutex<HashMap<String, Dial>>,
    tracker: TaskTracker,
    metrics: Arc<metrics::Metrics>,
    /// Stops the gateway's tasks (the accept loops, each peer's streams).
    tasks: CancellationToken,
    peer_timeout: Duration,
    transport: Arc<quinn::TransportConfig>,
}

/// Dialing state of one peer.
#[derive(Default)]
struct Dial {
    lock: Arc<tokio::sync::Mutex<()>>,
    failures: u32,
    retry_at: Option<tokio::time::Instant>,
    /// The peer went silent or a dial failed: until a dial succeeds, streams
    /// are refused at once while dials go on in the background, rather than
    /// each waiting for a handshake with a peer that may be gone.
    suspect: bool,
}

/// After a failed dial a peer is not dialed again for 100 ms, doubling with
/// each failure in a row up to 5 s; streams meanwhile are refused at once
/// (the caller can fail over) rather than each waiting for a handshake to
/// time out.
fn dial_backoff(failures: u32) -> Duration {
    Duration::from_millis(100)
        .saturating_mul(1 << failures.saturating_sub(1).min(6))
        .min(Duration::from_secs(5))
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
        cfg.credential.as_deref(),
        SYSTEM_NAMESPACE,
        "gateway",
        node,
        Duration::from_secs(30),
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
    let quic_server = QuicServerConfig::try_from(server_tls).map_err(|e| GatewayError::Quic(e.to_string()))?;
    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(quic_server));
    let transport = transport(cfg.peer_timeout);
    server_config.transport_config(transport.clone());
    let endpoint = quinn::Endpoint::new(
        endpoint_config(&dir.local_token().map_err(AgentError::from)?),
        Some(server_config),
        udp,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|e| GatewayError::Quic(e.to_string()))?;

    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(metrics::Metrics::register(&mut registry));
    agent.svid_metrics.register(&mut registry);
    let ready = isthmus_core::metrics::Ready::default();
    let admin_addr =
        isthmus_core::metrics::serve_admin(cfg.admin_addr, registry, ready.clone(), shutdown.clone()).await?;
    let tasks = CancellationToken::new();
    let gw = Arc::new(Gateway {
        dials: Mutex::new(HashMap::new()),
        tasks: tasks.clone(),
        metrics,
        cluster: agent.cluster.clone(),
        trust_domain: agent.trust_domain.clone(),
        agent,
        endpoint,
        peer_bundles,
        local_bundles,
        conns: Mutex::new(HashMap::new()),
        tracker: TaskTracker::new(),
        peer_timeout: cfg.peer_timeout,
        transport,
    });
    ready.set(true);
    let tunnel_tls = tls::server_config(
        gw.agent.svid.clone(),
        gw.local_bundles.clone(),
        ClientAuth::Required,
        &[],
    )?;
    tracing::info!(cluster = %gw.cluster, %tunnel_addr, %quic_addr, "gateway ready");

    tokio::spawn(follow_config(gw.clone(), tasks.clone()));
    tokio::spawn(accept_tunnels(gw.clone(), tcp, tunnel_tls, tasks.clone()));
    tokio::spawn(accept_quic(gw.clone(), tasks.clone()));
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

/// QUIC endpoint settings that survive a restart. The stateless-reset key
/// and the key that validates connection IDs are derived from the cluster's
/// local secret, so a restarted gateway recognises its predecessor's
/// connection IDs and answers with a reset that peers accept at once,
/// instead of them waiting out the idle timeout on a connection that no
/// longer exists. Only holders of the secret can forge such a reset.
fn endpoint_config(local_secret: &str) -> quinn::EndpointConfig {
    let derive = |label: &str| {
        ring::digest::digest(
            &ring::digest::SHA256,
            format!("isthmus quic {label}\0{local_secret}").as_bytes(),
        )
    };
    let reset = derive("stateless reset");
    let cid = derive("connection id");
    let cid_key = u64::from_le_bytes(cid.as_ref()[..8].try_into().expect("8 bytes"));
    let mut cfg = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, reset.as_ref())));
    cfg.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
    // Accept datagrams as large as PMTU discovery may probe (see transport()).
    cfg.max_udp_payload_size(MAX_UDP_PAYLOAD).expect("within QUIC's limits");
    cfg
}

/// Jumbo-frame payload: the most PMTU discovery tries.
const MAX_UDP_PAYLOAD: u16 = 8952;

fn transport(peer_timeout: Duration) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(4096u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    // Keep-alives (acknowledged by the peer) keep packets coming even when
    // no tunnel is busy, so silence means a dead peer or path: the watchdog
    // in `adopt` closes the connection after `peer_timeout` of it. The idle
    // timeout is only the backstop.
    t.keep_alive_interval(Some(peer_timeout / 4));
    t.max_idle_timeout(Some(Duration::from_secs(10).try_into().expect("valid")));
    // Windows sized for a WAN path (about 100 ms at 100 Mbit/s per stream).
    t.stream_receive_window((2u32 * 1024 * 1024).into());
    t.receive_window((16u32 * 1024 * 1024).into());
    t.send_window(16 * 1024 * 1024);
    // Probe for a path MTU up to jumbo frames: inside a data centre (and on
    // loopback) each datagram then carries six times the bytes for the same
    // per-packet crypto and system-call cost. Probes that are lost cost
    // nothing but the probe; across the internet it settles at ~1450.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD);
    t.mtu_discovery_config(Some(mtu));
    Arc::new(t)
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

/// Apply config changes: bundles, and drop connections to unlinked peers.
async fn follow_config(gw: Arc<Gateway>, stop: CancellationToken) {
    let mut rx = gw.agent.config.clone();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = rx.changed() => if r.is_err() { return },
        }
        split_bundles(&gw.agent, &gw.peer_bundles, &gw.local_bundles);
        let snap = rx.borrow_and_update().clone();
        let mut conns = gw.conns.lock().expect("conns lock");
        conns.retain(|peer, c| {
            let keep = snap.peers.iter().any(|p| &p.cluster == peer);
            if !keep {
                c.close(1u32.into(), b"unlinked");
            }
            keep
        });
    }
}

async fn accept_tunnels(
    gw: Arc<Gateway>,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    stop: CancellationToken,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    while let Some((tcp, from)) = isthmus_core::net::accept(&listener, &stop).await {
        let gw2 = gw.clone();
        let acceptor = acceptor.clone();
        gw.tracker.spawn(async move {
            if let Err(e) = outbound_tunnel(gw2, acceptor, tcp).await {
                tracing::debug!(%from, error = %e, "tunnel ended with error");
            }
        });
    }
}

/// A local sidecar's tunnel: authenticate it, forward the header to the
/// destination cluster's gateway, relay.
async fn outbound_tunnel(gw: Arc<Gateway>, acceptor: tokio_rustls::TlsAcceptor, tcp: TcpStream) -> Result<(), String> {
    let mut tls = tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(tcp))
        .await
        .map_err(|_| "TLS handshake timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let client = tls::peer_id(tls.get_ref().1.peer_certificates()).ok_or("no client identity")?;
    if client.trust_domain != gw.trust_domain {
        return Err(format!("{client} is not of this cluster"));
    }
    let req = tokio::time::timeout(HEADER_TIMEOUT, TunnelRequest::read(&mut tls))
        .await
        .map_err(|_| "header timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let quic = match open_stream(&gw, &req).await {
        Ok(s) => s,
        Err(refusal) => {
            gw.metrics.stream("outbound", &req.cluster, refusal.result());
            let _ = refusal.write(&mut tls).await;
            let _ = tls.shutdown().await;
            return Ok(());
        }
    };
    gw.metrics.stream("outbound", &req.cluster, "ok");
    let _open = gw.metrics.open("outbound");
    TunnelResponse::Ok.write(&mut tls).await.map_err(|e| e.to_string())?;
    tracing::debug!(%client, to = %req.cluster, service = %format!("{}/{}", req.namespace, req.service), "tunnel open");
    let (to_peer, from_peer) = gw.metrics.byte_counters(&req.cluster);
    let mut tls = Counted::new(tls, to_peer);
    let mut quic = Counted::new(quic, from_peer);
    let _ = tokio::io::copy_bidirectional(&mut tls, &mut quic).await;
    Ok(())
}

type QuicStream = tokio::io::Join<quinn::RecvStream, quinn::SendStream>;

async fn open_stream(gw: &Arc<Gateway>, req: &TunnelRequest) -> Result<QuicStream, TunnelResponse> {
    match try_open_stream(gw, req).await {
        // A refusal from the peer is final; a broken connection (say, the
        // peer gateway restarted) is dropped and dialed afresh, once.
        Err(TunnelResponse::Refused {
            code: RefuseCode::PeerUnreachable,
            reason,
        }) if connection_gone(gw, &req.cluster) => {
            tracing::info!(peer = %req.cluster, %reason, "redialing peer gateway");
            gw.conns.lock().expect("conns lock").remove(&req.cluster);
            try_open_stream(gw, req).await
        }
        other => other,
    }
}

/// Whether the cached connection to `cluster` is closed (or absent), so a
/// new one is worth dialing. A live but slow peer is not redialed.
fn connection_gone(gw: &Gateway, cluster: &str) -> bool {
    gw.conns
        .lock()
        .expect("conns lock")
        .get(cluster)
        .is_none_or(|c| c.close_reason().is_some())
}

async fn try_open_stream(gw: &Arc<Gateway>, req: &TunnelRequest) -> Result<QuicStream, TunnelResponse> {
    let refuse = TunnelResponse::refused;
    let unreachable = |e: String| {
        refuse(
            RefuseCode::PeerUnreachable,
            format!("gateway of cluster {}: {e}", req.cluster),
        )
    };
    let conn = peer_connection(gw, &req.cluster).await?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| unreachable(e.to_string()))?;
    req.write(&mut send).await.map_err(|e| unreachable(e.to_string()))?;
    let resp = tokio::time::timeout(STREAM_ANSWER_TIMEOUT, TunnelResponse::read(&mut recv))
        .await
        .map_err(|_| unreachable("no answer".into()))?
        .map_err(|e| unreachable(e.to_string()))?;
    match resp {
        TunnelResponse::Ok => Ok(tokio::io::join(recv, send)),
        refused => Err(refused),
    }
}

/// The QUIC connection to `cluster`'s gateway, dialed on first use and
/// again after it is lost. The peer's address is resolved at each dial, so a
/// DNS name that moves is followed.
async fn peer_connection(gw: &Arc<Gateway>, cluster: &str) -> Result<quinn::Connection, TunnelResponse> {
    let refuse = TunnelResponse::refused;
    // Linked first: a cached connection must not outlive the link.
    let snap: Arc<ConfigSnapshot> = gw.agent.config.borrow().clone();
    let peer = snap.peers.iter().find(|p| p.cluster == cluster).ok_or_else(|| {
        refuse(
            RefuseCode::UnknownPeer,
            format!("cluster {cluster} is not linked with cluster {}", gw.cluster),
        )
    })?;
    if let Some(c) = gw.live_connection(cluster) {
        return Ok(c);
    }
    // One dial per peer at a time: streams that arrive meanwhile wait for
    // it and share its connection, unless the peer is suspect (see `Dial`).
    let (lock, suspect) = {
        let mut dials = gw.dials.lock().expect("dials lock");
        let d = dials.entry(cluster.to_string()).or_default();
        (d.lock.clone(), d.suspect)
    };
    if suspect {
        if let Ok(guard) = lock.try_lock_owned() {
            let (gw, cluster, peer) = (gw.clone(), cluster.to_string(), peer.clone());
            tokio::spawn(async move {
                let _dialing = guard;
                if gw.live_connection(&cluster).is_none() {
                    let _ = dial_once(&gw, &cluster, &peer).await;
                }
            });
        }
        return Err(refuse(
            RefuseCode::PeerUnreachable,
            format!("the gateway of cluster {cluster} stopped answering; reconnecting in the background"),
        ));
    }
    let _dialing = lock.lock().await;
    if let Some(c) = gw.live_connection(cluster) {
        return Ok(c);
    }
    dial_once(gw, cluster, peer).await
}

/// Dial `cluster` unless its backoff is running, and record the outcome.
/// The caller holds the peer's dial lock.
async fn dial_once(
    gw: &Arc<Gateway>,
    cluster: &str,
    peer: &isthmus_proto::Peer,
) -> Result<quinn::Connection, TunnelResponse> {
    let retry_at = gw
        .dials
        .lock()
        .expect("dials lock")
        .get(cluster)
        .and_then(|d| d.retry_at);
    if let Some(left) = retry_at.map(|t| t.saturating_duration_since(tokio::time::Instant::now()))
        && !left.is_zero()
    {
        return Err(TunnelResponse::refused(
            RefuseCode::PeerUnreachable,
            format!("the gateway of cluster {cluster} was unreachable at the last try; next try in {left:?}"),
        ));
    }
    let dialed = dial(gw, cluster, peer).await;
    let mut dials = gw.dials.lock().expect("dials lock");
    let state = dials.entry(cluster.to_string()).or_default();
    match dialed {
        Ok(conn) => {
            state.failures = 0;
            state.retry_at = None;
            state.suspect = false;
            drop(dials);
            gw.adopt(cluster, conn.clone());
            // The peer tunnels to us on this connection too.
            tokio::spawn(serve_peer(gw.clone(), conn.clone(), gw.tasks.clone(), true));
            Ok(conn)
        }
        Err(e) => {
            state.failures += 1;
            state.retry_at = Some(tokio::time::Instant::now() + dial_backoff(state.failures));
            state.suspect = true;
            Err(e)
        }
    }
}

async fn dial(
    gw: &Arc<Gateway>,
    cluster: &str,
    peer: &isthmus_proto::Peer,
) -> Result<quinn::Connection, TunnelResponse> {
    let refuse = TunnelResponse::refused;
    if peer.gateway_addr.is_empty() {
        return Err(refuse(
            RefuseCode::PeerUnreachable,
            format!("cluster {cluster} has not announced a gateway address"),
        ));
    }
    let addr = tokio::net::lookup_host(&peer.gateway_addr)
        .await
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| {
            refuse(
                RefuseCode::PeerUnreachable,
                format!(
                    "cannot resolve gateway address {} of cluster {cluster}",
                    peer.gateway_addr
                ),
            )
        })?;
    let client_tls = tls::client_config(
        Some(gw.agent.svid.clone()),
        gw.peer_bundles.clone(),
        Expect::Id(SpiffeId::gateway(&peer.trust_domain)),
        &[tls::ALPN_TUNNEL],
    )
    .map_err(|e| refuse(RefuseCode::PeerUnreachable, e.to_string()))?;
    let quic_tls =
        QuicClientConfig::try_from(client_tls).map_err(|e| refuse(RefuseCode::PeerUnreachable, e.to_string()))?;
    let mut client_config = quinn::ClientConfig::new(Arc::new(quic_tls));
    client_config.transport_config(gw.transport.clone());
    let connecting = gw
        .endpoint
        .connect_with(client_config, addr, "isthmus.mesh.invalid")
        .map_err(|e| refuse(RefuseCode::PeerUnreachable, e.to_string()))?;
    let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| {
            refuse(
                RefuseCode::PeerUnreachable,
                format!("gateway of cluster {cluster} at {addr}: QUIC handshake timed out"),
            )
        })?
        .map_err(|e| {
            refuse(
                RefuseCode::PeerUnreachable,
                format!("gateway of cluster {cluster} at {addr}: {e}"),
            )
        })?;
    tracing::info!(peer = %cluster, %addr, "QUIC connection to peer gateway up");
    Ok(conn)
}

impl Gateway {
    fn live_connection(&self, cluster: &str) -> Option<quinn::Connection> {
        let conns = self.conns.lock().expect("conns lock");
        conns.get(cluster).filter(|c| c.close_reason().is_none()).cloned()
    }

    /// Make `conn` the connection to `peer` (unless a live one is there
    /// already: both sides may have dialed at once), serve the streams the
    /// peer opens on it, and publish its path while it lives.
    fn adopt(self: &Arc<Self>, peer: &str, conn: quinn::Connection) {
        {
            let mut conns = self.conns.lock().expect("conns lock");
            if !conns
                .get(peer)
                .is_some_and(|c| c.close_reason().is_none() && c.stable_id() != conn.stable_id())
            {
                conns.insert(peer.to_string(), conn.clone());
            }
        }
        let watch = conn.clone();
        let peer = peer.to_string();
        let gw = self.clone();
        tokio::spawn(async move {
            // Publish the path each second; close the connection when the
            // peer has sent nothing (not even an ACK of our keep-alives)
            // for `peer_timeout`.
            let mut tick = tokio::time::interval(gw.peer_timeout / 8);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let (mut seen, mut heard_at, mut published) = (0, tokio::time::Instant::now(), None);
            let reason = loop {
                tokio::select! {
                    r = watch.closed() => break r,
                    now = tick.tick() => {
                        let rx = watch.stats().udp_rx.datagrams;
                        if rx != seen {
                            (seen, heard_at) = (rx, now);
                        } else if now.duration_since(heard_at) >= gw.peer_timeout {
                            tracing::warn!(%peer, silent = ?now.duration_since(heard_at), "peer gateway silent: closing its connection so tunnels fail over");
                            gw.metrics.silent(&peer);
                            gw.dials.lock().expect("dials lock").entry(peer.clone()).or_default().suspect = true;
                            watch.close(3u32.into(), b"peer silent");
                            continue;
                        }
                        if published.is_none_or(|t: tokio::time::Instant| now.duration_since(t) >= Duration::from_secs(1)) {
                            gw.metrics.path(&peer, &watch);
                            published = Some(now);
                        }
                    }
                }
            };
            tracing::info!(%peer, %reason, "QUIC connection to peer gateway closed");
        });
    }
}

async fn accept_quic(gw: Arc<Gateway>, stop: CancellationToken) {
    loop {
        let incoming = tokio::select! {
            _ = stop.cancelled() => return,
            i = gw.endpoint.accept() => match i { Some(i) => i, None => return },
        };
        let gw2 = gw.clone();
        let stop2 = stop.clone();
        tokio::spawn(async move {
            match incoming.await {
                Ok(conn) => serve_peer(gw2, conn, stop2, false).await,
                Err(e) => tracing::debug!(error = %e, "QUIC handshake failed"),
            }
        });
    }
}

/// Streams from one peer gateway, on a connection it dialed or (`dialed`)
/// this gateway did.
async fn serve_peer(gw: Arc<Gateway>, conn: quinn::Connection, stop: CancellationToken, dialed: bool) {
    let id = conn
        .peer_identity()
        .and_then(|i| i.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok())
        .and_then(|certs| tls::peer_id(Some(&certs)));
    let peer = id.as_ref().and_then(|id| {
        let snap = gw.agent.config.borrow();
        snap.peers
            .iter()
            .find(|p| p.trust_domain == id.trust_domain && *id == SpiffeId::gateway(&p.trust_domain))
            .map(|p| p.cluster.clone())
    });
    let Some(peer) = peer else {
        tracing::warn!(id = ?id.map(|i| i.to_string()), remote = %conn.remote_address(), "refusing QUIC connection: not a linked peer's gateway");
        conn.close(2u32.into(), b"not a linked peer gateway");
        return;
    };
    // Every connection with a peer is counted, whichever side dialed it.
    let _open = gw.metrics.peer_connection(&peer);
    if !dialed {
        tracing::info!(%peer, remote = %conn.remote_address(), "QUIC connection from peer gateway");
        gw.adopt(&peer, conn.clone());
    }
    let mut config = gw.agent.config.clone();
    loop {
        let (send, recv) = tokio::select! {
            _ = stop.cancelled() => return,
            // Unlinked: end the connection, and every tunnel in it, now;
            // refusing only new streams would leave pooled sessions open.
            r = config.changed() => {
                let linked = r.is_ok() && config.borrow_and_update().peers.iter().any(|p| p.cluster == peer);
                if !linked {
                    tracing::warn!(%peer, "peer unlinked: closing its QUIC connection");
                    conn.close(1u32.into(), b"unlinked");
                    return;
                }
                continue;
            }
            s = conn.accept_bi() => match s {
                Ok(s) => s,
                Err(e) => {
                    tracing::info!(%peer, reason = %e, "QUIC connection from peer closed");
                    return;
                }
            },
        };
        let gw2 = gw.clone();
        let peer2 = peer.clone();
        gw.tracker.spawn(async move {
            if let Err(e) = inbound_stream(gw2, &peer2, send, recv).await {
                tracing::debug!(peer = %peer2, error = %e, "stream ended with error");
            }
        });
    }
}

/// Authorize a peer's stream and relay it to a local sidecar.
async fn inbound_stream(
    gw: Arc<Gateway>,
    peer: &str,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Result<(), String> {
    let req = tokio::time::timeout(HEADER_TIMEOUT, TunnelRequest::read(&mut recv))
        .await
        .map_err(|_| "header timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let decision = authorize(&gw.agent.config.borrow(), &gw.cluster, peer, &req);
    let target = match decision {
        Ok(addrs) => {
            let mut last = None;
            let start = rand::random_range(0..addrs.len());
            let mut found = None;
            let deadline = tokio::time::Instant::now() + UPSTREAM_BUDGET;
            for i in 0..addrs.len() {
                let a = &addrs[(start + i) % addrs.len()];
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                if left.is_zero() {
                    break;
                }
                match tokio::time::timeout(left.min(UPSTREAM_CONNECT_TIMEOUT), TcpStream::connect(a)).await {
                    Ok(Ok(s)) => {
                        found = Some(s);
                        break;
                    }
                    Ok(Err(e)) => last = Some(format!("{a}: {e}")),
                    Err(_) => last = Some(format!("{a}: connect timed out")),
                }
            }
            found.ok_or_else(|| {
                TunnelResponse::refused(
                    RefuseCode::UpstreamConnect,
                    format!(
                        "no endpoint of {}/{} in cluster {} accepted: {}",
                        req.namespace,
                        req.service,
                        gw.cluster,
                        last.unwrap_or_default()
                    ),
                )
            })
        }
        Err(r) => Err(r),
    };
    let upstream = match target {
        Ok(s) => s,
        Err(refusal) => {
            gw.metrics.stream("inbound", peer, refusal.result());
            tracing::info!(%peer, service = %format!("{}/{}", req.namespace, req.service), ?refusal, "stream refused");
            let _ = refusal.write(&mut send).await;
            let _ = send.finish();
            return Ok(());
        }
    };
    let _ = upstream.set_nodelay(true);
    gw.metrics.stream("inbound", peer, "ok");
    let _open = gw.metrics.open("inbound");
    TunnelResponse::Ok.write(&mut send).await.map_err(|e| e.to_string())?;
    let (to_peer, from_peer) = gw.metrics.byte_counters(peer);
    let mut stream = Counted::new(tokio::io::join(recv, send), from_peer);
    let mut upstream = Counted::new(upstream, to_peer);
    let _ = tokio::io::copy_bidirectional(&mut stream, &mut upstream).await;
    Ok(())
}

/// Whether a peer may open a stream to `req`'s target; if so, the local
/// sidecar addresses that serve it. Pure, so every rule is unit-tested.
pub fn authorize(
    snap: &ConfigSnapshot,
    cluster: &str,
    peer: &str,
    req: &TunnelRequest,
) -> Result<Vec<String>, TunnelResponse> {
    let refuse = TunnelResponse::refused;
    if !snap.peers.iter().any(|p| p.cluster == peer) {
        return Err(refuse(
            RefuseCode::UnknownPeer,
            format!("cluster {peer} is not linked with cluster {cluster}"),
        ));
    }
    if req.cluster != cluster {
        return Err(refuse(
            RefuseCode::BadRequest,
            format!("this is the gateway of cluster {cluster}, not {}", req.cluster),
        ));
    }
    let key = format!("{}/{}", req.namespace, req.service);
    let svc = snap
        .services
        .iter()
        .find(|s| s.namespace == req.namespace && s.name == req.service && s.exported)
        .ok_or_else(|| {
            refuse(
                RefuseCode::NotExported,
                format!("service {key} is not exported by cluster {cluster}"),
            )
        })?;
    if svc.port != u32::from(req.port) {
        return Err(refuse(
            RefuseCode::PortMismatch,
            format!(
                "service {key} in cluster {cluster} serves port {}, not {}",
                svc.port, req.port
            ),
        ));
    }
    let addrs: Vec<String> = svc
        .backends
        .iter()
        .filter(|b| b.cluster == cluster)
        .flat_map(|b| b.addresses.iter().cloned())
        .collect();
    if addrs.is_empty() {
        return Err(refuse(
            RefuseCode::NoEndpoints,
            format!("service {key} has no endpoints in cluster {cluster}"),
        ));
    }
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_proto::{Backend, Peer, Service};

    fn snap() -> ConfigSnapshot {
        ConfigSnapshot {
            cluster: "east".into(),
            peers: vec![Peer {
                cluster: "west".into(),
                trust_domain: "west.mesh".into(),
                gateway_addr: "x:1".into(),
            }],
            services: vec![
                Service {
                    namespace: "demo".into(),
                    name: "echo".into(),
                    port: 8080,
                    exported: true,
                    conditions: vec![],
                    policy: None,
                    backends: vec![Backend {
                        cluster: "east".into(),
                        addresses: vec!["127.0.1.10:1".into()],
                        identities: vec![],
                        healthy_endpoints: 1,
                    }],
                },
                Service {
                    namespace: "demo".into(),
                    name: "secret".into(),
                    port: 8080,
                    exported: false,
                    conditions: vec![],
                    policy: None,
                    backends: vec![Backend {
                        cluster: "east".into(),
                        addresses: vec!["127.0.1.11:1".into()],
                        identities: vec![],
                        healthy_endpoints: 1,
                    }],
                },
            ],
            ..Default::default()
        }
    }

    fn req(service: &str, port: u16) -> TunnelRequest {
        TunnelRequest {
            cluster: "east".into(),
            namespace: "demo".into(),
            service: service.into(),
            port,
            source_cluster: "west".into(),
            traceparent: None,
        }
    }

    fn code(r: Result<Vec<String>, TunnelResponse>) -> RefuseCode {
        match r {
            Err(TunnelResponse::Refused { code, .. }) => code,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn dial_backoff_doubles_up_to_five_seconds() {
        let ms: Vec<u128> = (1..=8).map(|n| dial_backoff(n).as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(dial_backoff(u32::MAX), Duration::from_secs(5));
    }

    #[test]
    fn authorizes_only_exported_services_on_their_port_for_linked_peers() {
        let s = snap();
        assert_eq!(
            authorize(&s, "east", "west", &req("echo", 8080)).unwrap(),
            ["127.0.1.10:1"]
        );
        assert_eq!(
            code(authorize(&s, "east", "west", &req("secret", 8080))),
            RefuseCode::NotExported
        );
        assert_eq!(
            code(authorize(&s, "east", "west", &req("nope", 8080))),
            RefuseCode::NotExported
        );
        assert_eq!(
            code(authorize(&s, "east", "west", &req("echo", 9999))),
            RefuseCode::PortMismatch
        );
        assert_eq!(
            code(authorize(&s, "east", "north", &req("echo", 8080))),
            RefuseCode::UnknownPeer
        );
        let mut other = req("echo", 8080);
        other.cluster = "north".into();
        assert_eq!(code(authorize(&s, "east", "west", &other)), RefuseCode::BadRequest);
        let mut empty = snap();
        empty.services[0].backends[0].addresses.clear();
        assert_eq!(
            code(authorize(&empty, "east", "west", &req("echo", 8080))),
            RefuseCode::NoEndpoints
        );
    }
}
