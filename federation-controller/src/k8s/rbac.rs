//! What the controller may do in the Kubernetes API: every permission it
//! needs, listed once here, and nothing more. `deploy/kubernetes/rbac.yaml`
//! is generated from this list (a test keeps it in step), and
//! `isthmus check` asks the API server whether each rule is granted.

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject};
use kube::api::ObjectMeta;

/// The controller's service account, in its namespace.
pub const SERVICE_ACCOUNT: &str = "isthmus-controller";

/// One permission: `verbs` on `resources` of `group` ("" is the core group).
#[derive(Clone, Copy, Debug)]
pub struct Rule {
    pub group: &'static str,
    pub resources: &'static [&'static str],
    pub verbs: &'static [&'static str],
    /// Only these objects, if any are named.
    pub names: &'static [&'static str],
    /// Why the controller needs it.
    pub why: &'static str,
}

const READ: &[&str] = &["get", "list", "watch"];
/// Read, and add or remove the controller's finalizer.
const READ_FINALIZE: &[&str] = &["get", "list", "watch", "patch", "update"];
const STATUS: &[&str] = &["get", "patch", "update"];
const OWN: &[&str] = &["get", "list", "watch", "create", "patch", "update", "delete"];

/// Cluster-wide: the resources users create in their namespaces, and what
/// the controller makes beside them.
pub const CLUSTER: &[Rule] = &[
    Rule {
        group: "multicluster.x-k8s.io",
        resources: &["serviceexports"],
        verbs: READ_FINALIZE,
        names: &[],
        why: "read exports, and hold a finalizer to withdraw them",
    },
    Rule {
        group: "multicluster.x-k8s.io",
        resources: &["serviceexports/status", "serviceimports/status"],
        verbs: STATUS,
        names: &[],
        why: "write their conditions",
    },
    Rule {
        group: "multicluster.x-k8s.io",
        resources: &["serviceimports"],
        verbs: OWN,
        names: &[],
        why: "keep imports in step with the cluster set",
    },
    Rule {
        group: "isthmus.dev",
        resources: &["links"],
        verbs: OWN,
        names: &[],
        why: "spend join tokens, show links, make Links for links peers made",
    },
    Rule {
        group: "isthmus.dev",
        resources: &["trafficpolicies"],
        verbs: READ_FINALIZE,
        names: &[],
        why: "read policies, and hold a finalizer to remove them",
    },
    Rule {
        group: "isthmus.dev",
        resources: &["links/status", "trafficpolicies/status"],
        verbs: STATUS,
        names: &[],
        why: "write their status",
    },
    Rule {
        group: "",
        resources: &["services"],
        verbs: OWN,
        names: &[],
        why: "check exported Services; make the derived Service of each import (its ClusterSet IP)",
    },
    Rule {
        group: "discovery.k8s.io",
        resources: &["endpointslices"],
        verbs: READ,
        names: &[],
        why: "notice endpoints of exported Services that have no sidecar",
    },
    Rule {
        group: "",
        resources: &["configmaps"],
        verbs: &["get", "create", "patch", "update"],
        names: &[],
        why: "publish its bundle, addresses and status (isthmus-cluster), and give every namespace the ConfigMap its injected pods mount",
    },
    Rule {
        group: "",
        resources: &["namespaces"],
        verbs: READ,
        names: &[],
        why: "find the namespaces that need that ConfigMap",
    },
    Rule {
        group: "admissionregistration.k8s.io",
        resources: &["mutatingwebhookconfigurations"],
        verbs: &["get", "update"],
        names: &[crate::config::WEBHOOK_CONFIGURATION],
        why: "keep its injection webhook's caBundle in step with the cluster's roots",
    },
    Rule {
        group: "authentication.k8s.io",
        resources: &["tokenreviews"],
        verbs: &["create"],
        names: &[],
        why: "check the service-account tokens sidecars and gateways present",
    },
];

/// In the controller's own namespace only.
pub const NAMESPACED: &[Rule] = &[
    Rule {
        group: "",
        resources: &["secrets"],
        verbs: OWN,
        names: &[],
        why: "its state, CA keys, join tokens, and the token Secrets `isthmus link` leaves",
    },
    Rule {
        group: "coordination.k8s.io",
        resources: &["leases"],
        verbs: &["get", "create", "update", "patch"],
        names: &[],
        why: "leader election between replicas",
    },
];

fn rules(list: &[Rule]) -> Vec<PolicyRule> {
    list.iter()
        .map(|r| PolicyRule {
            api_groups: Some(vec![r.group.to_string()]),
            resources: Some(r.resources.iter().map(|s| s.to_string()).collect()),
            verbs: r.verbs.iter().map(|s| s.to_string()).collect(),
            resource_names: (!r.names.is_empty()).then(|| r.names.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        })
        .collect()
}

fn meta(name: &str, namespace: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: namespace.map(str::to_string),
        labels: Some([("app.kubernetes.io/part-of".to_string(), "isthmus".to_string())].into()),
        ..Default::default()
    }
}

/// The controller's service account, and its roles and bindings.
pub struct Objects {
    pub service_account: ServiceAccount,
    pub cluster_role: ClusterRole,
    pub cluster_role_binding: ClusterRoleBinding,
    pub role: Role,
    pub role_binding: RoleBinding,
}

pub fn objects(namespace: &str) -> Objects {
    let subject = || {
        Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: SERVICE_ACCOUNT.into(),
            namespace: Some(namespace.into()),
            ..Default::default()
        }])
    };
    let role_ref = |kind: &str| RoleRef {
        api_group: "rbac.authorization.k8s.io".into(),
        kind: kind.into(),
        name: SERVICE_ACCOUNT.into(),
    };
    Objects {
        service_account: ServiceAccount {
            metadata: meta(SERVICE_ACCOUNT, Some(namespace)),
            ..Default::default()
        },
        cluster_role: ClusterRole {
            metadata: meta(SERVICE_ACCOUNT, None),
            rules: Some(rules(CLUSTER)),
            ..Default::default()
        },
        cluster_role_binding: ClusterRoleBinding {
            metadata: meta(SERVICE_ACCOUNT, None),
            role_ref: role_ref("ClusterRole"),
            subjects: subject(),
        },
        role: Role {
            metadata: meta(SERVICE_ACCOUNT, Some(namespace)),
            rules: Some(rules(NAMESPACED)),
        },
        role_binding: RoleBinding {
            metadata: meta(SERVICE_ACCOUNT, Some(namespace)),
            role_ref: role_ref("Role"),
            subjects: subject(),
        },
    }
}

/// The service account, roles and bindings, as one YAML stream.
pub fn yaml(namespace: &str) -> String {
    let o = objects(namespace);
    let docs = [
        serde_saphyr::to_string(&o.service_account),
        serde_saphyr::to_string(&o.cluster_role),
        serde_saphyr::to_string(&o.cluster_role_binding),
        serde_saphyr::to_string(&o.role),
        serde_saphyr::to_string(&o.role_binding),
    ];
    docs.into_iter()
        .map(|d| format!("---\n{}", d.expect("RBAC objects serialize")))
        .collect()
}
