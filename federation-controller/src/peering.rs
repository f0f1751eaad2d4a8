//! Links with other clusters: spending a join token, and the long-lived
//! peering stream that carries heartbeats, exports and bundle updates.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use isthmus_core::identity::{self, SpiffeId};
use isthmus_core::local::error_chain;
use isthmus_core::tls::{self, Expect};
use isthmus_core::token::JoinToken;
use isthmus_core::unix_now_ms;
use isthmus_proto::peer_message::Msg;
use isthmus_proto::peering_client::PeeringClient;
use isthmus_proto::{BundleUpdate, ExportList, Heartbeat, JoinRequest, LinkResponse, PeerMessage, Unlinked};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use crate::imports;
use crate::join::{self, LinkError};
use crate::metrics::StateLabels;
use crate::shared::{PeerRuntime, Shared};
use crate::state::{LinkRecord, RootPhase};

/// The state of a link, as `isthmus status` shows it.
pub(crate) fn link_state(rt: Option<&PeerRuntime>, lease: Duration) -> &'static str {
    match rt {
        None => "pending",
        Some(p) if p.connected && p.last_heartbeat.is_some_and(|t| t.elapsed() < lease) => "active",
        Some(p) if p.connected => "establishing",
        Some(p) if p.ever_connected => "failing",
        Some(_) => "establishing",
    }
}

/// Spend `tok` at its issuer and record the link.
pub(crate) async fn join(shared: Arc<Shared>, tok: &JoinToken) -> Result<LinkResponse, LinkError> {
    join::check_token_here(
        &shared.cfg.cluster,
        &shared.cfg.trust_domain,
        &shared.state.lock().expect("state lock"),
        tok,
    )?;
    // Every address the token lists is tried in turn (several replicas).
    let addr = &tok.peering.join(",");
    let cfg = tls::pinned_client_config(
        &tok.root_fingerprint,
        SpiffeId::controller(&tok.trust_domain),
        &[tls::ALPN_H2],
    )?;
    let channel = isthmus_core::grpc::connect(addr, cfg).await.map_err(|e| {
        if tls::is_pin_mismatch(&e) {
            LinkError::FingerprintMismatch(format!(
                "the server at {addr} does not present the root CA the token pins for cluster {}. Either it is not that cluster's controller, or that cluster rotated its root since the token was made (`isthmus token list` there shows it as stale): ask for a new token",
                tok.cluster
            ))
        } else {
            LinkError::Unreachable {
                cluster: tok.cluster.clone(),
                addr: addr.clone(),
                reason: error_chain(&e),
            }
        }
    })?;
    let secret = tok.secret_bytes()?;
    let (_, quic) = shared.gateway_addrs();
    let resp = PeeringClient::new(channel)
        .join(JoinRequest {
            token_id: tok.id.clone(),
            secret,
            cluster: shared.cfg.cluster.clone(),
            trust_domain: shared.cfg.trust_domain.clone(),
            roots_pem: shared.ca.load().bundle_pem(),
            gateway_addr: quic,
        })
        .await
        .map_err(|status| LinkError::Refused {
            cluster: tok.cluster.clone(),
            status,
        })?
        .into_inner();
    join::check_answer(tok, &resp.cluster, &resp.trust_domain, &resp.roots_pem)?;
    let mut raced = None;
    shared
        .update(|state| {
            // Checked again under the lock: another link may have landed meanwhile.
            if let Err(e) = join::not_linked(state, tok) {
                let status = e.status();
                raced = Some(e);
                return Err(status);
            }
            state.links.insert(
                resp.cluster.clone(),
                LinkRecord {
                    cluster: resp.cluster.clone(),
                    trust_domain: resp.trust_domain.clone(),
                    roots_pem: resp.roots_pem.clone(),
                    gateway_addr: if resp.gateway_addr.is_empty() {
                        tok.gateway.first().cloned().unwrap_or_default()
                    } else {
                        resp.gateway_addr.clone()
                    },
                    dial: Some(addr.clone()),
                    priority: tok.priority,
                    created_unix: isthmus_core::unix_now(),
                    imports: Vec::new(),
                    unconfirmed: None,
                },
            );
            Ok(())
        })
        .await
        .map_err(|status| raced.take().unwrap_or(LinkError::Store(status)))?;
    shared.rebuild_bundles();
    shared.changed();
    tracing::info!(peer = %resp.cluster, trust_domain = %resp.trust_domain, "linked (token spent)");
    tokio::spawn(dial_loop(shared.clone(), resp.cluster.clone()));
    Ok(LinkResponse {
        peer_cluster: resp.cluster,
        peer_trust_domain: resp.trust_domain,
    })
}

/// Keep the peering stream to `peer` up, reconnecting with backoff.
pub(crate) async fn dial_loop(shared: Arc<Shared>, peer: String) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(link) = shared.state.lock().expect("state lock").links.get(&peer).cloned() else {
            return;
        };
        let Some(addr) = link.dial.clone() else { return };
        let started = Instant::now();
        match dial_once(&shared, &link, &addr).await {
            Ok(()) => tracing::info!(%peer, "peering stream ended"),
            Err(e) => tracing::warn!(%peer, %addr, error = %e, "peering stream failed"),
        }
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(100);
        }
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Why a peering stream could not be opened.
#[derive(Debug, thiserror::Error)]
enum DialError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("{}", error_chain(.0))]
    Connect(#[from] tonic::transport::Error),
    #[error("the peer refused the stream: {}", .0.message())]
    Refused(#[from] Status),
}

async fn dial_once(shared: &Arc<Shared>, link: &LinkRecord, addr: &str) -> Result<(), DialError> {
    mark(shared, &link.cluster, |p| p.connected = false);
    let cfg = tls::client_config(
        Some(shared.svid.clone()),
        shared.bundles.clone(),
        Expect::Id(SpiffeId::controller(&link.trust_domain)),
        &[tls::ALPN_H2],
    )?;
    let channel = isthmus_core::grpc::connect(addr, cfg).await?;
    let (tx, rx) = mpsc::channel(16);
    let mut inbound = PeeringClient::new(channel)
        .sync(ReceiverStream::new(rx))
        .await?
        .into_inner();
    run_session(shared.clone(), link.cluster.clone(), &mut inbound, tx).await;
    // Let the last message (an unlink notice) reach the peer before the
    // call is dropped: wait, briefly, for the peer to end its side.
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Ok(Some(_)) = inbound.message().await {}
    })
    .await;
    Ok(())
}

/// The accepting side of a peering stream.
pub(crate) async fn session(
    shared: Arc<Shared>,
    peer: String,
    mut inbound: Streaming<PeerMessage>,
    out: mpsc::Sender<Result<PeerMessage, Status>>,
) {
    let (tx, rx) = mpsc::channel::<PeerMessage>(16);
    let mut forward = tokio::spawn(async move {
        let mut rx = ReceiverStream::new(rx).map(Ok);
        while let Some(m) = rx.next().await {
            if out.send(m).await.is_err() {
                break;
            }
        }
    });
    run_session(shared, peer, &mut inbound, tx).await;
    // Let the last messages (an unlink notice) go out before the stream ends.
    if tokio::time::timeout(Duration::from_secs(1), &mut forward)
        .await
        .is_err()
    {
        forward.abort();
    }
}

/// Update a linked peer's runtime state. A message that arrives after the
/// link was removed must not bring the peer's entry back.
fn mark(shared: &Shared, peer: &str, f: impl FnOnce(&mut PeerRuntime)) {
    let state = shared.state.lock().expect("state lock");
    if !state.links.contains_key(peer) {
        return;
    }
    let mut peers = shared.peers.lock().expect("peers lock");
    f(peers.entry(peer.to_string()).or_insert_with(PeerRuntime::new));
}

/// Both sides of a peering stream run this: announce our bundle and exports,
/// heartbeat, and apply what the peer sends.
async fn run_session(
    shared: Arc<Shared>,
    peer: String,
    inbound: &mut Streaming<PeerMessage>,
    tx: mpsc::Sender<PeerMessage>,
) {
    tracing::info!(%peer, "peering stream up");
    mark(&shared, &peer, |p| {
        p.connected = true;
        p.ever_connected = true;
    });
    // Woken by each rebuild of the table, which carries the export list.
    let mut table = shared.hub.current.subscribe();
    let mut heartbeat = tokio::time::interval(shared.cfg.heartbeat);
    let mut last_exports = None;
    let mut last_bundle = None;
    loop {
        let Some(link) = shared.state.lock().expect("state lock").links.get(&peer).cloned() else {
            // Unlinked here: tell the peer, so it removes its side too.
            let _ = tx
                .send(PeerMessage {
                    msg: Some(Msg::Unlinked(Unlinked {})),
                })
                .await;
            break;
        };
        // Announce what changed since the last round. The bundle's PEM is
        // built again only when the roots changed.
        let (_, quic) = shared.gateway_addrs();
        let ca = shared.ca.load_full();
        let roots_pem = match &last_bundle {
            Some((c, b)) if Arc::ptr_eq(c, &ca) => BundleUpdate::clone(b).roots_pem,
            _ => ca.bundle_pem(),
        };
        let bundle = BundleUpdate {
            trust_domain: shared.cfg.trust_domain.clone(),
            roots_pem,
            gateway_addr: quic,
        };
        if last_bundle.as_ref().map(|(_, b)| b) != Some(&bundle) {
            let m = Msg::Bundle(bundle.clone());
            if tx.send(PeerMessage { msg: Some(m) }).await.is_err() {
                break;
            }
            last_bundle = Some((ca, bundle));
        }
        let published = table.borrow_and_update().clone();
        let exports = published.exports.clone();
        // Exports wait until the registry has settled (Config::settle).
        // The first list is whole, later ones only what changed.
        let unchanged = last_exports
            .as_ref()
            .is_some_and(|l| Arc::ptr_eq(l, &exports) || *l == exports);
        if shared.settled() && !unchanged {
            let list = match &last_exports {
                None => ExportList {
                    services: exports.to_vec(),
                    delta: false,
                    withdrawn: vec![],
                },
                // The publisher's delta when this stream sent the list it
                // starts from (the common case), else one worked out here.
                Some(before) => match &published.exports_delta {
                    Some((from, d)) if Arc::ptr_eq(from, before) => d.clone(),
                    _ => imports::export_delta(before, &exports),
                },
            };
            shared.metrics.peering_export_bytes.inc_by(list.encoded_len() as u64);
            if tx
                .send(PeerMessage {
                    msg: Some(Msg::Exports(list)),
                })
                .await
                .is_err()
            {
                break;
            }
            last_exports = Some(exports);
        }
        tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            _ = tokio::time::sleep_until(shared.settled_at()), if !shared.settled() => {}
            _ = heartbeat.tick() => {
                let your_roots = identity::certs_from_pem(&link.roots_pem)
                    .map(|c| c.iter().map(identity::fingerprint).collect())
                    .unwrap_or_default();
                let m = Msg::Heartbeat(Heartbeat { sent_unix_ms: unix_now_ms(), your_roots });
                if tx.send(PeerMessage { msg: Some(m) }).await.is_err() { break; }
            }
            r = table.changed() => if r.is_err() { break },
            m = inbound.message() => match m {
                Ok(Some(PeerMessage { msg: Some(Msg::Unlinked(_)) })) => {
                    remove_link(&shared, &peer, "the peer unlinked").await;
                    break;
                }
                Ok(Some(m)) => apply(&shared, &peer, m).await,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "peering stream error");
                    break;
                }
            },
        }
    }
    // Not `mark`: an unlinked peer's entry is gone and must stay gone.
    if let Some(p) = shared.peers.lock().expect("peers lock").get_mut(&peer) {
        p.connected = false;
    }
    tracing::info!(%peer, "peering stream down");
}

async fn apply(shared: &Shared, peer: &str, m: PeerMessage) {
    let mut changed = false;
    // Services whose imports changed (a rebuild of those only).
    let mut keys: Vec<isthmus_core::naming::ServiceKey> = Vec::new();
    match m.msg {
        Some(Msg::Heartbeat(h)) => mark(shared, peer, |p| {
            p.last_heartbeat = Some(Instant::now());
            p.holds_our_roots = h.your_roots;
            if !p.imports.live {
                p.imports.live = true;
                changed = true;
            }
        }),
        Some(Msg::Exports(list)) => {
            let Some(td) = shared
                .state
                .lock()
                .expect("state lock")
                .links
                .get(peer)
                .map(|l| l.trust_domain.clone())
            else {
                return;
            };
            mark(shared, peer, |p| {
                p.last_heartbeat = Some(Instant::now());
                if !p.imports.live {
                    p.imports.live = true;
                    changed = true;
                }
                match imports::accept_exports(&mut p.imports, &td, list, isthmus_core::unix_now()) {
                    Err(problem) => {
                        if p.imports.problem.as_ref() != Some(&problem) {
                            tracing::warn!(%peer, %problem, "refusing the peer's export list");
                        }
                        p.imports.problem = Some(problem);
                    }
                    // An unchanged list (a reconnect, a peer resending)
                    // pushes nothing to sidecars and the gateway.
                    Ok(changed_keys) => {
                        p.imports.problem = None;
                        keys = changed_keys;
                    }
                }
            });
        }
        Some(Msg::Bundle(b)) => {
            let updated = shared
                .update(|state| {
                    let Some(link) = state.links.get_mut(peer) else {
                        return Ok(false);
                    };
                    if b.trust_domain != link.trust_domain || identity::certs_from_pem(&b.roots_pem).is_err() {
                        tracing::warn!(%peer, "ignoring malformed bundle update");
                        return Ok(false);
                    }
                    let before = link.clone();
                    link.roots_pem = b.roots_pem;
                    if !b.gateway_addr.is_empty() {
                        link.gateway_addr = b.gateway_addr;
                    }
                    Ok(*link != before)
                })
                .await;
            match updated {
                Ok(true) => {
                    shared.rebuild_bundles();
                    changed = true;
                }
                Ok(false) => {}
                Err(e) => tracing::error!(%peer, error = %e.message(), "saving bundle update failed"),
            }
        }
        Some(Msg::Unlinked(_)) | None => {}
    }
    if changed {
        shared.changed();
    } else if !keys.is_empty() {
        shared.changed_services(keys);
    }
}

/// End the link with `peer` on this side: its bundle, imports and gateway
/// go, so its workloads are refused from now on. False if it was not linked.
pub(crate) async fn remove_link(shared: &Shared, peer: &str, why: &str) -> bool {
    let removed = shared.update(|state| Ok(state.links.remove(peer).is_some())).await;
    match removed {
        Ok(true) => {
            shared.peers.lock().expect("peers lock").remove(peer);
            shared.metrics.forget_link(peer);
            shared.rebuild_bundles();
            shared.changed();
            tracing::warn!(%peer, reason = why, "link removed");
            true
        }
        Ok(false) => false,
        Err(e) => {
            tracing::error!(%peer, error = %e.message(), "removing the link failed");
            false
        }
    }
}

/// Set the import scope of the link with `peer` (validated whole: one bad
/// pattern changes nothing). NotFound if it is not linked.
pub(crate) async fn set_imports(shared: &Shared, peer: &str, imports: Vec<String>) -> Result<(), tonic::Status> {
    for p in &imports {
        isthmus_core::naming::ImportPattern::parse(p).map_err(|e| {
            tonic::Status::invalid_argument(format!("import pattern: {e}; use namespace/name, namespace/* or *"))
        })?;
    }
    let mut imports = imports;
    imports.sort();
    imports.dedup();
    // Reconcilers call this on every pass: no write when nothing changes.
    if shared
        .state
        .lock()
        .expect("state lock")
        .links
        .get(peer)
        .is_some_and(|l| l.imports == imports)
    {
        return Ok(());
    }
    let changed = shared
        .update(|state| {
            let known: Vec<String> = state.links.keys().cloned().collect();
            let link = state.links.get_mut(peer).ok_or_else(|| {
                tonic::Status::not_found(format!(
                    "no link with {peer:?} (links: {})",
                    if known.is_empty() {
                        "none".into()
                    } else {
                        known.join(", ")
                    }
                ))
            })?;
            let changed = link.imports != imports;
            link.imports = imports.clone();
            Ok(changed)
        })
        .await?;
    if changed {
        tracing::info!(%peer, scope = ?imports, "import scope set");
        shared.changed();
    }
    Ok(())
}

/// The joiner opened its peering stream: it has stored the link, so both
/// sides agree and the link is trusted for traffic from now on.
pub(crate) async fn confirm(shared: &Shared, peer: &str) -> Result<(), tonic::Status> {
    let pending = shared
        .state
        .lock()
        .expect("state lock")
        .links
        .get(peer)
        .is_some_and(|l| l.unconfirmed.is_some());
    if !pending {
        return Ok(());
    }
    let confirmed = shared
        .update(|state| Ok(state.links.get_mut(peer).and_then(|l| l.unconfirmed.take()).is_some()))
        .await?;
    if confirmed {
        tracing::info!(%peer, "link confirmed by the joining cluster");
        shared.changed();
    }
    Ok(())
}

/// Roll back links the joiner did not confirm in time: it failed its own
/// checks or could not store the link, so it never dialed.
async fn roll_back_unconfirmed(shared: &Shared) {
    let now = isthmus_core::unix_now();
    let late: Vec<String> = shared
        .state
        .lock()
        .expect("state lock")
        .links
        .values()
        .filter(|l| l.unconfirmed.as_ref().is_some_and(|u| now >= u.until_unix))
        .map(|l| l.cluster.clone())
        .collect();
    for peer in late {
        match shared.update(|state| Ok(join::roll_back(state, &peer))).await {
            Ok(true) => {
                tracing::warn!(%peer, "link rolled back: the joining cluster never confirmed it");
                shared.peers.lock().expect("peers lock").remove(&peer);
                shared.metrics.forget_link(&peer);
                shared.rebuild_bundles();
                shared.changed();
            }
            Ok(false) => {}
            Err(e) => tracing::error!(%peer, error = %e.message(), "rolling the link back failed"),
        }
    }
}

/// Withdraw the imports of peers whose heartbeats stopped for a lease.
pub(crate) async fn lease_keeper(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut expired = Vec::new();
        for (name, p) in shared.peers.lock().expect("peers lock").iter_mut() {
            let stale = p.last_heartbeat.is_none_or(|t| t.elapsed() > shared.cfg.import_lease);
            if p.imports.live && stale {
                p.imports.live = false;
                expired.push(name.clone());
            }
        }
        for peer in &expired {
            tracing::warn!(%peer, "no heartbeat for the import lease: imports withdrawn");
        }
        shared.advance_rotation().await;
        roll_back_unconfirmed(&shared).await;
        publish_metrics(&shared);
        if !expired.is_empty() {
            shared.changed();
        }
    }
}

/// Link gauges, which change with time alone, refreshed on the lease
/// keeper's tick.
fn publish_metrics(shared: &Shared) {
    let state = shared.state.lock().expect("state lock");
    for phase in [RootPhase::Staged, RootPhase::Signing, RootPhase::Retiring] {
        let n = state.roots.iter().filter(|r| r.phase == phase).count();
        shared
            .metrics
            .roots
            .get_or_create(&StateLabels { state: phase.as_str() })
            .set(n as i64);
    }
    if let Some(t) = shared.svid.not_after() {
        shared.metrics.svid_expiry.set(t);
    }
    let peers = shared.peers.lock().expect("peers lock");
    for link in state.links.values() {
        let rt = peers.get(&link.cluster);
        let age = rt.and_then(|p| p.last_heartbeat).map(|t| t.elapsed().as_secs_f64());
        let imports = rt
            .filter(|p| p.imports.live)
            .map(|p| p.imports.services.len())
            .unwrap_or(0);
        shared
            .metrics
            .link(&link.cluster, link_state(rt, shared.cfg.import_lease), age, imports);
    }
}
