//! Distributed traces (`[traces]`, off by default): W3C `traceparent` / `tracestate`
//! propagated through both hops, one span per hop, exported over OTLP/HTTP.
//!
//! - The source hop (a task's request into the mesh) makes a client span. Its parent is
//!   the task's own `traceparent` when it sent one; otherwise it starts a trace. The
//!   request leaves with a `traceparent` naming the source span, so every attempt (a
//!   retried request makes several) reaches a destination with the same parent.
//! - The destination hop (a request out of the tunnel to the local application) makes a
//!   server span, child of the source span, and hands the application a `traceparent`
//!   naming the destination span.
//! - Sampling is parent-based: a sampled (or unsampled) incoming `traceparent` decides;
//!   a new trace is sampled at `sample_ratio`. An unsampled span still gets a new span id
//!   and is propagated with the sampled flag off (W3C: each hop is a new `parent-id`),
//!   but records nothing and is never exported.
//! - Spans end at the response head (as the Istio request metrics measure), with the
//!   status code and an error status for 5xx answers and proxy-made errors.
//!
//! The OpenTelemetry SDK makes the ids, samples and holds span data; `export` queues
//! finished spans for the OTLP exporter without ever blocking the data path.
use std::time::Duration;

use http::{HeaderMap, Method};
use opentelemetry::{
    Context, KeyValue,
    propagation::TextMapPropagator,
    trace::{Span as _, SpanKind, Status, TraceContextExt, Tracer as _},
};
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    trace::{Sampler, SdkTracer, SdkTracerProvider},
};
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;

mod export;

pub use export::ExportError;

/// `[traces]`, parsed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TraceSettings {
    /// Where spans go: an OTLP/HTTP traces URL (`http://` or `https://`), used as is.
    pub otlp_endpoint: String,
    /// Trust roots (PEM) for an `https://` collector; `None`: the system's.
    pub ca_file: Option<std::path::PathBuf>,
    /// Share of new traces (no sampled flag from the caller) that are recorded, 0 to 1.
    pub sample_ratio: f64,
    /// Finished spans waiting for export; past it new ones are dropped and counted.
    pub max_queue: usize,
    /// Spans per export request.
    pub max_batch: usize,
    /// Longest a finished span waits for its batch to fill.
    pub export_interval: Duration,
    /// One export request's deadline (connect included); its spans are dropped after it.
    pub export_timeout: Duration,
}

/// Counters of the exporter, registered as `ecsmesh_trace_spans_*`.
#[derive(Clone, Default)]
pub struct TraceCounters {
    /// Spans the collector accepted.
    pub exported: Counter,
    /// Spans lost: the queue was full, or their export failed or timed out.
    pub dropped: Counter,
}

/// Who this proxy is, for the exported resource.
pub struct ProxyIdentity<'a> {
    pub cluster: &'a str,
    pub instance: &'a str,
}

/// The tracer of a proxy with `[traces]`.
pub struct Traces {
    tracer: SdkTracer,
    /// Kept so the tracer keeps its processor; shut down with the proxy.
    provider: SdkTracerProvider,
}

impl Traces {
    /// Builds the exporter and starts its task (on the current tokio runtime).
    pub fn start(
        settings: &TraceSettings,
        who: ProxyIdentity<'_>,
        counters: TraceCounters,
    ) -> Result<Self, ExportError> {
        let resource = Resource::builder_empty()
            .with_service_name("ecsmesh")
            .with_attributes([
                KeyValue::new(attr::CLUSTER, who.cluster.to_owned()),
                KeyValue::new(attr::CONTAINER_INSTANCE, who.instance.to_owned()),
            ])
            .build();
        let processor = export::Queue::start(settings, &resource, counters)?;
        let provider = SdkTracerProvider::builder()
            .with_resource(resource)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                settings.sample_ratio,
            ))))
            .with_span_processor(processor)
            .build();
        let tracer = opentelemetry::trace::TracerProvider::tracer(&provider, "ecsmesh");
        Ok(Self { tracer, provider })
    }

    /// The source hop's client span: child of the task's `traceparent`, if it sent one.
    pub fn source(&self, method: &Method, headers: &HeaderMap) -> HopSpan {
        self.hop(SpanKind::Client, method, headers)
    }

    /// The destination hop's server span: child of the source proxy's span.
    pub fn destination(&self, method: &Method, headers: &HeaderMap) -> HopSpan {
        self.hop(SpanKind::Server, method, headers)
    }

    fn hop(&self, kind: SpanKind, method: &Method, headers: &HeaderMap) -> HopSpan {
        let parent = TraceContextPropagator::new()
            .extract_with_context(&Context::new(), &HeaderExtractor(headers));
        let span = self
            .tracer
            .span_builder(span_name(method))
            .with_kind(kind)
            .start_with_context(&self.tracer, &parent);
        HopSpan { span }
    }

    /// Exports what is queued (bounded by the export timeout) and stops the exporter.
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::debug!(error = %e, "trace provider shutdown");
        }
    }
}

/// Attribute keys of the spans and the resource (also in the README).
pub mod attr {
    pub const CLUSTER: &str = "ecsmesh.cluster";
    pub const CONTAINER_INSTANCE: &str = "ecsmesh.container_instance";
    pub const SOURCE_TASK: &str = "ecsmesh.source.task_id";
    pub const SOURCE_FAMILY: &str = "ecsmesh.source.family";
    pub const SOURCE_PRINCIPAL: &str = "ecsmesh.source.principal";
    pub const DESTINATION_TASK: &str = "ecsmesh.destination.task_id";
    pub const DESTINATION_FAMILY: &str = "ecsmesh.destination.family";
    pub const DESTINATION_PRINCIPAL: &str = "ecsmesh.destination.principal";
    pub const DESTINATION_SERVICE: &str = "ecsmesh.destination.service";
    pub const ENDPOINT: &str = "ecsmesh.endpoint";
    pub const ATTEMPTS: &str = "ecsmesh.attempts";
    pub const PROXY_ERROR: &str = "ecsmesh.proxy_error";
    pub const METHOD: &str = "http.request.method";
    pub const PATH: &str = "url.path";
    pub const STATUS: &str = "http.response.status_code";
}

/// OpenTelemetry's HTTP span name: the method (a static string, so an unsampled span
/// allocates nothing for it).
fn span_name(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "HTTP",
    }
}

/// One hop's span; ends (and is queued for export, when sampled) with `finish` or drop.
pub struct HopSpan {
    span: opentelemetry_sdk::trace::Span,
}

impl HopSpan {
    /// Whether attributes are kept: false for unsampled spans (skip building them).
    pub fn recording(&self) -> bool {
        self.span.is_recording()
    }

    /// Sets `traceparent` (and `tracestate`, when the trace has one) to this span,
    /// replacing what the request carried.
    /// Hands `req` on as this span's child (its `traceparent` names this span), and
    /// records its method and path.
    pub fn propagate<B>(mut self, req: &mut http::Request<B>) -> Self {
        self.inject(req.headers_mut());
        if self.recording() {
            self.set([
                KeyValue::new(attr::METHOD, req.method().to_string()),
                KeyValue::new(attr::PATH, req.uri().path().to_owned()),
            ]);
        }
        self
    }

    pub fn inject(&self, headers: &mut HeaderMap) {
        let cx = Context::new().with_remote_span_context(self.span.span_context().clone());
        TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
        // The propagator writes `tracestate` even when the trace has none.
        if headers.get(TRACESTATE).is_some_and(|v| v.is_empty()) {
            headers.remove(TRACESTATE);
        }
    }

    /// Adds attributes (no-op when not recording).
    pub fn set(&mut self, attributes: impl IntoIterator<Item = KeyValue>) {
        if self.recording() {
            self.span.set_attributes(attributes);
        }
    }

    /// Ends the span with the response's status: 5xx and proxy-made errors are errors.
    pub fn finish(mut self, status: u16, proxy_error: Option<&str>) {
        if self.recording() {
            self.span
                .set_attribute(KeyValue::new(attr::STATUS, i64::from(status)));
            if let Some(reason) = proxy_error {
                self.span
                    .set_attribute(KeyValue::new(attr::PROXY_ERROR, reason.to_owned()));
                self.span.set_status(Status::error(reason.to_owned()));
            } else if status >= 500 {
                self.span
                    .set_status(Status::error(format!("HTTP {status}")));
            }
        }
        self.span.end();
    }
}

const TRACESTATE: http::HeaderName = http::HeaderName::from_static("tracestate");

#[cfg(test)]
mod tests;
