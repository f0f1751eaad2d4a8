//! Exports and traffic policies: `isthmus export`, `isthmus apply`.

use isthmus_core::naming::ServiceKey;
use isthmus_proto::ExportRequest;

use super::connect;
use crate::error::{CliError, exit};
use crate::kube::Target;

pub async fn export(target: &Target, service: &str) -> Result<(), CliError> {
    let key = ServiceKey::parse(service).map_err(|e| CliError::new(exit::BAD_INPUT, e.to_string()))?;
    let dir = match target {
        Target::Dir(dir) => dir,
        Target::Kube(k) => return crate::kube::service::export(k, &key).await,
    };
    let ServiceKey { namespace, name } = key;
    let c = connect(dir).await?;
    c.admin()
        .export(ExportRequest {
            namespace: namespace.clone(),
            name: name.clone(),
        })
        .await?;
    println!(
        "exported {namespace}/{name} from cluster {}: linked clusters can call {name}.{namespace}.svc.clusterset.local",
        c.info.cluster
    );
    Ok(())
}

/// Read, check and apply a TrafficPolicy document.
pub async fn apply(target: &Target, file: &str, delete: bool) -> Result<(), CliError> {
    let text = super::read_input(file)?;
    let doc: isthmus_core::policy::PolicyDocument = serde_saphyr::from_str(&text)
        .map_err(|e| CliError::new(exit::BAD_INPUT, format!("{file} is not a TrafficPolicy: {e}")))?;
    let policy = doc
        .to_proto()
        .map_err(|e| CliError::new(exit::BAD_INPUT, format!("{file}: {e}")))?;
    let dir = match target {
        Target::Dir(dir) => dir,
        Target::Kube(k) => return crate::kube::service::apply(k, doc, delete).await,
    };
    let c = connect(dir).await?;
    let key = ServiceKey::new(&policy.namespace, &policy.service);
    let r = c
        .admin()
        .apply_policy(isthmus_proto::ApplyPolicyRequest {
            policy: Some(policy),
            delete,
        })
        .await?
        .into_inner();
    let what = match (delete, r.changed) {
        (true, true) => "deleted",
        (true, false) => "had no policy to delete",
        (false, true) => "applied",
        (false, false) => "unchanged (already in place)",
    };
    println!("traffic policy for {key} in cluster {}: {what}", c.info.cluster);
    Ok(())
}
