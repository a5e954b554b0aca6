//! Istio's standard request metrics, so the dashboards and alerts written for Istio work
//! on an ECS mesh: `istio_requests_total` and `istio_request_duration_milliseconds`, with
//! Istio's label names and meanings mapped to ECS (workload = task family, namespace =
//! cluster, principal = SPIFFE ID). Both hops report a request: the source proxy with
//! `reporter="source"` once per task request (retries included), the destination proxy
//! with `reporter="destination"` once per attempt that reached it.
use std::sync::{Arc, atomic::AtomicUsize};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

use super::series::{Bounded, MetricLabels, OVERFLOW, Sweep, TaskNames};

/// Istio's default duration buckets (milliseconds).
const DURATION_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Istio's size buckets (bytes): 1 B to 1 GB by powers of ten.
const SIZE_BUCKETS: [f64; 10] = [1.0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `source` (the caller's node proxy) or `destination` (the endpoint's).
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    /// The discovery service the request belongs to.
    pub destination_service: String,
    pub request_protocol: &'static str,
    pub response_code: u16,
    /// Envoy's flags for proxy-made responses (`-` when the application answered).
    pub response_flags: &'static str,
    /// `mutual_tls` at the destination (the tunnel is always mTLS); `unknown` at the
    /// source, as Istio reports it there.
    pub connection_security_policy: &'static str,
}

/// Istio's TCP labels (`istio_tcp_*`), reported by the source hop.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    /// `unknown` for a destination outside the mesh (permissive mode).
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_service: String,
    pub request_protocol: &'static str,
    pub connection_security_policy: &'static str,
}

type HistogramFamily<L> = Bounded<L, Histogram, fn() -> Histogram>;

pub struct Istio {
    pub requests: Bounded<RequestLabels, Counter>,
    pub duration: HistogramFamily<RequestLabels>,
    /// Request and response body sizes (bytes), observed when the response body ends.
    pub request_bytes: HistogramFamily<RequestLabels>,
    pub response_bytes: HistogramFamily<RequestLabels>,
    pub tcp_opened: Bounded<TcpLabels, Counter>,
    pub tcp_closed: Bounded<TcpLabels, Counter>,
    /// Request bytes: from the source task towards the destination (Istio's meaning).
    pub tcp_received: Bounded<TcpLabels, Counter>,
    /// Response bytes: from the destination back to the source task.
    pub tcp_sent: Bounded<TcpLabels, Counter>,
}

fn durations() -> Histogram {
    Histogram::new(DURATION_BUCKETS.iter().copied())
}

fn sizes() -> Histogram {
    Histogram::new(SIZE_BUCKETS.iter().copied())
}

impl Istio {
    /// Istio's metrics, each holding at most `cap` label sets (overflow counted in
    /// `overflow`).
    pub fn new(cap: &Arc<AtomicUsize>, overflow: &Family<MetricLabels, Counter>) -> Self {
        let histograms = |name, constructor: fn() -> Histogram| {
            Bounded::new(
                name,
                Family::new_with_constructor(constructor),
                cap,
                overflow,
            )
        };
        Self {
            requests: Bounded::new("istio_requests", Family::default(), cap, overflow),
            duration: histograms("istio_request_duration_milliseconds", durations),
            request_bytes: histograms("istio_request_bytes", sizes),
            response_bytes: histograms("istio_response_bytes", sizes),
            tcp_opened: Bounded::new(
                "istio_tcp_connections_opened",
                Family::default(),
                cap,
                overflow,
            ),
            tcp_closed: Bounded::new(
                "istio_tcp_connections_closed",
                Family::default(),
                cap,
                overflow,
            ),
            tcp_received: Bounded::new(
                "istio_tcp_received_bytes",
                Family::default(),
                cap,
                overflow,
            ),
            tcp_sent: Bounded::new("istio_tcp_sent_bytes", Family::default(), cap, overflow),
        }
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            self.requests.name(),
            "Requests, by reporter (source, destination) and Istio's workload labels",
            self.requests.family(),
        );
        for (family, help) in [
            (
                &self.tcp_opened,
                "TCP connections opened through the proxy, by Istio's workload labels",
            ),
            (&self.tcp_closed, "TCP connections closed through the proxy"),
            (
                &self.tcp_received,
                "Request bytes: from the source task towards its destination",
            ),
            (
                &self.tcp_sent,
                "Response bytes: from the destination back to the source task",
            ),
        ] {
            registry.register(family.name(), help, family.family());
        }
        for (family, help) in [
            (
                &self.duration,
                "Request duration until the response headers, milliseconds",
            ),
            (&self.request_bytes, "Request body size, bytes"),
            (&self.response_bytes, "Response body size, bytes"),
        ] {
            registry.register(family.name(), help, family.family());
        }
    }

    /// Every family, for sweeps and series counts.
    pub fn bounded(&self) -> [&dyn Sweep; 8] {
        [
            &self.requests,
            &self.duration,
            &self.request_bytes,
            &self.response_bytes,
            &self.tcp_opened,
            &self.tcp_closed,
            &self.tcp_received,
            &self.tcp_sent,
        ]
    }

    /// Counts a request and its duration (until the response headers); the returned
    /// handles observe its body sizes when the response body ends.
    pub fn record(&self, labels: RequestLabels, elapsed: std::time::Duration) -> BodySizes {
        let sizes = self.sizes(&labels);
        self.duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64() * 1000.0);
        self.requests.get_or_create(&labels).inc();
        sizes
    }

    pub(crate) fn sizes(&self, labels: &RequestLabels) -> BodySizes {
        BodySizes {
            request: self.request_bytes.get_or_create(labels).clone(),
            response: self.response_bytes.get_or_create(labels).clone(),
        }
    }
}

/// Both Istio label sets name tasks by workload and principal, at each end.
macro_rules! workload_task_names {
    ($($labels:ty),*) => {$(
        impl TaskNames for $labels {
            fn task_names(&self) -> Vec<&str> {
                vec![
                    &self.source_workload,
                    &self.source_principal,
                    &self.destination_workload,
                    &self.destination_principal,
                ]
            }

            fn overflowed(&self) -> Self {
                Self {
                    source_workload: OVERFLOW.into(),
                    source_principal: OVERFLOW.into(),
                    destination_workload: OVERFLOW.into(),
                    destination_principal: OVERFLOW.into(),
                    ..self.clone()
                }
            }
        }
    )*};
}

workload_task_names!(RequestLabels, TcpLabels);

#[cfg(test)]
impl Default for Istio {
    fn default() -> Self {
        Self::new(
            &Arc::new(AtomicUsize::new(super::DEFAULT_MAX_SERIES)),
            &Family::default(),
        )
    }
}

/// One request's size histograms (shared handles: observing needs no label lookup).
pub struct BodySizes {
    request: Histogram,
    response: Histogram,
}

impl BodySizes {
    pub fn observe(self, request: u64, response: u64) {
        self.request.observe(request as f64);
        self.response.observe(response as f64);
    }
}

/// Envoy's response flag for a proxy-made answer (`ecsmesh-proxy-error: <reason>`).
pub fn response_flags(proxy_error: Option<&str>) -> &'static str {
    match proxy_error {
        None => "-",
        Some("no_endpoints" | "not_serving" | "drained") => "UH",
        Some("per_try_timeout" | "request_timeout" | "connect_timeout") => "UT",
        Some("authorization_denied" | "identity_mismatch" | "not_local_endpoint") => "UAEX",
        Some("bad_request" | "bad_target" | "request_body") => "DPE",
        Some(_) => "UF",
    }
}

/// `grpc` for gRPC requests (their content type), else `http`.
pub fn request_protocol(headers: &http::HeaderMap) -> &'static str {
    match headers.get(http::header::CONTENT_TYPE) {
        Some(v) if v.as_bytes().starts_with(b"application/grpc") => "grpc",
        _ => "http",
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn labels() -> RequestLabels {
        RequestLabels {
            reporter: "source",
            source_workload: "web".into(),
            source_workload_namespace: "c".into(),
            source_principal: "spiffe://td/a".into(),
            destination_workload: "api".into(),
            destination_workload_namespace: "c".into(),
            destination_principal: "spiffe://td/b".into(),
            destination_service: "api".into(),
            request_protocol: "http",
            response_code: 200,
            response_flags: "-",
            connection_security_policy: "unknown",
        }
    }

    #[test]
    fn flags_and_protocol() {
        assert_eq!(response_flags(None), "-");
        assert_eq!(response_flags(Some("not_serving")), "UH");
        assert_eq!(response_flags(Some("per_try_timeout")), "UT");
        assert_eq!(response_flags(Some("upstream_connect")), "UF");
        let mut h = http::HeaderMap::new();
        assert_eq!(request_protocol(&h), "http");
        h.insert(
            http::header::CONTENT_TYPE,
            "application/grpc+proto".parse().unwrap(),
        );
        assert_eq!(request_protocol(&h), "grpc");
    }
}
