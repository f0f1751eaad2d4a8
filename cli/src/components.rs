//! `isthmus controller|gateway|sidecar`: run one component in the foreground.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::error::CliError;
use crate::exit;

pub fn init_logging(filter: &str) {
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Options every component shares.
#[derive(clap::Args, Clone)]
pub struct Common {
    /// Write the bound addresses as JSON to this file once ready.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    /// Exit when the parent process goes away (set by `isthmus up`).
    #[arg(long, hide = true)]
    pub exit_with_parent: bool,
}

/// How a sidecar or gateway proves to its controller who it is.
#[derive(clap::Args, Clone)]
pub struct Credential {
    /// File holding this workload's credential (`isthmus workload
    /// credential`), or on Kubernetes its service-account token (projected,
    /// audience `isthmus`); it allows SVIDs for this identity only. Read
    /// again at each request, so a rotated token is picked up. Without it
    /// the cluster directory's admin token is used.
    #[arg(long, env = "ISTHMUS_CREDENTIAL_FILE")]
    pub credential_file: Option<PathBuf>,
}

impl Credential {
    /// The credential file, checked readable now.
    fn source(&self) -> Result<Option<isthmus_core::local::Credential>, CliError> {
        let Some(path) = &self.credential_file else {
            return Ok(None);
        };
        let c = isthmus_core::local::Credential::File(path.clone());
        c.current()
            .map_err(|e| CliError::new(exit::BAD_INPUT, format!("--credential-file {}: {e}", path.display())))?;
        Ok(Some(c))
    }
}

#[derive(clap::Args)]
pub struct ControllerArgs {
    /// Cluster directory: state, CA and the files local components read
    /// (local mode).
    #[arg(long, env = "ISTHMUS_DIR", required_unless_present_any = ["kube", "kubeconfig", "context"])]
    pub dir: Option<PathBuf>,
    /// Keep the state in the Kubernetes API instead (in-cluster config,
    /// KUBECONFIG or ~/.kube/config), and lead or stand by by a Lease.
    #[arg(long)]
    pub kube: bool,
    /// kubeconfig file (implies --kube).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// kubeconfig context (implies --kube).
    #[arg(long)]
    pub context: Option<String>,
    /// Namespace of the controller's own objects (Lease, Secrets, ConfigMap).
    #[arg(long, env = "ISTHMUS_NAMESPACE", default_value = isthmus_controller::config::DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// This replica's name in the Lease [default: $POD_NAME, else host name and pid].
    #[arg(long, env = "POD_NAME")]
    pub replica: Option<String>,
    /// How long a leader's Lease lasts without renewal: a standby takes
    /// over this long after the leader stops.
    #[arg(long, default_value_t = isthmus_controller::config::DEFAULT_LEASE.into())]
    pub lease: humantime::Duration,
    /// Control addresses components are told, comma separated (every
    /// replica's, or a Service name), if not the bound one.
    #[arg(long)]
    pub advertise_control: Option<String>,
    /// Serve the sidecar-injecting admission webhook here (with --kube);
    /// the leader serves it.
    #[arg(long)]
    pub webhook_addr: Option<SocketAddr>,
    /// A name the API server dials the webhook by: its Service's DNS name,
    /// or an IP (repeat) [default: isthmus-controller.<namespace>.svc].
    #[arg(long = "webhook-name")]
    pub webhook_names: Vec<String>,
    /// The image injected pods run the sidecar and its init step from.
    #[arg(long, default_value = concat!("isthmus:", env!("CARGO_PKG_VERSION")))]
    pub sidecar_image: String,
    /// Cluster name (lowercase letters, digits, '-').
    #[arg(long)]
    pub cluster: String,
    /// SPIFFE trust domain [default: <cluster>.mesh].
    #[arg(long)]
    pub trust_domain: Option<String>,
    /// Local control plane address (sidecars, gateway, CLI).
    #[arg(long, default_value = isthmus_controller::config::DEFAULT_CONTROL_ADDR)]
    pub control_addr: SocketAddr,
    /// Peering address other clusters' controllers dial.
    #[arg(long, default_value = isthmus_controller::config::DEFAULT_PEERING_ADDR)]
    pub peering_addr: SocketAddr,
    /// Peering address to put in join tokens, if not the bound one (host:port; host may be a DNS name).
    #[arg(long)]
    pub advertise_peering: Option<String>,
    /// Lifetime of the SVIDs this controller issues.
    #[arg(long, default_value_t = isthmus_controller::config::DEFAULT_SVID_TTL.into())]
    pub svid_ttl: humantime::Duration,
    /// A linked peer silent this long has its imports withdrawn.
    #[arg(long, default_value_t = isthmus_controller::config::DEFAULT_IMPORT_LEASE.into())]
    pub import_lease: humantime::Duration,
    /// Admin endpoint: /metrics (Prometheus), /ready, /live.
    #[arg(long, default_value = isthmus_controller::config::DEFAULT_ADMIN_ADDR)]
    pub admin_addr: SocketAddr,
    /// On first start, sign with this CA instead of generating a root: PEM
    /// with the signing certificate first, then its issuers up to your root
    /// (an intermediate of your own PKI, or a root). Needs --ca-key.
    #[arg(long, requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// The PEM private key of --ca-cert.
    #[arg(long, requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    #[command(flatten)]
    pub common: Common,
}

#[derive(clap::Args)]
pub struct GatewayArgs {
    /// Cluster directory of this cluster's controller.
    #[arg(long, env = "ISTHMUS_DIR")]
    pub dir: PathBuf,
    #[command(flatten)]
    pub credential: Credential,
    /// TCP address where local sidecars open tunnels (mTLS).
    #[arg(long, default_value = isthmus_gateway::config::DEFAULT_TUNNEL_ADDR)]
    pub tunnel_addr: SocketAddr,
    /// UDP address where peer gateways connect (QUIC).
    #[arg(long, default_value = isthmus_gateway::config::DEFAULT_QUIC_ADDR)]
    pub quic_addr: SocketAddr,
    /// QUIC address to announce to peers, if not the bound one (host:port; host may be a DNS name).
    #[arg(long)]
    pub advertise: Option<String>,
    /// How long open streams may finish at shutdown.
    #[arg(long, default_value_t = isthmus_gateway::config::DEFAULT_DRAIN.into())]
    pub drain: humantime::Duration,
    /// A peer gateway silent this long (no packet, not even an ACK of the
    /// keep-alives sent every quarter of it) is taken for dead: its tunnels
    /// are closed so callers fail over. Raise it on lossy paths.
    #[arg(long, default_value_t = isthmus_gateway::config::DEFAULT_PEER_TIMEOUT.into(), value_parser = parse_peer_timeout)]
    pub peer_timeout: humantime::Duration,
    /// Admin endpoint: /metrics (Prometheus), /ready, /live.
    #[arg(long, default_value = isthmus_gateway::config::DEFAULT_ADMIN_ADDR)]
    pub admin_addr: SocketAddr,
    /// DNS server (ip:port) for peer gateways' names, instead of the
    /// system's (/etc/resolv.conf). Repeat for several. Record TTLs are
    /// honoured (at most 5 min; a missing name is asked again after 5 s).
    #[arg(long = "dns-server", value_name = "ADDR")]
    pub dns_servers: Vec<SocketAddr>,
    /// Congestion control of the QUIC connections to peer gateways: cubic
    /// (the default), bbr (model-based: lossy paths) or newreno.
    #[arg(long, default_value_t = isthmus_gateway::config::Congestion::default())]
    pub congestion: isthmus_gateway::config::Congestion,
    #[command(flatten)]
    pub common: Common,
}

#[derive(clap::Args)]
pub struct SidecarArgs {
    /// Cluster directory of this cluster's controller.
    #[arg(long, env = "ISTHMUS_DIR")]
    pub dir: PathBuf,
    #[command(flatten)]
    pub credential: Credential,
    /// Namespace of the workload.
    #[arg(long)]
    pub namespace: String,
    /// Service the workload serves (omit for a client-only workload).
    #[arg(long, requires_all = ["port", "app"])]
    pub service: Option<String>,
    /// Service port clients call.
    #[arg(long)]
    pub port: Option<u16>,
    /// Where the workload listens (plain HTTP/1.1, or raw TCP for opaque
    /// connections; loopback).
    #[arg(long)]
    pub app: Option<SocketAddr>,
    /// The workload speaks HTTP/2 without TLS (h2c), as gRPC servers do.
    #[arg(long, requires = "app")]
    pub app_http2: bool,
    /// Service account of the workload [default: the service name, or "default"].
    #[arg(long)]
    pub service_account: Option<String>,
    /// Inbound mTLS address (other sidecars and the gateway connect here).
    #[arg(long, default_value = isthmus_sidecar::config::DEFAULT_INBOUND_ADDR)]
    pub inbound_addr: SocketAddr,
    /// Outbound address the workload sends requests to (HTTP proxy).
    #[arg(long, default_value = isthmus_sidecar::config::DEFAULT_OUTBOUND_ADDR)]
    pub outbound_addr: SocketAddr,
    /// Instance name reported in logs [default: the inbound address].
    #[arg(long)]
    pub instance: Option<String>,
    /// Admin endpoint: /metrics (Prometheus), /ready, /live.
    #[arg(long, default_value = isthmus_sidecar::config::DEFAULT_ADMIN_ADDR)]
    pub admin_addr: SocketAddr,
    /// How long an outbound request may wait for its response headers
    /// before the sidecar answers 504.
    #[arg(long, default_value_t = isthmus_sidecar::config::DEFAULT_REQUEST_TIMEOUT.into())]
    pub request_timeout: humantime::Duration,
    /// Print one JSON line per request (outbound and inbound) on stdout.
    #[arg(long, env = "ISTHMUS_ACCESS_LOG")]
    pub access_log: bool,
    /// Answer DNS for clusterset.local names here (UDP and TCP), with the
    /// outbound address's IP, and listen on that IP at every service port
    /// so unchanged clients can dial the names. Off by default.
    #[arg(long)]
    pub dns_addr: Option<SocketAddr>,
    /// The workload's TCP arrives redirected (`isthmus redirect` in its
    /// network namespace, or a pod's init step): route each connection by
    /// where it was going; DNS then answers each service with a virtual IP
    /// of its own (240.240.0.0/16). Run the sidecar as the user the rules
    /// exempt.
    #[arg(long)]
    pub transparent: bool,
    /// A service port whose connections are opaque TCP, without protocol
    /// detection (repeat, or comma-separate). Needed for server-first
    /// protocols, which would otherwise wait 1 s for detection.
    #[arg(long, value_delimiter = ',')]
    pub opaque_port: Vec<u16>,
    /// Export a span per request over OTLP to this collector base URL,
    /// e.g. http://127.0.0.1:4318 for HTTP (`/v1/traces` is appended) or
    /// http://127.0.0.1:4317 for gRPC. The other OTEL_* variables apply
    /// (headers, timeout, OTEL_TRACES_SAMPLER and _ARG, OTEL_BSP_*).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// The OTLP transport: http/protobuf or grpc.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_PROTOCOL", default_value = "http/protobuf", value_parser = isthmus_sidecar::otlp::Protocol::parse)]
    pub otlp_protocol: isthmus_sidecar::otlp::Protocol,
    /// Client connections open at once, per direction (from the app; from
    /// the mesh); more are closed as they arrive.
    #[arg(long, default_value_t = isthmus_sidecar::config::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Outbound requests in flight at once to one service; more are
    /// answered 503 `overloaded` at once rather than queued.
    #[arg(long, default_value_t = isthmus_sidecar::config::DEFAULT_MAX_REQUESTS_PER_SERVICE)]
    pub max_requests_per_service: usize,
    #[command(flatten)]
    pub common: Common,
}

/// A token cancelled by Ctrl-C, SIGTERM, or (if asked) the parent exiting.
pub fn shutdown_token(exit_with_parent: bool) -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending().await } } => {}
        }
        t.cancel();
    });
    if exit_with_parent {
        let t = token.clone();
        let parent = std::os::unix::process::parent_id();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if std::os::unix::process::parent_id() != parent {
                    t.cancel();
                    return;
                }
            }
        });
    }
    token
}

fn write_ready(path: Option<&Path>, v: serde_json::Value) -> Result<(), CliError> {
    if let Some(p) = path {
        isthmus_core::local::write_atomic(p, v.to_string().as_bytes(), false)
            .map_err(|e| CliError::new(exit::FAILURE, format!("{}: {e}", p.display())))?;
    }
    Ok(())
}

async fn finish(shutdown: CancellationToken, done: tokio::task::JoinHandle<()>) -> Result<(), CliError> {
    shutdown.cancelled().await;
    let _ = tokio::time::timeout(Duration::from_secs(15), done).await;
    Ok(())
}

pub async fn controller(a: ControllerArgs, log: &str) -> Result<(), CliError> {
    init_logging(log);
    let shutdown = shutdown_token(a.common.exit_with_parent);
    let td = a.trust_domain.clone().unwrap_or_else(|| format!("{}.mesh", a.cluster));
    let mut cfg = isthmus_controller::Config::new(a.dir.clone().unwrap_or_default(), &a.cluster, &td);
    if a.kube || a.kubeconfig.is_some() || a.context.is_some() {
        cfg.kube = Some(isthmus_controller::config::KubeSettings {
            kubeconfig: a.kubeconfig,
            context: a.context,
            replica: a.replica.unwrap_or_else(|| {
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
                format!("{}-{}", host.trim(), std::process::id())
            }),
            lease: a.lease.into(),
            webhook: a.webhook_addr.map(|addr| isthmus_controller::config::WebhookSettings {
                addr,
                names: if a.webhook_names.is_empty() {
                    let svc = format!("isthmus-controller.{}.svc", a.namespace);
                    vec![svc.clone(), format!("{svc}.cluster.local")]
                } else {
                    a.webhook_names.clone()
                },
                image: a.sidecar_image.clone(),
            }),
            namespace: a.namespace,
        });
    }
    cfg.advertise_control = a.advertise_control;
    cfg.control_addr = a.control_addr;
    cfg.peering_addr = a.peering_addr;
    cfg.advertise_peering = a.advertise_peering;
    cfg.svid_ttl = a.svid_ttl.into();
    cfg.import_lease = a.import_lease.into();
    cfg.admin_addr = Some(a.admin_addr);
    cfg.ca_files = a.ca_cert.zip(a.ca_key);
    let running = isthmus_controller::run(cfg, shutdown.clone()).await.map_err(|e| {
        let code = match e {
            isthmus_controller::ControllerError::Config(_) | isthmus_controller::ControllerError::Identity(_) => {
                exit::BAD_INPUT
            }
            _ => exit::FAILURE,
        };
        CliError::new(code, e.to_string())
    })?;
    write_ready(
        a.common.ready_file.as_deref(),
        serde_json::json!({
            "control": running.control_addr.to_string(),
            "peering": running.peering_addr.to_string(),
            "admin": running.admin_addr.map(|a| a.to_string()),
        }),
    )?;
    finish(shutdown, running.done).await
}

pub async fn gateway(a: GatewayArgs, log: &str) -> Result<(), CliError> {
    init_logging(log);
    let shutdown = shutdown_token(a.common.exit_with_parent);
    let cfg = isthmus_gateway::Config {
        credential: a.credential.source()?,
        dir: a.dir,
        tunnel_addr: a.tunnel_addr,
        quic_addr: a.quic_addr,
        advertise: a.advertise,
        drain: a.drain.into(),
        admin_addr: Some(a.admin_addr),
        peer_timeout: a.peer_timeout.into(),
        congestion: a.congestion,
        dns_servers: a.dns_servers,
    };
    let running = isthmus_gateway::run(cfg, shutdown.clone()).await.map_err(|e| {
        let code = match &e {
            isthmus_gateway::GatewayError::Agent(a) => agent_code(a),
            _ => exit::FAILURE,
        };
        CliError::new(code, e.to_string())
    })?;
    write_ready(
        a.common.ready_file.as_deref(),
        serde_json::json!({
            "tunnel": running.tunnel_addr.to_string(),
            "quic": running.quic_addr.to_string(),
            "admin": running.admin_addr.map(|a| a.to_string()),
        }),
    )?;
    finish(shutdown, running.done).await
}

pub async fn sidecar(a: SidecarArgs, log: &str) -> Result<(), CliError> {
    init_logging(log);
    let shutdown = shutdown_token(a.common.exit_with_parent);
    let serve = match (a.service.clone(), a.port, a.app) {
        (Some(service), Some(port), Some(app)) => Some(isthmus_sidecar::Serve {
            service,
            port,
            app,
            app_http2: a.app_http2,
        }),
        _ => None,
    };
    let sa = a
        .service_account
        .clone()
        .or_else(|| a.service.clone())
        .unwrap_or_else(|| "default".to_string());
    let cfg = isthmus_sidecar::Config {
        credential: a.credential.source()?,
        dir: a.dir,
        namespace: a.namespace,
        service_account: sa,
        serve,
        inbound_addr: a.inbound_addr,
        outbound_addr: a.outbound_addr,
        instance: a.instance.unwrap_or_else(|| a.inbound_addr.to_string()),
        admin_addr: Some(a.admin_addr),
        request_timeout: a.request_timeout.into(),
        access_log: a.access_log,
        dns_addr: a.dns_addr,
        transparent: a.transparent,
        opaque_ports: a.opaque_port,
        otlp_endpoint: a.otlp_endpoint,
        otlp_protocol: a.otlp_protocol,
        max_connections: a.max_connections,
        max_requests_per_service: a.max_requests_per_service,
    };
    let running = isthmus_sidecar::run(cfg, shutdown.clone()).await.map_err(|e| {
        let code = match &e {
            isthmus_sidecar::SidecarError::Agent(a) => agent_code(a),
            e if e.is_bad_input() => exit::BAD_INPUT,
            _ => exit::FAILURE,
        };
        CliError::new(code, e.to_string())
    })?;
    write_ready(
        a.common.ready_file.as_deref(),
        serde_json::json!({
            "inbound": running.inbound_addr.to_string(),
            "outbound": running.outbound_addr.to_string(),
            "id": running.id.to_string(),
            "admin": running.admin_addr.map(|a| a.to_string()),
            "dns": running.dns_addr.map(|a| a.to_string()),
        }),
    )?;
    finish(shutdown, running.done).await
}

/// The exit code of a component that could not get going with its
/// controller: the same as the admin commands' for the same cause.
fn agent_code(e: &isthmus_core::agent::AgentError) -> u8 {
    use isthmus_core::agent::AgentError;
    use isthmus_core::local::LocalError;
    match e {
        AgentError::Local(LocalError::NoController { .. }) => exit::NOT_FOUND,
        AgentError::Local(LocalError::Unreachable { .. }) => exit::UNREACHABLE,
        AgentError::Certificate(_) => exit::REFUSED,
        _ => exit::FAILURE,
    }
}

/// `--peer-timeout`, within `PEER_TIMEOUT_RANGE` (clap prints the error).
fn parse_peer_timeout(s: &str) -> Result<humantime::Duration, PeerTimeoutError> {
    let d = humantime::parse_duration(s)?;
    let range = isthmus_gateway::config::PEER_TIMEOUT_RANGE;
    if !range.contains(&d) {
        return Err(PeerTimeoutError::OutOfRange {
            given: s.to_string(),
            min: (*range.start()).into(),
            max: (*range.end()).into(),
        });
    }
    Ok(d.into())
}

#[derive(Debug, thiserror::Error)]
enum PeerTimeoutError {
    #[error(transparent)]
    Parse(#[from] humantime::DurationError),
    #[error("{given} is outside {min}..{max}")]
    OutOfRange {
        given: String,
        min: humantime::Duration,
        max: humantime::Duration,
    },
}
