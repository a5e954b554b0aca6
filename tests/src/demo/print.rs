//! The demo's report as a newcomer reads it: what each step did, what it shows, and the
//! figures behind it (all taken from the running components, none computed here except
//! the percentages).
use std::{collections::BTreeSet, fmt::Write};

use serde_json::Value;

use super::*;

/// The report, explained.
pub fn print(r: &Report) -> String {
    let mut o = String::new();
    intro(&mut o, r);
    hello(&mut o, &r.hello);
    retry(&mut o, &r.retry);
    refusal(&mut o, &r.refusal);
    split(&mut o, &r.split);
    proxies(&mut o, &r.proxies);
    let _ = writeln!(
        o,
        "\nDone in {:.1} s. Namespaces, cgroups, eBPF programs and pins, and every process \
         the demo started are gone.",
        r.took.as_secs_f64()
    );
    o
}

fn intro(o: &mut String, r: &Report) {
    let _ = writeln!(
        o,
        "\nTwo simulated ECS container instances (network namespaces on one fabric bridge),\n\
         one node proxy on each. Tasks are cgroups; they know nothing about the mesh: eBPF\n\
         sends their connect() to their node proxy, which carries the request over a pooled\n\
         mTLS tunnel (HTTP/2 inside) to the other instance's proxy, which hands it to the task.\n"
    );
    for i in &r.instances {
        let _ = writeln!(
            o,
            "  {} {}, node proxy holding the SVID(s) {}",
            i.name,
            i.address,
            i.identities.join(", ")
        );
        for (id, family, role) in &i.tasks {
            let _ = writeln!(o, "      task {id} (family {family}) {role}");
        }
    }
    let _ = writeln!(
        o,
        "  discovery file (service = endpoints): backend = v1 :{V1} weight {} + v2 :{V2} weight {};\n  \
         backend-flaky = :{FLAKY}; backend-admin = :{ADMIN}; backend-admin-tcp = :{TCP_ADMIN}",
        WEIGHTS.0, WEIGHTS.1
    );
}

fn ok_of(client: &Value) -> String {
    format!("{}/{} answered 2xx", client["ok"], client["sent"])
}

/// The distinct (source_principal, destination_principal) pairs of some log lines.
fn principals(lines: &[Value]) -> BTreeSet<(String, String)> {
    let s = |v: &Value| v.as_str().unwrap_or("?").to_owned();
    lines
        .iter()
        .map(|l| (s(&l["source_principal"]), s(&l["destination_principal"])))
        .collect()
}

fn hello(o: &mut String, h: &Hello) {
    let _ = writeln!(
        o,
        "\n1. HTTP through the mTLS tunnel: {HELLO_REQUESTS} GETs frontend -> backend :{V1}\n   \
         client: {}",
        ok_of(&h.client)
    );
    let _ = writeln!(
        o,
        "   Identities both sides presented in the tunnel's TLS handshake, as each proxy's\n   \
         access log recorded them ({} line(s) at the source hop, {} at the destination hop):",
        h.source_hop.len(),
        h.destination_hop.len()
    );
    for (src, dst) in principals(&h.source_hop) {
        let _ = writeln!(
            o,
            "   inst0 (source):      presented {src}\n                        \
             verified the server is {dst}"
        );
    }
    for (src, dst) in principals(&h.destination_hop) {
        let _ = writeln!(
            o,
            "   inst1 (destination): client certificate {src}\n                        \
             presented {dst}"
        );
    }
}

fn retry(o: &mut String, r: &Retry) {
    let attempts: Vec<String> = r
        .attempts
        .iter()
        .map(|(a, n)| format!("{n} took {a} attempt(s)"))
        .collect();
    let codes: Vec<String> = r
        .destination_codes
        .iter()
        .map(|(c, n)| format!("{n} x {c}"))
        .collect();
    let _ = writeln!(
        o,
        "\n2. A retry: {RETRY_REQUESTS} GETs to backend-flaky :{FLAKY} (503 to {FAIL_PERCENT} % of requests)\n   \
         client: {}, statuses {}: it never saw a 503\n   \
         inst0 retried {} time(s) (ecsmesh_retries_total); access log: {}\n   \
         inst1 received {} (istio_requests_total, reporter=destination)",
        ok_of(&r.client),
        r.client["statuses"],
        r.retries,
        attempts.join(", "),
        codes.join(", ")
    );
}

fn refusal(o: &mut String, r: &Refusal) {
    let counts = |m: &BTreeMap<String, f64>| -> String {
        let v: Vec<String> = m.iter().map(|(k, n)| format!("{k} {n}")).collect();
        if v.is_empty() {
            "none".into()
        } else {
            v.join(", ")
        }
    };
    let _ = writeln!(
        o,
        "\n3. Refused by authorization: inst1 allows frontend's identity only on backend ports\n   \
         {V1}, {V2} and {FLAKY}; frontend tries the admin ports.\n   \
         HTTP GET :{ADMIN}: client got {} with ecsmesh-proxy-error {} (made by inst1's proxy)\n   \
         TCP connection :{TCP_ADMIN}: {}\n   \
         inst1 rejected tunnel streams by reason: {}\n   \
         inst0 failed task connections by reason: {}",
        r.http["statuses"],
        r.http["proxy_errors"],
        if r.tcp_ok {
            "went through".to_owned()
        } else {
            format!(
                "closed by inst0's proxy when inst1 refused the tunnel stream ({})",
                r.tcp_error.as_deref().unwrap_or("no error text")
            )
        },
        counts(&r.rejected),
        counts(&r.source_failed),
    );
    // The message and its fields, without the timestamp, level and module.
    let message = |l: &String| l.split_once(": ").map_or(l.clone(), |(_, m)| m.to_owned());
    for (who, lines) in [("inst1", &r.log), ("inst0", &r.source_log)] {
        for l in lines {
            let _ = writeln!(o, "   {who}'s log: {}", message(l));
        }
    }
}

fn split(o: &mut String, s: &Split) {
    let total = (s.v1 + s.v2).max(1) as f64;
    let _ = writeln!(
        o,
        "\n4. Traffic split: {SPLIT_REQUESTS} GETs to backend; discovery gives subset v1 weight {} \
         and v2 weight {}\n   \
         client: {}; answered by v1 :{V1} {} ({:.1} %), v2 :{V2} {} ({:.1} %)",
        WEIGHTS.0,
        WEIGHTS.1,
        ok_of(&s.client),
        s.v1,
        100.0 * s.v1 as f64 / total,
        s.v2,
        100.0 * s.v2 as f64 / total,
    );
}

fn proxies(o: &mut String, ps: &[ProxyStats]) {
    let _ = writeln!(
        o,
        "\n5. What each proxy counted: istio_requests_total, and p50/p99 interpolated from the\n   \
         istio_request_duration_milliseconds buckets as Prometheus's histogram_quantile does\n   \
         (Istio's bucket bounds 0.5, 1, 5, 10, 25 ... ms: an estimate within a bucket)"
    );
    let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2} ms"));
    for p in ps {
        let _ = writeln!(
            o,
            "   {} (reporter={}): {} requests, p50 {}, p99 {}",
            p.instance,
            p.reporter,
            p.count,
            ms(p.p50_ms),
            ms(p.p99_ms)
        );
        for ((service, code), n) in &p.requests {
            let service = if service.is_empty() {
                "(refused before routing)"
            } else {
                service
            };
            let _ = writeln!(o, "      {service:<26} {code}  {n}");
        }
    }
}
