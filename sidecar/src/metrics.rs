//! The sidecar's metrics (names documented in docs/metrics.md).

pub use isthmus_core::metrics::Direction;
use isthmus_core::naming::ServiceKey;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// How an opaque TCP connection went.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum TcpOutcome {
    Ok,
    /// Refused by a gateway, or (inbound) not exported.
    Refused,
    ConnectFailed,
    /// No service, or several, on the port.
    NoRoute,
    AppUnavailable,
    /// Transparent mode: not for the mesh, carried to where it was going.
    Passthrough,
}

impl TcpOutcome {
    pub const ALL: [TcpOutcome; 6] = [
        TcpOutcome::Ok,
        TcpOutcome::Refused,
        TcpOutcome::ConnectFailed,
        TcpOutcome::NoRoute,
        TcpOutcome::AppUnavailable,
        TcpOutcome::Passthrough,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TcpOutcome::Ok => "ok",
            TcpOutcome::Refused => "refused",
            TcpOutcome::ConnectFailed => "connect-failed",
            TcpOutcome::NoRoute => "no-route",
            TcpOutcome::AppUnavailable => "app-unavailable",
            TcpOutcome::Passthrough => "passthrough",
        }
    }
}

impl EncodeLabelValue for TcpOutcome {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub direction: Direction,
    pub source_cluster: String,
    pub destination_cluster: String,
    pub destination_service: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub direction: Direction,
    pub source_cluster: String,
    pub destination_cluster: String,
    pub destination_service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub direction: Direction,
    pub source_cluster: String,
    pub destination_cluster: String,
    pub destination_service: String,
    pub outcome: TcpOutcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    pub direction: Direction,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: Direction,
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
    pub hedges: Family<RouteLabels, Counter>,
    pub connections: Family<DirectionLabels, Gauge>,
    pub ejections: Family<ServiceLabels, Counter>,
    pub tcp_connections: Family<TcpLabels, Counter>,
    pub request_bytes: Family<RouteLabels, Counter>,
    pub response_bytes: Family<RouteLabels, Counter>,
    pub spans: crate::otlp::SpanCounters,
    pub rejected: Family<RejectLabels, Counter>,
    pub level: Family<ServiceLabels, Gauge>,
    pub level_moves: Family<MoveLabels, Counter>,
    pub cluster_ejections: Family<ClusterLabels, Counter>,
    pub cluster_ejected: Family<ClusterLabels, Gauge>,
    pub probes: Family<ProbeLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    pub destination_service: String,
    pub destination_cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeLabels {
    pub destination_service: String,
    pub destination_cluster: String,
    /// `ok` or `failed`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MoveLabels {
    pub destination_service: String,
    pub kind: &'static str,
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
            hedges: Family::default(),
            connections: Family::default(),
            ejections: Family::default(),
            tcp_connections: Family::default(),
            request_bytes: Family::default(),
            response_bytes: Family::default(),
            spans: Default::default(),
            rejected: Family::default(),
            level: Family::default(),
            level_moves: Family::default(),
            cluster_ejections: Family::default(),
            cluster_ejected: Family::default(),
            probes: Family::default(),
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
            "Requests sent again, within the retry budget: to another endpoint or cluster when nothing was delivered (or, if idempotent, after app-failed, a dead session or a per-try timeout), gRPC UNAVAILABLE, or on a new session after a pooled one died",
            m.retries.clone(),
        );
        registry.register(
            "isthmus_hedges",
            "Copies of idempotent requests sent because the first attempt had not answered within the route's hedge.after",
            m.hedges.clone(),
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
        registry.register(
            "isthmus_tcp_connections",
            "Opaque TCP connections, by direction, route and outcome (ok, refused, connect-failed, app-unavailable, no-route)",
            m.tcp_connections.clone(),
        );
        registry.register(
            "isthmus_request_bytes",
            "Bytes from client to server: HTTP request bodies, and what opaque TCP clients sent",
            m.request_bytes.clone(),
        );
        registry.register(
            "isthmus_response_bytes",
            "Bytes from server to client: HTTP response bodies, and what opaque TCP servers sent",
            m.response_bytes.clone(),
        );
        registry.register(
            "isthmus_otlp_spans_ended",
            "Sampled spans ended and handed to the OTLP batch processor",
            m.spans.ended.clone(),
        );
        registry.register(
            "isthmus_otlp_spans_exported",
            "Spans the OTLP collector accepted",
            m.spans.exported.clone(),
        );
        registry.register(
            "isthmus_otlp_spans_failed",
            "Spans lost because their OTLP export failed (collector unreachable or refusing)",
            m.spans.failed.clone(),
        );
        registry.register(
            "isthmus_failover_level",
            "Priority level each service's traffic uses now (0: the split or first choice; 1, 2, ...: failover steps), set when it moves",
            m.level.clone(),
        );
        registry.register(
            "isthmus_failover_events",
            "Moves of a service's traffic to a later priority level (failover) or back (failback)",
            m.level_moves.clone(),
        );
        registry.register(
            "isthmus_rejected",
            "Connections and requests refused by a limit: connection-limit (--max-connections), handshake-limit (inbound connections still in their handshake), request-limit (--max-requests-per-service)",
            m.rejected.clone(),
        );
        registry.register(
            "isthmus_cluster_ejections",
            "A service in a cluster (this one included) taken out of this sidecar's choices after failures in a row",
            m.cluster_ejections.clone(),
        );
        registry.register(
            "isthmus_cluster_ejected",
            "1 while a service in a cluster is ejected (it is probed until it answers), else 0",
            m.cluster_ejected.clone(),
        );
        registry.register(
            "isthmus_probes",
            "Active probes of ejected (service, cluster) pairs, by result (ok puts the pair back in service)",
            m.probes.clone(),
        );
        m
    }

    /// A (service, cluster) pair was ejected, or put back.
    pub fn cluster_health(&self, service: &ServiceKey, cluster: &str, ejected: bool) {
        let l = ClusterLabels {
            destination_service: service.to_string(),
            destination_cluster: cluster.to_string(),
        };
        if ejected {
            self.cluster_ejections.get_or_create(&l).inc();
        }
        self.cluster_ejected.get_or_create(&l).set(i64::from(ejected));
    }

    pub fn probe(&self, service: &ServiceKey, cluster: &str, ok: bool) {
        self.probes
            .get_or_create(&ProbeLabels {
                destination_service: service.to_string(),
                destination_cluster: cluster.to_string(),
                result: if ok { "ok" } else { "failed" },
            })
            .inc();
    }

    /// Traffic of a service moved to priority `level`.
    pub fn level_moved(&self, service: &ServiceKey, level: usize, failover: bool) {
        let s = ServiceLabels {
            destination_service: service.to_string(),
        };
        self.level.get_or_create(&s).set(level as i64);
        let kind = if failover { "failover" } else { "failback" };
        self.level_moves
            .get_or_create(&MoveLabels {
                destination_service: service.to_string(),
                kind,
            })
            .inc();
    }

    pub fn rejected(&self, direction: Direction, reason: &'static str) {
        self.rejected.get_or_create(&RejectLabels { direction, reason }).inc();
    }

    /// An opaque TCP connection and how it went.
    pub fn tcp(&self, route: &RouteLabels, outcome: TcpOutcome) {
        self.tcp_connections
            .get_or_create(&TcpLabels {
                direction: route.direction,
                source_cluster: route.source_cluster.clone(),
                destination_cluster: route.destination_cluster.clone(),
                destination_service: route.destination_service.clone(),
                outcome,
            })
            .inc();
    }

    /// Bytes a finished opaque connection carried each way.
    pub fn bytes(&self, route: &RouteLabels, to_server: u64, to_client: u64) {
        self.request_bytes.get_or_create(route).inc_by(to_server);
        self.response_bytes.get_or_create(route).inc_by(to_client);
    }

    /// The request- and response-byte counters of `route`, to count bodies
    /// as they stream (each `get_or_create` guard is dropped at once).
    pub fn body_counters(&self, route: &RouteLabels) -> (Counter, Counter) {
        let req = self.request_bytes.get_or_create(route).clone();
        let resp = self.response_bytes.get_or_create(route).clone();
        (req, resp)
    }

    /// A connection opened; it counts until the returned guard drops.
    pub fn open(&self, direction: Direction) -> OpenConnection {
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

/// A body that adds the length of each data frame to a counter as it
/// passes, so a streamed body is counted without being held. It drops
/// empty data frames: they carry nothing, and HTTP/2 peers (h2 among them)
/// take empty non-final DATA frames for abuse and close the connection
/// after a hundred, so forwarding one per request would break a pooled
/// session.
pub struct CountedBody<B> {
    inner: B,
    counter: Counter,
}

impl<B> CountedBody<B> {
    pub fn new(inner: B, counter: Counter) -> Self {
        Self { inner, counter }
    }
}

impl<B> hyper::body::Body for CountedBody<B>
where
    B: hyper::body::Body<Data = bytes::Bytes> + Unpin,
{
    type Data = bytes::Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        loop {
            let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
            if let std::task::Poll::Ready(Some(Ok(frame))) = &polled
                && let Some(data) = frame.data_ref()
            {
                if data.is_empty() {
                    continue;
                }
                self.counter.inc_by(data.len() as u64);
            }
            return polled;
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
