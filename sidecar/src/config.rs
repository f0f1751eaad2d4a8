//! How a sidecar runs. Every default lives here once; the command line
//! (`isthmus sidecar`) reads these constants for its own defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Inbound mTLS address (other sidecars and the gateway connect here).
pub const DEFAULT_INBOUND_ADDR: &str = "127.0.0.1:15006";
/// Outbound address the workload sends requests to (HTTP proxy).
pub const DEFAULT_OUTBOUND_ADDR: &str = "127.0.0.1:15001";
/// Admin endpoint: `/metrics`, `/ready`, `/live`.
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:15020";
/// How long an outbound request may wait for its response headers.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Client connections open at once, per direction.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Outbound requests in flight at once to one service.
pub const DEFAULT_MAX_REQUESTS_PER_SERVICE: usize = 1_000;
/// How long the first call to a service waits for the controller to tell
/// this sidecar about it (its subscription's answer); a sidecar learns a
/// service when it is first called, and holds nothing of the rest.
pub const LEARN_WAIT: Duration = Duration::from_secs(2);
/// How long a DNS answer waits for the listener on the service's port.
pub const PORT_WAIT: Duration = Duration::from_secs(1);
/// How long a connection to an address that is no ClusterSet IP skips the
/// controller's lookup (transparent mode).
pub const IP_MISS_TTL: Duration = Duration::from_secs(30);
/// How long a starting sidecar waits for its controller to come up.
pub const CONTROLLER_WAIT: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
pub struct Config {
    pub dir: PathBuf,
    /// Workload credential for this identity (else the admin token).
    pub credential: Option<isthmus_core::local::Credential>,
    pub namespace: String,
    pub service_account: String,
    /// The service this workload serves, with the port clients call and
    /// where the workload itself listens (plain HTTP on loopback). `None`
    /// for a client-only workload.
    pub serve: Option<Serve>,
    pub inbound_addr: SocketAddr,
    pub outbound_addr: SocketAddr,
    pub instance: String,
    /// Admin endpoint (`/metrics`, `/ready`, `/live`), if any.
    pub admin_addr: Option<SocketAddr>,
    /// How long an outbound request may wait for its response headers.
    pub request_timeout: Duration,
    /// Print one JSON line per request on stdout.
    pub access_log: bool,
    /// Answer DNS for `clusterset.local` here, and listen on the outbound
    /// address's IP at every service port.
    pub dns_addr: Option<SocketAddr>,
    /// Connections arrive redirected (`isthmus redirect`): route each by
    /// its original destination; DNS answers virtual IPs.
    pub transparent: bool,
    /// Service ports whose connections are opaque TCP without detection
    /// (server-first protocols, or to skip the detection wait).
    pub opaque_ports: Vec<u16>,
    /// Export spans over OTLP to this base URL, if set.
    pub otlp_endpoint: Option<String>,
    /// The OTLP transport (`OTEL_EXPORTER_OTLP_PROTOCOL`).
    pub otlp_protocol: crate::otlp::Protocol,
    /// Client connections open at once, per direction; more are closed as
    /// they arrive.
    pub max_connections: usize,
    /// Outbound requests in flight at once to one service; more are
    /// answered 503 `overloaded` at once instead of queueing.
    pub max_requests_per_service: usize,
}

impl Config {
    /// A sidecar for `namespace`/`service_account` of the cluster at `dir`,
    /// serving `serve` if any, with every address on loopback port 0 and
    /// the defaults above for the rest.
    pub fn new(dir: &Path, namespace: &str, service_account: &str, serve: Option<Serve>) -> Self {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Self {
            dir: dir.to_path_buf(),
            credential: None,
            namespace: namespace.into(),
            service_account: service_account.into(),
            serve,
            inbound_addr: any,
            outbound_addr: any,
            instance: service_account.into(),
            admin_addr: Some(any),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            access_log: false,
            dns_addr: None,
            transparent: false,
            opaque_ports: Vec::new(),
            otlp_endpoint: None,
            otlp_protocol: crate::otlp::Protocol::HttpProtobuf,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_requests_per_service: DEFAULT_MAX_REQUESTS_PER_SERVICE,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Serve {
    pub service: String,
    pub port: u16,
    pub app: SocketAddr,
    /// The app speaks HTTP/2 without TLS (h2c; gRPC servers), not HTTP/1.1.
    pub app_http2: bool,
}
