//! `[traces]`: where spans go and how many are kept, parsed once into
//! [`TraceSettings`]. Absent: no tracer at all (the data path checks one `Option`).
use std::{path::PathBuf, time::Duration};

use serde::Deserialize;

use super::raw::Invalid;
use crate::trace::TraceSettings;

/// Istio's default: 1 % of new traces (a caller's sampled flag always wins).
pub const DEFAULT_SAMPLE_RATIO: f64 = 0.01;
const DEFAULT_MAX_QUEUE: usize = 2048;
const MAX_QUEUE_CAP: usize = 1 << 20;
const DEFAULT_MAX_BATCH: usize = 512;
const DEFAULT_EXPORT_INTERVAL_MS: u64 = 1000;
const DEFAULT_EXPORT_TIMEOUT_MS: u64 = 5000;
const MAX_MS: u64 = 600_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTraces {
    otlp_endpoint: String,
    #[serde(default)]
    sample_ratio: Option<f64>,
    #[serde(default)]
    ca_file: Option<PathBuf>,
    #[serde(default)]
    max_queue: Option<usize>,
    #[serde(default)]
    max_batch: Option<usize>,
    #[serde(default)]
    export_interval_ms: Option<u64>,
    #[serde(default)]
    export_timeout_ms: Option<u64>,
}

fn invalid(field: &str, message: impl Into<String>) -> Invalid {
    (format!("traces.{field}"), message.into())
}

fn millis(field: &str, value: Option<u64>, default: u64) -> Result<Duration, Invalid> {
    match value.unwrap_or(default) {
        0 => Err(invalid(field, "must be at least 1")),
        ms if ms > MAX_MS => Err(invalid(field, format!("must be at most {MAX_MS}"))),
        ms => Ok(Duration::from_millis(ms)),
    }
}

impl RawTraces {
    pub(super) fn validate(self) -> Result<TraceSettings, Invalid> {
        let uri: http::Uri = self.otlp_endpoint.parse().map_err(|e| {
            invalid(
                "otlp_endpoint",
                format!("{:?} is not a URL: {e}", self.otlp_endpoint),
            )
        })?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => {
                return Err(invalid(
                    "otlp_endpoint",
                    "must be an http:// or https:// URL (OTLP/HTTP, e.g. http://127.0.0.1:4318/v1/traces)",
                ));
            }
        };
        if uri.host().is_none_or(str::is_empty) {
            return Err(invalid("otlp_endpoint", "has no host"));
        }
        let sample_ratio = self.sample_ratio.unwrap_or(DEFAULT_SAMPLE_RATIO);
        if !(0.0..=1.0).contains(&sample_ratio) {
            return Err(invalid("sample_ratio", "must be between 0 and 1"));
        }
        if let Some(path) = &self.ca_file {
            if !https {
                return Err(invalid("ca_file", "only for an https:// otlp_endpoint"));
            }
            if !path.is_absolute() {
                return Err(invalid("ca_file", "must be an absolute path"));
            }
            if !path.is_file() {
                return Err(invalid(
                    "ca_file",
                    format!("{}: no such file", path.display()),
                ));
            }
        }
        let max_queue = self.max_queue.unwrap_or(DEFAULT_MAX_QUEUE);
        if max_queue == 0 || max_queue > MAX_QUEUE_CAP {
            return Err(invalid(
                "max_queue",
                format!("must be between 1 and {MAX_QUEUE_CAP}"),
            ));
        }
        let max_batch = self.max_batch.unwrap_or(DEFAULT_MAX_BATCH.min(max_queue));
        if max_batch == 0 || max_batch > max_queue {
            return Err(invalid(
                "max_batch",
                format!("must be between 1 and max_queue ({max_queue})"),
            ));
        }
        Ok(TraceSettings {
            otlp_endpoint: self.otlp_endpoint,
            ca_file: self.ca_file,
            sample_ratio,
            max_queue,
            max_batch,
            export_interval: millis(
                "export_interval_ms",
                self.export_interval_ms,
                DEFAULT_EXPORT_INTERVAL_MS,
            )?,
            export_timeout: millis(
                "export_timeout_ms",
                self.export_timeout_ms,
                DEFAULT_EXPORT_TIMEOUT_MS,
            )?,
        })
    }
}
