//! Reads the proxy's /metrics with a real Prometheus text parser.
use prometheus_parse::{Scrape, Value};

pub fn parse(text: &str) -> Scrape {
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    Scrape::parse(lines).expect("metrics parse as Prometheus text")
}

/// Sum of a counter's samples whose labels include all of `labels`.
pub fn counter(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}
