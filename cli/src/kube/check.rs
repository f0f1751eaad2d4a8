//! What `isthmus check --kube` verifies before the cluster's own status:
//! the CRDs, the controller's RBAC (asked of the API server, rule by
//! rule, with a SubjectAccessReview), the leader (its Lease), and that the
//! leader publishes its status.

use isthmus_controller::k8s::lease::LEASE_NAME;
use isthmus_controller::k8s::rbac::{self, Rule};
use isthmus_proto::StatusResponse;
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};

use super::{Kube, STALE_STATUS, api_error};
use crate::admin::Finding;
use crate::error::CliError;

pub async fn findings(k: &Kube) -> Result<(Vec<Finding>, Option<StatusResponse>), CliError> {
    let mut out = Vec::new();
    crds(k, &mut out).await?;
    out.push(permissions(k).await?);
    out.push(leader(k).await?);
    let status = match k.status().await {
        Ok((s, age)) => {
            out.push(Finding::new(
                age <= STALE_STATUS,
                format!("controller status published {age}s ago"),
                "the leader publishes every 5s: if this is old, no controller leads (see above)",
            ));
            Some(s)
        }
        Err(e) => {
            out.push(Finding::new(
                false,
                e.message,
                "start the controller (docs/kubernetes.md); it publishes its status once it leads",
            ));
            None
        }
    };
    Ok((out, status))
}

async fn crds(k: &Kube, out: &mut Vec<Finding>) -> Result<(), CliError> {
    let api = Api::<CustomResourceDefinition>::all(k.client.clone());
    for want in isthmus_controller::k8s::crds::all() {
        let name = want.metadata.name.clone().unwrap_or_default();
        let have = api.get_opt(&name).await.map_err(|e| api_error("reading CRDs", e))?;
        let missing: Vec<String> = want
            .spec
            .versions
            .iter()
            .filter(|v| {
                !have
                    .as_ref()
                    .is_some_and(|h| h.spec.versions.iter().any(|hv| hv.name == v.name && hv.served))
            })
            .map(|v| v.name.clone())
            .collect();
        out.push(Finding::new(
            missing.is_empty(),
            if missing.is_empty() {
                format!("CRD {name} installed")
            } else {
                format!("CRD {name}: version(s) {} not served", missing.join(", "))
            },
            "kubectl apply -f deploy/kubernetes/crds.yaml",
        ));
    }
    Ok(())
}

/// Whether the controller's service account holds each permission it needs.
async fn permissions(k: &Kube) -> Result<Finding, CliError> {
    let api = Api::<SubjectAccessReview>::all(k.client.clone());
    let user = format!("system:serviceaccount:{}:{}", k.namespace, rbac::SERVICE_ACCOUNT);
    let groups = vec![
        "system:serviceaccounts".to_string(),
        format!("system:serviceaccounts:{}", k.namespace),
        "system:authenticated".to_string(),
    ];
    let mut asked = 0;
    let mut missing = Vec::new();
    let rules = rbac::CLUSTER
        .iter()
        .map(|r| (r, None))
        .chain(rbac::NAMESPACED.iter().map(|r| (r, Some(k.namespace.clone()))));
    for (rule, namespace) in rules {
        let Rule {
            group,
            resources,
            verbs,
            names,
            ..
        } = *rule;
        for resource in resources {
            let (resource, subresource) = match resource.split_once('/') {
                Some((r, s)) => (r, Some(s.to_string())),
                None => (*resource, None),
            };
            for verb in verbs {
                asked += 1;
                let review = SubjectAccessReview {
                    spec: SubjectAccessReviewSpec {
                        user: Some(user.clone()),
                        groups: Some(groups.clone()),
                        resource_attributes: Some(ResourceAttributes {
                            group: Some(group.to_string()),
                            resource: Some(resource.to_string()),
                            subresource: subresource.clone(),
                            verb: Some(verb.to_string()),
                            namespace: namespace.clone(),
                            name: names.first().map(|n| n.to_string()),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                    ..Default::default()
                };
                let answer = api
                    .create(&PostParams::default(), &review)
                    .await
                    .map_err(|e| api_error("asking the API server about the controller's RBAC", e))?;
                if !answer.status.is_some_and(|s| s.allowed) {
                    let full = subresource
                        .as_ref()
                        .map_or(resource.to_string(), |s| format!("{resource}/{s}"));
                    missing.push(format!(
                        "{verb} {full}{}",
                        if group.is_empty() {
                            String::new()
                        } else {
                            format!(".{group}")
                        }
                    ));
                }
            }
        }
    }
    Ok(Finding::new(
        missing.is_empty(),
        if missing.is_empty() {
            format!("controller RBAC: all {asked} permissions granted to {user}")
        } else {
            format!("controller RBAC: {user} may not {}", missing.join(", "))
        },
        "kubectl apply -f deploy/kubernetes/rbac.yaml",
    ))
}

async fn leader(k: &Kube) -> Result<Finding, CliError> {
    let lease = Api::<Lease>::namespaced(k.client.clone(), &k.namespace)
        .get_opt(LEASE_NAME)
        .await
        .map_err(|e| api_error("reading the controller's Lease", e))?;
    let hint =
        "no controller replica renews the Lease: are the controller's pods running? (kubectl -n <namespace> get pods)";
    let Some(spec) = lease.and_then(|l| l.spec) else {
        return Ok(Finding::new(
            false,
            format!("no leader: Lease {LEASE_NAME} does not exist"),
            hint,
        ));
    };
    let holder = spec.holder_identity.unwrap_or_default();
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(0));
    let age = spec
        .renew_time
        .map(|t| isthmus_core::unix_now() - t.0.as_second())
        .unwrap_or(i64::MAX);
    let fresh = !holder.is_empty() && age <= duration.max(1);
    Ok(Finding::new(
        fresh,
        if holder.is_empty() {
            "no leader: the Lease was given up".to_string()
        } else {
            format!("leader {holder}, Lease renewed {age}s ago (lasts {duration}s)")
        },
        hint,
    ))
}
