//! Cloud Map refresh metrics.
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use std::{
    sync::atomic::AtomicU64,
    time::{SystemTime, UNIX_EPOCH},
};

use super::Snapshot;

/// Cloud Map refresh metrics; [`CloudMapMetrics::register`] adds them to the proxy registry.
/// Clones share the same series.
#[derive(Debug, Clone)]
pub struct CloudMapMetrics {
    /// `ecsmesh_cloudmap_refresh_total{result="ok|error"}`.
    pub refreshes: Family<ResultLabels, Counter>,
    /// `ecsmesh_cloudmap_endpoints`: endpoints in the set in use (the last good one).
    pub endpoints: Gauge,
    /// `ecsmesh_cloudmap_excluded_instances{reason}`: instances of the last good refresh
    /// that are not endpoints (`unhealthy`, `invalid` attributes).
    pub excluded: Family<ReasonLabels, Gauge>,
    /// `ecsmesh_cloudmap_last_success_timestamp_seconds`: alert on `time() - this`.
    pub last_success: Gauge<f64, AtomicU64>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

impl Default for CloudMapMetrics {
    fn default() -> Self {
        let m = Self {
            refreshes: Family::default(),
            endpoints: Gauge::default(),
            excluded: Family::default(),
            last_success: Gauge::default(),
        };
        // Both series exist from the start, so `rate(...{result="error"})` is 0, not absent.
        for result in ["ok", "error"] {
            let _ = m.refreshes.get_or_create(&ResultLabels { result });
        }
        for reason in ["unhealthy", "invalid"] {
            let _ = m.excluded.get_or_create(&ReasonLabels { reason });
        }
        m
    }
}

impl CloudMapMetrics {
    /// Register under `cloudmap_*` in `registry`; with the proxy's registry (prefix
    /// `ecsmesh`) the names become `ecsmesh_cloudmap_refresh_total` and so on.
    pub fn register(&self, registry: &mut Registry) {
        let registry = registry.sub_registry_with_prefix("cloudmap");
        registry.register(
            "refresh",
            "Cloud Map refreshes by result; on error the last good endpoint set stays in use",
            self.refreshes.clone(),
        );
        registry.register(
            "endpoints",
            "Endpoints from Cloud Map in the set in use",
            self.endpoints.clone(),
        );
        registry.register(
            "excluded_instances",
            "Cloud Map instances of the last good refresh left out, by reason",
            self.excluded.clone(),
        );
        registry.register(
            "last_success_timestamp_seconds",
            "Unix time of the last successful Cloud Map refresh",
            self.last_success.clone(),
        );
    }

    pub(super) fn record_ok(&self, snapshot: &Snapshot) {
        self.refreshes
            .get_or_create(&ResultLabels { result: "ok" })
            .inc();
        self.endpoints.set(snapshot.endpoints.len() as i64);
        self.excluded
            .get_or_create(&ReasonLabels {
                reason: "unhealthy",
            })
            .set(snapshot.unhealthy as i64);
        self.excluded
            .get_or_create(&ReasonLabels { reason: "invalid" })
            .set(snapshot.invalid as i64);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.last_success.set(now.as_secs_f64());
    }

    pub(super) fn record_error(&self) {
        self.refreshes
            .get_or_create(&ResultLabels { result: "error" })
            .inc();
    }
}
