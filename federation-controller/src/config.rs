//! How a controller runs. Every default lives here once; the command line
//! (`isthmus controller`, `isthmus up`) reads these constants.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Local control plane address (sidecars, gateway, CLI).
pub const DEFAULT_CONTROL_ADDR: &str = "127.0.0.1:15010";
/// Peering address other clusters' controllers dial.
pub const DEFAULT_PEERING_ADDR: &str = "127.0.0.1:15011";
/// Admin endpoint: `/metrics`, `/ready`, `/live`.
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:15022";
/// Lifetime of the SVIDs the controller issues; workloads renew at half.
pub const DEFAULT_SVID_TTL: Duration = Duration::from_secs(3600);
/// Interval between peering heartbeats.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(1);
/// A peer silent this long has its imports withdrawn.
pub const DEFAULT_IMPORT_LEASE: Duration = Duration::from_secs(10);
/// After it starts (or takes over as leader), a controller gives its
/// sidecars and gateway this long to reconnect and register before it
/// tells peers what it exports or removes imports: until then its registry
/// is empty, and announcing that would withdraw every export for a moment.
/// Heartbeats flow meanwhile, so peers keep their imports.
pub const SETTLE: Duration = Duration::from_secs(2);
// Components retry at most this often, so all are back within SETTLE.
const _: () = assert!(isthmus_core::agent::RECONNECT_MAX.as_millis() * 3 / 2 <= SETTLE.as_millis());
/// The joining cluster has this long to confirm a link (by opening its
/// peering stream) before the issuer rolls it back.
pub const DEFAULT_CONFIRM_WINDOW: Duration = Duration::from_secs(120);
/// A join token lives this long unless asked otherwise.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(15 * 60);
/// The longest a join token may live.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// How to run a controller.
#[derive(Clone, Debug)]
pub struct Config {
    pub dir: PathBuf,
    pub cluster: String,
    pub trust_domain: String,
    /// Local control plane (sidecars, gateway, CLI).
    pub control_addr: SocketAddr,
    /// Peering with other clusters' controllers.
    pub peering_addr: SocketAddr,
    /// Peering address written into join tokens (defaults to the bound one);
    /// may be a DNS name.
    pub advertise_peering: Option<String>,
    pub svid_ttl: Duration,
    /// Interval between peering heartbeats.
    pub heartbeat: Duration,
    /// A peer silent for this long has its imports withdrawn.
    pub import_lease: Duration,
    /// How long after it starts serving the registry is believed
    /// (`SETTLE`).
    pub settle: Duration,
    /// How long a joiner has to confirm a link it made here.
    pub confirm_window: Duration,
    /// Admin endpoint (`/metrics`, `/ready`, `/live`), if any.
    pub admin_addr: Option<SocketAddr>,
    /// A CA to use on first start instead of generating a root: PEM chain
    /// (signing certificate first, up to the root) and PEM private key.
    pub ca_files: Option<(PathBuf, PathBuf)>,
    /// Keep the state in the Kubernetes API instead of `dir` (and lead, or
    /// stand by, by a Lease).
    pub kube: Option<KubeSettings>,
    /// Control addresses put in `controller.json` for components (comma
    /// separated; several replicas, or a Service name), if not the bound one.
    pub advertise_control: Option<String>,
}

/// A lease is held this long without renewal before a standby takes over.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(5);
/// The controller's namespace on Kubernetes.
pub const DEFAULT_NAMESPACE: &str = "isthmus-system";

/// The controller on Kubernetes.
#[derive(Clone, Debug)]
pub struct KubeSettings {
    /// A kubeconfig file; else `KUBECONFIG`, `~/.kube/config`, or the
    /// in-cluster service account.
    pub kubeconfig: Option<PathBuf>,
    pub context: Option<String>,
    /// Where the controller's own objects live (Lease, Secrets, ConfigMap).
    pub namespace: String,
    /// This replica's name in the Lease (the pod's name).
    pub replica: String,
    pub lease: Duration,
    /// The sidecar-injecting admission webhook, if this controller serves it.
    pub webhook: Option<WebhookSettings>,
}

/// Port of the admission webhook.
pub const DEFAULT_WEBHOOK_ADDR: &str = "0.0.0.0:15017";
/// The MutatingWebhookConfiguration whose `caBundle` the controller keeps
/// current.
pub const WEBHOOK_CONFIGURATION: &str = "isthmus-sidecar-injector";

#[derive(Clone, Debug)]
pub struct WebhookSettings {
    pub addr: std::net::SocketAddr,
    /// Names the API server dials it by (its Service's DNS names, or an
    /// IP): they go into the controller's certificate.
    pub names: Vec<String>,
    /// The image injected pods run the sidecar from.
    pub image: String,
}

impl Config {
    /// Names the controller's certificate carries besides its SPIFFE ID.
    pub fn svid_names(&self) -> Vec<String> {
        self.kube
            .as_ref()
            .and_then(|k| k.webhook.as_ref())
            .map(|w| w.names.clone())
            .unwrap_or_default()
    }
}

impl Config {
    /// A controller of `cluster` in `dir`, every address on loopback port
    /// 0, and the defaults above for the rest.
    pub fn new(dir: impl Into<PathBuf>, cluster: &str, trust_domain: &str) -> Self {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Self {
            dir: dir.into(),
            cluster: cluster.to_string(),
            trust_domain: trust_domain.to_string(),
            control_addr: any,
            peering_addr: any,
            advertise_peering: None,
            svid_ttl: DEFAULT_SVID_TTL,
            heartbeat: DEFAULT_HEARTBEAT,
            import_lease: DEFAULT_IMPORT_LEASE,
            settle: SETTLE,
            confirm_window: DEFAULT_CONFIRM_WINDOW,
            admin_addr: None,
            ca_files: None,
            kube: None,
            advertise_control: None,
        }
    }
}
