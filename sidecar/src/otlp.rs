//! Spans over OTLP, with the OpenTelemetry SDK and its OTLP exporter: a
//! client span for each outbound request and a server span for each
//! inbound one, in the W3C trace the request carries.
//!
//! Configured the way every OpenTelemetry SDK is: `OTEL_EXPORTER_OTLP_*`
//! (endpoint, headers, timeout, protocol `grpc` or `http/protobuf`),
//! `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG`, `OTEL_BSP_*` for
//! the batch processor, `OTEL_RESOURCE_ATTRIBUTES`. The batch processor
//! queues spans and exports them from its own thread; a full queue drops
//! spans, so exporting never holds a request up.

use std::time::{Duration, SystemTime};

use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags, TraceId, TraceState,
    Tracer as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracer, SdkTracerProvider, SpanData, SpanExporter,
};
use prometheus_client::metrics::counter::Counter;
use tokio_util::sync::CancellationToken;

use crate::trace::TraceContext;

/// How often queued spans are exported, by default.
const EXPORT_EVERY: Duration = Duration::from_secs(1);
/// How long shutdown waits for the last spans to leave.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(2);

/// The OTLP transport, as `OTEL_EXPORTER_OTLP_PROTOCOL` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
}

impl Protocol {
    /// `grpc` or `http/protobuf` (the OpenTelemetry spec's default).
    pub fn parse(s: &str) -> Result<Self, OtlpError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "grpc" => Ok(Protocol::Grpc),
            "http/protobuf" | "" => Ok(Protocol::HttpProtobuf),
            other => Err(OtlpError::Protocol(other.to_string())),
        }
    }

    /// From `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`, else
    /// `OTEL_EXPORTER_OTLP_PROTOCOL`, else `http/protobuf`.
    pub fn from_env() -> Result<Self, OtlpError> {
        let v = std::env::var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL"))
            .unwrap_or_default();
        Self::parse(&v)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    #[error(
        "OTLP protocol {0:?} is not supported: use grpc or http/protobuf (OTEL_EXPORTER_OTLP_PROTOCOL or --otlp-protocol)"
    )]
    Protocol(String),
    #[error("OTLP exporter: {0}")]
    Build(#[from] opentelemetry_otlp::ExporterBuildError),
}

/// What the sidecar counts of its spans (docs/metrics.md).
#[derive(Clone, Default)]
pub struct SpanCounters {
    /// Sampled spans ended (handed to the batch processor).
    pub ended: Counter,
    /// Spans the collector took.
    pub exported: Counter,
    /// Spans whose export failed.
    pub failed: Counter,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Server,
    Client,
}

/// Spans of this sidecar, exported over OTLP.
pub struct Exporter {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    counters: SpanCounters,
}

impl Exporter {
    /// Start exporting to `endpoint` (a base URL: `/v1/traces` is added for
    /// HTTP) over `protocol`, as a resource with `attributes`. Needs a
    /// tokio runtime (the gRPC transport's connection lives on it).
    pub fn start(
        endpoint: &str,
        protocol: Protocol,
        attributes: Vec<(&'static str, String)>,
        counters: SpanCounters,
        stop: CancellationToken,
    ) -> Result<Self, OtlpError> {
        let base = endpoint.trim_end_matches('/');
        let exporter = match protocol {
            Protocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(base)
                .build()?,
            Protocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(format!("{base}/v1/traces"))
                .build()?,
        };
        let resource = Resource::builder()
            .with_attributes(attributes.into_iter().map(|(k, v)| KeyValue::new(k, v)))
            .build();
        // Spans leave each second unless OTEL_BSP_SCHEDULE_DELAY says
        // otherwise (the SDK's default, 5 s, makes traces slow to appear).
        let mut batch = BatchConfigBuilder::default();
        if std::env::var_os("OTEL_BSP_SCHEDULE_DELAY").is_none() {
            batch = batch.with_scheduled_delay(EXPORT_EVERY);
        }
        let processor = BatchSpanProcessor::builder(Counted {
            inner: exporter,
            counters: counters.clone(),
        })
        .with_batch_config(batch.build())
        .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(resource)
            .build();
        let tracer = opentelemetry::trace::TracerProvider::tracer(&provider, "isthmus-sidecar");
        // Flush on shutdown off the async thread: the gRPC transport's
        // connection is driven by this runtime while the flush waits.
        let p = provider.clone();
        tokio::spawn(async move {
            stop.cancelled().await;
            let _ = tokio::task::spawn_blocking(move || p.shutdown_with_timeout(SHUTDOWN_FLUSH)).await;
        });
        Ok(Self {
            provider,
            tracer,
            counters,
        })
    }

    /// Start this hop's span, a child of `parent` (else the root of a new
    /// trace); also its context, for the next hop's `traceparent`.
    pub fn begin(&self, kind: Kind, name: String, parent: Option<TraceContext>, start: SystemTime) -> Started {
        let cx = match parent {
            Some(p) => Context::new().with_remote_span_context(SpanContext::new(
                TraceId::from_bytes(p.trace_id),
                SpanId::from_bytes(p.span_id),
                TraceFlags::new(p.flags),
                true,
                TraceState::default(),
            )),
            None => Context::new(),
        };
        let span = self
            .tracer
            .span_builder(name)
            .with_kind(match kind {
                Kind::Server => SpanKind::Server,
                Kind::Client => SpanKind::Client,
            })
            .with_start_time(start)
            .start_with_context(&self.tracer, &cx);
        let sc = span.span_context();
        let ctx = TraceContext {
            trace_id: sc.trace_id().to_bytes(),
            span_id: sc.span_id().to_bytes(),
            flags: sc.trace_flags().to_u8(),
        };
        Started { span, ctx }
    }

    /// End a span, named `name`, with what the request's answer said.
    pub fn end(&self, mut started: Started, name: String, end: Ended) {
        let span = &mut started.span;
        if !span.is_recording() {
            return;
        }
        span.update_name(name);
        span.set_attributes(end.attributes.into_iter().map(|(k, v)| KeyValue::new(k, v)));
        span.set_attribute(KeyValue::new("http.response.status_code", i64::from(end.status)));
        if let Some(kind) = end.error {
            span.set_attribute(KeyValue::new("error.type", kind));
        }
        span.set_status(if end.status >= 500 {
            Status::error(format!("HTTP {}", end.status))
        } else {
            Status::Ok
        });
        span.end_with_timestamp(end.at);
        self.counters.ended.inc();
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        // Shut down already (or not started): nothing waits here.
        let _ = self.provider.shutdown_with_timeout(Duration::ZERO);
    }
}

/// A span begun, and its context for the next hop.
pub struct Started {
    span: opentelemetry_sdk::trace::Span,
    pub ctx: TraceContext,
}

/// How a request ended, for its span.
pub struct Ended {
    pub status: u16,
    /// The `x-isthmus-error` kind of an answer a sidecar made itself.
    pub error: Option<String>,
    pub attributes: Vec<(&'static str, String)>,
    pub at: SystemTime,
}

/// The OTLP exporter, counting what it exports and what fails.
#[derive(Debug)]
struct Counted<E> {
    inner: E,
    counters: SpanCounters,
}

impl std::fmt::Debug for SpanCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpanCounters").finish_non_exhaustive()
    }
}

impl<E: SpanExporter> SpanExporter for Counted<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len() as u64;
        let result = self.inner.export(batch).await;
        match &result {
            Ok(()) => self.counters.exported.inc_by(n),
            Err(_) => self.counters.failed.inc_by(n),
        };
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocols_by_their_standard_names() {
        assert_eq!(Protocol::parse("grpc").unwrap(), Protocol::Grpc);
        assert_eq!(Protocol::parse("http/protobuf").unwrap(), Protocol::HttpProtobuf);
        assert_eq!(Protocol::parse("").unwrap(), Protocol::HttpProtobuf);
        assert!(Protocol::parse("http/json").is_err());
    }
}
