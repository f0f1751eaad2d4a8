//! What the admission webhook does to a pod, as a pure function: the pod
//! in, the pod with its sidecar out (the webhook sends the difference as a
//! JSON patch). Unit-tested here; `tests/e2e/tests/kubernetes.rs` has a
//! real API server call it.
//!
//! A pod opts in by its namespace's label `isthmus.dev/inject=enabled`, or
//! its own (which also opts a pod out: `disabled`). It gets:
//! - an init container `isthmus-init` (`isthmus redirect`) that sends the
//!   app's TCP through the sidecar (nftables; NET_ADMIN for that step only);
//! - the sidecar `isthmus-sidecar`, as a native sidecar (an init container
//!   with `restartPolicy: Always`, Kubernetes 1.29 and later: started
//!   before the app, stopped after it) or else as the first container, as
//!   user 1337, whose own traffic the redirection leaves alone;
//! - a projected service-account token for audience `isthmus` (its
//!   identity) and the `isthmus-cluster` ConfigMap (its controller's
//!   address and trust bundle), mounted read-only.
//!
//! The service it serves comes from the annotations `isthmus.dev/service`
//! and `isthmus.dev/port` (the app listens on that port); without them the
//! pod is a client only.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
    ObjectFieldSelector, Pod, Probe, ProjectedVolumeSource, SecurityContext, ServiceAccountTokenProjection, Volume,
    VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

pub const INJECT_LABEL: &str = "isthmus.dev/inject";
pub const SERVICE_ANNOTATION: &str = "isthmus.dev/service";
pub const PORT_ANNOTATION: &str = "isthmus.dev/port";
/// Inbound ports the redirection leaves alone (comma separated), for
/// example a port kubelet probes directly.
pub const EXCLUDE_INBOUND_ANNOTATION: &str = "isthmus.dev/exclude-inbound-ports";
/// Ports of the app's own outbound calls the redirection leaves alone.
pub const EXCLUDE_OUTBOUND_ANNOTATION: &str = "isthmus.dev/exclude-outbound-ports";
/// Destinations (CIDRs) the app reaches directly, not through the sidecar.
pub const EXCLUDE_CIDRS_ANNOTATION: &str = "isthmus.dev/exclude-outbound-cidrs";
/// Service ports carried as opaque TCP without detection (server-first
/// protocols: they would otherwise wait 1 s for it).
pub const OPAQUE_PORTS_ANNOTATION: &str = "isthmus.dev/opaque-ports";
/// Set on injected pods: what injected them.
pub const INJECTED_ANNOTATION: &str = "isthmus.dev/injected";
pub const SIDECAR: &str = "isthmus-sidecar";
pub const INIT: &str = "isthmus-init";
/// The sidecar's user: the redirection exempts its traffic by this UID.
pub const SIDECAR_UID: i64 = 1337;
pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PORT: u16 = 15006;
pub const ADMIN_PORT: u16 = 15020;
/// Where the sidecar finds its token and its cluster's files.
pub const TOKEN_DIR: &str = "/var/run/secrets/isthmus";
pub const CLUSTER_DIR: &str = "/var/run/isthmus/cluster";

/// How pods are injected.
#[derive(Clone, Debug)]
pub struct Injection {
    /// The image holding the `isthmus` binary.
    pub image: String,
    /// Whether the API server runs native sidecars (1.29 and later).
    pub native_sidecars: bool,
}

/// Whether a Kubernetes version (`major`, `minor` as `/version` gives
/// them, e.g. "1", "29+") runs native sidecars by default.
pub fn native_sidecars(major: &str, minor: &str) -> bool {
    let num = |s: &str| s.trim_end_matches('+').parse::<u32>().unwrap_or(0);
    num(major) > 1 || (num(major) == 1 && num(minor) >= 29)
}

#[derive(Debug, PartialEq)]
pub enum Decision {
    Skip(&'static str),
    Inject(Box<Pod>),
    /// The pod's own annotations are wrong: it is refused with the reason
    /// rather than started with a sidecar that cannot run.
    Refuse(String),
}

/// The comma-separated list an annotation holds, each item checked.
fn annotation_list(
    annotations: &BTreeMap<String, String>,
    key: &str,
    valid: fn(&str) -> bool,
    what: &'static str,
) -> Result<Vec<String>, BadAnnotation> {
    let Some(v) = annotations.get(key) else {
        return Ok(vec![]);
    };
    let items: Vec<String> = v
        .split(',')
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect();
    match items.iter().find(|i| !valid(i)) {
        Some(bad) => Err(BadAnnotation {
            key: key.to_string(),
            value: bad.clone(),
            want: what,
        }),
        None => Ok(items),
    }
}

fn is_port(s: &str) -> bool {
    s.parse::<u16>().is_ok_and(|p| p != 0)
}

fn is_cidr(s: &str) -> bool {
    let (ip, len) = s.split_once('/').unwrap_or((s, ""));
    match ip.parse::<std::net::IpAddr>() {
        Ok(addr) => {
            let max = if addr.is_ipv4() { 32 } else { 128 };
            len.is_empty() || len.parse::<u8>().is_ok_and(|l| l <= max)
        }
        Err(_) => false,
    }
}

/// An `isthmus.dev/` annotation holding something it cannot: the pod is
/// refused with this as the reason.
#[derive(Debug, thiserror::Error)]
#[error("annotation {key}: {value:?} is not {want}")]
pub struct BadAnnotation {
    key: String,
    value: String,
    want: &'static str,
}

/// What the pod's annotations ask of its sidecar and redirection.
struct Asked {
    exclude_inbound: Vec<String>,
    exclude_outbound: Vec<String>,
    exclude_cidrs: Vec<String>,
    opaque: Vec<String>,
}

impl Asked {
    fn read(a: &BTreeMap<String, String>) -> Result<Self, BadAnnotation> {
        let port = "a port (1-65535)";
        Ok(Self {
            exclude_inbound: annotation_list(a, EXCLUDE_INBOUND_ANNOTATION, is_port, port)?,
            exclude_outbound: annotation_list(a, EXCLUDE_OUTBOUND_ANNOTATION, is_port, port)?,
            exclude_cidrs: annotation_list(a, EXCLUDE_CIDRS_ANNOTATION, is_cidr, "a CIDR (10.0.0.0/8)")?,
            opaque: annotation_list(a, OPAQUE_PORTS_ANNOTATION, is_port, port)?,
        })
    }
}

/// The pod with its sidecar, or why it is left alone. (The namespace
/// check is the webhook configuration's: the API server calls only for
/// pods that opted in or whose namespace did.)
pub fn inject(pod: &Pod, cfg: &Injection) -> Decision {
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    if labels.get(INJECT_LABEL).map(String::as_str) == Some("disabled") {
        return Decision::Skip("the pod opts out");
    }
    let Some(spec) = &pod.spec else {
        return Decision::Skip("the pod has no spec");
    };
    let has = |cs: &Option<Vec<Container>>| cs.iter().flatten().any(|c| c.name == SIDECAR || c.name == INIT);
    if has(&Some(spec.containers.clone())) || has(&spec.init_containers) {
        return Decision::Skip("the pod has its sidecar already");
    }
    if spec.host_network == Some(true) {
        return Decision::Skip("the pod uses the host's network: redirecting it would redirect the node");
    }
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    let asked = match Asked::read(&annotations) {
        Ok(a) => a,
        Err(why) => return Decision::Refuse(why.to_string()),
    };
    let mut out = pod.clone();
    let spec = out.spec.as_mut().expect("checked above");
    let sa = spec.service_account_name.clone().unwrap_or_else(|| "default".into());
    let sidecar = sidecar(cfg, &sa, &annotations, &asked);
    let init = redirect_init(cfg, &asked);
    let init_containers = spec.init_containers.get_or_insert_with(Vec::new);
    // The redirection first, so nothing the app or other init containers
    // send escapes the sidecar; a native sidecar right after it.
    init_containers.insert(0, init);
    if cfg.native_sidecars {
        let mut s = sidecar;
        s.restart_policy = Some("Always".into());
        init_containers.insert(1, s);
    } else {
        spec.containers.insert(0, sidecar);
    }
    let volumes = spec.volumes.get_or_insert_with(Vec::new);
    volumes.push(Volume {
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
    });
    volumes.push(Volume {
        name: "isthmus-cluster".into(),
        config_map: Some(ConfigMapVolumeSource {
            name: super::store::CLUSTER_CONFIGMAP.into(),
            ..Default::default()
        }),
        ..Default::default()
    });
    out.metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(INJECTED_ANNOTATION.into(), env!("CARGO_PKG_VERSION").into());
    Decision::Inject(Box::new(out))
}

fn env(name: &str, path: &str) -> EnvVar {
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

fn sidecar(cfg: &Injection, service_account: &str, annotations: &BTreeMap<String, String>, asked: &Asked) -> Container {
    let mut args: Vec<String> = [
        "sidecar",
        "--dir",
        CLUSTER_DIR,
        "--credential-file",
        &format!("{TOKEN_DIR}/token"),
        "--namespace",
        "$(POD_NAMESPACE)",
        "--service-account",
        service_account,
        "--instance",
        "$(POD_NAME)",
        "--inbound-addr",
        &format!("$(POD_IP):{INBOUND_PORT}"),
        "--outbound-addr",
        &format!("127.0.0.1:{OUTBOUND_PORT}"),
        "--admin-addr",
        &format!("0.0.0.0:{ADMIN_PORT}"),
        "--transparent",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let (Some(service), Some(port)) = (annotations.get(SERVICE_ANNOTATION), annotations.get(PORT_ANNOTATION)) {
        args.extend([
            "--service".into(),
            service.clone(),
            "--port".into(),
            port.clone(),
            "--app".into(),
            format!("127.0.0.1:{port}"),
        ]);
    }
    if !asked.opaque.is_empty() {
        args.extend(["--opaque-port".into(), asked.opaque.join(",")]);
    }
    Container {
        name: SIDECAR.into(),
        image: Some(cfg.image.clone()),
        args: Some(args),
        env: Some(vec![
            env("POD_NAME", "metadata.name"),
            env("POD_NAMESPACE", "metadata.namespace"),
            env("POD_IP", "status.podIP"),
        ]),
        ports: Some(vec![
            ContainerPort {
                name: Some("isthmus-inbound".into()),
                container_port: INBOUND_PORT.into(),
                ..Default::default()
            },
            ContainerPort {
                name: Some("isthmus-admin".into()),
                container_port: ADMIN_PORT.into(),
                ..Default::default()
            },
        ]),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/ready".into()),
                port: IntOrString::Int(ADMIN_PORT.into()),
                ..Default::default()
            }),
            period_seconds: Some(2),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            run_as_user: Some(SIDECAR_UID),
            run_as_group: Some(SIDECAR_UID),
            run_as_non_root: Some(true),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            ..Default::default()
        }),
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
    }
}

fn redirect_init(cfg: &Injection, asked: &Asked) -> Container {
    let mut exclude = vec![ADMIN_PORT.to_string()];
    exclude.extend(asked.exclude_inbound.iter().cloned());
    let mut args: Vec<String> = vec![
        "redirect".into(),
        "--outbound-port".into(),
        OUTBOUND_PORT.to_string(),
        "--inbound-port".into(),
        INBOUND_PORT.to_string(),
        "--uid".into(),
        SIDECAR_UID.to_string(),
        "--exclude-inbound-ports".into(),
        exclude.join(","),
    ];
    if !asked.exclude_outbound.is_empty() {
        args.extend(["--exclude-outbound-ports".into(), asked.exclude_outbound.join(",")]);
    }
    if !asked.exclude_cidrs.is_empty() {
        args.extend(["--exclude-outbound-cidrs".into(), asked.exclude_cidrs.join(",")]);
    }
    Container {
        name: INIT.into(),
        image: Some(cfg.image.clone()),
        args: Some(args),
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".into(), "NET_RAW".into()]),
                drop: Some(vec!["ALL".into()]),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(yaml: &str) -> Pod {
        serde_saphyr::from_str(yaml).expect("pod")
    }

    const APP: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: echo-1\n  namespace: demo\n  annotations:\n    isthmus.dev/service: echo\n    isthmus.dev/port: \"8080\"\nspec:\n  serviceAccountName: echo\n  containers:\n  - name: app\n    image: echo\n";

    fn cfg(native: bool) -> Injection {
        Injection {
            image: "isthmus:test".into(),
            native_sidecars: native,
        }
    }

    fn injected(p: &Pod, native: bool) -> Pod {
        match inject(p, &cfg(native)) {
            Decision::Inject(p) => *p,
            other => panic!("not injected: {other:?}"),
        }
    }

    #[test]
    fn a_native_sidecar_after_the_redirection() {
        let out = injected(&pod(APP), true);
        let spec = out.spec.unwrap();
        let inits: Vec<&str> = spec.init_containers.iter().flatten().map(|c| c.name.as_str()).collect();
        assert_eq!(inits, [INIT, SIDECAR]);
        let sc = &spec.init_containers.as_ref().unwrap()[1];
        assert_eq!(sc.restart_policy.as_deref(), Some("Always"));
        assert_eq!(spec.containers.len(), 1, "the app alone");
        let args = sc.args.clone().unwrap().join(" ");
        assert!(
            args.contains("--service echo --port 8080 --app 127.0.0.1:8080"),
            "{args}"
        );
        assert!(args.contains("--service-account echo"), "{args}");
        assert_eq!(sc.security_context.as_ref().unwrap().run_as_user, Some(SIDECAR_UID));
        let token = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "isthmus-token")
            .unwrap();
        let projection = token.projected.as_ref().unwrap().sources.as_ref().unwrap()[0]
            .service_account_token
            .clone()
            .unwrap();
        assert_eq!(projection.audience.as_deref(), Some("isthmus"));
        assert!(out.metadata.annotations.unwrap().contains_key(INJECTED_ANNOTATION));
    }

    #[test]
    fn a_regular_container_before_native_sidecars_existed() {
        let out = injected(&pod(APP), false);
        let spec = out.spec.unwrap();
        let names: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, [SIDECAR, "app"]);
        assert_eq!(spec.init_containers.unwrap().len(), 1);
        assert!(spec.containers[0].restart_policy.is_none());
    }

    #[test]
    fn the_redirection_step_has_net_admin_and_the_exclusions() {
        let mut p = pod(APP);
        p.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(EXCLUDE_INBOUND_ANNOTATION.into(), "8081, 9090".into());
        let out = injected(&p, true);
        let init = &out.spec.unwrap().init_containers.unwrap()[0];
        let args = init.args.clone().unwrap().join(" ");
        assert!(args.contains("--exclude-inbound-ports 15020,8081,9090"), "{args}");
        let caps = init.security_context.as_ref().unwrap().capabilities.as_ref().unwrap();
        assert!(caps.add.as_ref().unwrap().contains(&"NET_ADMIN".to_string()));
    }

    fn annotated(pairs: &[(&str, &str)]) -> Pod {
        let mut p = pod(APP);
        let a = p.metadata.annotations.as_mut().unwrap();
        for (k, v) in pairs {
            a.insert(k.to_string(), v.to_string());
        }
        p
    }

    #[test]
    fn annotations_reach_the_redirection_and_the_sidecar() {
        let p = annotated(&[
            (EXCLUDE_OUTBOUND_ANNOTATION, "5432, 6379"),
            (EXCLUDE_CIDRS_ANNOTATION, "10.0.0.0/8,fd00::/8"),
            (OPAQUE_PORTS_ANNOTATION, "25"),
        ]);
        let spec = injected(&p, true).spec.unwrap();
        let inits = spec.init_containers.unwrap();
        let init = inits[0].args.clone().unwrap().join(" ");
        assert!(init.contains("--exclude-outbound-ports 5432,6379"), "{init}");
        assert!(init.contains("--exclude-outbound-cidrs 10.0.0.0/8,fd00::/8"), "{init}");
        let sc = inits[1].args.clone().unwrap().join(" ");
        assert!(sc.contains("--opaque-port 25"), "{sc}");
    }

    #[test]
    fn a_wrong_annotation_refuses_the_pod_with_the_reason() {
        for (key, value) in [
            (EXCLUDE_INBOUND_ANNOTATION, "80,http"),
            (EXCLUDE_OUTBOUND_ANNOTATION, "70000"),
            (EXCLUDE_CIDRS_ANNOTATION, "10.0.0.0/33"),
            (OPAQUE_PORTS_ANNOTATION, "0"),
        ] {
            match inject(&annotated(&[(key, value)]), &cfg(true)) {
                Decision::Refuse(why) => assert!(why.contains(key), "{why}"),
                d => panic!("{key}={value}: {d:?}"),
            }
        }
    }

    #[test]
    fn pods_that_opt_out_or_have_a_sidecar_are_left_alone() {
        let mut out_label = pod(APP);
        out_label.metadata.labels = Some([(INJECT_LABEL.to_string(), "disabled".to_string())].into());
        assert_eq!(inject(&out_label, &cfg(true)), Decision::Skip("the pod opts out"));
        let twice = injected(&pod(APP), true);
        assert!(
            matches!(inject(&twice, &cfg(true)), Decision::Skip(_)),
            "injection is idempotent"
        );
        let mut host = pod(APP);
        host.spec.as_mut().unwrap().host_network = Some(true);
        assert!(matches!(inject(&host, &cfg(true)), Decision::Skip(_)));
    }

    #[test]
    fn native_sidecars_from_1_29() {
        assert!(!native_sidecars("1", "20"));
        assert!(!native_sidecars("1", "28+"));
        assert!(native_sidecars("1", "29"));
        assert!(native_sidecars("1", "35+"));
    }
}
