//! Which cluster a request goes to, with what this sidecar remembers
//! between requests: each service route's failover level and the health of
//! each (service, cluster) pair. The decisions themselves are pure
//! (`route.rs`, `health.rs`); this keeps their state and reports changes.

use std::sync::Mutex;
use std::time::Instant;

use isthmus_core::naming::{ServiceKey, ServiceName};
use isthmus_proto::ConfigSnapshot;

use crate::health::{Change, ClusterHealth, Outcome};
use crate::metrics::Metrics;
use crate::route::{self, FailoverStates, RouteError, Target};

#[derive(Default)]
pub(crate) struct Router {
    failover: FailoverStates,
    /// Passive outlier detection per (service, cluster), this cluster's
    /// included; ejected pairs are probed back (`probe.rs`).
    clusters: Mutex<ClusterHealth>,
}

impl Router {
    /// Route `name:port` by policy and health, avoiding `failed` clusters
    /// and ejected ones, and record a failover or failback it causes.
    pub fn route(
        &self,
        snap: &ConfigSnapshot,
        name: &ServiceName,
        port: Option<u16>,
        headers: Option<&http::HeaderMap>,
        failed: &[String],
        metrics: &Metrics,
    ) -> Result<Target, RouteError> {
        let now = Instant::now();
        let key = name.key();
        let tried = |c: &str| failed.iter().any(|f| f == c);
        let avoid = |c: &str| tried(c) || self.is_ejected(&key, c);
        let route_avoiding = |avoid: &dyn Fn(&str) -> bool| {
            route::route(
                snap,
                name,
                port,
                &route::Inputs {
                    headers,
                    avoid,
                    failover: Some(&self.failover),
                    now,
                    random: rand::random(),
                },
            )
        };
        let routed = match route_avoiding(&avoid) {
            // Everything left is ejected: use it anyway rather than refuse
            // (a probe may not have caught up; ejection must never make
            // things worse than the failures it saw).
            Err(RouteError::NoEndpoints { .. }) => route_avoiding(&tried)?,
            r => r?,
        };
        if let Some(moved) = routed.moved {
            tracing::info!(service = %key, level = routed.level, cluster = %routed.target.cluster, ?moved, "traffic moved to another priority level");
            metrics.level_moved(&key, routed.level, moved == route::LevelMove::Failover);
        }
        Ok(routed.target)
    }

    pub fn is_ejected(&self, service: &ServiceKey, cluster: &str) -> bool {
        self.clusters
            .lock()
            .expect("clusters lock")
            .is_ejected(service, cluster)
    }

    /// Learn from a request (or probe) to `service` in `cluster`.
    pub fn outcome(&self, service: &ServiceKey, cluster: &str, outcome: Outcome, metrics: &Metrics) {
        let change = self
            .clusters
            .lock()
            .expect("clusters lock")
            .outcome(service, cluster, outcome);
        match change {
            Some(Change::Ejected) => {
                tracing::warn!(%service, %cluster, "cluster ejected for this service (a request not delivered there, or failed answers in a row); probing it");
            }
            Some(Change::Restored) => {
                tracing::info!(%service, %cluster, "cluster answers this service again");
            }
            None => return,
        }
        metrics.cluster_health(service, cluster, change == Some(Change::Ejected));
    }

    /// The ejected (service, cluster) pairs: what the prober checks.
    pub fn ejected(&self) -> Vec<(ServiceKey, String)> {
        self.clusters.lock().expect("clusters lock").ejected()
    }
}
