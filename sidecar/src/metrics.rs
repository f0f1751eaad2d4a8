//! The sidecar's metrics (names documented in docs/metrics.md).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
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

type HistogramFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub duration: HistogramFamily,
    pub retries: Family<RouteLabels, Counter>,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Metrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(isthmus_core::metrics::latency_histogram as fn() -> Histogram),
            retries: Family::default(),
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
            "Requests sent again on a new session after their pooled session failed",
            m.retries.clone(),
        );
        m
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
