//! The CLI against a Kubernetes cluster: the same commands, through the
//! API (kubeconfig, context, the usual environment) instead of a cluster
//! directory. Nothing talks to the controller directly: the CLI writes the
//! objects the controller reconciles (join token Secrets, `Link`,
//! `ServiceExport`, `TrafficPolicy`), waits for their status, and reads
//! what the controller publishes in its ConfigMap.

pub mod check;
pub mod service;
pub mod tokens;

use std::path::PathBuf;
use std::time::Duration;

use isthmus_controller::join::JoinInfo;
use isthmus_controller::k8s::store::{CLUSTER_CONFIGMAP, JOIN_FILE, STATUS_FILE, STATUS_TIME};
use isthmus_proto::StatusResponse;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use prost::Message;

use crate::error::{CliError, exit};

/// Where a command finds the cluster: a cluster directory (local mode),
/// or a Kubernetes API.
#[derive(clap::Args, Clone, Debug)]
pub struct TargetArgs {
    /// Cluster directory (local mode; `isthmus up --dir`).
    #[arg(long, env = "ISTHMUS_DIR")]
    pub dir: Option<PathBuf>,
    /// Talk to a cluster through the Kubernetes API: KUBECONFIG,
    /// ~/.kube/config, or the in-cluster service account.
    #[arg(long)]
    pub kube: bool,
    /// kubeconfig file (implies --kube).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// kubeconfig context [default: the current one] (implies --kube).
    #[arg(long)]
    pub context: Option<String>,
    /// Namespace the Isthmus controller runs in (with --kube).
    #[arg(long, env = "ISTHMUS_NAMESPACE", default_value = isthmus_controller::config::DEFAULT_NAMESPACE)]
    pub isthmus_namespace: String,
}

/// A cluster reached through the Kubernetes API.
#[derive(Clone)]
pub struct Kube {
    pub client: kube::Client,
    /// The controller's namespace.
    pub namespace: String,
    /// How the user named it, for messages.
    pub context: String,
}

pub enum Target {
    Dir(PathBuf),
    Kube(Kube),
}

impl TargetArgs {
    pub fn wants_kube(&self) -> bool {
        self.kube || self.kubeconfig.is_some() || self.context.is_some()
    }

    /// The cluster this command talks to. A kube flag wins over `--dir`
    /// (which may come from `ISTHMUS_DIR`).
    pub async fn resolve(&self) -> Result<Target, CliError> {
        if !self.wants_kube() {
            return match &self.dir {
                Some(d) => Ok(Target::Dir(d.clone())),
                None => Err(CliError::new(
                    exit::BAD_INPUT,
                    "name the cluster: --dir <cluster directory> (local mode), or --kube / --kubeconfig / --context (Kubernetes)",
                )),
            };
        }
        let settings = isthmus_controller::config::KubeSettings {
            kubeconfig: self.kubeconfig.clone(),
            context: self.context.clone(),
            namespace: self.isthmus_namespace.clone(),
            replica: String::new(),
            lease: isthmus_controller::config::DEFAULT_LEASE,
            webhook: None,
        };
        let client = isthmus_controller::k8s::client(&settings)
            .await
            .map_err(|e| CliError::new(exit::BAD_INPUT, format!("kubeconfig: {e}")))?;
        Ok(Target::Kube(Kube {
            client,
            namespace: self.isthmus_namespace.clone(),
            context: self
                .context
                .clone()
                .unwrap_or_else(|| "the current kubeconfig context".into()),
        }))
    }
}

/// A failed API call, as the user sees it.
pub fn api_error(what: &str, e: kube::Error) -> CliError {
    let code = match &e {
        kube::Error::Api(s) if s.code == 404 => exit::NOT_FOUND,
        kube::Error::Api(s) if s.code == 400 || s.code == 422 => exit::BAD_INPUT,
        kube::Error::Api(s) if matches!(s.code, 401 | 403 | 409) => exit::REFUSED,
        kube::Error::Api(_) => exit::FAILURE,
        kube::Error::InferConfig(_) | kube::Error::InferKubeconfig(_) => exit::BAD_INPUT,
        _ => exit::UNREACHABLE,
    };
    CliError::new(code, format!("{what}: {e}"))
}

impl Kube {
    /// The controller's ConfigMap: what it publishes for the CLI.
    pub async fn cluster_configmap(&self) -> Result<ConfigMap, CliError> {
        Api::<ConfigMap>::namespaced(self.client.clone(), &self.namespace)
            .get_opt(CLUSTER_CONFIGMAP)
            .await
            .map_err(|e| api_error("reading the Isthmus controller's ConfigMap", e))?
            .ok_or_else(|| {
                CliError::new(
                    exit::NOT_FOUND,
                    format!(
                        "no Isthmus controller has run in namespace {} ({}): ConfigMap {CLUSTER_CONFIGMAP} is missing. Install it (docs/kubernetes.md), or name its namespace with --isthmus-namespace",
                        self.namespace, self.context
                    ),
                )
            })
    }

    /// What join tokens say about this cluster, as the controller last
    /// published it.
    pub async fn join_info(&self) -> Result<JoinInfo, CliError> {
        let cm = self.cluster_configmap().await?;
        let text = cm.data.as_ref().and_then(|d| d.get(JOIN_FILE)).ok_or_else(|| {
            CliError::new(
                exit::UNREACHABLE,
                format!(
                    "the controller in {} has not published its join details yet: is it running and leading? (`isthmus check --kube`)",
                    self.namespace
                ),
            )
        })?;
        serde_json::from_str(text).map_err(|e| {
            CliError::new(
                exit::FAILURE,
                format!("{CLUSTER_CONFIGMAP}/{JOIN_FILE} is unreadable: {e}"),
            )
        })
    }

    /// The cluster's status as the controller last published it, its
    /// heartbeat ages brought up to now, and how old it is (seconds).
    pub async fn status(&self) -> Result<(StatusResponse, i64), CliError> {
        let cm = self.cluster_configmap().await?;
        let bytes = cm.binary_data.as_ref().and_then(|d| d.get(STATUS_FILE)).ok_or_else(|| {
            CliError::new(
                exit::UNREACHABLE,
                format!(
                    "the controller in {} has not published a status yet: is it running and leading? (`isthmus check --kube`)",
                    self.namespace
                ),
            )
        })?;
        let mut s = StatusResponse::decode(bytes.0.as_slice()).map_err(|e| {
            CliError::new(
                exit::FAILURE,
                format!("{CLUSTER_CONFIGMAP}/{STATUS_FILE} is unreadable: {e}"),
            )
        })?;
        let at: i64 = cm
            .data
            .as_ref()
            .and_then(|d| d.get(STATUS_TIME))
            .and_then(|t| t.parse().ok())
            .unwrap_or(0);
        let age = (isthmus_core::unix_now() - at).max(0);
        for l in &mut s.links {
            if l.heartbeat_age_ms >= 0 {
                l.heartbeat_age_ms += age * 1000;
            }
        }
        Ok((s, age))
    }
}

/// Status older than this means no controller is leading.
pub const STALE_STATUS: i64 = 30;

/// Poll `probe` every 250 ms until it gives an answer, or `within` passes.
pub async fn wait_for<T, F, Fut>(within: Duration, mut probe: F) -> Result<Option<T>, CliError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>, CliError>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = probe().await? {
            return Ok(Some(v));
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The controller did not act on an object in time.
pub fn no_answer(k: &Kube, what: &str, within: Duration) -> CliError {
    CliError::new(
        exit::UNREACHABLE,
        format!(
            "the Isthmus controller did not act on {what} within {}s: is it running and leading in {}? (`isthmus check --kube`)",
            within.as_secs(),
            k.namespace
        ),
    )
}

/// The condition `type_` of a status, if the controller has decided it
/// for this generation of the object.
pub fn condition<'a>(
    conds: &'a [k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    type_: &str,
    generation: Option<i64>,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    conds
        .iter()
        .find(|c| c.type_ == type_ && (generation.is_none() || c.observed_generation >= generation))
}
