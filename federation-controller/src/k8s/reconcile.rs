//! The reconcilers, in the kube-rs shape: each a `reconcile` function, an
//! error policy and one shared context, idempotent (run it twice, nothing
//! more happens), with finalizers where something must be undone, and
//! status written through the status subresource.
//!
//! - `export.rs`: `ServiceExport` → this cluster's exports, and the
//!   export's conditions;
//! - `policy.rs`: `TrafficPolicy` → the policies sidecars apply;
//! - `link.rs`: `Link` → spends its join token, shows the link's health,
//!   and unlinks when deleted;
//! - `mirror.rs`: the other way, from the mesh into the API: a `Link` per
//!   linked cluster, a `ServiceImport` (and the Service that gives it a
//!   ClusterSet IP) per service the cluster set exports, and the cluster's
//!   status for `isthmus status`.

use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::ApiResource;
use kube::runtime::controller::Action;

use crate::shared::Shared;

/// The finalizer Isthmus puts on what it must clean up after.
pub const FINALIZER: &str = "isthmus.dev/cleanup";
/// How often each object is looked at again, changes or not.
pub const RESYNC: Duration = Duration::from_secs(30);
/// After a failed reconcile, the next try.
const RETRY: Duration = Duration::from_secs(5);

/// What every reconciler shares.
pub(crate) struct Ctx {
    pub shared: Arc<Shared>,
    pub client: kube::Client,
    /// The controller's own namespace (Secrets, ConfigMap, Lease).
    pub namespace: String,
    /// EndpointSlices as this API server serves them (`discovery.k8s.io`
    /// `v1`, or `v1beta1` before Kubernetes 1.21), if at all.
    pub slices: Option<ApiResource>,
    /// Whether this controller serves the injection webhook (then it also
    /// gives namespaces the cluster's ConfigMap, and keeps the webhook's
    /// `caBundle` current).
    pub webhook: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<ReconcileError>>),
    #[error("{0}")]
    Mesh(String),
}

impl From<kube::runtime::finalizer::Error<ReconcileError>> for ReconcileError {
    fn from(e: kube::runtime::finalizer::Error<ReconcileError>) -> Self {
        ReconcileError::Finalizer(Box::new(e))
    }
}

impl From<tonic::Status> for ReconcileError {
    fn from(s: tonic::Status) -> Self {
        ReconcileError::Mesh(s.message().to_string())
    }
}

/// The error policy of every reconciler: log, and try again shortly.
pub(crate) fn retry<K: kube::Resource<DynamicType = ()>>(obj: Arc<K>, e: &ReconcileError, _: Arc<Ctx>) -> Action {
    tracing::warn!(
        kind = %K::kind(&()),
        name = obj.meta().name.as_deref().unwrap_or_default(),
        namespace = obj.meta().namespace.as_deref().unwrap_or_default(),
        error = %e,
        "reconcile failed; retrying"
    );
    Action::requeue(RETRY)
}

/// Run every reconciler until the task is aborted.
pub(crate) async fn run(shared: Arc<Shared>, client: kube::Client, namespace: String, webhook: bool) {
    let slices = endpoint_slices(&client).await;
    match &slices {
        Some(r) => tracing::info!(version = %r.api_version, "EndpointSlices found"),
        None => tracing::warn!("this API server serves no EndpointSlices: pods without sidecars go unnoticed"),
    }
    let ctx = Arc::new(Ctx {
        shared,
        client,
        namespace,
        slices,
        webhook,
    });
    tokio::join!(
        super::export::run(ctx.clone()),
        super::policy::run(ctx.clone()),
        super::link::run(ctx.clone()),
        super::mirror::run(ctx),
    );
}

/// Which EndpointSlice version the API server serves: `v1` (Kubernetes
/// 1.21 and later) or `v1beta1` (1.17 to 1.24). The fields read here
/// (`endpoints[].addresses`, `endpoints[].conditions.ready`) are the same
/// in both.
async fn endpoint_slices(client: &kube::Client) -> Option<ApiResource> {
    let group = kube::discovery::group(client, "discovery.k8s.io").await.ok()?;
    ["v1", "v1beta1"].iter().find_map(|v| {
        group
            .versioned_resources(v)
            .into_iter()
            .find(|(r, _)| r.kind == "EndpointSlice")
            .map(|(r, _)| r)
    })
}

/// A stream that yields whenever what sidecars, gateways or peers see has
/// changed, at most once per `every`: reconcilers whose outcome depends on
/// the mesh (registrations, imports) look again.
pub(crate) fn mesh_changes(shared: &Shared, every: Duration) -> impl Stream<Item = ()> + Send + 'static {
    let rx = shared.version.subscribe();
    futures::stream::unfold(rx, move |mut rx| async move {
        rx.changed().await.ok()?;
        tokio::time::sleep(every).await;
        rx.borrow_and_update();
        Some(((), rx))
    })
    .boxed()
}

/// A condition as a reconciler decides it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cond {
    pub type_: &'static str,
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

impl Cond {
    /// A condition; its message must say something (API servers before
    /// 1.21 refuse an empty one in a status patch).
    pub fn new(type_: &'static str, status: bool, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            type_,
            status,
            reason,
            message: message.into(),
        }
    }
}

/// The conditions to write: `decided`, each keeping the transition time it
/// had if its status did not change. `None` if nothing changed (no write).
pub fn conditions(previous: &[Condition], decided: &[Cond], generation: Option<i64>) -> Option<Vec<Condition>> {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let next: Vec<Condition> = decided
        .iter()
        .map(|c| {
            let status = if c.status { "True" } else { "False" };
            let before = previous.iter().find(|p| p.type_ == c.type_);
            Condition {
                type_: c.type_.to_string(),
                status: status.to_string(),
                reason: c.reason.to_string(),
                message: c.message.clone(),
                observed_generation: generation,
                last_transition_time: before
                    .filter(|p| p.status == status)
                    .map(|p| p.last_transition_time.clone())
                    .unwrap_or_else(|| now.clone()),
            }
        })
        .collect();
    (next != previous).then_some(next)
}

/// Whether `conds` has `type_` with status True.
pub fn is_true(conds: &[Condition], type_: &str) -> bool {
    conds.iter().any(|c| c.type_ == type_ && c.status == "True")
}

/// The unix time an object was created at.
pub fn created_unix(meta: &kube::api::ObjectMeta) -> i64 {
    meta.creation_timestamp
        .as_ref()
        .map(|t| t.0.as_second())
        .unwrap_or_else(isthmus_core::unix_now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_condition_keeps_its_transition_time_until_its_status_changes() {
        let first = conditions(&[], &[Cond::new("Valid", true, "Valid", "ok")], Some(1)).expect("new");
        assert_eq!(first[0].status, "True");
        // The same decision again writes nothing.
        assert_eq!(
            conditions(&first, &[Cond::new("Valid", true, "Valid", "ok")], Some(1)),
            None
        );
        // A new message keeps the time; a new status moves it.
        let mut old = first.clone();
        old[0].last_transition_time = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        let reworded =
            conditions(&old, &[Cond::new("Valid", true, "Valid", "now with words")], Some(1)).expect("changed");
        assert_eq!(reworded[0].last_transition_time, old[0].last_transition_time);
        let flipped = conditions(&old, &[Cond::new("Valid", false, "NoService", "gone")], Some(2)).expect("changed");
        assert_ne!(flipped[0].last_transition_time, old[0].last_transition_time);
        assert_eq!(flipped[0].observed_generation, Some(2));
        assert!(is_true(&first, "Valid") && !is_true(&flipped, "Valid"));
    }
}
