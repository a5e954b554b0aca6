//! A real Prometheus server (Debian's `prometheus`) scrapes both node proxies; what its
//! HTTP API answers must be exactly the traffic the test sent.
mod common;
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use common::{mesh::TRUST_DOMAIN, *};
use harness::{NetworkMode::Host, ProxyOptions, World, process};
use serde_json::Value;

const HTTP: u16 = 8090;
/// An opaque TCP port (the harness's default `opaque_ports` list it).
const TCP: u16 = 9000;
const PROMETHEUS: &str = "127.0.0.1:9090";

struct Prom<'a> {
    w: &'a World,
}

impl Prom<'_> {
    fn get(&self, path: &str) -> Option<(u16, String)> {
        self.w.instances[0]
            .netns
            .http_get(PROMETHEUS.parse().unwrap(), path)
            .ok()
    }

    /// An instant query's result vector.
    fn query(&self, q: &str) -> Vec<Value> {
        let (status, body) = self
            .get(&format!(
                "/api/v1/query?query={}",
                harness::aws::form_encode(q)
            ))
            .expect("query Prometheus");
        assert_eq!(status, 200, "{q}: {body}");
        let v: Value = serde_json::from_str(&body).expect("Prometheus JSON");
        assert_eq!(v["status"], "success", "{q}: {v}");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// A query that yields one number (None while it yields none).
    fn value(&self, q: &str) -> Option<f64> {
        let r = self.query(q);
        let v = r.first()?["value"][1].as_str()?.parse().ok()?;
        Some(v)
    }

    /// Polls `q` until it yields `want` (Prometheus scrapes every second).
    fn wait_for(&self, q: &str, want: f64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = self.value(q);
            if got == Some(want) {
                return;
            }
            assert!(Instant::now() < deadline, "{q}: {got:?}, want {want}");
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

#[test]
fn a_real_prometheus_scrapes_both_proxies_and_counts_exactly_what_was_sent() {
    let mut w = World::new(tools(), 2);
    w.enable_mesh(TRUST_DOMAIN);
    w.add_task(0, Host, 1);
    w.add_task(1, Host, 1);
    let (http, tcp) = (w.instances[1].addr(HTTP), w.instances[1].addr(TCP));
    let server = w.instances[1].tasks[0].family.clone();
    w.write_discovery(&[("web", http, &server), ("greeter", tcp, &server)]);
    let args: Vec<String> = ["http-echo", "--h1", &http.to_string()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    w.instances[1].tasks[0].server(0, &args);
    w.instances[1].echo_server(&[tcp]);
    let opts = ProxyOptions {
        admin_on_fabric: true,
        ..Default::default()
    };
    w.instances[1].start_proxy(&opts);
    w.instances[0].start_proxy(&opts);
    let targets: Vec<SocketAddr> = w.instances.iter().map(|i| i.admin).collect();

    // Prometheus in instance 0's netns (unenrolled), scraping both admin endpoints.
    let dir = w.workdir.join("prometheus");
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("prometheus.yml");
    let list: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\nscrape_configs:\n  - job_name: ecsmesh\n    static_configs:\n      - targets: [{}]\n",
            list.join(", ")
        ),
    )
    .unwrap();
    let args: Vec<String> = [
        format!("--config.file={}", config.display()),
        format!("--storage.tsdb.path={}", dir.join("data").display()),
        format!("--web.listen-address={PROMETHEUS}"),
        "--log.level=warn".into(),
    ]
    .into();
    let log = dir.join("prometheus.log");
    w.instances[0].spawn_program(std::path::Path::new("/usr/bin/prometheus"), &args, &log);
    let prom = Prom { w: &w };
    let deadline = Instant::now() + Duration::from_secs(30);
    while prom.get("/-/ready").map(|r| r.0) != Some(200) {
        assert!(
            Instant::now() < deadline,
            "Prometheus not ready: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    prom.wait_for("sum(up{job=\"ecsmesh\"})", 2.0);

    // The traffic: 37 HTTP requests to `web`, 5 TCP connections of 3000 bytes each way
    // to `greeter`.
    const REQUESTS: u64 = 37;
    const CONNS: usize = 5;
    const BYTES: usize = 3000;
    let args: Vec<String> = [
        "http-requests",
        &http.to_string(),
        "--count",
        &REQUESTS.to_string(),
        "--rate",
        "200",
        "--host",
        "web",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = process::run(w.instances[0].tasks[0].meshtool(0, &args));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["statuses"]["200"], REQUESTS, "{r}");
    let conns = w.instances[0].tasks[0].client(&[tcp], CONNS, BYTES);
    assert_all_ok(&conns);
    // The echo server answers with its address on a line, then the bytes it got.
    let greetings: usize = conns
        .iter()
        .map(|c| c.served_by.as_ref().map_or(0, |s| s.len() + 1))
        .sum();

    // Both hops, as Prometheus stored them: exactly the requests sent.
    for reporter in ["source", "destination"] {
        prom.wait_for(
            &format!(
                "sum(istio_requests_total{{reporter=\"{reporter}\",destination_service=\"web\",response_code=\"200\"}})"
            ),
            REQUESTS as f64,
        );
    }
    // Exactly the TCP bytes sent each way: Istio's "received" is the request direction
    // (task → destination), "sent" the response (the greetings and the echo).
    for (metric, total) in [
        ("istio_tcp_received_bytes_total", CONNS * BYTES),
        ("istio_tcp_sent_bytes_total", CONNS * BYTES + greetings),
    ] {
        prom.wait_for(
            &format!("sum({metric}{{reporter=\"source\",destination_service=\"greeter\"}})"),
            total as f64,
        );
    }
    prom.wait_for(
        "sum(istio_tcp_connections_closed_total{destination_service=\"greeter\"})",
        CONNS as f64,
    );
    // The duration histogram answers histogram_quantile, per hop: a real latency.
    for reporter in ["source", "destination"] {
        let q = format!(
            "histogram_quantile(0.99, sum by (le) (istio_request_duration_milliseconds_bucket{{reporter=\"{reporter}\",destination_service=\"web\"}}))"
        );
        let p99 = prom.value(&q).unwrap_or(f64::NAN);
        assert!(p99.is_finite() && p99 > 0.0 && p99 <= 5000.0, "{q}: {p99}");
        let count = format!(
            "sum(istio_request_duration_milliseconds_count{{reporter=\"{reporter}\",destination_service=\"web\"}})"
        );
        assert_eq!(prom.value(&count), Some(REQUESTS as f64), "{count}");
    }
}
