//! The sidecar's metrics (names documented in docs/metrics.md).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub direction: &'static str,
    pub source_cluster: String,
    pub destination_cluster: String,
    pub destination_service: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub direction: &'static str,
    pub source_cluster: String,
    pub destination_cluster: String,
    pub destination_service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub destination_service: String,
}

type HistogramFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub duration: HistogramFamily,
    pub retries: Family<RouteLabels, Counter>,
    pub connections: Family<DirectionLabels, Gauge>,
    pub ejections: Family<ServiceLabels, Counter>,
}

/// Counts a connection as open until dropped.
pub struct OpenConnection(Gauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Metrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(isthmus_core::metrics::latency_histogram as fn() -> Histogram),
            retries: Family::default(),
            connections: Family::default(),
            ejections: Family::default(),
        };
        registry.register(
            "isthmus_requests",
            "Requests handled, by direction (outbound from the app, inbound to it), route and response status",
            m.requests.clone(),
        );
        registry.register(
            "isthmus_request_duration_seconds",
            "Time from request to response headers, by direction and route",
            m.duration.clone(),
        );
        registry.register(
            "isthmus_retries",
            "Requests sent again: on another endpoint after a connect failure, or on a new session after their pooled session failed",
            m.retries.clone(),
        );
        registry.register(
            "isthmus_open_connections",
            "Client connections open now, by direction (outbound: from the local app; inbound: from other sidecars and gateways)",
            m.connections.clone(),
        );
        registry.register(
            "isthmus_endpoint_ejections",
            "Local endpoints ejected after consecutive failures, by service",
            m.ejections.clone(),
        );
        m
    }

    /// A connection opened; it counts until the returned guard drops.
    pub fn open(&self, direction: &'static str) -> OpenConnection {
        let g = self.connections.get_or_create(&DirectionLabels { direction }).clone();
        g.inc();
        OpenConnection(g)
    }

    pub fn observe(&self, route: RouteLabels, status: u16, seconds: f64) {
        self.duration.get_or_create(&route).observe(seconds);
        self.requests
            .get_or_create(&RequestLabels {
                direction: route.direction,
                source_cluster: route.source_cluster,
                destination_cluster: route.destination_cluster,
                destination_service: route.destination_service,
                status,
            })
            .inc();
    }
}
