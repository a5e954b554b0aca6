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

/// A counter's samples matching `labels`, summed by the value of label `by`.
pub fn counter_by(
    scrape: &Scrape,
    name: &str,
    labels: &[(&str, &str)],
    by: &str,
) -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    for s in scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
    {
        if let Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) = s.value {
            let key = s.labels.get(by).unwrap_or_default().to_owned();
            *out.entry(key).or_default() += v;
        }
    }
    out
}

/// The cumulative buckets `(le, count)` of a histogram, summed over its series whose
/// labels include all of `labels`, in ascending `le` (`+Inf` last). Empty when none match.
pub fn histogram(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Vec<(f64, f64)> {
    let mut sum: Vec<(f64, f64)> = Vec::new();
    let series = scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)));
    for s in series {
        let Value::Histogram(buckets) = &s.value else {
            continue;
        };
        for b in buckets {
            match sum.iter_mut().find(|(le, _)| *le == b.less_than) {
                Some((_, n)) => *n += b.count,
                None => sum.push((b.less_than, b.count)),
            }
        }
    }
    sum.sort_by(|a, b| a.0.total_cmp(&b.0));
    sum
}

/// The `q` quantile of cumulative buckets, as Prometheus's `histogram_quantile` computes
/// it: linear interpolation inside the bucket that holds the rank (from 0 for the first
/// bucket), the highest finite bound when the rank falls in `+Inf`. None without
/// observations.
pub fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 || !(0.0..=1.0).contains(&q) {
        return None;
    }
    let rank = q * total;
    let i = buckets.iter().position(|(_, n)| *n >= rank)?;
    let (le, n) = buckets[i];
    if le.is_infinite() {
        return Some(if i == 0 { 0.0 } else { buckets[i - 1].0 });
    }
    let (start, below) = if i == 0 { (0.0, 0.0) } else { buckets[i - 1] };
    if n == below {
        return Some(le);
    }
    Some(start + (le - start) * (rank - below) / (n - below))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_within_buckets_like_prometheus() {
        let text = "# TYPE d histogram\n\
            d_bucket{r=\"a\",le=\"1\"} 2\nd_bucket{r=\"a\",le=\"10\"} 6\nd_bucket{r=\"a\",le=\"+Inf\"} 8\n\
            d_sum{r=\"a\"} 40\nd_count{r=\"a\"} 8\n\
            d_bucket{r=\"b\",le=\"1\"} 2\nd_bucket{r=\"b\",le=\"10\"} 2\nd_bucket{r=\"b\",le=\"+Inf\"} 2\n\
            d_sum{r=\"b\"} 1\nd_count{r=\"b\"} 2\n";
        let s = parse(text);
        let all = histogram(&s, "d", &[]);
        assert_eq!(all, vec![(1.0, 4.0), (10.0, 8.0), (f64::INFINITY, 10.0)]);
        // Rank 5 of 10: one of the four observations in (1, 10].
        assert_eq!(quantile(0.5, &all), Some(1.0 + 9.0 * 0.25));
        // Rank 2 of 10: half-way through the first bucket, which starts at 0.
        assert_eq!(quantile(0.2, &all), Some(0.5));
        // Rank 9.9 falls in +Inf: the highest finite bound.
        assert_eq!(quantile(0.99, &all), Some(10.0));
        let b = histogram(&s, "d", &[("r", "b")]);
        assert!((quantile(0.99, &b).unwrap() - 0.99).abs() < 1e-9);
        assert_eq!(quantile(0.5, &histogram(&s, "d", &[("r", "c")])), None);
    }
}
