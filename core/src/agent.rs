//! What a sidecar or gateway needs from its controller: an SVID (by CSR, the
//! key never leaves this process), renewed at half its life, and a config
//! stream that keeps the last snapshot if the controller goes away.

use std::sync::Arc;
use std::time::Duration;

use std::collections::{BTreeSet, HashSet};
use std::sync::Mutex;

use isthmus_proto::{CertificateRequest, ConfigSnapshot, WatchRequest, WatchScope, watch_request};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tokio::sync::watch;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::bundle::TrustBundles;
use crate::identity::{self, IdentityError, SpiffeId, Svid, WorkloadKey};
use crate::local::{ClusterDir, Credential, LocalClient, LocalError, error_chain};
use crate::tls::{SharedBundles, SvidResolver, TlsError};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Local(#[from] LocalError),
    #[error("the controller refused the certificate request: {0}")]
    Certificate(String),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("no config from the controller: {0}")]
    Config(String),
    #[error("stopped before the controller answered")]
    Cancelled,
}

/// The SVID's health, for the component's `/metrics`.
#[derive(Clone, Default)]
pub struct SvidMetrics {
    expiry: Gauge,
    renewals: Family<ResultLabel, Counter>,
    root: Family<RootLabel, Gauge>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RootLabel {
    root: String,
}

impl SvidMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "isthmus_svid_expiry_timestamp_seconds",
            "When this component's SVID expires (Unix time); it renews at half-life",
            self.expiry.clone(),
        );
        registry.register(
            "isthmus_svid_renewals",
            "SVID renewals by result (ok, error)",
            self.renewals.clone(),
        );
        registry.register(
            "isthmus_svid_root",
            "1 for the root (first 16 hex digits of its SHA-256) the current SVID chains to",
            self.root.clone(),
        );
    }

    fn observe(&self, resolver: &SvidResolver) {
        if let Some(t) = resolver.not_after() {
            self.expiry.set(t);
        }
        self.root.clear();
        if let Some(fp) = resolver.anchor_fingerprint() {
            self.root
                .get_or_create(&RootLabel {
                    root: fp[..16].to_string(),
                })
                .set(1);
        }
    }
}

/// A data-plane component's link to its controller.
pub struct Agent {
    pub svid: Arc<SvidResolver>,
    /// Own trust domain and every linked peer's.
    pub bundles: SharedBundles,
    pub config: watch::Receiver<Arc<ConfigSnapshot>>,
    pub cluster: String,
    pub trust_domain: String,
    pub svid_metrics: SvidMetrics,
    subs: Arc<Subscriptions>,
}

/// The services a component has subscribed to (scope Subscribed), which
/// the controller has answered, and where to send new ones.
#[derive(Default)]
struct Subscriptions {
    /// Everything subscribed: sent again on every new stream.
    wanted: Mutex<BTreeSet<String>>,
    answered: Mutex<HashSet<String>>,
    /// Bumped after each answer is applied.
    answers: watch::Sender<u64>,
    /// Requests of the current stream.
    tx: Mutex<Option<mpsc::UnboundedSender<WatchRequest>>>,
}

impl Subscriptions {
    /// A new stream: its first request registers and subscribes to
    /// everything wanted so far.
    fn open(&self, mut first: WatchRequest) -> UnboundedReceiverStream<WatchRequest> {
        let (tx, rx) = mpsc::unbounded_channel();
        first.subscribe = self.wanted.lock().expect("wanted lock").iter().cloned().collect();
        let _ = tx.send(first);
        *self.tx.lock().expect("tx lock") = Some(tx);
        UnboundedReceiverStream::new(rx)
    }

    fn answer(&self, items: &[String]) {
        if items.is_empty() {
            return;
        }
        self.answered
            .lock()
            .expect("answered lock")
            .extend(items.iter().cloned());
        self.answers.send_modify(|n| *n += 1);
    }
}

/// How a component registers: as what, and which services it hears of.
pub struct Registration {
    pub node: watch_request::Node,
    pub scope: WatchScope,
}

impl Agent {
    /// Connect (waiting up to `wait` for the controller to come up), get an
    /// SVID for `namespace/service_account`, register and receive a first
    /// config snapshot. `credential` is the workload credential the
    /// controller issued for that identity; without one, the cluster
    /// directory's admin token is used (a component the operator runs).
    pub async fn start(
        dir: &ClusterDir,
        credential: Option<&Credential>,
        namespace: &str,
        service_account: &str,
        registration: Registration,
        wait: Duration,
        shutdown: CancellationToken,
    ) -> Result<Self, AgentError> {
        let deadline = tokio::time::Instant::now() + wait;
        let client = loop {
            let connected = match credential {
                Some(c) => dir.connect_as(c.clone()).await,
                None => dir.connect().await,
            };
            match connected {
                Ok(c) => break c,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "controller not ready yet");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Err(AgentError::Cancelled),
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                }
                Err(e) => return Err(e.into()),
            }
        };
        let (svid, not_after) = request_svid(&client, namespace, service_account).await?;
        let resolver = SvidResolver::new(&svid)?;
        let svid_metrics = SvidMetrics::default();
        svid_metrics.observe(&resolver);
        tracing::info!(id = %svid.id, "SVID issued");

        let bundles = client.bundles.clone();
        let req = WatchRequest {
            node: Some(registration.node),
            resume: false,
            subscribe: Vec::new(),
            scope: registration.scope.into(),
            incremental: true,
        };
        let subs = Arc::new(Subscriptions::default());
        let mut stream = client
            .control()
            .watch_config(subs.open(req.clone()))
            .await
            .map_err(|s| AgentError::Config(s.message().to_string()))?
            .into_inner();
        let first = stream
            .message()
            .await
            .map_err(|s| AgentError::Config(s.message().to_string()))?
            .ok_or_else(|| AgentError::Config("stream closed".into()))?;
        let mut held = ConfigSnapshot::default();
        crate::delta::apply(&mut held, first);
        apply_bundles(&bundles, &held);
        let cluster = held.cluster.clone();
        let trust_domain = held.trust_domain.clone();
        let (tx, rx) = watch::channel(Arc::new(held.clone()));

        tokio::spawn(
            Watch {
                client: client.clone(),
                req,
                tx,
                bundles: bundles.clone(),
                subs: subs.clone(),
                held,
            }
            .run(Some(stream), shutdown.clone()),
        );
        let renewer = Renewer {
            client,
            ns: namespace.to_string(),
            sa: service_account.to_string(),
            resolver: resolver.clone(),
            metrics: svid_metrics.clone(),
        };
        tokio::spawn(renewer.run(not_after, rx.clone(), shutdown));
        Ok(Self {
            svid: resolver,
            bundles,
            config: rx,
            cluster,
            trust_domain,
            svid_metrics,
            subs,
        })
    }

    pub fn id(&self) -> SpiffeId {
        self.svid.id()
    }

    /// Make sure the controller has told this component about `item` (a
    /// `namespace/name` key, or `ip:ADDRESS`): subscribe if not yet, and
    /// wait up to `wait` for the answer. True once answered (the service
    /// is then in `config`, or unknown to the cluster).
    pub async fn ensure(&self, item: &str, wait: Duration) -> bool {
        if self.subs.answered.lock().expect("answered lock").contains(item) {
            return true;
        }
        let mut answers = self.subs.answers.subscribe();
        if self.subs.wanted.lock().expect("wanted lock").insert(item.to_string())
            && let Some(tx) = self.subs.tx.lock().expect("tx lock").as_ref()
        {
            let _ = tx.send(WatchRequest {
                subscribe: vec![item.to_string()],
                ..Default::default()
            });
        }
        let done = |subs: &Subscriptions| subs.answered.lock().expect("answered lock").contains(item);
        let answered = tokio::time::timeout(wait, async {
            loop {
                if done(&self.subs) {
                    return;
                }
                if answers.changed().await.is_err() {
                    return std::future::pending().await;
                }
            }
        })
        .await
        .is_ok();
        // An address is looked up when asked, not followed: ask again next
        // time rather than remember that it was unknown.
        if item.starts_with("ip:") && answered {
            self.subs.answered.lock().expect("answered lock").remove(item);
            self.subs.wanted.lock().expect("wanted lock").remove(item);
        }
        answered
    }
}

/// A fresh key and an SVID for `ns/sa` from the controller `client` talks
/// to, with its expiry (Unix seconds).
pub async fn request_svid(client: &LocalClient, ns: &str, sa: &str) -> Result<(Svid, i64), AgentError> {
    let key = WorkloadKey::generate()?;
    let resp = client
        .control()
        .issue_certificate(CertificateRequest {
            csr_pem: key.csr_pem()?,
            namespace: ns.to_string(),
            service_account: sa.to_string(),
        })
        .await
        .map_err(|s| AgentError::Certificate(s.message().to_string()))?
        .into_inner();
    let chain = identity::certs_from_pem(&resp.cert_chain_pem)?;
    let id = SpiffeId::parse(&resp.spiffe_id)?;
    Ok((
        Svid {
            id,
            chain,
            key: key.private_key_der(),
        },
        resp.not_after_unix,
    ))
}

fn apply_bundles(bundles: &SharedBundles, snap: &ConfigSnapshot) {
    let mut b = TrustBundles::new();
    for tb in &snap.bundles {
        if let Err(e) = b.set_pem(&tb.trust_domain, &tb.roots_pem) {
            tracing::warn!(trust_domain = %tb.trust_domain, error = %e, "unusable trust bundle");
        }
    }
    bundles.store(Arc::new(b));
}

/// The config stream, reconnected after a loss; applies each message to
/// the config held and publishes the result.
struct Watch {
    client: LocalClient,
    req: WatchRequest,
    tx: watch::Sender<Arc<ConfigSnapshot>>,
    bundles: SharedBundles,
    subs: Arc<Subscriptions>,
    held: ConfigSnapshot,
}

impl Watch {
    async fn run(mut self, mut stream: Option<tonic::Streaming<ConfigSnapshot>>, shutdown: CancellationToken) {
        // Every later stream resumes: this component keeps serving from its
        // last config until the controller it reaches has settled.
        self.req.resume = true;
        let mut backoff = RECONNECT_MIN;
        loop {
            if let Some(s) = stream.as_mut() {
                loop {
                    let msg = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        m = s.message() => m,
                    };
                    match msg {
                        Ok(Some(update)) => {
                            backoff = RECONNECT_MIN;
                            let answered = update.answered.clone();
                            let cluster = !update.delta || update.cluster_changed;
                            crate::delta::apply(&mut self.held, update);
                            if cluster {
                                apply_bundles(&self.bundles, &self.held);
                            }
                            self.tx.send_replace(Arc::new(self.held.clone()));
                            self.subs.answer(&answered);
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(error = %e.message(), "config stream lost; serving from the last config");
                            break;
                        }
                    }
                }
            }
            stream = None;
            *self.subs.tx.lock().expect("tx lock") = None;
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(jittered(backoff)) => {}
            }
            backoff = (backoff * 2).min(RECONNECT_MAX);
            match self
                .client
                .control()
                .watch_config(self.subs.open(self.req.clone()))
                .await
            {
                Ok(s) => stream = Some(s.into_inner()),
                Err(e) => tracing::debug!(error = %error_chain(&e), "controller unreachable"),
            }
        }
    }
}

/// First retry after a lost config stream; doubles up to `RECONNECT_MAX`.
const RECONNECT_MIN: Duration = Duration::from_millis(100);
/// The longest a component waits between attempts to reach its controller.
/// Kept under the controller's settle time (`isthmus_controller::config::
/// SETTLE`, which asserts it), so every component is back within that
/// window when a standby takes over, and the new leader's first word to
/// peers and gateways includes them all.
pub const RECONNECT_MAX: Duration = Duration::from_millis(1000);

/// `d` less up to a quarter, so components that lost the same controller
/// do not all knock at once.
fn jittered(d: Duration) -> Duration {
    d.mul_f64(1.0 - rand::random::<f64>() / 4.0)
}

/// Whether the controller signs under another root than our SVID's.
fn signer_moved(resolver: &SvidResolver, snap: &ConfigSnapshot) -> bool {
    !snap.signing_root.is_empty() && resolver.anchor_fingerprint().as_deref() != Some(&snap.signing_root)
}

/// Renew at half the SVID's remaining life, and at once when the cluster's
/// signing root changes (a rotation), without dropping connections: the
/// resolver hands the new certificate to new handshakes only.
struct Renewer {
    client: LocalClient,
    ns: String,
    sa: String,
    resolver: Arc<SvidResolver>,
    metrics: SvidMetrics,
}

impl Renewer {
    async fn run(
        self,
        mut not_after: i64,
        mut config: watch::Receiver<Arc<ConfigSnapshot>>,
        shutdown: CancellationToken,
    ) {
        let Renewer {
            client,
            ns,
            sa,
            resolver,
            metrics,
        } = self;
        let mut retry = Duration::from_millis(200);
        loop {
            let left = (not_after - crate::unix_now()).max(2) as u64;
            let half_life = tokio::time::sleep(Duration::from_secs(left / 2));
            tokio::pin!(half_life);
            loop {
                if signer_moved(&resolver, &config.borrow_and_update()) {
                    tracing::info!("the cluster's signing root changed: renewing now");
                    break;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = &mut half_life => break,
                    r = config.changed() => if r.is_err() { return },
                }
            }
            match request_svid(&client, &ns, &sa).await {
                Ok((svid, na)) => match resolver.update(&svid) {
                    Ok(()) => {
                        not_after = na;
                        retry = Duration::from_millis(200);
                        metrics.observe(&resolver);
                        metrics.renewals.get_or_create(&ResultLabel { result: "ok" }).inc();
                        tracing::info!(id = %svid.id, not_after = na, "SVID renewed");
                        continue;
                    }
                    Err(e) => tracing::error!(error = %e, "renewed SVID unusable"),
                },
                Err(e) => tracing::warn!(error = %e, "SVID renewal failed; retrying"),
            }
            metrics.renewals.get_or_create(&ResultLabel { result: "error" }).inc();
            // Back off before the next attempt, so a signer change that cannot
            // be served yet is not asked for in a busy loop.
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(retry) => {}
            }
            retry = (retry * 2).min(Duration::from_secs(10));
        }
    }
}
