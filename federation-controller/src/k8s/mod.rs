//! The controller on Kubernetes: its resources (`crds.rs`), its state in
//! the API (`store.rs`), leader election (`lease.rs`), identities from
//! service-account tokens (`auth.rs`), and the reconcilers that keep the
//! API and the mesh in step (`reconcile.rs` and one file per resource).

pub mod auth;
pub mod crds;
pub mod export;
#[cfg(test)]
mod fake;
pub mod inject;
pub mod install;
pub mod lease;
pub mod link;
pub mod mirror;
pub mod policy;
pub mod rbac;
pub mod reconcile;
pub mod store;
pub mod webhook;

use std::sync::Arc;

use isthmus_core::metrics::Ready;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, KubeSettings};
use crate::store::Store;
use crate::{Ports, metrics, start};

/// A client for the API server: the given kubeconfig and context, else
/// `KUBECONFIG`, `~/.kube/config` or the in-cluster service account.
pub async fn client(k: &KubeSettings) -> Result<kube::Client, kube::Error> {
    let options = kube::config::KubeConfigOptions {
        context: k.context.clone(),
        ..Default::default()
    };
    let config = match &k.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path).map_err(kube::Error::InferKubeconfig)?;
            kube::Config::from_custom_kubeconfig(kc, &options)
                .await
                .map_err(kube::Error::InferKubeconfig)?
        }
        None => kube::Config::infer().await.map_err(kube::Error::InferConfig)?,
    };
    kube::Client::try_from(config)
}

/// Stand by until this replica leads, then serve until the lease is lost
/// (or shutdown). A standby closes connections to its ports at once, so
/// components and peers move on to the next address.
pub(crate) async fn lead(
    cfg: Config,
    k: KubeSettings,
    client: kube::Client,
    ports: Ports,
    metrics: metrics::Metrics,
    ready: Ready,
    shutdown: CancellationToken,
) {
    let elector = lease::Elector::new(client.clone(), &k.namespace, &k.replica, k.lease);
    let Ports {
        control,
        peering,
        control_addr,
        peering_addr,
    } = ports;
    let leading = CancellationToken::new();
    let standby = tokio::spawn(refuse(control, peering, leading.clone()));
    let won = elector.acquire(&shutdown).await;
    leading.cancel();
    let (control, peering) = standby.await.expect("the standby listener task");
    if !won {
        return;
    }
    let ports = Ports {
        control,
        peering,
        control_addr,
        peering_addr,
    };
    let store = Store::Kube(store::KubeStore::new(client.clone(), &k.namespace));
    let (shared, mut tasks) =
        match start(cfg, store, None, Some(client.clone()), ports, metrics, shutdown.clone()).await {
            Ok(started) => started,
            Err(e) => {
                tracing::error!(error = %e, "cannot serve as the leader; giving the lease up");
                elector.release().await;
                shutdown.cancel();
                return;
            }
        };
    tasks.spawn(reconcile::run(
        Arc::clone(&shared),
        client.clone(),
        k.namespace.clone(),
        k.webhook.is_some(),
    ));
    if let Some(w) = &k.webhook {
        match isthmus_core::net::bind(w.addr).await {
            Ok((listener, _)) => {
                let native = match client.apiserver_version().await {
                    Ok(v) => inject::native_sidecars(&v.major, &v.minor),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the API server's version: injecting regular containers");
                        false
                    }
                };
                let cfg = inject::Injection {
                    image: w.image.clone(),
                    native_sidecars: native,
                };
                tasks.spawn(webhook::serve(Arc::clone(&shared), listener, cfg));
            }
            Err(e) => tracing::error!(error = %e, "cannot serve the admission webhook"),
        }
    }
    ready.set(true);
    match elector.hold(&shutdown).await {
        Ok(()) => {
            tasks.shutdown().await;
            elector.release().await;
        }
        Err(e) => {
            // Another replica may lead now: stop serving at once. The
            // process ends and is restarted as a standby.
            tracing::error!(error = %e, "no longer the leader: stopping");
            ready.set(false);
            tasks.shutdown().await;
            shutdown.cancel();
        }
    }
}

/// Accept and close connections until `until`, then hand the listeners back.
async fn refuse(
    control: tokio::net::TcpListener,
    peering: tokio::net::TcpListener,
    until: CancellationToken,
) -> (tokio::net::TcpListener, tokio::net::TcpListener) {
    loop {
        tokio::select! {
            _ = until.cancelled() => return (control, peering),
            r = control.accept() => drop(r),
            r = peering.accept() => drop(r),
        }
    }
}

#[cfg(test)]
mod tests {
    /// The manifests in deploy/kubernetes and the Helm chart's template are
    /// generated from the code; a change to either shows here.
    /// `UPDATE_MANIFESTS=1` rewrites them.
    #[test]
    fn deploy_manifests_are_in_step_with_the_code() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes");
        let files = [
            ("crds.yaml", super::crds::yaml()),
            ("rbac.yaml", super::rbac::yaml(crate::config::DEFAULT_NAMESPACE)),
        ];
        for (name, want) in files {
            let path = dir.join(name);
            let want = format!("# Generated from federation-controller/src/k8s ({name}); do not edit.\n{want}");
            check_file(&path, &want);
        }
        let chart =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/helm/isthmus/templates/isthmus.yaml");
        check_file(&chart, &super::install::helm_template());
    }

    fn check_file(path: &std::path::Path, want: &str) {
        if std::env::var_os("UPDATE_MANIFESTS").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, want).unwrap();
        }
        let have = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            have == want,
            "{} is out of date: run `UPDATE_MANIFESTS=1 cargo test -p isthmus-controller --lib deploy_manifests`",
            path.display()
        );
    }
}
