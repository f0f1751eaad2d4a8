//! For unit tests of the reconcilers: a controller (real CA, state and
//! registry, in a temporary directory) whose Kubernetes client talks to
//! the test instead of an API server. The test sees each request and
//! writes the answer, so it checks exactly what a reconciler asks and
//! writes.

use std::sync::Arc;

use http::{Request, Response};
use kube::client::Body;
use serde_json::Value;
use tokio_util::sync::{CancellationToken, DropGuard};
use tower_test::mock::Handle;

use super::reconcile::Ctx;
use crate::Ports;
use crate::store::Store;

pub(crate) struct Fake {
    pub ctx: Arc<Ctx>,
    api: Handle<Request<Body>, Response<Body>>,
    _tasks: tokio::task::JoinSet<()>,
    _dir: tempfile::TempDir,
    _stop: DropGuard,
}

/// A request as the API server would have seen it.
pub(crate) struct Seen {
    pub method: String,
    pub path: String,
    pub content_type: String,
    pub body: Value,
}

impl Fake {
    /// A controller of cluster `east`, settled (its registry believed).
    pub async fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let cfg = crate::Config::new(dir.path(), "east", "east.mesh");
        let stop = CancellationToken::new();
        let (control, control_addr) = isthmus_core::net::bind(cfg.control_addr).await.expect("bind");
        let (peering, peering_addr) = isthmus_core::net::bind(cfg.peering_addr).await.expect("bind");
        let ports = Ports {
            control,
            peering,
            control_addr,
            peering_addr,
        };
        let metrics = crate::metrics::Metrics::register(&mut Default::default());
        let store = Store::Dir(isthmus_core::local::ClusterDir::new(dir.path()));
        let (shared, tasks) = crate::start(cfg, store, None, None, ports, metrics, stop.clone())
            .await
            .expect("controller starts");
        let (service, api) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let ctx = Arc::new(Ctx {
            shared,
            client: kube::Client::new(service, "default"),
            namespace: "isthmus-system".into(),
            slices: None,
            webhook: false,
        });
        tokio::time::sleep_until(ctx.shared.settled_at()).await;
        Fake {
            ctx,
            api,
            _tasks: tasks,
            _dir: dir,
            _stop: stop.drop_guard(),
        }
    }

    /// Answer the next request with `status` and `body`, after checking it
    /// is `method` on `path` (query string aside); returns what was asked.
    pub async fn answer(&mut self, method: &str, path: &str, status: u16, body: Value) -> Seen {
        let (req, send) = tokio::time::timeout(std::time::Duration::from_secs(5), self.api.next_request())
            .await
            .unwrap_or_else(|_| panic!("no request came; expected {method} {path}"))
            .expect("the client is gone");
        let seen = Seen {
            method: req.method().to_string(),
            path: req.uri().path().to_string(),
            content_type: req
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string(),
            body: {
                let bytes = req.into_body().collect_bytes().await.expect("request body");
                serde_json::from_slice(&bytes).unwrap_or(Value::Null)
            },
        };
        assert_eq!(
            (seen.method.as_str(), seen.path.as_str()),
            (method, path),
            "unexpected request"
        );
        let response = Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&body).expect("JSON")))
            .expect("response");
        send.send_response(response);
        seen
    }
}

/// The API server's answer for an object that does not exist.
pub(crate) fn not_found(what: &str) -> Value {
    serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("{what} not found"), "reason": "NotFound", "code": 404
    })
}

/// The condition `type_` of a status patch, as (status, reason, message).
pub(crate) fn condition(patch: &Value, type_: &str) -> (String, String, String) {
    let c = patch["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .unwrap_or_else(|| panic!("no {type_} condition in {patch}"));
    let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
    (s("status"), s("reason"), s("message"))
}
