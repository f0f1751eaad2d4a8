//! The mutating admission webhook: the API server sends each new pod of an
//! opted-in namespace (or an opted-in pod) here, and gets back a JSON
//! patch that adds the sidecar (`inject.rs`). Served over TLS with the
//! controller's own certificate, which the cluster's CA issues with the
//! webhook's names in it and renews at half-life like every SVID; the
//! webhook configuration's `caBundle` is the cluster's trust bundle.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use k8s_openapi::api::core::v1::Pod;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::inject::{self, Decision, Injection};
use crate::shared::Shared;

/// Where the API server sends pods.
pub const PATH: &str = "/inject";
/// The largest AdmissionReview read (a pod is a few KiB; the API server
/// caps requests at 3 MiB).
const MAX_BODY: usize = 4 << 20;

/// The AdmissionReview to answer `review` with (pure: unit-tested).
pub fn review(body: &[u8], cfg: &Injection) -> (serde_json::Value, &'static str) {
    type Error = Box<dyn std::error::Error + Send + Sync>;
    let parsed: Result<AdmissionRequest<Pod>, Error> = serde_json::from_slice::<AdmissionReview<Pod>>(body)
        .map_err(Error::from)
        .and_then(|r| r.try_into().map_err(Error::from));
    let req = match parsed {
        Ok(r) => r,
        Err(e) => {
            let resp = AdmissionResponse::invalid(format!("not an AdmissionReview of a pod: {e}"));
            return (serde_json::to_value(resp.into_review()).expect("serializes"), "error");
        }
    };
    let mut resp = AdmissionResponse::from(&req);
    let result = match req.object.as_ref().map(|p| (p, inject::inject(p, cfg))) {
        Some((before, Decision::Inject(after))) => {
            let patch = json_patch::diff(
                &serde_json::to_value(before).expect("serializes"),
                &serde_json::to_value(&*after).expect("serializes"),
            );
            resp = resp.with_patch(patch).expect("a patch serializes");
            tracing::info!(namespace = %req.namespace.as_deref().unwrap_or_default(), pod = %req.name, "sidecar injected");
            "injected"
        }
        Some((_, Decision::Skip(why))) => {
            tracing::debug!(pod = %req.name, why, "not injected");
            "skipped"
        }
        Some((_, Decision::Refuse(why))) => {
            tracing::info!(namespace = %req.namespace.as_deref().unwrap_or_default(), pod = %req.name, %why, "pod refused");
            resp = resp.deny(why);
            "refused"
        }
        None => "skipped",
    };
    (serde_json::to_value(resp.into_review()).expect("serializes"), result)
}

/// Serve the webhook until shutdown.
pub(crate) async fn serve(shared: Arc<Shared>, listener: TcpListener, cfg: Injection) {
    let tls = match isthmus_core::tls::server_config(
        shared.svid.clone(),
        shared.bundles.clone(),
        isthmus_core::tls::ClientAuth::None,
        &[b"h2", b"http/1.1"],
    ) {
        Ok(t) => TlsAcceptor::from(t),
        Err(e) => {
            tracing::error!(error = %e, "cannot serve the admission webhook");
            return;
        }
    };
    let cfg = Arc::new(cfg);
    tracing::info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), native_sidecars = cfg.native_sidecars, "admission webhook serving");
    while let Some((tcp, peer)) = isthmus_core::net::accept(&listener, &shared.shutdown).await {
        let (tls, shared, cfg) = (tls.clone(), shared.clone(), cfg.clone());
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(std::time::Duration::from_secs(10), tls.accept(tcp)).await {
                Ok(Ok(s)) => s,
                _ => {
                    tracing::debug!(%peer, "webhook TLS handshake failed");
                    return;
                }
            };
            let svc = hyper::service::service_fn(move |req| handle(req, shared.clone(), cfg.clone()));
            let _ = isthmus_core::http::serve_connection(stream, svc).await;
        });
    }
}

async fn handle(
    req: Request<Incoming>,
    shared: Arc<Shared>,
    cfg: Arc<Injection>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let reply = |status: StatusCode, body: Vec<u8>| {
        Ok(Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .expect("a response"))
    };
    if req.method() != hyper::Method::POST || req.uri().path() != PATH {
        return reply(StatusCode::NOT_FOUND, b"{}".to_vec());
    }
    let body = match http_body_util::Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return reply(StatusCode::PAYLOAD_TOO_LARGE, b"{}".to_vec()),
    };
    let (answer, result) = review(&body, &cfg);
    shared
        .metrics
        .injections
        .get_or_create(&crate::metrics::ResultLabels { result })
        .inc();
    reply(StatusCode::OK, serde_json::to_vec(&answer).expect("serializes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Injection {
        Injection {
            image: "isthmus:test".into(),
            native_sidecars: false,
        }
    }

    fn admission(pod: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "name": "echo-1", "namespace": "demo", "operation": "CREATE",
                "userInfo": {"username": "admin"},
                "object": pod, "dryRun": false
            }
        }))
        .unwrap()
    }

    #[test]
    fn a_pod_is_answered_with_a_patch_that_adds_the_sidecar() {
        let pod = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "echo-1", "namespace": "demo"},
            "spec": {"containers": [{"name": "app", "image": "echo"}]}
        });
        let (answer, result) = review(&admission(pod.clone()), &cfg());
        assert_eq!(result, "injected", "{answer}");
        let resp = &answer["response"];
        assert_eq!(resp["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert_eq!(resp["allowed"], true);
        assert_eq!(resp["patchType"], "JSONPatch");
        // kube-core writes the patch's bytes as a JSON array (Go's []byte
        // decodes from that as from base64).
        let patch: Vec<u8> = serde_json::from_value(resp["patch"].clone()).unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
        let mut patched = pod;
        json_patch::patch(&mut patched, &patch).unwrap();
        assert_eq!(patched["spec"]["containers"][0]["name"], inject::SIDECAR);
        assert_eq!(patched["spec"]["containers"][1]["name"], "app");
        assert_eq!(patched["spec"]["initContainers"][0]["name"], inject::INIT);
    }

    #[test]
    fn a_pod_that_opts_out_is_allowed_unchanged() {
        let pod = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "echo-1", "namespace": "demo", "labels": {"isthmus.dev/inject": "disabled"}},
            "spec": {"containers": [{"name": "app", "image": "echo"}]}
        });
        let (answer, result) = review(&admission(pod), &cfg());
        assert_eq!(result, "skipped");
        assert_eq!(answer["response"]["allowed"], true);
        assert!(answer["response"].get("patch").is_none());
    }

    #[test]
    fn garbage_is_refused_not_panicked_on() {
        let (answer, result) = review(b"{\"kind\": 3}", &cfg());
        assert_eq!(result, "error");
        assert_eq!(answer["response"]["allowed"], false, "{answer}");
    }
}
