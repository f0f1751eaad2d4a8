//! A real Kubernetes API server per cluster, on loopback: Debian's etcd
//! and a kube-apiserver built from Debian's source package
//! (`scripts/kube-apiserver`, cached outside the work tree). No kubelet,
//! scheduler or controller manager: pods never run, so the mesh's
//! components run as local processes with tokens the API server mints
//! (`TokenRequest`), and what a controller manager would write
//! (EndpointSlices) a test writes itself.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};

use crate::{eventually, repo, runtime};

/// The admin's bearer token (group system:masters).
const ADMIN_TOKEN: &str = "isthmus-e2e-admin";

/// A free TCP port on 127.0.0.1 for a program that binds it itself (etcd,
/// kube-apiserver). Taken below the kernel's ephemeral range (32768 and
/// up): a port-0 bind handed out and released there was once taken by
/// another test's connection before the API server bound it ("address
/// already in use"). Here no connection or port-0 bind takes it, and this
/// process never hands out the same one twice.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let seed = std::process::id().wrapping_mul(2_654_435_761);
    for _ in 0..10_000 {
        // A pseudo-random walk over 20000-32767, different per process.
        let n = NEXT
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(7919)
            .wrapping_add(seed);
        let port = 20_000 + (n % 12_768) as u16;
        let mut given = GIVEN.lock().expect("port list");
        if !given.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    panic!("no free port in 20000-32767 on 127.0.0.1");
}

/// Ask `scripts/kube-apiserver` for a binary: the path is its last line.
fn tool(arg: Option<&str>) -> PathBuf {
    let script = repo().join("scripts/kube-apiserver");
    let mut cmd = Command::new("bash");
    cmd.arg(&script);
    if let Some(a) = arg {
        cmd.arg(a);
    }
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed: the Kubernetes tests need a kube-apiserver and etcd (.ci/run builds them)",
        script.display()
    );
    let path = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_string();
    PathBuf::from(path)
}

/// One API server and its etcd, killed on drop.
pub struct ApiServer {
    pub name: String,
    pub dir: PathBuf,
    pub url: String,
    /// kubeconfig of the admin (system:masters).
    pub admin: PathBuf,
    pub client: kube::Client,
    etcd: Child,
    apiserver: Child,
}

impl ApiServer {
    /// Start an etcd and an API server for cluster `name`, in `root/<name>-api`.
    pub fn start(root: &Path, name: &str) -> Self {
        let apiserver_bin = tool(None);
        let etcd_bin = tool(Some("--etcd"));
        let dir = root.join(format!("{name}-api"));
        std::fs::create_dir_all(dir.join("certs")).unwrap();
        let (client_port, peer_port, secure_port) = (free_port(), free_port(), free_port());
        let log = |n: &str| std::fs::File::create(dir.join(n)).expect("log file");
        let etcd = Command::new(&etcd_bin)
            .args(["--name", "default", "--data-dir"])
            .arg(dir.join("etcd"))
            .args([
                "--listen-client-urls",
                &format!("http://127.0.0.1:{client_port}"),
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{client_port}"),
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{peer_port}"),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer_port}"),
                "--initial-cluster",
                &format!("default=http://127.0.0.1:{peer_port}"),
            ])
            .stdout(Stdio::null())
            .stderr(log("etcd.log"))
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", etcd_bin.display()));
        // The service-account signing key: the API server mints and checks
        // tokens with it.
        let key = dir.join("sa.key");
        let status = Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&key)
            .arg("2048")
            .stderr(Stdio::null())
            .status()
            .expect("run openssl");
        assert!(status.success(), "openssl genrsa failed");
        std::fs::write(
            dir.join("tokens.csv"),
            format!("{ADMIN_TOKEN},admin,admin,system:masters\n"),
        )
        .unwrap();
        let apiserver = Command::new(&apiserver_bin)
            .args(["--etcd-servers", &format!("http://127.0.0.1:{client_port}")])
            .args(["--secure-port", &secure_port.to_string(), "--bind-address", "127.0.0.1"])
            .arg("--cert-dir")
            .arg(dir.join("certs"))
            .arg("--token-auth-file")
            .arg(dir.join("tokens.csv"))
            .args(["--authorization-mode", "RBAC"])
            .arg("--service-account-key-file")
            .arg(&key)
            .arg("--service-account-signing-key-file")
            .arg(&key)
            .args(["--service-account-issuer", "https://kubernetes.default.svc"])
            .args(["--service-cluster-ip-range", "10.96.0.0/16"])
            .stdout(Stdio::null())
            .stderr(log("kube-apiserver.log"))
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", apiserver_bin.display()));
        let url = format!("https://127.0.0.1:{secure_port}");
        let admin = dir.join("admin.kubeconfig");
        write_kubeconfig(&admin, &url, ADMIN_TOKEN);
        let client = runtime().block_on(client(&admin));
        let mut server = ApiServer {
            name: name.to_string(),
            dir,
            url,
            admin,
            client,
            etcd,
            apiserver,
        };
        server.wait_ready();
        server
    }

    fn wait_ready(&mut self) {
        let client = self.client.clone();
        let log = self.dir.join("kube-apiserver.log");
        let apiserver = &mut self.apiserver;
        eventually(
            &format!("the {} API server to be ready", self.name),
            Duration::from_secs(120),
            || {
                if let Ok(Some(status)) = apiserver.try_wait() {
                    panic!(
                        "kube-apiserver exited ({status}):\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
                runtime().block_on(async {
                    let ns = Api::<Namespace>::all(client.clone()).get_opt("default").await.ok()??;
                    // RBAC's bootstrap roles are in place once the
                    // system:masters' cluster role exists.
                    let roles = Api::<k8s_openapi::api::rbac::v1::ClusterRole>::all(client.clone());
                    roles.get_opt("cluster-admin").await.ok()??;
                    Some(ns)
                })
            },
        );
    }

    /// Run `f` with the admin client on the shared runtime.
    pub fn run<T>(&self, f: impl AsyncFnOnce(kube::Client) -> T) -> T {
        runtime().block_on(f(self.client.clone()))
    }

    /// Namespaces, CRDs and the controller's RBAC, as an operator installs
    /// them (from the same code as deploy/kubernetes/).
    pub fn install(&self) {
        let ns_name = isthmus_controller::config::DEFAULT_NAMESPACE;
        self.run(async |c| {
            let ssa = PatchParams::apply("isthmus-e2e").force();
            for ns in [ns_name, "demo"] {
                let obj = Namespace {
                    metadata: ObjectMeta {
                        name: Some(ns.into()),
                        ..Default::default()
                    },
                    ..Default::default()
                };
                Api::<Namespace>::all(c.clone())
                    .patch(ns, &ssa, &Patch::Apply(&obj))
                    .await
                    .unwrap();
            }
            let crds = Api::<CustomResourceDefinition>::all(c.clone());
            for crd in isthmus_controller::k8s::crds::all() {
                let name = crd.metadata.name.clone().unwrap();
                crds.patch(&name, &ssa, &Patch::Apply(&crd))
                    .await
                    .unwrap_or_else(|e| panic!("CRD {name}: {e}"));
            }
            let o = isthmus_controller::k8s::rbac::objects(ns_name);
            let name = isthmus_controller::k8s::rbac::SERVICE_ACCOUNT;
            Api::<ServiceAccount>::namespaced(c.clone(), ns_name)
                .patch(name, &ssa, &Patch::Apply(&o.service_account))
                .await
                .unwrap();
            Api::<k8s_openapi::api::rbac::v1::ClusterRole>::all(c.clone())
                .patch(name, &ssa, &Patch::Apply(&o.cluster_role))
                .await
                .unwrap();
            Api::<k8s_openapi::api::rbac::v1::ClusterRoleBinding>::all(c.clone())
                .patch(name, &ssa, &Patch::Apply(&o.cluster_role_binding))
                .await
                .unwrap();
            Api::<k8s_openapi::api::rbac::v1::Role>::namespaced(c.clone(), ns_name)
                .patch(name, &ssa, &Patch::Apply(&o.role))
                .await
                .unwrap();
            Api::<k8s_openapi::api::rbac::v1::RoleBinding>::namespaced(c.clone(), ns_name)
                .patch(name, &ssa, &Patch::Apply(&o.role_binding))
                .await
                .unwrap();
        });
        // The CRDs serve once established.
        eventually("the CRDs to be established", Duration::from_secs(30), || {
            self.run(async |c| {
                let crds = Api::<CustomResourceDefinition>::all(c)
                    .list(&Default::default())
                    .await
                    .ok()?;
                let established = crds
                    .items
                    .iter()
                    .filter(|crd| {
                        crd.status.as_ref().is_some_and(|s| {
                            s.conditions
                                .iter()
                                .flatten()
                                .any(|c| c.type_ == "Established" && c.status == "True")
                        })
                    })
                    .count();
                (established >= 4).then_some(())
            })
        });
    }

    /// Apply a YAML stream (what `isthmus install` prints) as `kubectl
    /// apply --server-side` would: each object by its kind, found through
    /// discovery. Panics with the API server's word on any it refuses.
    pub fn apply_yaml(&self, yaml: &str) -> Vec<String> {
        let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(yaml).expect("YAML stream");
        self.run(async |c| {
            let mut applied = Vec::new();
            for doc in docs.into_iter().filter(|d| !d.is_null()) {
                let obj: kube::api::DynamicObject = serde_json::from_value(doc.clone()).expect("an object");
                let types = obj.types.clone().expect("apiVersion and kind");
                let gvk = kube::api::GroupVersionKind::try_from(&types).expect("a GVK");
                // Discovery afresh: CRDs applied a moment ago serve now.
                let (ar, caps) = kube::discovery::pinned_kind(&c, &gvk)
                    .await
                    .unwrap_or_else(|e| panic!("{}: {e}", types.kind));
                let name = obj.metadata.name.clone().expect("a name");
                let api: Api<kube::api::DynamicObject> = match (caps.scope, &obj.metadata.namespace) {
                    (kube::discovery::Scope::Namespaced, Some(ns)) => Api::namespaced_with(c.clone(), ns, &ar),
                    _ => Api::all_with(c.clone(), &ar),
                };
                api.patch(&name, &PatchParams::apply("isthmus-e2e").force(), &Patch::Apply(&doc))
                    .await
                    .unwrap_or_else(|e| panic!("the API server refused {}/{name}: {e}", types.kind));
                applied.push(format!("{}/{name}", types.kind));
            }
            applied
        })
    }

    /// A token for service account `namespace/name` (created if missing),
    /// for `audience` (None: the API server's own), as a pod's projected
    /// token would be.
    pub fn token(&self, namespace: &str, name: &str, audience: Option<&str>) -> String {
        self.run(async |c| {
            let sas = Api::<ServiceAccount>::namespaced(c, namespace);
            if sas.get_opt(name).await.unwrap().is_none() {
                let sa = ServiceAccount {
                    metadata: ObjectMeta {
                        name: Some(name.into()),
                        ..Default::default()
                    },
                    ..Default::default()
                };
                sas.create(&PostParams::default(), &sa).await.unwrap();
            }
            let req = TokenRequest {
                spec: TokenRequestSpec {
                    audiences: audience.map(|a| vec![a.to_string()]).unwrap_or_default(),
                    expiration_seconds: Some(3600),
                    ..Default::default()
                },
                ..Default::default()
            };
            sas.create_token_request(name, &PostParams::default(), &req)
                .await
                .unwrap_or_else(|e| panic!("TokenRequest for {namespace}/{name}: {e}"))
                .status
                .expect("a token")
                .token
        })
    }

    /// A kubeconfig that authenticates as service account `namespace/name`.
    pub fn kubeconfig_of(&self, namespace: &str, name: &str) -> PathBuf {
        let token = self.token(namespace, name, None);
        let path = self.dir.join(format!("{namespace}-{name}.kubeconfig"));
        write_kubeconfig(&path, &self.url, &token);
        path
    }

    /// A token file for a component running as `namespace/name`: its
    /// projected service-account token (audience `isthmus`).
    pub fn component_token(&self, namespace: &str, name: &str) -> PathBuf {
        let token = self.token(namespace, name, Some(isthmus_controller::k8s::auth::AUDIENCE));
        let path = self.dir.join(format!("{namespace}-{name}.token"));
        std::fs::write(&path, token).unwrap();
        path
    }

    /// What a component's pod would mount from the controller's ConfigMap
    /// (`controller.json`, `ca.pem`), as a cluster directory.
    pub fn cluster_dir(&self) -> PathBuf {
        let dir = self.dir.join("cluster");
        std::fs::create_dir_all(&dir).unwrap();
        let data = eventually(
            "the controller to publish its ConfigMap",
            Duration::from_secs(60),
            || {
                self.run(async |c| {
                    let cm = Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(
                        c,
                        isthmus_controller::config::DEFAULT_NAMESPACE,
                    )
                    .get_opt(isthmus_controller::k8s::store::CLUSTER_CONFIGMAP)
                    .await
                    .ok()??;
                    let data = cm.data?;
                    (data.contains_key("controller.json") && data.contains_key("ca.pem")).then_some(data)
                })
            },
        );
        for file in ["controller.json", "ca.pem"] {
            std::fs::write(dir.join(file), &data[file]).unwrap();
        }
        dir
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        for child in [&mut self.apiserver, &mut self.etcd] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A kubeconfig for `url` with a bearer token. The API server's serving
/// certificate is self-signed (made at start in its cert dir); the test
/// trusts it by skipping verification, on loopback only.
fn write_kubeconfig(path: &Path, url: &str, token: &str) {
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {url}\n    insecure-skip-tls-verify: true\n\
         users:\n- name: u\n  user:\n    token: {token}\ncontexts:\n- name: ctx\n  context:\n    cluster: c\n    user: u\n\
         current-context: ctx\n"
    );
    std::fs::write(path, text).unwrap();
}

async fn client(kubeconfig: &Path) -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig).expect("kubeconfig");
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .expect("kube config");
    kube::Client::try_from(cfg).expect("kube client")
}
