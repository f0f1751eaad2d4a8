//! The Isthmus sidecar: the proxy beside each workload.
//!
//! - Outbound (`outbound/`): plain HTTP from the local app, routed by policy
//!   and health (`router.rs`, `route.rs`, `health.rs`) to local endpoints
//!   (`admission.rs`, `balance.rs`) or through the gateway to another
//!   cluster, inside an end-to-end mTLS session with the serving sidecar
//!   (`pool.rs`); sent again where HTTP allows (`outbound/retry.rs`).
//! - Inbound (`inbound.rs`): mTLS only; the client's SVID is verified
//!   against the bundle of its own trust domain, and the app gets the
//!   client's SPIFFE ID in `x-isthmus-client-id`.
//! - Ejected (service, cluster) pairs are probed back (`probe.rs`).
//! - With DNS on (`dns.rs`, `ports.rs`, `detect.rs`): `clusterset.local`
//!   names resolve to the outbound address, which listens on every service
//!   port for clients that dial the name unchanged.
//! - Transparent (`transparent.rs`, `vip.rs`): the workload's TCP arrives
//!   redirected by the rules of `redirect.rs`, and goes where its original
//!   destination says (a service's virtual or ClusterSet IP, or through).
//! - What goes wrong is told in one place (`error.rs`); metrics, access
//!   lines and spans in `metrics.rs`, `telemetry.rs`, `trace.rs`, `otlp.rs`.
//!
//! This file only wires the pieces together.

mod admission;
pub mod balance;
mod body;
pub mod config;
pub mod detect;
pub mod dns;
pub mod error;
pub mod health;
mod inbound;
pub mod metrics;
pub mod otlp;
mod outbound;
mod pool;
mod ports;
mod probe;
pub mod redirect;
pub mod route;
mod router;
mod telemetry;
pub mod trace;
pub mod transparent;
mod upgrade;
pub mod vip;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use isthmus_core::agent::{Agent, AgentError};
use isthmus_core::identity::{SpiffeId, validate_name};
use isthmus_core::local::ClusterDir;
use isthmus_core::naming::{ServiceKey, ServiceName};
use isthmus_core::tls::{self, ClientAuth};
use isthmus_proto::{SidecarRegistration, watch_request};
use tokio_util::sync::CancellationToken;

pub use config::{Config, Serve};
pub use error::{ERROR_HEADER, ErrorKind};
pub use inbound::{CLIENT_ID_HEADER, SERVED_BY_HEADER};
pub use probe::PROBE_HEADER;

use crate::metrics::{Direction, RouteLabels};
use crate::route::{RouteError, Target};

#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error(transparent)]
    Bind(#[from] isthmus_core::net::BindError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Name(#[from] isthmus_core::identity::IdentityError),
    #[error("cannot serve DNS on {addr}: {source}")]
    Dns { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Otlp(#[from] otlp::OtlpError),
}

impl SidecarError {
    /// Whether the operator's input is at fault (rather than the system).
    pub fn is_bad_input(&self) -> bool {
        matches!(self, SidecarError::Name(_) | SidecarError::Otlp(_))
    }
}

pub struct Running {
    pub inbound_addr: SocketAddr,
    pub outbound_addr: SocketAddr,
    pub id: SpiffeId,
    pub admin_addr: Option<SocketAddr>,
    pub dns_addr: Option<SocketAddr>,
    pub done: tokio::task::JoinHandle<()>,
}

/// What every task of a sidecar shares. Each part keeps its own state
/// behind its own lock.
struct Sidecar {
    cfg: Config,
    agent: Agent,
    app_client: inbound::AppClient,
    pool: pool::Pool,
    limits: admission::Limits,
    budgets: admission::Budgets,
    endpoints: admission::Endpoints,
    router: router::Router,
    metrics: metrics::Metrics,
    otlp: Option<otlp::Exporter>,
    /// Transparent mode: each known service's virtual IP.
    vips: arc_swap::ArcSwap<vip::Vips>,
    /// Service ports `ports::follow` has tried to listen on (open or not).
    ports_tried: tokio::sync::watch::Sender<std::collections::BTreeSet<u16>>,
    /// Addresses the controller said are no ClusterSet IP, and when.
    ip_misses: Mutex<std::collections::HashMap<std::net::IpAddr, Instant>>,
}

pub async fn run(cfg: Config, shutdown: CancellationToken) -> Result<Running, SidecarError> {
    let mut names = vec![&cfg.namespace, &cfg.service_account];
    names.extend(cfg.serve.as_ref().map(|s| &s.service));
    for n in names {
        validate_name(n)?;
    }
    let (inbound, inbound_addr) = isthmus_core::net::bind(cfg.inbound_addr).await?;
    let (outbound, outbound_addr) = isthmus_core::net::bind(cfg.outbound_addr).await?;

    let dir = ClusterDir::new(&cfg.dir);
    let node = watch_request::Node::Sidecar(SidecarRegistration {
        namespace: cfg.namespace.clone(),
        service: cfg.serve.as_ref().map(|s| s.service.clone()).unwrap_or_default(),
        port: cfg.serve.as_ref().map(|s| u32::from(s.port)).unwrap_or_default(),
        inbound_addr: inbound_addr.to_string(),
        instance: cfg.instance.clone(),
        identity: String::new(),
        service_account: cfg.service_account.clone(),
    });
    let agent = Agent::start(
        &dir,
        cfg.credential.as_ref(),
        &cfg.namespace,
        &cfg.service_account,
        // Services are subscribed to as they are first called (`Sidecar::
        // known`): a sidecar holds nothing of a service it never calls.
        isthmus_core::agent::Registration {
            node,
            scope: isthmus_proto::WatchScope::Subscribed,
        },
        config::CONTROLLER_WAIT,
        shutdown.clone(),
    )
    .await?;
    let id = agent.id();
    let inbound_tls = tls::server_config(
        agent.svid.clone(),
        agent.bundles.clone(),
        ClientAuth::Required,
        &[tls::ALPN_H2, tls::ALPN_OPAQUE],
    )?;
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = metrics::Metrics::register(&mut registry);
    agent.svid_metrics.register(&mut registry);
    let ready = isthmus_core::metrics::Ready::default();
    let admin_addr =
        isthmus_core::metrics::serve_admin(cfg.admin_addr, registry, ready.clone(), shutdown.clone()).await?;
    let otlp = match &cfg.otlp_endpoint {
        None => None,
        Some(endpoint) => {
            let who = cfg.serve.as_ref().map_or(&cfg.service_account, |s| &s.service);
            let resource = vec![
                ("service.name", format!("{}/{who}", cfg.namespace)),
                ("service.instance.id", cfg.instance.clone()),
                ("isthmus.cluster", agent.cluster.clone()),
            ];
            Some(otlp::Exporter::start(
                endpoint,
                cfg.otlp_protocol,
                resource,
                metrics.spans.clone(),
                shutdown.clone(),
            )?)
        }
    };
    let sc = Arc::new(Sidecar {
        app_client: inbound::app_client(cfg.serve.as_ref().is_some_and(|s| s.app_http2)),
        pool: pool::Pool::default(),
        limits: admission::Limits::new(cfg.max_connections, cfg.max_requests_per_service),
        budgets: admission::Budgets::new(Instant::now()),
        endpoints: admission::Endpoints::default(),
        router: router::Router::default(),
        otlp,
        metrics,
        agent,
        cfg,
        vips: Default::default(),
        ports_tried: Default::default(),
        ip_misses: Default::default(),
    });
    tracing::info!(%id, %inbound_addr, %outbound_addr, app = ?sc.cfg.serve.as_ref().map(|s| s.app), "sidecar ready");

    if sc.cfg.transparent {
        tokio::spawn(follow_vips(sc.clone(), shutdown.clone()));
    }
    let mut dns_addr = None;
    if let Some(addr) = sc.cfg.dns_addr {
        let resolve: dns::Resolve = Arc::new(Names {
            sc: sc.clone(),
            ip: outbound_addr.ip(),
        });
        dns_addr = Some(
            dns::serve(addr, resolve, shutdown.clone())
                .await
                .map_err(|source| SidecarError::Dns { addr, source })?,
        );
        if !sc.cfg.transparent {
            tokio::spawn(ports::follow(sc.clone(), outbound_addr.ip(), shutdown.clone()));
        }
        tracing::info!(dns = ?dns_addr, transparent = sc.cfg.transparent, "answering DNS for clusterset.local");
    }
    tokio::spawn(probe::probe_ejected(sc.clone(), shutdown.clone()));
    let t1 = tokio::spawn(inbound::serve(sc.clone(), inbound, inbound_tls, shutdown.clone()));
    let t2 = if sc.cfg.transparent {
        tokio::spawn(transparent::serve(sc.clone(), outbound, shutdown.clone()))
    } else {
        tokio::spawn(outbound::serve(sc.clone(), outbound, shutdown.clone()))
    };
    let done = tokio::spawn(async move {
        let _ = tokio::join!(t1, t2);
    });
    ready.set(true);
    Ok(Running {
        inbound_addr,
        outbound_addr,
        id,
        admin_addr,
        dns_addr,
        done,
    })
}

/// Keep the virtual IPs in step with the known services.
async fn follow_vips(sc: Arc<Sidecar>, stop: CancellationToken) {
    let mut rx = sc.agent.config.clone();
    loop {
        rx.borrow_and_update();
        sc.refresh_vips();
        tokio::select! {
            _ = stop.cancelled() => return,
            r = rx.changed() => if r.is_err() { return },
        }
    }
}

/// What the sidecar's DNS answers with.
struct Names {
    sc: Arc<Sidecar>,
    /// The outbound address, where the service ports listen.
    ip: std::net::IpAddr,
}

impl dns::Names for Names {
    fn prepare<'a>(&'a self, name: &'a ServiceName) -> futures::future::BoxFuture<'a, ()> {
        Box::pin(async move {
            let key = name.key();
            self.sc.learn(&key).await;
            if self.sc.cfg.transparent {
                self.sc.refresh_vips();
                return;
            }
            // The answer is only good once the port listens.
            let Some(port) = self.sc.port_of(&key) else { return };
            let mut tried = self.sc.ports_tried.subscribe();
            let _ = tokio::time::timeout(config::PORT_WAIT, tried.wait_for(|t| t.contains(&port))).await;
        })
    }

    fn resolve(&self, name: &ServiceName) -> Option<std::net::IpAddr> {
        self.sc.resolve(name, self.ip)
    }
}

impl Sidecar {
    /// Whether this sidecar holds `key`'s service now.
    fn knows(&self, key: &ServiceKey) -> bool {
        self.port_of(key).is_some()
    }

    fn port_of(&self, key: &ServiceKey) -> Option<u16> {
        let snap = self.agent.config.borrow();
        isthmus_core::delta::find(&snap, &key.namespace, &key.name).and_then(|s| u16::try_from(s.port).ok())
    }

    /// Before the first call to a service: subscribe to it and wait (up to
    /// `LEARN_WAIT`) for the controller's answer. Afterwards, free.
    pub(crate) async fn learn(&self, key: &ServiceKey) {
        if !self.knows(key) && !self.agent.ensure(&key.to_string(), config::LEARN_WAIT).await {
            tracing::warn!(service = %key, "the controller did not answer for this service in time");
        }
    }

    /// Give every held service a virtual IP, keeping those already given.
    fn refresh_vips(&self) {
        let keys: Vec<ServiceKey> = self
            .agent
            .config
            .borrow()
            .services
            .iter()
            .map(|s| ServiceKey::new(&s.namespace, &s.name))
            .collect();
        self.vips.rcu(|v| Arc::new(v.extended(&keys)));
    }

    /// The address DNS gives a service name: its virtual IP in transparent
    /// mode, else the outbound address (`ip`), where it listens on every
    /// service port; `None` for a service nobody serves or exports.
    fn resolve(&self, name: &ServiceName, ip: std::net::IpAddr) -> Option<std::net::IpAddr> {
        if !self.knows(&name.key()) {
            return None;
        }
        if self.cfg.transparent {
            return self.vips.load().ip_of(&name.key()).map(std::net::IpAddr::V4);
        }
        Some(ip)
    }

    /// The service a redirected connection to `ip` is for: a virtual IP,
    /// or a ClusterSet IP of a service the controller told of.
    fn service_at(&self, ip: std::net::IpAddr) -> Option<ServiceName> {
        let key = self.vips.load().service_at(ip).cloned().or_else(|| {
            let text = ip.to_string();
            self.agent
                .config
                .borrow()
                .services
                .iter()
                .find(|s| s.clusterset_ips.contains(&text))
                .map(|s| ServiceKey::new(&s.namespace, &s.name))
        })?;
        Some(ServiceName {
            cluster: None,
            namespace: key.namespace,
            name: key.name,
        })
    }

    /// `service_at`, asking the controller about an address not held yet
    /// (a ClusterSet IP dialled without a DNS lookup through this
    /// sidecar); an address it says is none is not asked about again for
    /// `IP_MISS_TTL`.
    pub(crate) async fn service_at_learning(&self, ip: std::net::IpAddr) -> Option<ServiceName> {
        if let Some(name) = self.service_at(ip) {
            return Some(name);
        }
        let now = Instant::now();
        {
            let mut misses = self.ip_misses.lock().expect("ip misses lock");
            if misses
                .get(&ip)
                .is_some_and(|t| now.duration_since(*t) < config::IP_MISS_TTL)
            {
                return None;
            }
            if misses.len() >= 4096 {
                misses.clear();
            }
        }
        self.agent.ensure(&format!("ip:{ip}"), config::LEARN_WAIT).await;
        let found = self.service_at(ip);
        if found.is_none() {
            self.ip_misses.lock().expect("ip misses lock").insert(ip, now);
        }
        found
    }

    /// Route `name:port` (see `Router::route`) on the current config, and
    /// label the request with the cluster it goes to.
    fn route(
        &self,
        name: &ServiceName,
        port: Option<u16>,
        headers: Option<&http::HeaderMap>,
        failed: &[String],
        labels: &mut RouteLabels,
    ) -> Result<Target, RouteError> {
        let snap = self.agent.config.borrow();
        let target = self.router.route(&snap, name, port, headers, failed, &self.metrics)?;
        labels.destination_cluster = target.cluster.clone();
        Ok(target)
    }

    /// Whether this workload's service is exported to linked clusters.
    fn exported(&self) -> bool {
        let Some(serve) = &self.cfg.serve else { return false };
        let snap = self.agent.config.borrow();
        snap.services
            .iter()
            .any(|s| s.namespace == self.cfg.namespace && s.name == serve.service && s.exported)
    }

    /// Metric labels of a connection from `client` to this workload.
    fn inbound_route(&self, client: &SpiffeId) -> RouteLabels {
        RouteLabels {
            direction: Direction::Inbound,
            source_cluster: self.cluster_of(&client.trust_domain),
            destination_cluster: self.agent.cluster.clone(),
            destination_service: self
                .cfg
                .serve
                .as_ref()
                .map(|s| isthmus_core::naming::ServiceKey::new(&self.cfg.namespace, &s.service).to_string())
                .unwrap_or_default(),
        }
    }

    /// The cluster a trust domain belongs to, for metric labels.
    fn cluster_of(&self, trust_domain: &str) -> String {
        let snap = self.agent.config.borrow();
        if trust_domain == snap.trust_domain {
            return snap.cluster.clone();
        }
        snap.peers
            .iter()
            .find(|p| p.trust_domain == trust_domain)
            .map(|p| p.cluster.clone())
            .unwrap_or_else(|| "unknown".into())
    }
}
