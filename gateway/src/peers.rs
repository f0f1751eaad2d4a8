//! The peer table: one QUIC connection per linked peer gateway, whichever
//! side dialed it (tunnels go both ways on it), dialed on first use and
//! again after it is lost, one dial at a time (`dial.rs`), watched for
//! silence (`watchdog.rs`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use isthmus_core::identity::SpiffeId;
use isthmus_core::tls::{self, Expect};
use isthmus_core::tunnel::{RefuseCode, TunnelRequest, TunnelResponse};
use isthmus_proto::{ConfigSnapshot, Peer};
use quinn::crypto::rustls::QuicClientConfig;
use tokio_util::sync::CancellationToken;

use crate::Gateway;
use crate::dial::DialState;
use crate::watchdog::Silence;

/// How long a QUIC handshake with a peer gateway may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// A peer gateway's next address is tried when the one before has not
/// answered in this long (Happy Eyeballs' pace, RFC 8305).
const NEXT_ADDRESS_AFTER: Duration = Duration::from_millis(250);
/// How long a peer gateway has to accept or refuse a stream. It answers
/// after one local TCP connect, so a silent peer is a dead connection.
const STREAM_ANSWER_TIMEOUT: Duration = Duration::from_secs(4);
/// How often a connection's path (RTT, window, loss, MTU) is published.
const PUBLISH_PATH_EVERY: Duration = Duration::from_secs(1);
/// The name the client asks for: the peer is verified by its SPIFFE ID.
const SERVER_NAME: &str = "isthmus.mesh.invalid";

pub(crate) type QuicStream = tokio::io::Join<quinn::RecvStream, quinn::SendStream>;

/// One peer's dial lock (single flight) and state.
#[derive(Default)]
struct Dial {
    lock: Arc<tokio::sync::Mutex<()>>,
    state: DialState,
}

#[derive(Default)]
pub(crate) struct Peers {
    conns: Mutex<HashMap<String, quinn::Connection>>,
    dials: Mutex<HashMap<String, Dial>>,
}

impl Peers {
    fn live(&self, cluster: &str) -> Option<quinn::Connection> {
        let conns = self.conns.lock().expect("conns lock");
        conns.get(cluster).filter(|c| c.close_reason().is_none()).cloned()
    }

    /// Whether the cached connection to `cluster` is closed (or absent), so
    /// a new one is worth dialing. A live but slow peer is not redialed.
    fn gone(&self, cluster: &str) -> bool {
        self.conns
            .lock()
            .expect("conns lock")
            .get(cluster)
            .is_none_or(|c| c.close_reason().is_some())
    }

    fn forget(&self, cluster: &str) {
        self.conns.lock().expect("conns lock").remove(cluster);
    }

    /// Close and forget connections to peers that are no longer linked.
    pub fn keep_linked(&self, snap: &ConfigSnapshot) {
        self.conns.lock().expect("conns lock").retain(|peer, c| {
            let keep = snap.peers.iter().any(|p| &p.cluster == peer);
            if !keep {
                c.close(1u32.into(), b"unlinked");
            }
            keep
        });
    }

    fn went_silent(&self, cluster: &str) {
        self.dials
            .lock()
            .expect("dials lock")
            .entry(cluster.to_string())
            .or_default()
            .state
            .went_silent();
    }
}

/// Open a stream to `req.cluster`'s gateway and forward the header. A
/// refusal from the peer is final; a broken connection (say, the peer
/// gateway restarted) is dropped and dialed afresh, once.
pub(crate) async fn open_stream(gw: &Arc<Gateway>, req: &TunnelRequest) -> Result<QuicStream, TunnelResponse> {
    match try_open_stream(gw, req).await {
        Err(TunnelResponse::Refused {
            code: RefuseCode::PeerUnreachable,
            reason,
        }) if gw.peers.gone(&req.cluster) => {
            tracing::info!(peer = %req.cluster, %reason, "redialing peer gateway");
            gw.peers.forget(&req.cluster);
            try_open_stream(gw, req).await
        }
        other => other,
    }
}

async fn try_open_stream(gw: &Arc<Gateway>, req: &TunnelRequest) -> Result<QuicStream, TunnelResponse> {
    let unreachable = |e: String| {
        TunnelResponse::refused(
            RefuseCode::PeerUnreachable,
            format!("gateway of cluster {}: {e}", req.cluster),
        )
    };
    let conn = connection(gw, &req.cluster).await?;
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
async fn connection(gw: &Arc<Gateway>, cluster: &str) -> Result<quinn::Connection, TunnelResponse> {
    // Linked first: a cached connection must not outlive the link.
    let snap: Arc<ConfigSnapshot> = gw.agent.config.borrow().clone();
    let peer = snap.peers.iter().find(|p| p.cluster == cluster).ok_or_else(|| {
        TunnelResponse::refused(
            RefuseCode::UnknownPeer,
            format!("cluster {cluster} is not linked with cluster {}", gw.cluster),
        )
    })?;
    if let Some(c) = gw.peers.live(cluster) {
        return Ok(c);
    }
    let (lock, suspect) = {
        let mut dials = gw.peers.dials.lock().expect("dials lock");
        let d = dials.entry(cluster.to_string()).or_default();
        (d.lock.clone(), d.state.is_suspect())
    };
    if suspect {
        if let Ok(guard) = lock.try_lock_owned() {
            let (gw, cluster, peer) = (gw.clone(), cluster.to_string(), peer.clone());
            tokio::spawn(async move {
                let _dialing = guard;
                if gw.peers.live(&cluster).is_none() {
                    let _ = dial_once(&gw, &cluster, &peer).await;
                }
            });
        }
        return Err(TunnelResponse::refused(
            RefuseCode::PeerUnreachable,
            format!("the gateway of cluster {cluster} stopped answering; reconnecting in the background"),
        ));
    }
    let _dialing = lock.lock().await;
    if let Some(c) = gw.peers.live(cluster) {
        return Ok(c);
    }
    dial_once(gw, cluster, peer).await
}

/// Dial `cluster` unless its backoff is running, and record the outcome.
/// The caller holds the peer's dial lock.
async fn dial_once(gw: &Arc<Gateway>, cluster: &str, peer: &Peer) -> Result<quinn::Connection, TunnelResponse> {
    let may = gw
        .peers
        .dials
        .lock()
        .expect("dials lock")
        .get(cluster)
        .map_or(Ok(()), |d| d.state.may_dial(Instant::now()));
    if let Err(left) = may {
        return Err(TunnelResponse::refused(
            RefuseCode::PeerUnreachable,
            format!("the gateway of cluster {cluster} was unreachable at the last try; next try in {left:?}"),
        ));
    }
    let dialed = dial(gw, cluster, peer).await;
    let mut dials = gw.peers.dials.lock().expect("dials lock");
    let state = &mut dials.entry(cluster.to_string()).or_default().state;
    match dialed {
        Ok(conn) => {
            state.succeeded();
            drop(dials);
            adopt(gw, cluster, conn.clone());
            // The peer tunnels to us on this connection too.
            tokio::spawn(crate::inbound::serve_peer(
                gw.clone(),
                conn.clone(),
                gw.tasks.clone(),
                true,
            ));
            Ok(conn)
        }
        Err(e) => {
            state.failed(Instant::now());
            Err(e)
        }
    }
}

async fn dial(gw: &Arc<Gateway>, cluster: &str, peer: &Peer) -> Result<quinn::Connection, TunnelResponse> {
    let unreachable = |reason: String| TunnelResponse::refused(RefuseCode::PeerUnreachable, reason);
    if peer.gateway_addr.is_empty() {
        return Err(unreachable(format!(
            "cluster {cluster} has not announced a gateway address"
        )));
    }
    let addrs = gw.resolver.addresses(&peer.gateway_addr).await.map_err(|e| {
        unreachable(format!(
            "gateway address {} of cluster {cluster}: {e}",
            peer.gateway_addr
        ))
    })?;
    let client_tls = tls::client_config(
        Some(gw.agent.svid.clone()),
        gw.peer_bundles.clone(),
        Expect::Id(SpiffeId::gateway(&peer.trust_domain)),
        &[tls::ALPN_TUNNEL],
    )
    .map_err(|e| unreachable(e.to_string()))?;
    let quic_tls = QuicClientConfig::try_from(client_tls).map_err(|e| unreachable(e.to_string()))?;
    let mut client_config = quinn::ClientConfig::new(Arc::new(quic_tls));
    client_config.transport_config(gw.transport.clone());

    // Every address, staggered: the next starts when the one before has
    // failed or had NEXT_ADDRESS_AFTER to answer; the first to finish its
    // handshake wins and the rest are dropped (closed).
    let mut attempts = futures::stream::FuturesUnordered::new();
    let mut pending = addrs.iter().copied();
    let mut failures: Vec<String> = Vec::new();
    let connect = |addr: SocketAddr| {
        let connecting = gw.endpoint.connect_with(client_config.clone(), addr, SERVER_NAME);
        async move {
            let r = match connecting {
                Ok(c) => match tokio::time::timeout(HANDSHAKE_TIMEOUT, c).await {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(_) => Err("QUIC handshake timed out".to_string()),
                },
                Err(e) => Err(e.to_string()),
            };
            (addr, r)
        }
    };
    if let Some(a) = pending.next() {
        attempts.push(connect(a));
    }
    loop {
        let next = tokio::time::sleep(NEXT_ADDRESS_AFTER);
        tokio::select! {
            done = attempts.next() => match done {
                Some((addr, Ok(conn))) => {
                    tracing::info!(peer = %cluster, %addr, "QUIC connection to peer gateway up");
                    return Ok(conn);
                }
                Some((addr, Err(e))) => {
                    tracing::debug!(peer = %cluster, %addr, error = %e, "peer gateway address failed");
                    failures.push(format!("{addr}: {e}"));
                    if let Some(a) = pending.next() {
                        attempts.push(connect(a));
                    } else if attempts.is_empty() {
                        return Err(unreachable(format!(
                            "gateway of cluster {cluster} ({}): {}",
                            peer.gateway_addr,
                            failures.join("; ")
                        )));
                    }
                }
                None => unreachable!("an attempt is always pending here"),
            },
            () = next, if pending.len() > 0 => {
                if let Some(a) = pending.next() {
                    attempts.push(connect(a));
                }
            }
        }
    }
}

/// Make `conn` the connection to `peer` (unless a live one is there
/// already: both sides may have dialed at once), and watch it while it
/// lives: publish its path each second, and close it when the peer has
/// sent nothing (not even an ACK of our keep-alives) for the peer timeout.
pub(crate) fn adopt(gw: &Arc<Gateway>, peer: &str, conn: quinn::Connection) {
    {
        let mut conns = gw.peers.conns.lock().expect("conns lock");
        if !conns
            .get(peer)
            .is_some_and(|c| c.close_reason().is_none() && c.stable_id() != conn.stable_id())
        {
            conns.insert(peer.to_string(), conn.clone());
        }
    }
    let peer = peer.to_string();
    let gw = gw.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(gw.peer_timeout / 8);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut silence = Silence::new(Instant::now(), gw.peer_timeout);
        let mut published: Option<Instant> = None;
        let reason = loop {
            tokio::select! {
                r = conn.closed() => break r,
                _ = tick.tick() => {
                    let now = Instant::now();
                    if let Some(silent) = silence.observe(conn.stats().udp_rx.datagrams, now) {
                        tracing::warn!(%peer, ?silent, "peer gateway silent: closing its connection so tunnels fail over");
                        gw.metrics.silent(&peer);
                        gw.peers.went_silent(&peer);
                        conn.close(3u32.into(), b"peer silent");
                        continue;
                    }
                    if published.is_none_or(|t| now.duration_since(t) >= PUBLISH_PATH_EVERY) {
                        gw.metrics.path(&peer, &conn);
                        published = Some(now);
                    }
                }
            }
        };
        tracing::info!(%peer, %reason, "QUIC connection to peer gateway closed");
    });
}

/// Apply config changes: bundles, and drop connections to unlinked peers.
pub(crate) async fn follow_config(gw: Arc<Gateway>, stop: CancellationToken) {
    let mut rx = gw.agent.config.clone();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = rx.changed() => if r.is_err() { return },
        }
        gw.split_bundles();
        let snap = rx.borrow_and_update().clone();
        gw.peers.keep_linked(&snap);
    }
}
