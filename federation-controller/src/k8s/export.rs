//! `ServiceExport`: a user exports the Service of the same name by creating
//! one beside it. The reconciler records the export (what peers are told),
//! and says in the status what became of it, with the upstream condition
//! types and reasons of the Multi-Cluster Services API:
//!
//! - `Valid`: the Service exists and can be exported (`NoService`,
//!   `InvalidServiceType` for an ExternalName Service);
//! - `Ready`: a meshed endpoint serves it, so linked clusters import it
//!   (`Pending` until a sidecar of the service registers);
//! - `Conflict`: another cluster exports it on another port (`PortConflict`;
//!   the oldest export wins, as KEP-1645 says), else `NoConflicts`;
//! - `isthmus.dev/Meshed`: whether every ready endpoint of the Service
//!   (its EndpointSlices) has a sidecar. Endpoints come from sidecar
//!   registration, never from EndpointSlices: only a sidecar can take a
//!   call that arrives through the gateway with the caller's identity, so
//!   a pod without one is not served to other clusters, and this
//!   condition says so (`EndpointsWithoutSidecar`).

use std::sync::Arc;

use futures::StreamExt;
use isthmus_core::naming::ServiceKey;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{Event, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;

use super::crds::ServiceExport;
use super::reconcile::{Cond, Ctx, FINALIZER, RESYNC, ReconcileError, conditions, created_unix, mesh_changes, retry};
use crate::state::ExportRecord;

pub const VALID: &str = "Valid";
pub const READY: &str = "Ready";
pub const CONFLICT: &str = "Conflict";
pub const MESHED: &str = "isthmus.dev/Meshed";

/// What the reconciler found about one export.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Facts {
    /// The Service's `spec.type`, or `None` if there is no such Service.
    pub service_type: Option<String>,
    /// Sidecars registered as endpoints of the service.
    pub sidecars: usize,
    /// Ready endpoints in the Service's EndpointSlices, if the API serves them.
    pub slice_endpoints: Option<usize>,
    /// Conflicts with other clusters' exports (`PortConflict: ...`).
    pub conflicts: Vec<String>,
    pub linked_clusters: usize,
}

/// Whether to export, and the conditions that say why.
pub fn decide(key: &ServiceKey, f: &Facts) -> (bool, Vec<Cond>) {
    let valid = match f.service_type.as_deref() {
        None => Cond::new(
            VALID,
            false,
            "NoService",
            format!("there is no Service {key}: create it, then its workloads"),
        ),
        Some("ExternalName") => Cond::new(
            VALID,
            false,
            "InvalidServiceType",
            "an ExternalName Service names something outside the cluster: it cannot be exported",
        ),
        Some(_) => Cond::new(VALID, true, "Valid", format!("Service {key} can be exported")),
    };
    let export = valid.status;
    let ready = if !export {
        Cond::new(READY, false, "Pending", "the export is not valid")
    } else if f.sidecars == 0 {
        Cond::new(
            READY,
            false,
            "Pending",
            format!("no sidecar of {key} has registered: until one does, no other cluster imports it"),
        )
    } else {
        Cond::new(
            READY,
            true,
            "Ready",
            format!(
                "exported to {} linked cluster(s), {} meshed endpoint(s)",
                f.linked_clusters, f.sidecars
            ),
        )
    };
    let conflict = match f.conflicts.iter().find(|c| c.starts_with("PortConflict")) {
        Some(c) => Cond::new(CONFLICT, true, "PortConflict", c.clone()),
        None => Cond::new(CONFLICT, false, "NoConflicts", "every cluster exports it alike"),
    };
    let mut conds = vec![valid, ready, conflict];
    if export && let Some(ready) = f.slice_endpoints {
        conds.push(if ready > f.sidecars {
            Cond::new(
                MESHED,
                false,
                "EndpointsWithoutSidecar",
                format!(
                    "{} of {ready} ready endpoint(s) have no Isthmus sidecar: other clusters reach only the {} meshed one(s)",
                    ready - f.sidecars,
                    f.sidecars
                ),
            )
        } else {
            Cond::new(MESHED, true, "AllMeshed", "every ready endpoint has a sidecar")
        });
    }
    (export, conds)
}

pub(crate) async fn run(ctx: Arc<Ctx>) {
    let exports = Api::<ServiceExport>::all(ctx.client.clone());
    let services = Api::<Service>::all(ctx.client.clone());
    Controller::new(exports, watcher::Config::default())
        // A Service created, changed or deleted: look at its export again.
        .watches(services, watcher::Config::default(), |svc| {
            let ns = svc.metadata.namespace?;
            Some(ObjectRef::new(&svc.metadata.name?).within(&ns))
        })
        .reconcile_all_on(mesh_changes(&ctx.shared, std::time::Duration::from_millis(200)))
        .run(reconcile, retry, ctx)
        .for_each(|_| async {})
        .await;
}

async fn reconcile(se: Arc<ServiceExport>, ctx: Arc<Ctx>) -> Result<Action, ReconcileError> {
    let ns = se.metadata.namespace.clone().unwrap_or_default();
    let api = Api::<ServiceExport>::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, se, |event| async {
        match event {
            Event::Apply(se) => apply(&se, &ctx).await,
            Event::Cleanup(se) => {
                let key = ServiceKey::new(&ns, se.metadata.name.as_deref().unwrap_or_default());
                withdraw(&ctx, &key).await;
                Ok(Action::await_change())
            }
        }
    })
    .await
    .map_err(ReconcileError::from)
}

async fn apply(se: &ServiceExport, ctx: &Ctx) -> Result<Action, ReconcileError> {
    let ns = se.metadata.namespace.clone().unwrap_or_default();
    let name = se.metadata.name.clone().unwrap_or_default();
    let key = ServiceKey::new(&ns, &name);
    let facts = facts(ctx, &key).await?;
    let (export, conds) = decide(&key, &facts);
    if export {
        let rec = ExportRecord {
            namespace: ns.clone(),
            name: name.clone(),
            created_unix: created_unix(&se.metadata),
        };
        let changed = ctx
            .shared
            .absorb(|state| state.exports.insert(key.clone(), rec.clone()).as_ref() != Some(&rec))
            .await;
        if changed {
            tracing::info!(service = %key, "exported (ServiceExport)");
        }
    } else {
        withdraw(ctx, &key).await;
    }
    // Sidecars re-register after a new leader starts: until then, no
    // conditions are judged on an empty registry.
    if !ctx.shared.settled() {
        return Ok(Action::requeue(ctx.shared.settled_at() - tokio::time::Instant::now()));
    }
    let previous = se.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
    if let Some(next) = conditions(previous, &conds, se.metadata.generation) {
        let patch = serde_json::json!({ "status": { "conditions": next } });
        Api::<ServiceExport>::namespaced(ctx.client.clone(), &ns)
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }
    ctx.shared
        .metrics
        .exports
        .set(ctx.shared.state.lock().expect("state lock").exports.len() as i64);
    Ok(Action::requeue(RESYNC))
}

async fn withdraw(ctx: &Ctx, key: &ServiceKey) {
    if ctx.shared.absorb(|state| state.exports.remove(key).is_some()).await {
        tracing::info!(service = %key, "export withdrawn");
    }
}

async fn facts(ctx: &Ctx, key: &ServiceKey) -> Result<Facts, ReconcileError> {
    let service = Api::<Service>::namespaced(ctx.client.clone(), &key.namespace)
        .get_opt(&key.name)
        .await?;
    let sidecars = ctx
        .shared
        .registry
        .lock()
        .expect("registry lock")
        .sidecars
        .values()
        .filter(|s| s.namespace == key.namespace && s.service == key.name)
        .count();
    let slice_endpoints = match &ctx.slices {
        Some(ar) => Some(ready_endpoints(ctx, ar, key).await?),
        None => None,
    };
    let conflicts = ctx
        .shared
        .snapshot()
        .services
        .into_iter()
        .find(|s| s.namespace == key.namespace && s.name == key.name)
        .map(|s| s.conditions)
        .unwrap_or_default();
    Ok(Facts {
        service_type: service.map(|s| s.spec.and_then(|s| s.type_).unwrap_or_else(|| "ClusterIP".into())),
        sidecars,
        slice_endpoints,
        conflicts,
        linked_clusters: ctx.shared.state.lock().expect("state lock").links.len(),
    })
}

/// Ready endpoint addresses in a Service's EndpointSlices. An endpoint
/// with no `ready` condition counts as ready (the API's own rule).
async fn ready_endpoints(ctx: &Ctx, ar: &kube::api::ApiResource, key: &ServiceKey) -> Result<usize, kube::Error> {
    let api = Api::<DynamicObject>::namespaced_with(ctx.client.clone(), &key.namespace, ar);
    let slices = api
        .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={}", key.name)))
        .await?;
    Ok(slices.items.iter().map(|s| count_ready(&s.data)).sum())
}

/// Ready addresses in one EndpointSlice (`v1` and `v1beta1` alike).
pub fn count_ready(slice: &serde_json::Value) -> usize {
    slice["endpoints"]
        .as_array()
        .map(|eps| {
            eps.iter()
                .filter(|e| e["conditions"]["ready"].as_bool() != Some(false))
                .map(|e| e["addresses"].as_array().map_or(0, |a| a.len().min(1)))
                .sum()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::fake::{Fake, condition, not_found};

    const SE: &str = "/apis/multicluster.x-k8s.io/v1beta1/namespaces/demo/serviceexports/echo";

    fn export(finalizer: bool, deleting: bool) -> ServiceExport {
        let mut se = ServiceExport::new("echo", Default::default());
        se.metadata.namespace = Some("demo".into());
        se.metadata.generation = Some(1);
        if finalizer {
            se.metadata.finalizers = Some(vec![FINALIZER.into()]);
        }
        if deleting {
            se.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ));
        }
        se
    }

    fn echo_service() -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "echo", "namespace": "demo"},
            "spec": {"type": "ClusterIP", "ports": [{"port": 8080}]}
        })
    }

    /// Answer the export's status patch; what it wrote.
    async fn status_patch(fake: &mut Fake) -> crate::k8s::fake::Seen {
        let answer = serde_json::to_value(export(true, false)).unwrap();
        fake.answer("PATCH", &format!("{SE}/status"), 200, answer).await
    }

    #[tokio::test]
    async fn reconcile_first_puts_the_finalizer_on() {
        let mut fake = Fake::new().await;
        let task = tokio::spawn(reconcile(Arc::new(export(false, false)), fake.ctx.clone()));
        let seen = fake
            .answer("PATCH", SE, 200, serde_json::to_value(export(true, false)).unwrap())
            .await;
        assert_eq!(seen.content_type, "application/json-patch+json");
        assert!(seen.body.to_string().contains(FINALIZER), "{}", seen.body);
        task.await.unwrap().expect("reconciled");
        assert!(
            fake.ctx.shared.state.lock().unwrap().exports.is_empty(),
            "nothing exported yet"
        );
    }

    #[tokio::test]
    async fn an_export_of_a_missing_service_is_refused_in_its_status() {
        let mut fake = Fake::new().await;
        let task = tokio::spawn(reconcile(Arc::new(export(true, false)), fake.ctx.clone()));
        fake.answer("GET", "/api/v1/namespaces/demo/services/echo", 404, not_found("echo"))
            .await;
        let patch = status_patch(&mut fake).await;
        assert_eq!(patch.content_type, "application/merge-patch+json");
        let (status, reason, message) = condition(&patch.body, VALID);
        assert_eq!((status.as_str(), reason.as_str()), ("False", "NoService"));
        assert!(message.contains("demo/echo"), "{message}");
        task.await.unwrap().expect("reconciled");
        assert!(fake.ctx.shared.state.lock().unwrap().exports.is_empty());
    }

    #[tokio::test]
    async fn a_valid_export_is_recorded_then_withdrawn_on_deletion() {
        let mut fake = Fake::new().await;
        let task = tokio::spawn(reconcile(Arc::new(export(true, false)), fake.ctx.clone()));
        fake.answer("GET", "/api/v1/namespaces/demo/services/echo", 200, echo_service())
            .await;
        let patch = status_patch(&mut fake).await;
        assert_eq!(condition(&patch.body, VALID).0, "True");
        // No sidecar serves it yet: valid, recorded, but not ready.
        assert_eq!(condition(&patch.body, READY).1, "Pending");
        task.await.unwrap().expect("reconciled");
        let key = ServiceKey::new("demo", "echo");
        assert!(fake.ctx.shared.state.lock().unwrap().exports.contains_key(&key));

        // Deleted: the export is withdrawn, then the finalizer comes off.
        let task = tokio::spawn(reconcile(Arc::new(export(true, true)), fake.ctx.clone()));
        let seen = fake
            .answer("PATCH", SE, 200, serde_json::to_value(export(false, true)).unwrap())
            .await;
        assert!(seen.body.to_string().contains("remove"), "{}", seen.body);
        task.await.unwrap().expect("cleaned up");
        assert!(!fake.ctx.shared.state.lock().unwrap().exports.contains_key(&key));
    }

    fn key() -> ServiceKey {
        ServiceKey::new("demo", "echo")
    }

    fn find<'a>(conds: &'a [Cond], t: &str) -> &'a Cond {
        conds.iter().find(|c| c.type_ == t).expect(t)
    }

    #[test]
    fn an_export_without_its_service_is_invalid_and_not_exported() {
        let (export, conds) = decide(&key(), &Facts::default());
        assert!(!export);
        assert_eq!(find(&conds, VALID).reason, "NoService");
        assert!(find(&conds, VALID).message.contains("demo/echo"));
        assert!(!find(&conds, READY).status);
    }

    #[test]
    fn external_name_services_are_refused() {
        let f = Facts {
            service_type: Some("ExternalName".into()),
            sidecars: 1,
            ..Default::default()
        };
        let (export, conds) = decide(&key(), &f);
        assert!(!export);
        assert_eq!(find(&conds, VALID).reason, "InvalidServiceType");
    }

    #[test]
    fn ready_once_a_sidecar_serves_it() {
        let mut f = Facts {
            service_type: Some("ClusterIP".into()),
            linked_clusters: 2,
            ..Default::default()
        };
        let (export, conds) = decide(&key(), &f);
        assert!(export, "valid exports are recorded before they are ready");
        assert_eq!(
            (find(&conds, READY).status, find(&conds, READY).reason),
            (false, "Pending")
        );
        f.sidecars = 1;
        let (_, conds) = decide(&key(), &f);
        assert_eq!(
            (find(&conds, READY).status, find(&conds, READY).reason),
            (true, "Ready")
        );
        assert_eq!(find(&conds, CONFLICT).reason, "NoConflicts");
        assert!(conds.iter().all(|c| c.type_ != MESHED), "no slices, no claim");
    }

    #[test]
    fn a_port_conflict_is_reported() {
        let f = Facts {
            service_type: Some("ClusterIP".into()),
            sidecars: 1,
            conflicts: vec!["PortConflict: cluster west exports port 9090, but the service uses port 8080".into()],
            ..Default::default()
        };
        let (_, conds) = decide(&key(), &f);
        let c = find(&conds, CONFLICT);
        assert!(
            c.status && c.reason == "PortConflict" && c.message.contains("west"),
            "{c:?}"
        );
    }

    #[test]
    fn pods_without_sidecars_are_named() {
        let f = Facts {
            service_type: Some("ClusterIP".into()),
            sidecars: 1,
            slice_endpoints: Some(3),
            ..Default::default()
        };
        let (_, conds) = decide(&key(), &f);
        let c = find(&conds, MESHED);
        assert!(!c.status && c.reason == "EndpointsWithoutSidecar", "{c:?}");
        assert!(c.message.starts_with("2 of 3"), "{}", c.message);
    }

    #[test]
    fn ready_endpoints_are_counted_in_either_slice_version() {
        let slice = serde_json::json!({
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.0.0.1"], "conditions": {"ready": true}, "nodeName": "a"},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": false}},
                {"addresses": ["10.0.0.3"], "topology": {"kubernetes.io/hostname": "b"}},
                {"addresses": [], "conditions": {}}
            ]
        });
        assert_eq!(count_ready(&slice), 2);
        assert_eq!(count_ready(&serde_json::json!({"endpoints": null})), 0);
    }
}
