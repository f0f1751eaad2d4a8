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
//!   port for clients that dial the name unchanged. A service is learned
//!   (subscribed to) on its first lookup or call (`services.rs`).
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
mod services;
mod telemetry;
pub mod trace;
pub mod transparent;
mod upgrade;
pub mod vip;

use std::net::SocketAddr;
use std::sync::Arc;
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
    /// What this sidecar has learned of the services it calls.
    learned: services::Learned,
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
                ("service.name", ServiceKey::new(&cfg.namespace, who).to_string()),
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
        learned: Default::default(),
    });
    tracing::info!(%id, %inbound_addr, %outbound_addr, app = ?sc.cfg.serve.as_ref().map(|s| s.app), "sidecar ready");

    if sc.cfg.transparent {
        tokio::spawn(services::follow_vips(sc.clone(), shutdown.clone()));
    }
    let mut dns_addr = None;
    if let Some(addr) = sc.cfg.dns_addr {
        let resolve: dns::Resolve = Arc::new(services::Names {
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

impl Sidecar {
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
