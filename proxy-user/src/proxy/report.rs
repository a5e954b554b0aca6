//! One HTTP request as a hop saw it, rendered once for each consumer: Istio's request
//! labels, the access log line and the span's attributes. Both hops fill the same
//! report, so the three always agree and name things the same way.
use std::{net::SocketAddr, time::Duration};

use opentelemetry::KeyValue;

use crate::{
    metrics::{
        Metrics,
        istio::{self, BodySizes, RequestLabels},
    },
    trace::{HopSpan, attr},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reporter {
    /// The caller's node proxy: once per task request, whatever the attempts.
    Source,
    /// The endpoint's node proxy: once per attempt that reached it.
    Destination,
}

/// What a hop knows of one request once its response head is back.
pub struct RequestReport<'a> {
    pub reporter: Reporter,
    pub cluster: &'a str,
    pub source_task: &'a str,
    pub source_workload: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_principal: String,
    pub service: String,
    pub protocol: &'static str,
    pub status: u16,
    /// `ecsmesh-proxy-error` of a proxy-made answer.
    pub proxy_error: Option<&'a str>,
    /// The endpoint that answered (`ip:port`), when known.
    pub endpoint: Option<String>,
    /// The endpoint the task dialled (source hop).
    pub original_destination: Option<SocketAddr>,
    /// Attempts the request took (source hop).
    pub attempts: Option<u32>,
    pub elapsed: Duration,
}

/// What the request looked like when it arrived, kept only when the access log wants it.
pub struct Logged {
    pub method: String,
    pub path: String,
}

impl Logged {
    /// The method and path, when the HTTP access log is on.
    pub fn capture<B>(metrics: &Metrics, req: &http::Request<B>) -> Option<Self> {
        metrics.access_log().filter(|l| l.http_on()).map(|_| Self {
            method: req.method().to_string(),
            path: req.uri().path().to_owned(),
        })
    }
}

impl RequestReport<'_> {
    /// Ends the span, writes the access line and counts the request; the returned handles
    /// observe its body sizes. `destination_task` is asked only when a line or a
    /// recording span needs it.
    pub fn emit(
        self,
        metrics: &Metrics,
        span: Option<HopSpan>,
        logged: Option<Logged>,
        destination_task: impl FnOnce() -> Option<String>,
    ) -> BodySizes {
        let detail = logged.is_some() || span.as_ref().is_some_and(HopSpan::recording);
        let task = if detail { destination_task() } else { None };
        if let Some(mut span) = span {
            if span.recording() {
                span.set(self.attributes(task.as_deref()));
            }
            span.finish(self.status, self.proxy_error);
        }
        if let (Some(logged), Some(log)) = (logged, metrics.access_log()) {
            log.write(&self.line(&logged, task.as_deref()));
        }
        let elapsed = self.elapsed;
        metrics.istio.record(self.labels(), elapsed)
    }

    fn reporter(&self) -> &'static str {
        match self.reporter {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }

    fn labels(self) -> RequestLabels {
        RequestLabels {
            reporter: self.reporter(),
            source_workload: self.source_workload,
            source_workload_namespace: self.cluster.to_owned(),
            source_principal: self.source_principal,
            destination_workload: self.destination_workload,
            destination_workload_namespace: self.cluster.to_owned(),
            destination_principal: self.destination_principal,
            destination_service: self.service,
            request_protocol: self.protocol,
            response_code: self.status,
            response_flags: istio::response_flags(self.proxy_error),
            // The tunnel is always mTLS; Istio reports `unknown` at the source.
            connection_security_policy: match self.reporter {
                Reporter::Source => "unknown",
                Reporter::Destination => "mutual_tls",
            },
        }
    }

    fn line(&self, logged: &Logged, destination_task: Option<&str>) -> serde_json::Value {
        serde_json::json!({
            "time": crate::access_log::now(),
            "kind": "http",
            "reporter": self.reporter(),
            "method": logged.method,
            "path": logged.path,
            "status": self.status,
            "response_flags": istio::response_flags(self.proxy_error),
            "duration_ms": self.elapsed.as_secs_f64() * 1000.0,
            "attempts": self.attempts,
            "source_task": self.source_task,
            "source_workload": self.source_workload,
            "source_principal": self.source_principal,
            "destination_task": destination_task,
            "destination_service": self.service,
            "destination_workload": self.destination_workload,
            "destination_principal": self.destination_principal,
            "original_destination": self.original_destination.map(|a| a.to_string()),
            "endpoint": self.endpoint,
        })
    }

    fn attributes(&self, destination_task: Option<&str>) -> Vec<KeyValue> {
        let text = |k, v: &str| KeyValue::new(k, v.to_owned());
        let mut a = vec![
            text(attr::SOURCE_TASK, self.source_task),
            text(attr::SOURCE_FAMILY, &self.source_workload),
            text(attr::SOURCE_PRINCIPAL, &self.source_principal),
            text(attr::DESTINATION_SERVICE, &self.service),
            text(attr::DESTINATION_FAMILY, &self.destination_workload),
            text(attr::DESTINATION_PRINCIPAL, &self.destination_principal),
        ];
        a.extend(destination_task.map(|t| text(attr::DESTINATION_TASK, t)));
        a.extend(self.endpoint.as_deref().map(|e| text(attr::ENDPOINT, e)));
        a.extend(
            self.attempts
                .map(|n| KeyValue::new(attr::ATTEMPTS, i64::from(n))),
        );
        a
    }
}
