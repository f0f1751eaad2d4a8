//! Everything a cluster needs, as manifests (`isthmus install`, and the
//! Helm chart under deploy/helm, generated from the same code): the
//! namespace, the CRDs, the controller's RBAC, the controller (two
//! replicas, one leads) and its Services, the gateway and its
//! LoadBalancer Service, and the sidecar-injecting webhook.

use std::collections::BTreeMap;

use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, ServiceReference, WebhookClientConfig,
};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, Namespace,
    ObjectFieldSelector, PodSpec, PodTemplateSpec, Probe, ProjectedVolumeSource, SecurityContext, Service,
    ServiceAccount, ServiceAccountTokenProjection, ServicePort, ServiceSpec, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::ObjectMeta;
use serde::{Deserialize, Serialize};

use super::inject::{CLUSTER_DIR, INJECT_LABEL, TOKEN_DIR};
use crate::config::{DEFAULT_NAMESPACE, WEBHOOK_CONFIGURATION};

pub const CONTROL_PORT: i32 = 15010;
pub const PEERING_PORT: i32 = 15011;
pub const WEBHOOK_PORT: i32 = 15017;
pub const CONTROLLER_ADMIN_PORT: i32 = 15022;
pub const TUNNEL_PORT: i32 = 15008;
pub const QUIC_PORT: i32 = 15443;
pub const GATEWAY_ADMIN_PORT: i32 = 15021;

/// What `isthmus install` takes (flags, or a `--values` YAML file with
/// these keys in camelCase).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Values {
    pub cluster: String,
    /// [default: `<cluster>.mesh`]
    pub trust_domain: Option<String>,
    /// The image with the `isthmus` binary (the Dockerfile at the top).
    pub image: String,
    pub controller_replicas: i32,
    /// `LoadBalancer`, or `NodePort` where there is no load balancer.
    pub gateway_service_type: String,
    /// The controller's peering address as other clusters dial it
    /// (host:port; a DNS name is best), put in join tokens.
    pub peering_address: Option<String>,
    /// The gateway's QUIC address as other clusters' gateways dial it.
    pub gateway_address: Option<String>,
}

impl Default for Values {
    fn default() -> Self {
        Self {
            cluster: String::new(),
            trust_domain: None,
            image: concat!("isthmus:", env!("CARGO_PKG_VERSION")).into(),
            controller_replicas: 2,
            gateway_service_type: "LoadBalancer".into(),
            peering_address: None,
            gateway_address: None,
        }
    }
}

fn meta(name: &str, namespaced: bool) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: namespaced.then(|| DEFAULT_NAMESPACE.into()),
        labels: Some(labels(name)),
        ..Default::default()
    }
}

fn labels(app: &str) -> BTreeMap<String, String> {
    [
        ("app.kubernetes.io/name".to_string(), app.to_string()),
        ("app.kubernetes.io/part-of".to_string(), "isthmus".to_string()),
    ]
    .into()
}

fn field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn port(name: &str, port: i32, protocol: &str) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: port,
        protocol: Some(protocol.into()),
        ..Default::default()
    }
}

fn ready(port: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some("/ready".into()),
            port: IntOrString::Int(port),
            ..Default::default()
        }),
        period_seconds: Some(2),
        ..Default::default()
    }
}

fn locked_down() -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(65532),
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        capabilities: Some(k8s_openapi::api::core::v1::Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn deployment(name: &str, replicas: i32, sa: &str, container: Container, volumes: Vec<Volume>) -> Deployment {
    Deployment {
        metadata: meta(name, true),
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(labels(name)),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(
                        labels(name)
                            .into_iter()
                            .chain([(INJECT_LABEL.to_string(), "disabled".to_string())])
                            .collect(),
                    ),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(sa.into()),
                    containers: vec![container],
                    volumes: (!volumes.is_empty()).then_some(volumes),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn service(name: &str, type_: &str, selector: &str, ports: Vec<(&str, i32, i32, &str)>) -> Service {
    Service {
        metadata: meta(name, true),
        spec: Some(ServiceSpec {
            type_: Some(type_.into()),
            selector: Some(labels(selector)),
            ports: Some(
                ports
                    .into_iter()
                    .map(|(n, p, target, proto)| ServicePort {
                        name: Some(n.into()),
                        port: p,
                        target_port: Some(IntOrString::Int(target)),
                        protocol: Some(proto.into()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn controller(v: &Values) -> Deployment {
    let td = v.trust_domain.clone().unwrap_or_else(|| format!("{}.mesh", v.cluster));
    let svc = format!("isthmus-controller.{DEFAULT_NAMESPACE}.svc");
    let peering = v
        .peering_address
        .clone()
        .unwrap_or_else(|| format!("isthmus-peering.{DEFAULT_NAMESPACE}.svc:{PEERING_PORT}"));
    let args = [
        "controller".to_string(),
        "--kube".into(),
        "--cluster".into(),
        v.cluster.clone(),
        "--trust-domain".into(),
        td,
        "--control-addr".into(),
        format!("0.0.0.0:{CONTROL_PORT}"),
        "--peering-addr".into(),
        format!("0.0.0.0:{PEERING_PORT}"),
        "--admin-addr".into(),
        format!("0.0.0.0:{CONTROLLER_ADMIN_PORT}"),
        "--advertise-control".into(),
        format!("{svc}:{CONTROL_PORT}"),
        "--advertise-peering".into(),
        peering,
        "--webhook-addr".into(),
        format!("0.0.0.0:{WEBHOOK_PORT}"),
        "--sidecar-image".into(),
        v.image.clone(),
    ];
    let c = Container {
        name: "controller".into(),
        image: Some(v.image.clone()),
        args: Some(args.to_vec()),
        env: Some(vec![field("POD_NAME", "metadata.name")]),
        ports: Some(vec![
            port("control", CONTROL_PORT, "TCP"),
            port("peering", PEERING_PORT, "TCP"),
            port("webhook", WEBHOOK_PORT, "TCP"),
            port("admin", CONTROLLER_ADMIN_PORT, "TCP"),
        ]),
        // Only the leader is ready: Services send to it alone.
        readiness_probe: Some(ready(CONTROLLER_ADMIN_PORT)),
        security_context: Some(locked_down()),
        ..Default::default()
    };
    deployment(
        "isthmus-controller",
        v.controller_replicas,
        super::rbac::SERVICE_ACCOUNT,
        c,
        vec![],
    )
}

fn gateway(v: &Values) -> Deployment {
    let mut args = vec![
        "gateway".to_string(),
        "--dir".into(),
        CLUSTER_DIR.into(),
        "--credential-file".into(),
        format!("{TOKEN_DIR}/token"),
        "--tunnel-addr".into(),
        format!("$(POD_IP):{TUNNEL_PORT}"),
        "--quic-addr".into(),
        format!("0.0.0.0:{QUIC_PORT}"),
        "--admin-addr".into(),
        format!("0.0.0.0:{GATEWAY_ADMIN_PORT}"),
    ];
    // Peers dial what the gateway announces: its load balancer's name
    // (`gatewayAddress`); the in-cluster name serves only until it is set.
    args.extend([
        "--advertise".into(),
        v.gateway_address
            .clone()
            .unwrap_or_else(|| format!("isthmus-gateway.{DEFAULT_NAMESPACE}.svc:{QUIC_PORT}")),
    ]);
    let c = Container {
        name: "gateway".into(),
        image: Some(v.image.clone()),
        args: Some(args),
        env: Some(vec![field("POD_IP", "status.podIP")]),
        ports: Some(vec![
            port("tunnel", TUNNEL_PORT, "TCP"),
            port("quic", QUIC_PORT, "UDP"),
            port("admin", GATEWAY_ADMIN_PORT, "TCP"),
        ]),
        readiness_probe: Some(ready(GATEWAY_ADMIN_PORT)),
        security_context: Some(locked_down()),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "isthmus-token".into(),
                mount_path: TOKEN_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            },
            VolumeMount {
                name: "isthmus-cluster".into(),
                mount_path: CLUSTER_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            },
        ]),
        ..Default::default()
    };
    let volumes = vec![
        Volume {
            name: "isthmus-token".into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(super::auth::AUDIENCE.into()),
                        expiration_seconds: Some(3600),
                        path: "token".into(),
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume {
            name: "isthmus-cluster".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: super::store::CLUSTER_CONFIGMAP.into(),
                ..Default::default()
            }),
            ..Default::default()
        },
    ];
    deployment("isthmus-gateway", 1, "gateway", c, volumes)
}

fn webhook_configuration() -> MutatingWebhookConfiguration {
    let not_system = LabelSelectorRequirement {
        key: "kubernetes.io/metadata.name".into(),
        operator: "NotIn".into(),
        values: Some(vec!["kube-system".into(), DEFAULT_NAMESPACE.into()]),
    };
    let hook = |name: &str, ns: Vec<LabelSelectorRequirement>, pod: Vec<LabelSelectorRequirement>| MutatingWebhook {
        name: name.into(),
        admission_review_versions: vec!["v1".into()],
        side_effects: "None".into(),
        failure_policy: Some("Fail".into()),
        reinvocation_policy: Some("Never".into()),
        timeout_seconds: Some(10),
        client_config: WebhookClientConfig {
            service: Some(ServiceReference {
                name: "isthmus-controller".into(),
                namespace: DEFAULT_NAMESPACE.into(),
                path: Some(super::webhook::PATH.into()),
                port: Some(443),
            }),
            // Kept current by the controller (its roots, through rotations).
            ca_bundle: None,
            url: None,
        },
        rules: Some(vec![RuleWithOperations {
            api_groups: Some(vec![String::new()]),
            api_versions: Some(vec!["v1".into()]),
            operations: Some(vec!["CREATE".into()]),
            resources: Some(vec!["pods".into()]),
            scope: Some("Namespaced".into()),
        }]),
        namespace_selector: Some(LabelSelector {
            match_expressions: Some(ns),
            ..Default::default()
        }),
        object_selector: Some(LabelSelector {
            match_expressions: Some(pod),
            ..Default::default()
        }),
        ..Default::default()
    };
    let req = |op: &str, values: &[&str]| LabelSelectorRequirement {
        key: INJECT_LABEL.into(),
        operator: op.into(),
        values: Some(values.iter().map(|s| s.to_string()).collect()),
    };
    MutatingWebhookConfiguration {
        metadata: meta(WEBHOOK_CONFIGURATION, false),
        webhooks: Some(vec![
            // Pods of namespaces that opted in, unless the pod opts out.
            hook(
                "namespace.inject.isthmus.dev",
                vec![req("In", &["enabled"]), not_system.clone()],
                vec![req("NotIn", &["disabled"])],
            ),
            // Pods that opt in, in namespaces that did not decide.
            hook(
                "pod.inject.isthmus.dev",
                vec![req("NotIn", &["enabled", "disabled"]), not_system],
                vec![req("In", &["enabled"])],
            ),
        ]),
    }
}

/// Every object, in the order `kubectl apply` needs them.
pub fn objects(v: &Values) -> Vec<serde_json::Value> {
    let rbac = super::rbac::objects(DEFAULT_NAMESPACE);
    let mut out: Vec<serde_json::Value> = vec![to(&Namespace {
        metadata: ObjectMeta {
            name: Some(DEFAULT_NAMESPACE.into()),
            labels: Some(
                labels(DEFAULT_NAMESPACE)
                    .into_iter()
                    .chain([(INJECT_LABEL.to_string(), "disabled".to_string())])
                    .collect(),
            ),
            ..Default::default()
        },
        ..Default::default()
    })];
    out.extend(super::crds::all().iter().map(to));
    out.extend([
        to(&rbac.service_account),
        to(&rbac.cluster_role),
        to(&rbac.cluster_role_binding),
        to(&rbac.role),
        to(&rbac.role_binding),
        to(&ServiceAccount {
            metadata: meta("gateway", true),
            ..Default::default()
        }),
        to(&controller(v)),
        to(&service(
            "isthmus-controller",
            "ClusterIP",
            "isthmus-controller",
            vec![
                ("control", CONTROL_PORT, CONTROL_PORT, "TCP"),
                ("webhook", 443, WEBHOOK_PORT, "TCP"),
            ],
        )),
        to(&service(
            "isthmus-peering",
            &v.gateway_service_type,
            "isthmus-controller",
            vec![("peering", PEERING_PORT, PEERING_PORT, "TCP")],
        )),
        to(&gateway(v)),
        to(&service(
            "isthmus-gateway",
            &v.gateway_service_type,
            "isthmus-gateway",
            vec![("quic", QUIC_PORT, QUIC_PORT, "UDP")],
        )),
        to(&webhook_configuration()),
    ]);
    out
}

fn to<T: Serialize>(object: &T) -> serde_json::Value {
    serde_json::to_value(object).expect("manifests serialize")
}

/// The objects as one YAML stream.
pub fn yaml(objects: &[serde_json::Value]) -> String {
    objects
        .iter()
        .map(|o| format!("---\n{}", serde_saphyr::to_string(o).expect("YAML")))
        .collect()
}

/// The Helm chart's template (deploy/helm/isthmus): the same objects, with
/// the values as Helm placeholders (a test keeps the file in step).
pub fn helm_template() -> String {
    let v = Values {
        cluster: "{{ .Values.cluster }}".into(),
        // A raw string (backquotes): YAML would escape double quotes.
        trust_domain: Some("{{ .Values.trustDomain | default (printf `%s.mesh` .Values.cluster) }}".into()),
        image: "{{ .Values.image }}".into(),
        controller_replicas: 2,
        gateway_service_type: "{{ .Values.gatewayServiceType }}".into(),
        peering_address: Some("{{ .Values.peeringAddress }}".into()),
        gateway_address: Some("{{ .Values.gatewayAddress }}".into()),
    };
    let text = yaml(&objects(&v)).replacen("replicas: 2", "replicas: {{ .Values.controllerReplicas }}", 1);
    format!("# Generated by `isthmus install` from federation-controller/src/k8s/install.rs; do not edit.\n{text}")
}

/// What `isthmus uninstall` prints: every object but the namespace and,
/// unless asked, the CRDs (deleting a CRD deletes every ServiceExport,
/// ServiceImport, Link and TrafficPolicy with it).
pub fn uninstall(v: &Values, with_crds: bool) -> Vec<serde_json::Value> {
    objects(v)
        .into_iter()
        .filter(|o| o["kind"] != "Namespace" && (with_crds || o["kind"] != "CustomResourceDefinition"))
        .rev()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values() -> Values {
        Values {
            cluster: "east".into(),
            ..Default::default()
        }
    }

    #[test]
    fn install_has_every_object_once() {
        let objs = objects(&values());
        let kinds: Vec<String> = objs
            .iter()
            .map(|o| {
                format!(
                    "{}/{}",
                    o["kind"].as_str().unwrap(),
                    o["metadata"]["name"].as_str().unwrap()
                )
            })
            .collect();
        for want in [
            "Namespace/isthmus-system",
            "CustomResourceDefinition/serviceexports.multicluster.x-k8s.io",
            "ClusterRole/isthmus-controller",
            "ServiceAccount/gateway",
            "Deployment/isthmus-controller",
            "Deployment/isthmus-gateway",
            "Service/isthmus-gateway",
            "MutatingWebhookConfiguration/isthmus-sidecar-injector",
        ] {
            assert_eq!(kinds.iter().filter(|k| *k == want).count(), 1, "{want} in {kinds:?}");
        }
        let controller = objs.iter().find(|o| o["kind"] == "Deployment").unwrap();
        assert_eq!(controller["spec"]["replicas"], 2);
        let args = controller["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
        assert!(
            args.contains("\"--cluster\",\"east\"") && args.contains("east.mesh"),
            "{args}"
        );
        let gw_svc = objs
            .iter()
            .find(|o| o["kind"] == "Service" && o["metadata"]["name"] == "isthmus-gateway")
            .unwrap();
        assert_eq!(gw_svc["spec"]["type"], "LoadBalancer");
        assert_eq!(gw_svc["spec"]["ports"][0]["protocol"], "UDP");
    }

    #[test]
    fn the_webhook_never_sees_namespaces_that_did_not_opt_in() {
        let w = webhook_configuration();
        for hook in w.webhooks.unwrap() {
            let ns = hook.namespace_selector.unwrap().match_expressions.unwrap();
            assert!(
                ns.iter().any(|r| r.key == INJECT_LABEL),
                "{}: selects namespaces by their label",
                hook.name
            );
            assert!(
                ns.iter()
                    .any(|r| r.values.as_ref().unwrap().contains(&"kube-system".to_string()))
            );
            assert_eq!(hook.failure_policy.as_deref(), Some("Fail"));
            assert_eq!(hook.side_effects, "None");
        }
    }

    /// The chart renders to what `isthmus install` prints, with Helm's
    /// substitutions done by hand (no Helm here): every placeholder is one
    /// of these, and the result parses to the same objects.
    #[test]
    fn the_helm_chart_is_install_with_placeholders() {
        let rendered = helm_template()
            .replace("{{ .Values.cluster }}", "east")
            .replace(
                "{{ .Values.trustDomain | default (printf `%s.mesh` .Values.cluster) }}",
                "east.mesh",
            )
            .replace("{{ .Values.image }}", "isthmus:0.1.0")
            .replace("{{ .Values.controllerReplicas }}", "2")
            .replace("{{ .Values.gatewayServiceType }}", "LoadBalancer")
            .replace(
                "{{ .Values.peeringAddress }}",
                "isthmus-peering.isthmus-system.svc:15011",
            )
            .replace(
                "{{ .Values.gatewayAddress }}",
                "isthmus-gateway.isthmus-system.svc:15443",
            );
        assert!(!rendered.contains("{{"), "a placeholder the test does not know");
        let parsed: Vec<serde_json::Value> = serde_saphyr::from_multiple(&rendered).unwrap();
        let parsed: Vec<serde_json::Value> = parsed.into_iter().filter(|d| !d.is_null()).collect();
        let v = Values {
            cluster: "east".into(),
            trust_domain: Some("east.mesh".into()),
            image: "isthmus:0.1.0".into(),
            ..Default::default()
        };
        assert_eq!(parsed, objects(&v));
    }

    #[test]
    fn uninstall_keeps_crds_and_namespace_unless_asked() {
        let v = values();
        let plain = uninstall(&v, false);
        assert!(
            plain
                .iter()
                .all(|o| o["kind"] != "CustomResourceDefinition" && o["kind"] != "Namespace")
        );
        assert!(
            uninstall(&v, true)
                .iter()
                .any(|o| o["kind"] == "CustomResourceDefinition")
        );
    }
}
