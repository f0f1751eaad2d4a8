//! The custom resources Isthmus reads and writes on Kubernetes.
//!
//! - `ServiceExport` and `ServiceImport` of the Multi-Cluster Services API
//!   (`multicluster.x-k8s.io`), as upstream mcs-api v0.5 defines them:
//!   `v1beta1` stored, `v1alpha1` served with the same schema.
//! - `Link` (`isthmus.dev/v1alpha1`, cluster-scoped): one per linked
//!   cluster, its state in the status; `isthmus link` creates one naming a
//!   Secret with the join token to spend, `isthmus unlink` deletes it.
//! - `TrafficPolicy` (`isthmus.dev/v1alpha1`): the local mode's policy
//!   document, as a resource beside the Service, with its verdict in status.

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResourceExt;
use kube::core::crd::merge_crds;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const MCS_GROUP: &str = "multicluster.x-k8s.io";
pub const GROUP: &str = "isthmus.dev";

/// The two served versions of an MCS resource share one schema, written
/// once here and instantiated per version below.
macro_rules! mcs_versions {
    ($version:ident, $v:literal) => {
        pub mod $version {
            use super::*;

            /// Declares that the Service of the same name and namespace is
            /// consumable from every cluster of the cluster set.
            #[derive(kube::CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
            #[kube(
                group = "multicluster.x-k8s.io",
                version = $v,
                kind = "ServiceExport",
                namespaced,
                status = "ServiceExportStatus",
                shortname = "svcex",
                category = "multicluster",
                printcolumn = r#"{"name":"Valid","type":"string","jsonPath":".status.conditions[?(@.type=='Valid')].status"}"#,
                printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type=='Ready')].status"}"#,
                printcolumn = r#"{"name":"Conflict","type":"string","jsonPath":".status.conditions[?(@.type=='Conflict')].status"}"#
            )]
            #[serde(rename_all = "camelCase")]
            pub struct ServiceExportSpec {
                #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
                pub exported_labels: BTreeMap<String, String>,
                #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
                pub exported_annotations: BTreeMap<String, String>,
            }

            /// A service imported from the clusters that export it.
            #[derive(kube::CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
            #[kube(
                group = "multicluster.x-k8s.io",
                version = $v,
                kind = "ServiceImport",
                namespaced,
                status = "ServiceImportStatus",
                shortname = "svcim",
                category = "multicluster",
                printcolumn = r#"{"name":"Type","type":"string","jsonPath":".spec.type"}"#,
                printcolumn = r#"{"name":"IP","type":"string","jsonPath":".spec.ips"}"#
            )]
            #[serde(rename_all = "camelCase")]
            pub struct ServiceImportSpec {
                pub ports: Vec<ServicePort>,
                #[serde(default, skip_serializing_if = "Vec::is_empty")]
                pub ips: Vec<String>,
                /// `ClusterSetIP` or `Headless`.
                #[serde(rename = "type")]
                pub type_: String,
                #[serde(default, skip_serializing_if = "Option::is_none")]
                pub session_affinity: Option<String>,
            }
        }
    };
}

mcs_versions!(v1alpha1, "v1alpha1");
mcs_versions!(v1beta1, "v1beta1");

pub use v1beta1::{ServiceExport, ServiceImport};

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
pub struct ServiceExportStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
    pub port: i32,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
pub struct ServiceImportStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clusters: Vec<ClusterStatus>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub struct ClusterStatus {
    pub cluster: String,
}

/// A link with another cluster of the cluster set, named after it.
#[derive(kube::CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "isthmus.dev",
    version = "v1alpha1",
    kind = "Link",
    status = "LinkStatus",
    category = "isthmus",
    printcolumn = r#"{"name":"State","type":"string","jsonPath":".status.state"}"#,
    printcolumn = r#"{"name":"Heartbeat","type":"string","jsonPath":".status.lastHeartbeat"}"#,
    printcolumn = r#"{"name":"Trust Domain","type":"string","jsonPath":".status.trustDomain"}"#,
    printcolumn = r#"{"name":"Roots","type":"string","jsonPath":".status.rootFingerprints"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct LinkSpec {
    /// A Secret in the controller's namespace whose `token` is a join token
    /// issued by the cluster this Link names: the controller spends it,
    /// then deletes the Secret. Unset on links the other cluster made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret: Option<String>,
    /// Which of the peer's exports this cluster accepts: `namespace/name`,
    /// `namespace/*` or `*`. Unset: any service that does not run in this
    /// cluster, or is exported from it too (`isthmus imports`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub imports: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LinkStatus {
    /// `pending`, `establishing`, `active` or `failing`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// When the peer's last heartbeat arrived (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_domain: Option<String>,
    /// The first 16 hex digits of the SHA-256 of each root the peer's
    /// bundle holds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub root_fingerprints: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Whether the peer holds every root of this cluster.
    #[serde(default)]
    pub peer_holds_our_roots: bool,
    /// Services imported from the peer now.
    #[serde(default)]
    pub imports: u32,
    /// The import scope in force (the spec's, once validated).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub import_scope: Vec<String>,
    /// Internal: carried from the controller's view to the condition.
    #[serde(skip)]
    pub import_problem: Option<String>,
    /// `Linked`: True once the join succeeded; False with the reason it
    /// was refused (`Malformed`, `Refused`, `Unreachable`,
    /// `FingerprintMismatch`, `AlreadyLinked`, `Error`).
    /// `ImportsAccepted`: False when the import scope is invalid
    /// (`InvalidScope`) or the peer's export list is over a limit
    /// (`TooManyServices`, `TooManyIdentities`, `TooManyEndpoints`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// The local mode's TrafficPolicy, as a resource.
#[derive(kube::CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "isthmus.dev",
    version = "v1alpha1",
    kind = "TrafficPolicy",
    namespaced,
    status = "TrafficPolicyStatus",
    category = "isthmus",
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type=='Accepted')].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type=='Accepted')].message"}"#
)]
pub struct TrafficPolicySpec {
    #[serde(flatten)]
    pub spec: isthmus_core::policy::Spec,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
pub struct TrafficPolicyStatus {
    /// `Accepted`: True, or False with the field at fault in the message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Every CRD Isthmus needs, as `kubectl apply` takes them.
pub fn all() -> Vec<CustomResourceDefinition> {
    let export = merge_crds(
        vec![v1alpha1::ServiceExport::crd(), v1beta1::ServiceExport::crd()],
        "v1beta1",
    )
    .expect("the two versions share names and scope");
    let import = merge_crds(
        vec![v1alpha1::ServiceImport::crd(), v1beta1::ServiceImport::crd()],
        "v1beta1",
    )
    .expect("the two versions share names and scope");
    vec![export, import, Link::crd(), TrafficPolicy::crd()]
}

/// The CRDs as one YAML stream.
pub fn yaml() -> String {
    all()
        .iter()
        .map(|c| format!("---\n{}", serde_saphyr::to_string(c).expect("CRDs serialize")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crds_have_the_upstream_names_and_versions() {
        let crds = all();
        let names: Vec<&str> = crds.iter().filter_map(|c| c.metadata.name.as_deref()).collect();
        assert_eq!(
            names,
            [
                "serviceexports.multicluster.x-k8s.io",
                "serviceimports.multicluster.x-k8s.io",
                "links.isthmus.dev",
                "trafficpolicies.isthmus.dev"
            ]
        );
        for c in &crds[..2] {
            let mut versions: Vec<(&str, bool, bool)> = c
                .spec
                .versions
                .iter()
                .map(|v| (v.name.as_str(), v.served, v.storage))
                .collect();
            versions.sort();
            assert_eq!(versions, [("v1alpha1", true, false), ("v1beta1", true, true)]);
        }
        assert_eq!(crds[2].spec.scope, "Cluster");
        assert_eq!(crds[3].spec.scope, "Namespaced");
        // Structural for old API servers: no type lists, every array's
        // items typed.
        let text = yaml();
        assert!(!text.contains("- 'null'") && !text.contains("- \"null\""), "{text}");
        if std::env::var_os("PRINT_CRDS").is_some() {
            println!("{text}");
        }
    }
}
