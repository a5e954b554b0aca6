//! Prometheus metrics of the data path. Names follow Istio's `istio_tcp_*` family so
//! existing dashboards translate; every series is labelled by the source ECS task.
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskLabels {
    pub source_task: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub opened: Family<TaskLabels, Counter>,
    pub closed: Family<TaskLabels, Counter>,
    /// Bytes from the task towards its destination.
    pub sent: Family<TaskLabels, Counter>,
    /// Bytes from the destination back to the task.
    pub received: Family<TaskLabels, Counter>,
    /// Connections the proxy accepted but could not forward, by reason.
    pub failed: Family<ReasonLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("ecsmesh");
        let m = Self {
            opened: Family::default(),
            closed: Family::default(),
            sent: Family::default(),
            received: Family::default(),
            failed: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "tcp_connections_opened",
            "TCP connections opened through the node proxy",
            m.opened.clone(),
        );
        registry.register(
            "tcp_connections_closed",
            "TCP connections closed through the node proxy",
            m.closed.clone(),
        );
        registry.register(
            "tcp_sent_bytes",
            "Bytes sent by the source task towards its destination",
            m.sent.clone(),
        );
        registry.register(
            "tcp_received_bytes",
            "Bytes received by the source task from its destination",
            m.received.clone(),
        );
        registry.register(
            "tcp_connections_failed",
            "Accepted connections that could not be forwarded",
            m.failed.clone(),
        );
        Self { registry, ..m }
    }
}

impl Metrics {
    pub fn task(task: &str) -> TaskLabels {
        TaskLabels {
            source_task: task.to_owned(),
        }
    }

    pub fn fail(&self, reason: &'static str) {
        self.failed.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// Prometheus text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
