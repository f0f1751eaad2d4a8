//! `isthmus export` and `isthmus apply` on Kubernetes: a `ServiceExport`
//! beside the Service, a `TrafficPolicy` beside it, each with the verdict
//! the controller writes in its status.

use std::time::Duration;

use isthmus_controller::k8s::crds::v1beta1::ServiceExportSpec;
use isthmus_controller::k8s::crds::{ServiceExport, TrafficPolicy, TrafficPolicySpec};
use isthmus_controller::k8s::export::{READY, VALID};
use isthmus_controller::k8s::policy::ACCEPTED;
use isthmus_core::naming::ServiceKey;
use isthmus_core::policy::PolicyDocument;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, DeleteParams, Patch, PatchParams};

use super::{Kube, api_error, condition, no_answer, wait_for};
use crate::error::{CliError, exit};

const WAIT: Duration = Duration::from_secs(30);
const MANAGER: &str = "isthmus-cli";

pub async fn export(k: &Kube, key: &ServiceKey) -> Result<(), CliError> {
    let own = k.join_info().await?;
    let services = Api::<Service>::namespaced(k.client.clone(), &key.namespace);
    if services
        .get_opt(&key.name)
        .await
        .map_err(|e| api_error("reading the Service", e))?
        .is_none()
    {
        return Err(CliError::new(
            exit::NOT_FOUND,
            format!(
                "service {key} does not exist in cluster {}: there is no such Service",
                own.cluster
            ),
        ));
    }
    let api = Api::<ServiceExport>::namespaced(k.client.clone(), &key.namespace);
    let mut se = ServiceExport::new(&key.name, ServiceExportSpec::default());
    se.metadata.namespace = Some(key.namespace.clone());
    let applied = api
        .patch(&key.name, &PatchParams::apply(MANAGER), &Patch::Apply(&se))
        .await
        .map_err(|e| api_error(&format!("writing ServiceExport {key} (are the MCS CRDs installed?)"), e))?;
    let generation = applied.metadata.generation;
    let conds = wait_for(WAIT, || async {
        let se = api
            .get_opt(&key.name)
            .await
            .map_err(|e| api_error("reading the ServiceExport", e))?;
        let conds = se.and_then(|s| s.status).map(|s| s.conditions).unwrap_or_default();
        Ok(condition(&conds, VALID, generation).is_some().then_some(conds))
    })
    .await?
    .ok_or_else(|| no_answer(k, &format!("ServiceExport {key}"), WAIT))?;
    let valid = condition(&conds, VALID, None).expect("waited for it");
    if valid.status != "True" {
        let code = if valid.reason == "NoService" {
            exit::NOT_FOUND
        } else {
            exit::REFUSED
        };
        return Err(CliError::new(code, format!("{}: {}", valid.reason, valid.message)));
    }
    println!(
        "exported {key} from cluster {}: linked clusters can call {}.{}.svc.clusterset.local",
        own.cluster, key.name, key.namespace
    );
    if let Some(ready) = condition(&conds, READY, None).filter(|c| c.status != "True") {
        println!("note: not ready yet: {}", ready.message);
    }
    Ok(())
}

/// Read, check and apply a TrafficPolicy document as a resource.
pub async fn apply(k: &Kube, doc: PolicyDocument, delete: bool) -> Result<(), CliError> {
    let own = k.join_info().await?;
    let policy = doc
        .to_proto()
        .map_err(|e| CliError::new(exit::BAD_INPUT, e.to_string()))?;
    let key = ServiceKey::new(&policy.namespace, &policy.service);
    let api = Api::<TrafficPolicy>::namespaced(k.client.clone(), &doc.metadata.namespace);
    let name = doc.metadata.name.clone();
    if delete {
        let what = match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => "deleted",
            Err(kube::Error::Api(e)) if e.code == 404 => "had no policy to delete",
            Err(e) => return Err(api_error(&format!("deleting TrafficPolicy {name}"), e)),
        };
        println!("traffic policy for {key} in cluster {}: {what}", own.cluster);
        return Ok(());
    }
    let before = api
        .get_opt(&name)
        .await
        .map_err(|e| api_error("reading the TrafficPolicy (are the Isthmus CRDs installed?)", e))?
        .and_then(|p| p.metadata.generation);
    let mut tp = TrafficPolicy::new(&name, TrafficPolicySpec { spec: doc.spec });
    tp.metadata.namespace = Some(doc.metadata.namespace.clone());
    let applied = api
        .patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&tp))
        .await
        .map_err(|e| api_error(&format!("writing TrafficPolicy {name}"), e))?;
    let generation = applied.metadata.generation;
    let accepted = wait_for(WAIT, || async {
        let tp = api
            .get_opt(&name)
            .await
            .map_err(|e| api_error("reading the TrafficPolicy", e))?;
        let conds = tp.and_then(|t| t.status).map(|s| s.conditions).unwrap_or_default();
        Ok(condition(&conds, ACCEPTED, generation).cloned())
    })
    .await?
    .ok_or_else(|| no_answer(k, &format!("TrafficPolicy {name}"), WAIT))?;
    if accepted.status != "True" {
        return Err(CliError::new(
            exit::REFUSED,
            format!("{}: {}", accepted.reason, accepted.message),
        ));
    }
    let what = if before == generation {
        "unchanged (already in place)"
    } else {
        "applied"
    };
    println!("traffic policy for {key} in cluster {}: {what}", own.cluster);
    Ok(())
}
