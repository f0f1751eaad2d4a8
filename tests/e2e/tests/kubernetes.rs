//! Isthmus on Kubernetes, against two real API servers (kube-apiserver
//! 1.20 with its own etcd each, started here on loopback): the
//! controllers run as processes with least-privilege RBAC (their own
//! service-account tokens), keep their state in the API and elect a
//! leader; the CLI works through kubeconfigs; gateways and sidecars prove
//! who they are with tokens the API server minted (TokenRequest) and the
//! controller checked (TokenReview). A call crosses through the real data
//! path with the caller's identity, and the leading controller is killed
//! while calls run.
//!
//! Run: `cargo test -p isthmus-e2e --test kubernetes -- --nocapture`
//! (the first run builds kube-apiserver, a few minutes; see
//! scripts/kube-apiserver).

use std::path::Path;
use std::time::{Duration, Instant};

use isthmus_controller::k8s::crds::{Link, ServiceExport, ServiceImport, TrafficPolicy};
use isthmus_e2e::apiserver::{ApiServer, free_port};
use isthmus_e2e::{Component, ECHO, Impact, Load, eventually, fails, get_via, ok};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use kube::api::{Api, ApiResource, DynamicObject, ObjectMeta, Patch, PatchParams, PostParams};

const NS: &str = isthmus_controller::config::DEFAULT_NAMESPACE;

/// One cluster: its API server, controller replicas, gateway.
struct Cluster {
    api: ApiServer,
    /// Controller replicas by name.
    replicas: Vec<(String, Component)>,
    /// Where components read `controller.json` and `ca.pem` (a pod mounts
    /// them from the controller's ConfigMap).
    dir: String,
    _gateway: Option<Component>,
}

impl Cluster {
    fn start(root: &Path, api: ApiServer, name: &str, replicas: usize, ip: &str) -> Self {
        api.install();
        let kubeconfig = api.kubeconfig_of(NS, isthmus_controller::k8s::rbac::SERVICE_ACCOUNT);
        let ports: Vec<(u16, u16)> = (0..replicas).map(|_| (free_port(), free_port())).collect();
        let list = |f: fn(&(u16, u16)) -> u16| {
            ports
                .iter()
                .map(|p| format!("127.0.0.1:{}", f(p)))
                .collect::<Vec<_>>()
                .join(",")
        };
        let (controls, peerings) = (list(|p| p.0), list(|p| p.1));
        let replicas = ports
            .iter()
            .enumerate()
            .map(|(i, (control, peering))| {
                let replica = format!("{name}-{i}");
                let c = Component::start(
                    root,
                    &format!("{replica}-controller"),
                    &format!(
                        "controller --kubeconfig {} --cluster {name} --replica {replica} \
                         --control-addr 127.0.0.1:{control} --peering-addr 127.0.0.1:{peering} --admin-addr 127.0.0.1:0 \
                         --advertise-control {controls} --advertise-peering {peerings}",
                        kubeconfig.display()
                    ),
                );
                (replica, c)
            })
            .collect();
        let dir = api.cluster_dir().display().to_string();
        let gw_token = api.component_token(NS, "gateway");
        let gateway = Component::start(
            root,
            &format!("{name}-gateway"),
            &format!(
                "gateway --dir {dir} --credential-file {} --tunnel-addr {ip}.2:0 --quic-addr {ip}.2:0 --admin-addr {ip}.2:0",
                gw_token.display()
            ),
        );
        Cluster {
            api,
            replicas,
            dir,
            _gateway: Some(gateway),
        }
    }

    fn kubeconfig(&self) -> String {
        self.api.admin.display().to_string()
    }

    /// The replica holding the Lease.
    fn leader(&self) -> Option<String> {
        self.api.run(async |c| {
            let lease = Api::<Lease>::namespaced(c, NS)
                .get_opt(isthmus_controller::k8s::lease::LEASE_NAME)
                .await
                .ok()??;
            lease.spec?.holder_identity.filter(|h| !h.is_empty())
        })
    }

    fn isthmus(&self, args: &[&str]) -> String {
        let mut all = args.to_vec();
        all.extend(["--kubeconfig", self.api.admin.to_str().unwrap()]);
        ok(&all)
    }
}

fn service(name: &str, port: i32) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("demo".into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            ports: Some(vec![ServicePort {
                port,
                ..Default::default()
            }]),
            selector: Some([("app".to_string(), name.to_string())].into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn condition(conds: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition], t: &str) -> Option<(String, String)> {
    conds
        .iter()
        .find(|c| c.type_ == t)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

#[test]
fn two_clusters_on_real_api_servers() {
    let tmp = tempfile::tempdir().unwrap();
    // ISTHMUS_E2E_KEEP=1 keeps the logs (and API servers' data) after the test.
    let root = &if std::env::var_os("ISTHMUS_E2E_KEEP").is_some() {
        tmp.keep()
    } else {
        tmp.path().to_path_buf()
    };
    let east = Cluster::start(root, ApiServer::start(root, "east"), "east", 2, "127.0.51");
    let west = Cluster::start(root, ApiServer::start(root, "west"), "west", 1, "127.0.52");

    // East serves demo/echo: a Service, the app, and its sidecar, which
    // proves it is demo/echo with its service-account token.
    east.api.run(async |c| {
        Api::<Service>::namespaced(c, "demo")
            .create(&PostParams::default(), &service("echo", 8080))
            .await
            .unwrap()
    });
    let echo = Component::start(root, "east-echo", "echo --cluster east --listen 127.0.51.20:0");
    let echo_token = east.api.component_token("demo", "echo");
    let _echo_sidecar = Component::start(
        root,
        "east-echo-sidecar",
        &format!(
            "sidecar --dir {} --credential-file {} --namespace demo --service echo --port 8080 --app {} \
             --inbound-addr 127.0.51.20:0 --outbound-addr 127.0.51.20:0 --admin-addr 127.0.51.20:0",
            east.dir,
            echo_token.display(),
            echo.addr("listen")
        ),
    );
    let client_token = west.api.component_token("demo", "client");
    let client = Component::start(
        root,
        "west-client",
        &format!(
            "sidecar --dir {} --credential-file {} --namespace demo --service-account client \
             --inbound-addr 127.0.52.30:0 --outbound-addr 127.0.52.30:0 --admin-addr 127.0.52.30:0",
            west.dir,
            client_token.display()
        ),
    );
    let proxy = client.addr("outbound");

    // A token of one service account cannot serve another's Service, nor
    // one that does not exist: the controller asks the API server.
    let (code, err) = fails(&[
        "sidecar",
        "--dir",
        &east.dir,
        "--credential-file",
        echo_token.to_str().unwrap(),
        "--namespace",
        "demo",
        "--service-account",
        "other",
        "--service",
        "echo",
        "--port",
        "8080",
        "--app",
        "127.0.0.1:9",
        "--inbound-addr",
        "127.0.51.21:0",
        "--outbound-addr",
        "127.0.51.21:0",
        "--admin-addr",
        "127.0.51.21:0",
    ]);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("demo/echo, not demo/other"), "{err}");

    // Link west to east through the API: a token made with east's
    // kubeconfig, spent by west's controller.
    let (code, err) = fails(&["link", "--kubeconfig", &west.kubeconfig(), "not-a-token"]);
    assert_eq!(code, 2, "{err}");
    let token = east.isthmus(&["token", "create"]).trim().to_string();
    let listed = east.isthmus(&["token", "list"]);
    assert!(listed.contains("usable"), "{listed}");
    let out = west.isthmus(&["link", &token]);
    assert!(out.contains("linked cluster west with cluster east"), "{out}");
    let (code, err) = fails(&["link", "--kubeconfig", &west.kubeconfig(), &token]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("already linked"), "{err}");
    // Both sides show a Link; east made its own for the link west made.
    for (c, peer) in [(&west, "east"), (&east, "west")] {
        let link = eventually(&format!("Link {peer} active"), Duration::from_secs(30), || {
            c.api.run(async |k| {
                let l = Api::<Link>::all(k).get_opt(peer).await.ok()??;
                let s = l.status?;
                (s.state.as_deref() == Some("active") && s.last_heartbeat.is_some()).then_some(s)
            })
        });
        assert_eq!(link.trust_domain.as_deref(), Some(&*format!("{peer}.mesh")));
        assert_eq!(link.root_fingerprints.len(), 1, "{link:?}");
    }
    let listed = east.isthmus(&["token", "list"]);
    assert!(listed.contains("used") && listed.contains("west"), "{listed}");

    // Export: a ServiceExport in east, a ServiceImport with a ClusterSet IP in west.
    let (code, err) = fails(&["export", "--kubeconfig", &east.kubeconfig(), "demo/nope"]);
    assert_eq!(code, 3, "{err}");
    let exported = Instant::now();
    let out = east.isthmus(&["export", "demo/echo"]);
    assert!(out.contains("exported demo/echo from cluster east"), "{out}");
    let import = eventually("the ServiceImport in west", Duration::from_secs(30), || {
        west.api.run(async |k| {
            let si = Api::<ServiceImport>::namespaced(k, "demo")
                .get_opt("echo")
                .await
                .ok()??;
            let s = si.status.clone()?;
            (s.clusters.iter().any(|c| c.cluster == "east") && !si.spec.ips.is_empty()).then_some(si)
        })
    });
    let export_to_import = exported.elapsed();
    assert_eq!(import.spec.type_, "ClusterSetIP");
    assert_eq!(import.spec.ports[0].port, 8080);
    let derived = west
        .api
        .run(async |k| Api::<Service>::namespaced(k, "demo").get("derived-echo").await.unwrap());
    assert_eq!(
        derived.spec.and_then(|s| s.cluster_ip),
        Some(import.spec.ips[0].clone()),
        "the import's IP is its derived Service's"
    );
    let se = east
        .api
        .run(async |k| Api::<ServiceExport>::namespaced(k, "demo").get("echo").await.unwrap());
    let conds = se.status.unwrap().conditions;
    assert_eq!(
        condition(&conds, "Valid"),
        Some(("True".into(), "Valid".into())),
        "{conds:?}"
    );
    assert_eq!(
        condition(&conds, "Ready"),
        Some(("True".into(), "Ready".into())),
        "{conds:?}"
    );
    assert_eq!(
        condition(&conds, "Conflict"),
        Some(("False".into(), "NoConflicts".into())),
        "{conds:?}"
    );

    // A call crosses, and east's sidecar saw west's client identity.
    let r = eventually("echo across clusters", Duration::from_secs(30), || {
        get_via(&proxy, ECHO).ok().filter(|r| r.status == 200)
    });
    let v = r.json();
    assert_eq!(v["cluster"], "east", "{v}");
    assert_eq!(v["client_identity"], "spiffe://west.mesh/ns/demo/sa/client", "{v}");

    // Pods without sidecars: an EndpointSlice (what the controller manager
    // would write) with three ready endpoints, one of them meshed.
    east.api.run(async |k| {
        let ar = ApiResource {
            group: "discovery.k8s.io".into(),
            version: "v1beta1".into(),
            api_version: "discovery.k8s.io/v1beta1".into(),
            kind: "EndpointSlice".into(),
            plural: "endpointslices".into(),
        };
        let mut slice = DynamicObject::new("echo-abcde", &ar).within("demo");
        slice.metadata.labels = Some([("kubernetes.io/service-name".to_string(), "echo".to_string())].into());
        slice.data = serde_json::json!({
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.1.0.1"], "conditions": {"ready": true}},
                {"addresses": ["10.1.0.2"], "conditions": {"ready": true}},
                {"addresses": ["10.1.0.3"]}
            ],
            "ports": [{"port": 8080, "protocol": "TCP"}]
        });
        Api::<DynamicObject>::namespaced_with(k, "demo", &ar)
            .create(&PostParams::default(), &slice)
            .await
            .unwrap()
    });
    let meshed = eventually("the Meshed condition", Duration::from_secs(60), || {
        east.api.run(async |k| {
            let se = Api::<ServiceExport>::namespaced(k, "demo").get("echo").await.ok()?;
            let c = se
                .status?
                .conditions
                .into_iter()
                .find(|c| c.type_ == "isthmus.dev/Meshed")?;
            (c.status == "False").then_some(c)
        })
    });
    assert_eq!(meshed.reason, "EndpointsWithoutSidecar");
    assert!(meshed.message.starts_with("2 of 3"), "{}", meshed.message);

    // A TrafficPolicy through the CLI is accepted; one written straight to
    // the API with an invalid weight is refused in its status.
    let policy = root.join("policy.yaml");
    std::fs::write(
        &policy,
        "apiVersion: isthmus.dev/v1alpha1\nkind: TrafficPolicy\nmetadata:\n  name: echo\n  namespace: demo\n\
         spec:\n  routes:\n  - split:\n    - cluster: east\n      weight: 100\n",
    )
    .unwrap();
    let out = west.isthmus(&["apply", "-f", policy.to_str().unwrap()]);
    assert!(out.contains("applied"), "{out}");
    west.api.run(async |k| {
        let bad = serde_json::json!({
            "apiVersion": "isthmus.dev/v1alpha1", "kind": "TrafficPolicy",
            "metadata": {"name": "bad", "namespace": "demo"},
            "spec": {"service": "other", "routes": [{"split": [{"cluster": "east", "weight": 0}]}]}
        });
        Api::<TrafficPolicy>::namespaced(k, "demo")
            .patch("bad", &PatchParams::apply("e2e"), &Patch::Apply(&bad))
            .await
            .unwrap()
    });
    let refused = eventually("the invalid policy's status", Duration::from_secs(30), || {
        west.api.run(async |k| {
            let tp = Api::<TrafficPolicy>::namespaced(k, "demo").get("bad").await.ok()?;
            tp.status?.conditions.into_iter().find(|c| c.type_ == "Accepted")
        })
    });
    assert_eq!((refused.status.as_str(), refused.reason.as_str()), ("False", "Invalid"));
    assert!(refused.message.contains("weight"), "{}", refused.message);

    // An import scope set through the Link: in force, and accepted.
    let out = west.isthmus(&["imports", "east", "demo/*"]);
    assert!(out.contains("imports only demo/*"), "{out}");
    let link = west.api.run(async |k| Api::<Link>::all(k).get("east").await.unwrap());
    assert_eq!(link.spec.imports, ["demo/*"]);
    let s = link.status.unwrap();
    assert_eq!(s.import_scope, ["demo/*"]);
    assert_eq!(
        condition(&s.conditions, "ImportsAccepted"),
        Some(("True".into(), "Accepted".into())),
        "{:?}",
        s.conditions
    );
    let (code, err) = fails(&["imports", "--kubeconfig", &west.kubeconfig(), "east", "demo/ec*"]);
    assert_eq!(code, 2, "{err}");
    let (code, err) = fails(&["imports", "--kubeconfig", &west.kubeconfig(), "nowhere", "demo/*"]);
    assert_eq!(code, 3, "{err}");
    west.isthmus(&["imports", "east"]);

    // Status and check read what the controller publishes.
    let status = west.isthmus(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["links"][0]["cluster"], "east", "{status}");
    assert_eq!(status["links"][0]["state"], "active", "{status}");
    let checked = east.isthmus(&["check"]);
    assert!(checked.contains("controller RBAC: all"), "{checked}");
    assert!(
        checked.contains("CRD serviceexports.multicluster.x-k8s.io installed"),
        "{checked}"
    );

    // Kill east's leading controller while calls run: the data plane
    // keeps serving, and the standby takes over.
    let leader = east.leader().expect("east has a leader");
    let load = Load::start(&proxy, ECHO, 4, Duration::from_millis(20));
    std::thread::sleep(Duration::from_millis(500));
    let mut east = east;
    let killed = Instant::now();
    let (_, c) = east.replicas.iter_mut().find(|(n, _)| *n == leader).unwrap();
    c.kill();
    let new_leader = eventually("a new leader in east", Duration::from_secs(60), || {
        east.leader().filter(|l| *l != leader)
    });
    // Serving means publishing its status afresh.
    eventually("the new leader to publish", Duration::from_secs(30), || {
        let s = east.isthmus(&["status", "--json"]);
        let s: serde_json::Value = serde_json::from_str(&s).ok()?;
        (s["services"].as_array()?.iter().any(|svc| svc["name"] == "echo")).then_some(())
    });
    let handover = killed.elapsed();
    // The peering and the components reconnect to it: a fresh export
    // reaches west through the new leader.
    std::thread::sleep(Duration::from_secs(2));
    let sent = load.finish();
    let impact = Impact::of(&sent, killed, Duration::from_secs(1), |c| c == "east");
    println!("{}", impact.report("leader killed"));
    assert_eq!(
        impact.failed, 0,
        "calls failed while the controller changed hands: {impact:?}"
    );
    let link = eventually("west's link to east active again", Duration::from_secs(30), || {
        west.api.run(async |k| {
            let s = Api::<Link>::all(k).get_opt("east").await.ok()??.status?;
            (s.state.as_deref() == Some("active")).then_some(s)
        })
    });
    assert!(link.last_heartbeat.is_some());

    // Unlink through the API: the Link goes on both sides, and so does
    // the import.
    let out = west.isthmus(&["unlink", "east"]);
    assert!(out.contains("unlinked cluster west from east"), "{out}");
    eventually("the import to go", Duration::from_secs(30), || {
        west.api.run(async |k| {
            let gone = Api::<ServiceImport>::namespaced(k, "demo")
                .get_opt("echo")
                .await
                .ok()?
                .is_none();
            gone.then_some(())
        })
    });
    eventually("east's Link to go", Duration::from_secs(30), || {
        east.api
            .run(async |k| Api::<Link>::all(k).get_opt("west").await.ok()?.is_none().then_some(()))
    });

    println!(
        "kubernetes: leader {leader} killed, {new_leader} serving after {:.2} s; export to import {:.2} s",
        handover.as_secs_f64(),
        export_to_import.as_secs_f64()
    );
}

fn pod(name: &str, namespace: &str) -> k8s_openapi::api::core::v1::Pod {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": namespace,
            "annotations": {"isthmus.dev/service": "echo", "isthmus.dev/port": "8080"}
        },
        // No controller manager here mints legacy token Secrets: the pod
        // does without the automatic API token (its sidecar uses its own).
        "spec": {
            "automountServiceAccountToken": false,
            "containers": [{"name": "app", "image": "registry.example/echo:1"}]
        }
    }))
    .unwrap()
}

/// `isthmus install`'s manifests, applied to a real API server, then the
/// injection webhook called by it.
#[test]
fn install_manifests_and_sidecar_injection_on_a_real_api_server() {
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod};

    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let api = ApiServer::start(root, "inject");
    // Every object install prints is accepted: CRDs, RBAC, Deployments,
    // Services, the webhook configuration (the API server validates each).
    let manifests = ok(&["install", "--cluster", "east", "--image", "isthmus:e2e"]);
    let applied = api.apply_yaml(&manifests);
    for want in [
        "CustomResourceDefinition/links.isthmus.dev",
        "Deployment/isthmus-controller",
        "Deployment/isthmus-gateway",
        "Service/isthmus-gateway",
        "MutatingWebhookConfiguration/isthmus-sidecar-injector",
    ] {
        assert!(applied.iter().any(|a| a == want), "{want} not in {applied:?}");
    }
    // Every CRD install printed is served: Established, names accepted.
    let crds: Vec<&str> = applied
        .iter()
        .filter_map(|a| a.strip_prefix("CustomResourceDefinition/"))
        .collect();
    assert_eq!(crds.len(), 4, "{applied:?}");
    for crd in crds {
        eventually(&format!("CRD {crd} established"), Duration::from_secs(30), || {
            api.run(async |c| {
                use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
                let d = Api::<CustomResourceDefinition>::all(c).get(crd).await.ok()?;
                let conds = d.status?.conditions?;
                let is = |t: &str| conds.iter().any(|x| x.type_ == t && x.status == "True");
                (is("Established") && is("NamesAccepted")).then_some(())
            })
        });
    }
    // The controller runs as install's service account, with its RBAC.
    let kubeconfig = api.kubeconfig_of(NS, isthmus_controller::k8s::rbac::SERVICE_ACCOUNT);
    let webhook_port = free_port();
    let mut controller = Component::start(
        root,
        "inject-controller",
        &format!(
            "controller --kubeconfig {} --cluster east --replica east-0 --control-addr 127.0.0.1:0 \
             --peering-addr 127.0.0.1:0 --admin-addr 127.0.0.1:0 --webhook-addr 127.0.0.1:{webhook_port} \
             --webhook-name 127.0.0.1 --sidecar-image isthmus:e2e",
            kubeconfig.display()
        ),
    );
    // No Service network here: point the webhook at the controller's
    // loopback address, as the test's stand-in for its Service.
    let url = format!("https://127.0.0.1:{webhook_port}/inject");
    eventually(
        "the webhook pointed at the controller, with its CA",
        Duration::from_secs(60),
        || {
            api.run(async |c| {
                let mwcs = Api::<MutatingWebhookConfiguration>::all(c);
                let mut mwc = mwcs.get("isthmus-sidecar-injector").await.ok()?;
                let hooks = mwc.webhooks.as_mut()?;
                let done = hooks
                    .iter()
                    .all(|h| h.client_config.url.as_deref() == Some(&*url) && h.client_config.ca_bundle.is_some());
                if done {
                    return Some(());
                }
                for h in hooks.iter_mut() {
                    h.client_config.service = None;
                    h.client_config.url = Some(url.clone());
                }
                // May race the controller's own caBundle update: tried again.
                let _ = mwcs
                    .replace("isthmus-sidecar-injector", &PostParams::default(), &mwc)
                    .await;
                None
            })
        },
    );

    // An opted-in namespace gets its pods injected; another does not.
    api.run(async |c| {
        let ns = Api::<Namespace>::all(c.clone());
        for (name, label) in [("demo", Some("enabled")), ("other", None)] {
            let mut n = Namespace::default();
            n.metadata.name = Some(name.into());
            n.metadata.labels = label.map(|l| [("isthmus.dev/inject".to_string(), l.to_string())].into());
            ns.patch(name, &PatchParams::apply("e2e"), &Patch::Apply(&n))
                .await
                .unwrap();
            // What the controller manager would make.
            let mut sa = k8s_openapi::api::core::v1::ServiceAccount::default();
            sa.metadata.name = Some("default".into());
            Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(c.clone(), name)
                .create(&PostParams::default(), &sa)
                .await
                .unwrap();
        }
    });
    let stored = api.run(async |c| {
        Api::<Pod>::namespaced(c, "demo")
            .create(&PostParams::default(), &pod("echo-1", "demo"))
            .await
            .unwrap_or_else(|e| panic!("creating a pod in an opted-in namespace: {e}"))
    });
    let spec = stored.spec.clone().unwrap();
    let containers: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
    // Kubernetes 1.20 has no native sidecars: a regular container, first.
    assert_eq!(containers, ["isthmus-sidecar", "app"], "{stored:?}");
    let inits: Vec<&str> = spec.init_containers.iter().flatten().map(|c| c.name.as_str()).collect();
    assert_eq!(inits, ["isthmus-init"]);
    let args = spec.containers[0].args.clone().unwrap().join(" ");
    assert!(args.contains("--service echo --port 8080"), "{args}");
    assert_eq!(spec.containers[0].image.as_deref(), Some("isthmus:e2e"));
    assert!(
        stored
            .metadata
            .annotations
            .unwrap()
            .contains_key("isthmus.dev/injected")
    );
    let metrics = isthmus_e2e::metrics(&controller.addr("admin"));
    assert_eq!(
        isthmus_e2e::sample(&metrics, "isthmus_injections_total", &[("result", "injected")]),
        Some(1.0),
        "the API server called the webhook: {metrics}"
    );
    // The injected pod mounts the cluster's ConfigMap from its namespace.
    eventually("the cluster's ConfigMap in demo", Duration::from_secs(30), || {
        api.run(async |c| {
            let cm = Api::<ConfigMap>::namespaced(c, "demo")
                .get_opt("isthmus-cluster")
                .await
                .ok()??;
            cm.data?.contains_key("ca.pem").then_some(())
        })
    });
    let untouched = api.run(async |c| {
        Api::<Pod>::namespaced(c, "other")
            .create(&PostParams::default(), &pod("echo-1", "other"))
            .await
            .unwrap()
    });
    assert_eq!(untouched.spec.unwrap().containers.len(), 1, "not opted in: left alone");
    // A pod opts in on its own, in a namespace that did not.
    let mut own = pod("echo-own", "other");
    own.metadata.labels = Some([("isthmus.dev/inject".to_string(), "enabled".to_string())].into());
    let stored = api.run(async |c| {
        Api::<Pod>::namespaced(c, "other")
            .create(&PostParams::default(), &own)
            .await
            .unwrap()
    });
    let names: Vec<String> = stored.spec.unwrap().containers.into_iter().map(|c| c.name).collect();
    assert_eq!(names, ["isthmus-sidecar", "app"], "a pod's own label opts it in");
    // A pod whose annotations are wrong is refused with the reason.
    let mut wrong = pod("echo-wrong", "demo");
    wrong
        .metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert("isthmus.dev/opaque-ports".into(), "smtp".into());
    let refused = api.run(async |c| {
        Api::<Pod>::namespaced(c, "demo")
            .create(&PostParams::default(), &wrong)
            .await
            .expect_err("a pod with a wrong annotation is refused")
    });
    assert!(refused.to_string().contains("isthmus.dev/opaque-ports"), "{refused}");

    // The webhook down: namespaces that did not opt in are not held up;
    // opted-in ones refuse pods rather than run them without a sidecar.
    controller.kill();
    api.run(async |c| {
        Api::<Pod>::namespaced(c.clone(), "other")
            .create(&PostParams::default(), &pod("echo-2", "other"))
            .await
            .expect("a pod of a namespace that did not opt in is admitted with the webhook down");
        let refused = Api::<Pod>::namespaced(c, "demo")
            .create(&PostParams::default(), &pod("echo-2", "demo"))
            .await
            .expect_err("an opted-in pod is not admitted without its sidecar");
        assert!(refused.to_string().contains("inject.isthmus.dev"), "{refused}");
    });
}
