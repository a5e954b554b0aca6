//! The classic Prometheus text format (0.0.4), which every scraper and `promtool` read,
//! from the OpenMetrics text prometheus-client writes. `/metrics` serves this unless the
//! scraper asks for OpenMetrics in `Accept`.
//!
//! The differences that matter for what this proxy exports: OpenMetrics names a counter
//! family without `_total` (`# TYPE x counter`, samples `x_total`) where the classic format
//! names it with (`# TYPE x_total counter`); `# UNIT` and `# EOF` do not exist there, nor
//! do the `unknown`, `info` and `stateset` types (`untyped`); exemplars are dropped.
use std::collections::HashSet;

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Whether an `Accept` header asks for OpenMetrics.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| a.contains("application/openmetrics-text"))
}

pub fn from_openmetrics(om: &str) -> String {
    let counters: HashSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_once(' '))
        .filter(|(_, ty)| *ty == "counter")
        .map(|(name, _)| name)
        .collect();
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let (name, ty) = match ty {
                "counter" => (format!("{name}_total"), "counter"),
                "gauge" | "histogram" | "summary" => (name.to_owned(), ty),
                _ => (name.to_owned(), "untyped"),
            };
            out.push_str(&format!("# TYPE {name} {ty}\n"));
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            let name = if counters.contains(name) {
                format!("{name}_total")
            } else {
                name.to_owned()
            };
            out.push_str(&format!("# HELP {name} {help}\n"));
        } else if line.starts_with('#') {
            continue;
        } else {
            let sample = line.split_once(" # ").map_or(line, |(s, _)| s);
            let name = sample.split(['{', ' ']).next().unwrap_or("");
            // A counter's creation time has no place in the classic format.
            if name
                .strip_suffix("_created")
                .is_some_and(|base| counters.contains(base))
            {
                continue;
            }
            out.push_str(sample);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use prometheus_client::{
        metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
        registry::Registry,
    };

    use super::*;

    #[test]
    fn counters_gauges_and_histograms_in_the_classic_format() {
        let mut r = Registry::with_prefix("ecsmesh");
        let c: Family<Vec<(String, String)>, Counter> = Family::default();
        c.get_or_create(&vec![("reason".into(), "refused".into())])
            .inc_by(3);
        r.register("things", "Things that happened", c);
        let g: Gauge = Gauge::default();
        g.set(7);
        r.register("level", "A level", g);
        let h = Histogram::new([1.0, 10.0]);
        h.observe(5.0);
        r.register("latency", "How long", h);
        let mut om = String::new();
        prometheus_client::encoding::text::encode(&mut om, &r).unwrap();
        let text = from_openmetrics(&om);
        assert_eq!(
            text,
            "# HELP ecsmesh_things_total Things that happened.\n\
             # TYPE ecsmesh_things_total counter\n\
             ecsmesh_things_total{reason=\"refused\"} 3\n\
             # HELP ecsmesh_level A level.\n\
             # TYPE ecsmesh_level gauge\n\
             ecsmesh_level 7\n\
             # HELP ecsmesh_latency How long.\n\
             # TYPE ecsmesh_latency histogram\n\
             ecsmesh_latency_sum 5.0\n\
             ecsmesh_latency_count 1\n\
             ecsmesh_latency_bucket{le=\"1.0\"} 0\n\
             ecsmesh_latency_bucket{le=\"10.0\"} 1\n\
             ecsmesh_latency_bucket{le=\"+Inf\"} 1\n",
            "from:\n{om}"
        );
    }

    #[test]
    fn accept_decides_the_format() {
        assert!(!wants_openmetrics(None));
        assert!(!wants_openmetrics(Some(
            "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        )));
        assert!(wants_openmetrics(Some(
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
        )));
    }
}
