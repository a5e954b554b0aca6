//! Prometheus metrics of the data path. Names follow Istio's `istio_tcp_*` family so
//! existing dashboards translate; every series is labelled by the source ECS task.
use std::sync::{
    Arc, OnceLock,
    atomic::{AtomicUsize, Ordering},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use series::{Bounded, MetricLabels, Sweep};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    /// "client" (outbound side) or "server" (inbound side).
    pub role: &'static str,
    pub source_identity: String,
    pub destination_identity: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    pub side: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    pub source_identity: String,
    pub destination_family: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IssuerCallLabels {
    pub call: &'static str,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AcceptLabels {
    /// `outbound`, `tunnel`, `admin` or `admin_socket`.
    pub listener: &'static str,
    /// `emfile`, `enfile`, `enobufs`, `enomem` (accepting paused) or `other` (retried).
    pub error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AnchorLabels {
    pub fingerprint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IssuerLabels {
    pub issuer: String,
    pub fingerprint: String,
    pub anchor_fingerprint: String,
}

/// Per service, with a reason or kind (retries, timeouts).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceReasonLabels {
    pub service: String,
    pub reason: &'static str,
}

/// Requests a balancer sent to one endpoint of a service.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub service: String,
    pub endpoint: String,
}

/// A side of the tunnel handshake: `client` (dialling) or `server` (accepting).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabels {
    pub role: &'static str,
}

/// Seconds, from 1 ms to about an hour.
fn duration_buckets() -> impl Iterator<Item = f64> {
    [
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        300.0, 900.0, 3600.0,
    ]
    .into_iter()
}

pub struct Metrics {
    registry: Registry,
    /// How long task TCP connections stayed open, by Istio's TCP labels.
    pub tcp_duration: Bounded<istio::TcpLabels, Histogram>,
    /// mTLS tunnel handshakes that completed, how long they took (TCP connect excluded).
    pub handshake_duration: Family<RoleLabels, Histogram>,
    /// The access log, once started (`[access_log]`; off by default).
    access_log: OnceLock<crate::access_log::AccessLog>,
    /// Access log lines dropped because the writer fell behind.
    pub access_log_dropped: Counter,
    /// The tracer, once started (`[traces]`; off by default).
    traces: OnceLock<crate::trace::Traces>,
    /// Spans exported, and spans dropped (queue full, export failed or timed out).
    pub trace_spans: crate::trace::TraceCounters,
    /// The standard series, without the `ecsmesh_` prefix: Istio's and `process_*`.
    standard: Registry,
    /// Retried attempts, by service and what failed (status, connect, reset, unavailable,
    /// per_try_timeout).
    pub retries: Family<ServiceReasonLabels, Counter>,
    /// Retries the budget refused, by service.
    pub retry_budget_exhausted: Family<ServiceReasonLabels, Counter>,
    /// Timeouts by service and kind: connect, per_try, request.
    pub timeouts: Family<ServiceReasonLabels, Counter>,
    /// Attempts per endpoint chosen by the balancer.
    pub endpoint_requests: Bounded<EndpointLabels, Counter>,
    /// The most label sets one task-labelled metric holds (`[metrics]
    /// max_series_per_metric`).
    series_cap: Arc<AtomicUsize>,
    /// Observations folded into a metric's overflow series, by metric.
    series_overflow: Family<MetricLabels, Counter>,
    /// Label sets each task-labelled metric holds (updated at each sweep).
    series: Family<MetricLabels, Gauge>,
    /// Series removed because a task they name is gone.
    series_removed: Counter,
    /// Filled once the eBPF programs are installed.
    pub kernel: KernelCounters,
    /// Istio's request metrics (unprefixed, in the standard registry).
    pub istio: istio::Istio,
    /// 1 per anchor in the node's trust bundle (label: SHA-256 fingerprint).
    pub trust_anchors: Family<AnchorLabels, Gauge>,
    /// 1 for the issuer the node signs SVIDs with, and the anchor it chains to.
    pub issuer: Family<IssuerLabels, Gauge>,
    /// Local ECS tasks by state: `enrolled`, `serving`, `pending`, `not_meshed_awsvpc`.
    pub ecs_tasks: Family<StateLabels, Gauge>,
    /// ECS agent polls by result.
    pub ecs_syncs: Family<ResultLabels, Counter>,
    /// Issuer mode: calls to `ecsmesh issuer` by call and result.
    pub issuer_calls: Family<IssuerCallLabels, Counter>,
    /// mTLS handshakes completed, per identity pair.
    pub handshakes: Bounded<HandshakeLabels, Counter>,
    /// Tunnel handshakes and streams refused, by side and reason.
    pub rejected: Family<RejectLabels, Counter>,
    /// Tunnel streams accepted by the inbound side.
    pub inbound_streams: Bounded<StreamLabels, Counter>,
    /// Inbound tunnel bytes from the remote caller to the local task.
    pub inbound_to_task: Bounded<StreamLabels, Counter>,
    /// Inbound tunnel bytes from the local task back to the remote caller.
    pub inbound_from_task: Bounded<StreamLabels, Counter>,
    /// Connections the proxy accepted but could not forward, by reason.
    pub failed: Family<ReasonLabels, Counter>,
    /// Accept errors by listener and error; resource errors pause accepting.
    pub accept_errors: Family<AcceptLabels, Counter>,
    /// Pooled (outbound side) tunnel connections closed, by reason.
    pub tunnel_closed: Family<ReasonLabels, Counter>,
    /// Inbound TLS handshakes holding a slot of `tunnel_handshake_cap`.
    pub handshakes_in_progress: Gauge,
    /// Opaque TCP connections closed by `tcp_idle_timeout_secs`.
    pub tcp_idle_timeouts: Counter,
    /// The soft `RLIMIT_NOFILE` the proxy runs with.
    pub open_files_limit: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::with_extra(|_| {})
    }
}

impl Metrics {
    /// The proxy's metrics plus whatever `extra` registers (optional subsystems such as
    /// Cloud Map bring their own series).
    pub fn with_extra(extra: impl FnOnce(&mut Registry)) -> Self {
        let mut registry = Registry::with_prefix("ecsmesh");
        extra(&mut registry);
        let cap = Arc::new(AtomicUsize::new(DEFAULT_MAX_SERIES));
        let overflow = Family::default();
        let mut m = Self {
            retries: Family::default(),
            retry_budget_exhausted: Family::default(),
            timeouts: Family::default(),
            endpoint_requests: Bounded::new(
                "endpoint_requests",
                Family::default(),
                &cap,
                &overflow,
            ),
            failed: Family::default(),
            handshakes: Bounded::new("tls_handshakes", Family::default(), &cap, &overflow),
            ecs_tasks: Family::default(),
            ecs_syncs: Family::default(),
            issuer_calls: Family::default(),
            rejected: Family::default(),
            inbound_streams: Bounded::new(
                "tunnel_inbound_streams",
                Family::default(),
                &cap,
                &overflow,
            ),
            inbound_to_task: Bounded::new(
                "tunnel_inbound_received_bytes",
                Family::default(),
                &cap,
                &overflow,
            ),
            inbound_from_task: Bounded::new(
                "tunnel_inbound_sent_bytes",
                Family::default(),
                &cap,
                &overflow,
            ),
            trust_anchors: Family::default(),
            issuer: Family::default(),
            istio: istio::Istio::new(&cap, &overflow),
            tcp_duration: Bounded::new(
                "tcp_connection_duration_seconds",
                Family::new_with_constructor(|| Histogram::new(duration_buckets())),
                &cap,
                &overflow,
            ),
            handshake_duration: Family::new_with_constructor(|| Histogram::new(duration_buckets())),
            access_log: OnceLock::new(),
            access_log_dropped: Counter::default(),
            traces: OnceLock::new(),
            trace_spans: crate::trace::TraceCounters::default(),
            accept_errors: Family::default(),
            tunnel_closed: Family::default(),
            handshakes_in_progress: Gauge::default(),
            tcp_idle_timeouts: Counter::default(),
            open_files_limit: Gauge::default(),
            kernel: KernelCounters::default(),
            registry: Registry::default(),
            standard: Registry::default(),
            series_cap: cap.clone(),
            series_overflow: overflow.clone(),
            series: Family::default(),
            series_removed: Counter::default(),
        };
        registry.register_collector(Box::new(m.kernel.clone()));
        m.istio.register(&mut m.standard);
        m.standard
            .register_collector(Box::new(process::ProcessCollector));
        registry.register(
            "trust_anchor",
            "Anchors in this node's trust bundle, by SHA-256 fingerprint (value 1)",
            m.trust_anchors.clone(),
        );
        registry.register(
            "issuer",
            "The issuer this node signs SVIDs with and the anchor it chains to (value 1)",
            m.issuer.clone(),
        );
        registry.register(
            "ecs_tasks",
            "Local ECS tasks by state (enrolled, serving, pending, not_meshed_awsvpc)",
            m.ecs_tasks.clone(),
        );
        registry.register("ecs_sync", "ECS agent polls by result", m.ecs_syncs.clone());
        registry.register(
            "issuer_calls",
            "Issuer mode: calls to ecsmesh issuer (attest, node, svid) by result (issued, unreachable, or the issuer's refusal reason)",
            m.issuer_calls.clone(),
        );
        registry.register(
            m.handshakes.name(),
            "mTLS tunnel handshakes completed, per identity pair",
            m.handshakes.family(),
        );
        registry.register(
            "tunnel_rejected",
            "Tunnel handshakes or streams refused, by side and reason",
            m.rejected.clone(),
        );
        registry.register(
            m.inbound_streams.name(),
            "Tunnel streams accepted by this proxy's inbound side",
            m.inbound_streams.family(),
        );
        registry.register(
            m.inbound_to_task.name(),
            "Bytes from tunnel callers to local tasks",
            m.inbound_to_task.family(),
        );
        registry.register(
            m.inbound_from_task.name(),
            "Bytes from local tasks back to tunnel callers",
            m.inbound_from_task.family(),
        );
        registry.register(
            m.tcp_duration.name(),
            "How long task TCP connections stayed open",
            m.tcp_duration.family(),
        );
        registry.register(
            "tunnel_handshake_duration_seconds",
            "mTLS tunnel handshakes that completed, by role, how long they took",
            m.handshake_duration.clone(),
        );
        registry.register(
            "access_log_dropped",
            "Access log lines dropped because the writer fell behind",
            m.access_log_dropped.clone(),
        );
        registry.register(
            "trace_spans_exported",
            "Spans the OTLP collector accepted",
            m.trace_spans.exported.clone(),
        );
        registry.register(
            "trace_spans_dropped",
            "Spans dropped: the export queue was full, or their export failed or timed out",
            m.trace_spans.dropped.clone(),
        );
        registry.register(
            "retries",
            "Retried attempts (HTTP requests, balanced TCP connects), by service and the failure retried",
            m.retries.clone(),
        );
        registry.register(
            "retry_budget_exhausted",
            "Retries refused because the service's retry budget was spent",
            m.retry_budget_exhausted.clone(),
        );
        registry.register(
            "timeouts",
            "Timeouts by service and kind (connect, per_try, request)",
            m.timeouts.clone(),
        );
        registry.register(
            m.endpoint_requests.name(),
            "Attempts the balancer sent to each endpoint of a service",
            m.endpoint_requests.family(),
        );
        registry.register(
            "tcp_connections_failed",
            "Accepted connections that could not be forwarded",
            m.failed.clone(),
        );
        registry.register(
            "accept_errors",
            "Accept errors by listener and error (emfile, enfile, enobufs, enomem pause accepting; other is retried)",
            m.accept_errors.clone(),
        );
        registry.register(
            "tunnel_connections_closed",
            "Pooled tunnel connections closed on the dialling side, by reason",
            m.tunnel_closed.clone(),
        );
        registry.register(
            "tunnel_handshakes_in_progress",
            "Inbound tunnel TLS handshakes holding a slot of tunnel_handshake_cap",
            m.handshakes_in_progress.clone(),
        );
        registry.register(
            "tcp_idle_timeouts",
            "Opaque TCP connections closed by tcp_idle_timeout_secs",
            m.tcp_idle_timeouts.clone(),
        );
        registry.register(
            "open_files_limit",
            "The soft RLIMIT_NOFILE the proxy runs with",
            m.open_files_limit.clone(),
        );
        registry.register(
            "metric_series_overflow",
            "Observations folded into a metric's overflow series (task names `overflow`) because it held max_series_per_metric label sets",
            m.series_overflow.clone(),
        );
        registry.register(
            "metric_series",
            "Label sets held by each task-labelled metric (at the last sweep)",
            m.series.clone(),
        );
        registry.register(
            "metric_series_removed",
            "Series removed because a task they name stopped (after the grace period)",
            m.series_removed.clone(),
        );
        Self { registry, ..m }
    }

    /// Sets the most label sets each task-labelled metric holds.
    pub fn set_max_series(&self, max: usize) {
        self.series_cap.store(max, Ordering::Relaxed);
    }

    /// Every task-labelled metric.
    fn bounded(&self) -> Vec<&dyn Sweep> {
        let mut all: Vec<&dyn Sweep> = self.istio.bounded().to_vec();
        all.extend([
            &self.tcp_duration as &dyn Sweep,
            &self.handshakes,
            &self.inbound_streams,
            &self.inbound_to_task,
            &self.inbound_from_task,
            &self.endpoint_requests,
        ]);
        all
    }

    /// Removes the series naming a task `gone` matches, and updates the series gauges.
    pub fn remove_series(&self, gone: &dyn Fn(&str) -> bool) -> usize {
        let mut removed = 0;
        for family in self.bounded() {
            removed += family.remove_mentioning(gone);
            self.series
                .get_or_create(&MetricLabels {
                    metric: family.name(),
                })
                .set(family.series_count() as i64);
        }
        self.series_removed.inc_by(removed as u64);
        removed
    }

    /// One HTTP request through the mesh, counted with its response at one side.
    pub fn reject(&self, side: &'static str, reason: &'static str) {
        self.rejected
            .get_or_create(&RejectLabels { side, reason })
            .inc();
    }

    pub fn fail(&self, reason: &'static str) {
        self.failed.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// Replaces the trust series with `status` (old anchors disappear from the scrape).
    pub fn set_trust(&self, status: &crate::identity::TrustStatus) {
        self.trust_anchors.clear();
        for anchor in &status.anchors {
            self.trust_anchors
                .get_or_create(&AnchorLabels {
                    fingerprint: anchor.to_string(),
                })
                .set(1);
        }
        self.issuer.clear();
        if let Some(issuer) = &status.issuer {
            self.issuer
                .get_or_create(&IssuerLabels {
                    issuer: issuer.identity.to_string(),
                    fingerprint: issuer.fingerprint.to_string(),
                    anchor_fingerprint: issuer.anchor.to_string(),
                })
                .set(1);
        }
    }

    pub fn handshake_took(&self, role: &'static str, took: std::time::Duration) {
        self.handshake_duration
            .get_or_create(&RoleLabels { role })
            .observe(took.as_secs_f64());
    }

    /// Installs the access log (once, at start).
    pub fn set_access_log(&self, log: crate::access_log::AccessLog) {
        let _ = self.access_log.set(log);
    }

    /// The access log, when one was started.
    pub fn access_log(&self) -> Option<&crate::access_log::AccessLog> {
        self.access_log.get()
    }

    /// Installs the tracer (once, at start).
    pub fn set_traces(&self, traces: crate::trace::Traces) {
        let _ = self.traces.set(traces);
    }

    /// The tracer, when `[traces]` is configured.
    pub fn traces(&self) -> Option<&crate::trace::Traces> {
        self.traces.get()
    }

    /// OpenMetrics text (what `/metrics` serves when the scraper asks for it).
    pub fn encode(&self) -> String {
        use prometheus_client::encoding::text::{encode_eof, encode_registry};
        let mut out = String::new();
        encode_registry(&mut out, &self.registry)
            .and_then(|()| encode_registry(&mut out, &self.standard))
            .and_then(|()| encode_eof(&mut out))
            .expect("writing to a String cannot fail");
        out
    }

    /// The classic Prometheus text format, what `/metrics` serves by default.
    pub fn encode_classic(&self) -> String {
        classic::from_openmetrics(&self.encode())
    }
}

/// `[metrics] max_series_per_metric` by default.
pub const DEFAULT_MAX_SERIES: usize = 10_000;

pub mod classic;
pub mod istio;
mod kernel;
pub mod process;
pub mod series;

pub use kernel::KernelCounters;
