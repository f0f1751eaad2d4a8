//! Active probes: how an ejected (service, cluster) pair earns its way back.
//!
//! Each ejected pair is probed along the path its requests take (a local
//! endpoint's sidecar, or the gateways and a sidecar in the other cluster);
//! the serving sidecar answers the probe itself with whether its app
//! answers a request now (`answer`: a hung app that still accepts
//! connections is not healthy), so the probe tests the whole path and the
//! app. Only a probe's success puts a pair
//! back (traffic returns after the failback hold, `route::FAILBACK_HOLD`).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use isthmus_core::naming::{ServiceKey, ServiceName};
use tokio_util::sync::CancellationToken;

use crate::Sidecar;
use crate::body::{Body, empty, full};
use crate::error::ErrorKind;
use crate::health::Outcome;
use crate::inbound::AppClient;
use crate::metrics::{Direction, RouteLabels};
use crate::route;

/// Marks a request the serving sidecar answers itself: 200 if its app
/// answers a request now (`answer`), else 502 `app-unavailable`.
pub const PROBE_HEADER: &str = "x-isthmus-probe";
/// How often each ejected (service, cluster) is probed.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// How long one probe may take, end to end.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the serving side gives its app to answer a probe: well within
/// `PROBE_TIMEOUT`, so a slow app reads as such, not as a lost probe.
pub const APP_PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// Probe each ejected pair every `PROBE_INTERVAL`, one probe per pair at a
/// time. Local pairs with no registered endpoints are not probed: they
/// come back when a workload registers.
pub(crate) async fn probe_ejected(sc: Arc<Sidecar>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(PROBE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let running: Arc<Mutex<HashSet<(ServiceKey, String)>>> = Arc::default();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        for pair in sc.router.ejected() {
            if !running.lock().expect("probes lock").insert(pair.clone()) {
                continue;
            }
            let (sc, running) = (sc.clone(), running.clone());
            tokio::spawn(async move {
                let (service, cluster) = &pair;
                if let Some(ok) = probe(&sc, service, cluster).await {
                    sc.metrics.probe(service, cluster, ok);
                    let outcome = if ok { Outcome::Ok } else { Outcome::Unreached };
                    sc.router.outcome(service, cluster, outcome, &sc.metrics);
                }
                running.lock().expect("probes lock").remove(&pair);
            });
        }
    }
}

/// One probe of `service` in `cluster`: `None` if there is nothing to
/// probe there now.
async fn probe(sc: &Arc<Sidecar>, service: &ServiceKey, cluster: &str) -> Option<bool> {
    let name = ServiceName {
        cluster: Some(cluster.to_string()),
        name: service.name.clone(),
        namespace: service.namespace.clone(),
    };
    let mut target = {
        let snap = sc.agent.config.borrow();
        route::route(&snap, &name, None, &route::Inputs::simple(0)).ok()?.target
    };
    if target.is_local() {
        let pick = target.addresses[rand::random_range(0..target.addresses.len())].clone();
        target.addresses = vec![pick];
    }
    let host = service.host();
    let mut req = Request::new(empty());
    req.headers_mut().insert(PROBE_HEADER, HeaderValue::from_static("1"));
    let labels = RouteLabels {
        direction: Direction::Outbound,
        source_cluster: sc.agent.cluster.clone(),
        destination_cluster: cluster.to_string(),
        destination_service: service.to_string(),
    };
    let sent = tokio::time::timeout(
        PROBE_TIMEOUT,
        crate::outbound::send(sc, &target, (&host, Some(target.port)), req, &labels),
    )
    .await;
    let ok = matches!(&sent, Ok(Ok(r)) if r.status() == StatusCode::OK);
    tracing::debug!(%service, %cluster, ok, "probe");
    Some(ok)
}

/// The serving side's answer to a probe: whether its app answers a
/// request now, not only whether it accepts a connection (a hung app still
/// does that, from the kernel's backlog). Any answer counts, whatever its
/// status; a refused connection, or no answer within `APP_PROBE_TIMEOUT`,
/// does not. HTTP/1 apps get `GET /` with `x-isthmus-probe: 1`; h2c apps a
/// gRPC health check (any answer, even UNIMPLEMENTED, counts).
pub(crate) async fn answer(client: &AppClient, app: SocketAddr, http2: bool) -> Response<Body> {
    let req = if http2 {
        Request::post(format!("http://{app}/grpc.health.v1.Health/Check"))
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header(http::header::TE, "trailers")
            .header(PROBE_HEADER, "1")
            // One gRPC message: uncompressed, empty (all fields default).
            .body(full(Bytes::from_static(&[0, 0, 0, 0, 0])))
    } else {
        Request::get(format!("http://{app}/"))
            .header(PROBE_HEADER, "1")
            .body(empty())
    };
    let req = req.expect("a valid probe request");
    match tokio::time::timeout(APP_PROBE_TIMEOUT, client.request(req)).await {
        Ok(Ok(_)) => Response::new(full(Bytes::from_static(b"ok\n"))),
        Ok(Err(e)) if e.is_connect() => ErrorKind::AppUnavailable.response(&format!(
            "the workload at {app} refuses connections: {}",
            isthmus_core::local::error_chain(&e)
        )),
        Ok(Err(e)) => ErrorKind::AppUnavailable.response(&format!(
            "the workload at {app} did not answer a probe: {}",
            isthmus_core::local::error_chain(&e)
        )),
        Err(_) => ErrorKind::AppUnavailable.response(&format!(
            "the workload at {app} did not answer a probe within {APP_PROBE_TIMEOUT:?}"
        )),
    }
}
