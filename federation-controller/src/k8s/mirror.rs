//! From the mesh into the API, on every change and every few seconds:
//!
//! - a `Link` for each linked cluster that has none (links the other
//!   cluster made); `link.rs` keeps its status;
//! - a `ServiceImport` for each service any cluster of the set exports,
//!   in the namespace of the same name if it exists here (namespace
//!   sameness), with its port, the clusters behind it and a `Ready`
//!   condition; removed when the last exporter goes;
//! - beside each, a Service `derived-<name>` with no selector, whose
//!   ClusterIP the API server allocates: the import's ClusterSet IP (as
//!   other MCS implementations do). Meshed workloads do not need it: their
//!   sidecar resolves `<name>.<ns>.svc.clusterset.local` itself;
//! - the cluster's status (`status.pb`) and join details (`join.json`) in
//!   the `isthmus-cluster` ConfigMap, for `isthmus status` and
//!   `isthmus token create`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use isthmus_core::naming::ServiceKey;
use k8s_openapi::api::core::v1::{Service, ServicePort as KubeServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use prost::Message;

use super::crds::v1beta1::ServiceImportSpec;
use super::crds::{ClusterStatus, Link, LinkSpec, ServiceImport, ServiceImportStatus, ServicePort};
use super::reconcile::{Cond, Ctx, RESYNC, ReconcileError, conditions};
use super::store::MANAGER;
use crate::store::Store;

/// Label on what the mirror made, so that it removes only its own.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "isthmus");
/// The MCS label that ties a derived Service to its import.
pub const SERVICE_NAME_LABEL: &str = "multicluster.kubernetes.io/service-name";
/// How often the status is published while nothing changes.
const PUBLISH_EVERY: Duration = Duration::from_secs(5);

/// One import, as it should be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Import {
    pub port: u32,
    /// Clusters that serve it (this one too, if it exports it).
    pub clusters: BTreeSet<String>,
}

/// What should be imported, from the config this cluster's sidecars get.
pub fn desired(own_cluster: &str, services: &[isthmus_proto::Service]) -> BTreeMap<ServiceKey, Import> {
    services
        .iter()
        .filter_map(|s| {
            let clusters: BTreeSet<String> = s
                .backends
                .iter()
                .filter(|b| b.cluster != own_cluster || s.exported)
                .map(|b| b.cluster.clone())
                .collect();
            (!clusters.is_empty() && clusters.iter().any(|c| c != own_cluster) || s.exported).then(|| {
                (
                    ServiceKey::new(&s.namespace, &s.name),
                    Import { port: s.port, clusters },
                )
            })
        })
        .collect()
}

/// The derived Service's name: `derived-<name>`, shortened with a hash
/// when that would pass the 63 characters a Service name may have.
pub fn derived_name(name: &str) -> String {
    let full = format!("derived-{name}");
    if full.len() <= 63 {
        return full;
    }
    let hash = &isthmus_core::token::hash_secret(name.as_bytes())[..8];
    format!("derived-{}-{hash}", name[..45].trim_end_matches('-'))
}

/// A linked peer that has not reached this controller within this long
/// no longer holds back the removal of imports.
const PEERS_GRACE: Duration = Duration::from_secs(30);

/// Whether what peers export is known: each has opened its peering stream
/// since this controller started (a new leader learns imports afresh), or
/// has had `PEERS_GRACE` to.
fn imports_known(ctx: &Ctx) -> bool {
    if ctx.shared.started.elapsed() >= PEERS_GRACE {
        return true;
    }
    let links: Vec<String> = ctx
        .shared
        .state
        .lock()
        .expect("state lock")
        .links
        .keys()
        .cloned()
        .collect();
    let peers = ctx.shared.peers.lock().expect("peers lock");
    links
        .iter()
        .all(|l| peers.get(l).is_some_and(|p| p.ever_connected && p.imports.live))
}

pub(crate) async fn run(ctx: Arc<Ctx>) {
    let mut version = ctx.shared.version.subscribe();
    let mut last: Option<BTreeMap<ServiceKey, Import>> = None;
    let mut configmaps: BTreeMap<String, String> = BTreeMap::new();
    let mut synced = Instant::now();
    loop {
        if synced.elapsed() >= RESYNC {
            last = None;
            synced = Instant::now();
        }
        if let Err(e) = links(&ctx).await {
            tracing::warn!(error = %e, "cannot mirror links");
        }
        // Until components have re-registered, the mesh's view is empty.
        let want = desired(&ctx.shared.cfg.cluster, &ctx.shared.snapshot().services);
        if ctx.shared.settled() && last.as_ref() != Some(&want) {
            match imports(&ctx, &want).await {
                Ok(true) => last = Some(want),
                Ok(false) => tracing::debug!("imports applied; removals wait for linked peers"),
                Err(e) => tracing::warn!(error = %e, "cannot mirror service imports"),
            }
        }
        if let Err(e) = publish(&ctx).await {
            tracing::warn!(error = %e, "cannot publish the cluster's status");
        }
        if ctx.webhook {
            if let Err(e) = namespace_configmaps(&ctx, &mut configmaps).await {
                tracing::warn!(error = %e, "cannot give namespaces the cluster's ConfigMap");
            }
            if let Err(e) = webhook_ca_bundle(&ctx).await {
                tracing::warn!(error = %e, "cannot keep the webhook's caBundle current");
            }
        }
        tokio::select! {
            r = version.changed() => {
                if r.is_err() {
                    return;
                }
                // Let a burst of changes settle into one pass.
                tokio::time::sleep(Duration::from_millis(100)).await;
                version.borrow_and_update();
            }
            _ = tokio::time::sleep(PUBLISH_EVERY) => {}
            _ = tokio::time::sleep_until(ctx.shared.settled_at()), if !ctx.shared.settled() => {}
        }
    }
}

/// A Link for each linked cluster without one.
async fn links(ctx: &Ctx) -> Result<(), kube::Error> {
    let api = Api::<Link>::all(ctx.client.clone());
    let have: BTreeSet<String> = api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|l| l.metadata.name)
        .collect();
    let peers: Vec<String> = ctx
        .shared
        .state
        .lock()
        .expect("state lock")
        .links
        .keys()
        .cloned()
        .collect();
    for peer in peers.into_iter().filter(|p| !have.contains(p)) {
        let link = Link::new(&peer, LinkSpec::default());
        match api.create(&PostParams::default(), &link).await {
            Ok(_) => tracing::info!(%peer, "Link created for a link the other cluster made"),
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Make the ServiceImports and derived Services what `want` says (and
/// remove none until what peers export is known: then `false`).
async fn imports(ctx: &Ctx, want: &BTreeMap<ServiceKey, Import>) -> Result<bool, ReconcileError> {
    let managed = ListParams::default().labels(&format!("{}={}", MANAGED_BY.0, MANAGED_BY.1));
    for (key, imp) in want {
        if let Err(e) = apply_import(ctx, key, imp).await {
            match e {
                // Namespace sameness: no namespace here, nothing to import into.
                ReconcileError::Api(kube::Error::Api(ref a)) if a.code == 404 || a.code == 403 => {
                    tracing::debug!(service = %key, error = %e, "not imported here")
                }
                e => return Err(e),
            }
        }
    }
    if !imports_known(ctx) {
        return Ok(false);
    }
    for si in Api::<ServiceImport>::all(ctx.client.clone())
        .list(&managed)
        .await?
        .items
    {
        let (Some(ns), Some(name)) = (si.metadata.namespace.clone(), si.metadata.name.clone()) else {
            continue;
        };
        if !want.contains_key(&ServiceKey::new(&ns, &name)) {
            ctx.shared
                .clusterset_ips
                .lock()
                .expect("clusterset ips lock")
                .remove(&ServiceKey::new(&ns, &name));
            tracing::info!(service = %ServiceKey::new(&ns, &name), "no cluster exports it any more: ServiceImport removed");
            delete(&Api::<ServiceImport>::namespaced(ctx.client.clone(), &ns), &name).await?;
        }
    }
    for svc in Api::<Service>::all(ctx.client.clone()).list(&managed).await?.items {
        let ns = svc.metadata.namespace.clone().unwrap_or_default();
        let imported = svc
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .cloned();
        if imported.is_none_or(|n| !want.contains_key(&ServiceKey::new(&ns, &n))) {
            let name = svc.metadata.name.clone().unwrap_or_default();
            delete(&Api::<Service>::namespaced(ctx.client.clone(), &ns), &name).await?;
        }
    }
    Ok(true)
}

async fn delete<K>(api: &Api<K>, name: &str) -> Result<(), kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

fn labels(name: &str) -> BTreeMap<String, String> {
    [
        (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
        (SERVICE_NAME_LABEL.to_string(), name.to_string()),
    ]
    .into()
}

async fn apply_import(ctx: &Ctx, key: &ServiceKey, imp: &Import) -> Result<(), ReconcileError> {
    let ssa = PatchParams::apply(MANAGER).force();
    let port = i32::try_from(imp.port).unwrap_or_default();
    let derived = Service {
        metadata: ObjectMeta {
            name: Some(derived_name(&key.name)),
            namespace: Some(key.namespace.clone()),
            labels: Some(labels(&key.name)),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            ports: Some(vec![KubeServicePort {
                name: Some(format!("tcp-{port}")),
                port,
                target_port: Some(IntOrString::Int(port)),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    let services = Api::<Service>::namespaced(ctx.client.clone(), &key.namespace);
    let derived = services
        .patch(&derived_name(&key.name), &ssa, &Patch::Apply(&derived))
        .await?;
    let ip = derived.spec.and_then(|s| s.cluster_ip).filter(|ip| ip != "None");
    let ips: Vec<String> = ip.iter().cloned().collect();
    let changed = ctx
        .shared
        .clusterset_ips
        .lock()
        .expect("clusterset ips lock")
        .insert(key.clone(), ips.clone())
        != Some(ips);
    if changed {
        ctx.shared.changed();
    }
    let mut si = ServiceImport::new(
        &key.name,
        ServiceImportSpec {
            ports: vec![ServicePort {
                name: Some(format!("tcp-{port}")),
                protocol: Some("TCP".into()),
                app_protocol: None,
                port,
            }],
            ips: ip.into_iter().collect(),
            type_: "ClusterSetIP".into(),
            session_affinity: None,
        },
    );
    si.metadata.namespace = Some(key.namespace.clone());
    si.metadata.labels = Some(labels(&key.name));
    let api = Api::<ServiceImport>::namespaced(ctx.client.clone(), &key.namespace);
    let applied = api.patch(&key.name, &ssa, &Patch::Apply(&si)).await?;
    let previous = applied.status.clone().unwrap_or_default();
    let ready = Cond::new(
        "Ready",
        true,
        "Ready",
        format!(
            "served by {}",
            imp.clusters.iter().cloned().collect::<Vec<_>>().join(", ")
        ),
    );
    let conds = conditions(&previous.conditions, &[ready], applied.metadata.generation);
    let clusters: Vec<ClusterStatus> = imp
        .clusters
        .iter()
        .map(|c| ClusterStatus { cluster: c.clone() })
        .collect();
    if conds.is_some() || previous.clusters != clusters {
        let status = ServiceImportStatus {
            clusters,
            conditions: conds.unwrap_or(previous.conditions),
        };
        api.patch_status(
            &key.name,
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({ "status": status })),
        )
        .await?;
        tracing::info!(service = %key, clusters = ?imp.clusters, "ServiceImport in step");
    }
    Ok(())
}

/// Namespaces no pod of the mesh runs in.
const SYSTEM_NAMESPACES: [&str; 3] = ["kube-system", "kube-public", "kube-node-lease"];

/// The cluster's ConfigMap (`controller.json`, `ca.pem`) in every
/// namespace: an injected pod mounts it, and a pod can mount ConfigMaps of
/// its own namespace only. `written` holds what each namespace has, so
/// only a change (a rotation, a new namespace) is written.
async fn namespace_configmaps(ctx: &Ctx, written: &mut BTreeMap<String, String>) -> Result<(), kube::Error> {
    let info = serde_json::to_string_pretty(&ctx.shared.controller_info()).expect("serializes");
    let bundle = ctx.shared.ca.load().bundle_pem();
    let content = format!("{info}\n{bundle}");
    let namespaces = Api::<k8s_openapi::api::core::v1::Namespace>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await?;
    for ns in namespaces.items.into_iter().filter_map(|n| n.metadata.name) {
        if SYSTEM_NAMESPACES.contains(&ns.as_str()) || ns == ctx.namespace || written.get(&ns) == Some(&content) {
            continue;
        }
        let cm = k8s_openapi::api::core::v1::ConfigMap {
            metadata: ObjectMeta {
                name: Some(super::store::CLUSTER_CONFIGMAP.into()),
                namespace: Some(ns.clone()),
                labels: Some([(MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string())].into()),
                ..Default::default()
            },
            data: Some(
                [
                    (isthmus_core::local::CONTROLLER_FILE.to_string(), info.clone()),
                    (isthmus_core::local::CA_FILE.to_string(), bundle.clone()),
                ]
                .into(),
            ),
            ..Default::default()
        };
        Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(ctx.client.clone(), &ns)
            .patch(
                super::store::CLUSTER_CONFIGMAP,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&cm),
            )
            .await?;
        written.insert(ns, content.clone());
    }
    Ok(())
}

/// The webhook configuration trusts this cluster's roots (`caBundle`),
/// through rotations.
async fn webhook_ca_bundle(ctx: &Ctx) -> Result<(), kube::Error> {
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    let api = Api::<MutatingWebhookConfiguration>::all(ctx.client.clone());
    let name = crate::config::WEBHOOK_CONFIGURATION;
    let Some(mut mwc) = api.get_opt(name).await? else {
        tracing::debug!("no MutatingWebhookConfiguration {name} yet");
        return Ok(());
    };
    let bundle = k8s_openapi::ByteString(ctx.shared.ca.load().bundle_pem().into_bytes());
    let mut changed = false;
    for w in mwc.webhooks.iter_mut().flatten() {
        if w.client_config.ca_bundle.as_ref() != Some(&bundle) {
            w.client_config.ca_bundle = Some(bundle.clone());
            changed = true;
        }
    }
    if changed {
        api.replace(name, &PostParams::default(), &mwc).await?;
        tracing::info!("webhook caBundle updated");
    }
    Ok(())
}

/// The status and join details, in the cluster's ConfigMap.
async fn publish(ctx: &Ctx) -> Result<(), ReconcileError> {
    let Store::Kube(store) = &ctx.shared.store else {
        return Ok(());
    };
    let join = serde_json::to_string_pretty(&ctx.shared.join_info()).expect("serializes");
    store
        .publish_status(join, ctx.shared.status().encode_to_vec(), isthmus_core::unix_now())
        .await
        .map_err(|e| ReconcileError::Mesh(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::fake::Fake;
    use isthmus_proto::{Backend, Service as MeshService};

    #[tokio::test]
    async fn imports_are_applied_and_stale_ones_removed() {
        let mut fake = Fake::new().await;
        let want: BTreeMap<ServiceKey, Import> = [(
            ServiceKey::new("demo", "echo"),
            Import {
                port: 8080,
                clusters: ["west".to_string()].into(),
            },
        )]
        .into();
        let ctx = fake.ctx.clone();
        let task = tokio::spawn(async move { imports(&ctx, &want).await });
        let svc = fake
            .answer(
                "PATCH",
                "/api/v1/namespaces/demo/services/derived-echo",
                200,
                serde_json::json!({
                    "apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": "derived-echo", "namespace": "demo"},
                    "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 8080}]}
                }),
            )
            .await;
        assert_eq!(svc.content_type, "application/apply-patch+yaml");
        assert_eq!(svc.body["metadata"]["labels"][SERVICE_NAME_LABEL], "echo");
        assert!(
            svc.body["spec"].get("selector").is_none(),
            "a derived Service selects no pods"
        );
        let si_path = "/apis/multicluster.x-k8s.io/v1beta1/namespaces/demo/serviceimports/echo";
        let si = fake
            .answer(
                "PATCH",
                si_path,
                200,
                serde_json::json!({
                    "apiVersion": "multicluster.x-k8s.io/v1beta1", "kind": "ServiceImport",
                    "metadata": {"name": "echo", "namespace": "demo", "generation": 1},
                    "spec": {"ports": [{"port": 8080}], "type": "ClusterSetIP", "ips": ["10.96.0.10"]}
                }),
            )
            .await;
        assert_eq!(
            si.body["spec"]["ips"][0], "10.96.0.10",
            "the import's IP is its derived Service's"
        );
        assert_eq!(si.body["spec"]["type"], "ClusterSetIP");
        let status = fake
            .answer("PATCH", &format!("{si_path}/status"), 200, si.body.clone())
            .await;
        assert_eq!(status.body["status"]["clusters"][0]["cluster"], "west");
        assert_eq!(status.body["status"]["conditions"][0]["type"], "Ready");
        // One import nobody exports any more, with its derived Service.
        fake.answer(
            "GET",
            "/apis/multicluster.x-k8s.io/v1beta1/serviceimports",
            200,
            serde_json::json!({
                "apiVersion": "multicluster.x-k8s.io/v1beta1", "kind": "ServiceImportList", "metadata": {},
                "items": [si.body, {
                    "apiVersion": "multicluster.x-k8s.io/v1beta1", "kind": "ServiceImport",
                    "metadata": {"name": "old", "namespace": "demo"},
                    "spec": {"ports": [{"port": 80}], "type": "ClusterSetIP"}
                }]
            }),
        )
        .await;
        let gone = serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"});
        fake.answer(
            "DELETE",
            "/apis/multicluster.x-k8s.io/v1beta1/namespaces/demo/serviceimports/old",
            200,
            gone.clone(),
        )
        .await;
        fake.answer(
            "GET",
            "/api/v1/services",
            200,
            serde_json::json!({
                "apiVersion": "v1", "kind": "ServiceList", "metadata": {},
                "items": [svc.body, {
                    "apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": "derived-old", "namespace": "demo",
                                 "labels": {SERVICE_NAME_LABEL: "old", "app.kubernetes.io/managed-by": "isthmus"}},
                    "spec": {"ports": [{"port": 80}]}
                }]
            }),
        )
        .await;
        fake.answer("DELETE", "/api/v1/namespaces/demo/services/derived-old", 200, gone)
            .await;
        assert!(task.await.unwrap().expect("mirrored"), "no linked peer to wait for");
    }

    fn svc(name: &str, exported: bool, clusters: &[&str]) -> MeshService {
        MeshService {
            namespace: "demo".into(),
            name: name.into(),
            port: 8080,
            exported,
            backends: clusters
                .iter()
                .map(|c| Backend {
                    cluster: c.to_string(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn imports_are_what_any_cluster_exports() {
        let services = [
            svc("local-only", false, &["east"]),
            svc("exported-here", true, &["east"]),
            svc("imported", false, &["west", "north"]),
            svc("both", false, &["east", "west"]),
        ];
        let want = desired("east", &services);
        let names: Vec<&str> = want.keys().map(|k| k.name.as_str()).collect();
        assert_eq!(names, ["both", "exported-here", "imported"]);
        let both = &want[&ServiceKey::new("demo", "both")];
        assert_eq!(
            both.clusters.iter().collect::<Vec<_>>(),
            ["west"],
            "not exported here: only west serves it"
        );
        let here = &want[&ServiceKey::new("demo", "exported-here")];
        assert_eq!(here.clusters.iter().collect::<Vec<_>>(), ["east"]);
    }

    #[test]
    fn derived_names_fit_a_service_name() {
        assert_eq!(derived_name("echo"), "derived-echo");
        let long = "a".repeat(63);
        let d = derived_name(&long);
        assert!(d.len() <= 63 && d.starts_with("derived-aaaa"), "{d}");
        assert_ne!(derived_name(&format!("{}b", "a".repeat(62))), d);
    }
}
