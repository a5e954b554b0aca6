//! The scenario `cargo xtask demo` runs and `tests/tests/demo.rs` checks: two container
//! instances, a `frontend` task on one and two `backend` tasks (v1, v2) on the other, HTTP
//! between them through the node proxies and their mTLS tunnel. It only observes: what the
//! client saw, the access logs, `/identities`, `/metrics` and the proxy logs go into a
//! [`Report`]; judging it is the caller's business ([`print`] explains it, the test
//! asserts it).
mod print;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

pub use print::print;
use serde_json::Value;

use crate::{
    NetworkMode::Host,
    ProxyOptions, Tools, World,
    metrics::{counter, counter_by, histogram, quantile},
    process,
};

pub const TRUST_DOMAIN: &str = "demo.ecsmesh";
pub const FRONTEND: &str = "frontend";
pub const BACKEND: &str = "backend";
/// Backend ports (instance 1): v1's API, v2's API, v1's flaky endpoint (503 to
/// `FAIL_PERCENT` % of requests, evenly spread), v1's admin endpoint (no rule allows it),
/// v1's raw TCP echo (idem).
pub const V1: u16 = 8081;
pub const V2: u16 = 8082;
pub const FLAKY: u16 = 8083;
pub const ADMIN: u16 = 8084;
pub const TCP_ADMIN: u16 = 9000;
pub const FAIL_PERCENT: u8 = 25;
/// The split the discovery file asks for: subset v1 (weight 90) and v2 (weight 10).
pub const WEIGHTS: (u32, u32) = (90, 10);
pub const SPLIT_REQUESTS: u64 = 1000;
pub const RETRY_REQUESTS: u64 = 10;
pub const HELLO_REQUESTS: u64 = 3;

/// Everything the demo observed, step by step.
#[derive(Debug)]
pub struct Report {
    pub instances: Vec<InstanceInfo>,
    pub hello: Hello,
    pub retry: Retry,
    pub refusal: Refusal,
    pub split: Split,
    /// One per instance, in order.
    pub proxies: Vec<ProxyStats>,
    pub took: Duration,
}

#[derive(Debug)]
pub struct InstanceInfo {
    pub name: String,
    pub address: std::net::Ipv4Addr,
    /// (task id, family, what the demo runs in it).
    pub tasks: Vec<(String, String, String)>,
    /// The SVIDs the node proxy holds for its tasks (`GET /identities`).
    pub identities: Vec<String>,
}

/// Step 1: a few GETs from `frontend` to `backend`, and the identities each hop logged.
#[derive(Debug)]
pub struct Hello {
    pub client: Value,
    /// Access log lines of instance 0's proxy (`reporter = source`).
    pub source_hop: Vec<Value>,
    /// Access log lines of instance 1's proxy (`reporter = destination`).
    pub destination_hop: Vec<Value>,
}

/// Step 2: GETs to an endpoint that answers `FAIL_PERCENT` % of requests with 503.
#[derive(Debug)]
pub struct Retry {
    pub client: Value,
    /// `ecsmesh_retries_total{service="backend-flaky"}` at the source.
    pub retries: f64,
    /// Source hop: requests by `attempts` (access log).
    pub attempts: BTreeMap<u64, u64>,
    /// Destination hop: `istio_requests_total{reporter="destination"}` by response code.
    pub destination_codes: BTreeMap<String, f64>,
}

/// Step 3: the frontend tries backend ports no authorization rule allows.
#[derive(Debug)]
pub struct Refusal {
    /// An HTTP GET to the admin port: what the client got back.
    pub http: Value,
    /// A raw TCP connection to the TCP admin port: meshtool's report of it.
    pub tcp_ok: bool,
    pub tcp_error: Option<String>,
    /// `ecsmesh_tunnel_rejected_total{side="server"}` at instance 1, by reason.
    pub rejected: BTreeMap<String, f64>,
    /// `ecsmesh_tcp_connections_failed_total` at instance 0, by reason.
    pub source_failed: BTreeMap<String, f64>,
    /// Instance 1's log lines about the denials (without colours).
    pub log: Vec<String>,
    /// Instance 0's log lines about the refused TCP connection.
    pub source_log: Vec<String>,
}

/// Step 4: the 90/10 split between backend v1 and v2.
#[derive(Debug)]
pub struct Split {
    pub client: Value,
    pub v1: u64,
    pub v2: u64,
}

/// One node proxy's view of the HTTP requests it handled (Istio's metrics).
#[derive(Debug)]
pub struct ProxyStats {
    pub instance: String,
    pub reporter: &'static str,
    /// `istio_requests_total` by (destination_service, response_code).
    pub requests: BTreeMap<(String, String), f64>,
    /// `istio_request_duration_milliseconds`, every series of this reporter.
    pub count: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

struct Demo {
    w: World,
    logs: [PathBuf; 2],
}

impl Demo {
    fn endpoint(&self, port: u16) -> SocketAddr {
        self.w.instances[1].addr(port)
    }

    /// `http-requests` from the frontend task: `count` GETs at `rate` to `port`, with
    /// `Host: service`.
    fn requests(&self, port: u16, service: &str, count: u64, rate: f64, conns: usize) -> Value {
        let args: Vec<String> = [
            "http-requests",
            &self.endpoint(port).to_string(),
            "--count",
            &count.to_string(),
            "--rate",
            &rate.to_string(),
            "--host",
            service,
            "--connections",
            &conns.to_string(),
            "--max-secs",
            "30",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let out = process::run(self.w.instances[0].tasks[0].meshtool(0, &args));
        assert!(
            out.status.success(),
            "http-requests: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("http-requests prints JSON")
    }

    /// HTTP access log lines of proxy `i` for `service`: waits (bounded) until there are
    /// `want`, as lines are written off the data path.
    fn http_lines(&self, i: usize, service: &str, want: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let lines: Vec<Value> = read_lines(&self.logs[i])
                .into_iter()
                .filter(|l| l["kind"] == "http" && l["destination_service"] == service)
                .collect();
            if lines.len() >= want || Instant::now() > deadline {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn read_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The discovery file: the backend's services, all served by tasks of family
/// `backend` on instance 1.
fn discovery(w: &World) -> String {
    let b = &w.instances[1];
    let ep = |port: u16, extra: &str| {
        format!(
            "[[services.endpoints]]\naddress = \"{}\"\nfamily = \"{BACKEND}\"\n{extra}",
            b.addr(port)
        )
    };
    format!(
        "[[services]]\nname = \"backend\"\n{}{}\n[[services]]\nname = \"backend-flaky\"\n{}\n\
         [[services]]\nname = \"backend-admin\"\n{}\n[[services]]\nname = \"backend-admin-tcp\"\n{}",
        ep(V1, &format!("subset = \"v1\"\nweight = {}\n", WEIGHTS.0)),
        ep(V2, &format!("subset = \"v2\"\nweight = {}\n", WEIGHTS.1)),
        ep(FLAKY, ""),
        ep(ADMIN, ""),
        ep(TCP_ADMIN, ""),
    )
}

fn access_log_toml(path: &Path) -> String {
    format!(
        "\n[access_log]\nhttp = true\npath = \"{}\"\n",
        path.display()
    )
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Builds the cluster, runs the four steps, reads each proxy's metrics; the world (netns,
/// cgroups, eBPF pins, processes) is removed when this returns or panics. `step` is told
/// what is about to happen.
pub fn run(tools: Tools, mut step: impl FnMut(&str)) -> Report {
    let started = Instant::now();
    step("building two container instances (network namespaces, cgroups) and a CA");
    let mut w = World::new(tools, 2);
    w.enable_mesh(TRUST_DOMAIN);
    w.add_task(0, Host, 1);
    w.add_task(1, Host, 1);
    w.add_task(1, Host, 1);
    w.instances[0].tasks[0].family = FRONTEND.into();
    for t in &mut w.instances[1].tasks {
        t.family = BACKEND.into();
    }
    std::fs::write(w.workdir.join("discovery.toml"), discovery(&w)).expect("write discovery");
    let b = &mut w.instances[1];
    let (v1, v2) = (b.addr(V1), b.addr(V2));
    let (flaky, admin, tcp) = (b.addr(FLAKY), b.addr(ADMIN), b.addr(TCP_ADMIN));
    let task = &mut b.tasks[0];
    task.server(0, &s(&["http-echo", "--h1", &v1.to_string()]));
    task.server(0, &s(&["http-echo", "--h1", &admin.to_string()]));
    task.server(
        0,
        &s(&[
            "http-echo",
            "--h1",
            &flaky.to_string(),
            "--fail-percent",
            &FAIL_PERCENT.to_string(),
        ]),
    );
    task.server(0, &s(&["echo", &tcp.to_string()]));
    b.tasks[1].server(0, &s(&["http-echo", "--h1", &v2.to_string()]));

    step("starting a node proxy on each instance");
    let logs = [0, 1].map(|i| w.workdir.join(format!("inst{i}-access.log")));
    let frontend = w.identity(FRONTEND);
    w.instances[1].start_proxy(&ProxyOptions {
        allow: [V1, V2, FLAKY]
            .map(|port| (frontend.clone(), Some(BACKEND.to_owned()), Some(port)))
            .to_vec(),
        extra_toml: access_log_toml(&logs[1]),
        ..Default::default()
    });
    w.instances[0].start_proxy(&ProxyOptions {
        extra_toml: access_log_toml(&logs[0]),
        ..Default::default()
    });
    let d = Demo { w, logs };
    let instances = d.w.instances.iter().map(instance_info).collect();

    step("step 1: frontend -> backend, identities at both hops");
    let client = d.requests(V1, "backend", HELLO_REQUESTS, 20.0, 1);
    let want = HELLO_REQUESTS as usize;
    let hello = Hello {
        client,
        source_hop: d.http_lines(0, "backend", want),
        destination_hop: d.http_lines(1, "backend", want),
    };

    step("step 2: frontend -> backend-flaky, which fails some requests");
    let client = d.requests(FLAKY, "backend-flaky", RETRY_REQUESTS, 50.0, 1);
    let mut attempts = BTreeMap::new();
    for l in d.http_lines(0, "backend-flaky", RETRY_REQUESTS as usize) {
        *attempts
            .entry(l["attempts"].as_u64().unwrap_or(0))
            .or_default() += 1;
    }
    let (m0, m1) = (d.w.instances[0].metrics(), d.w.instances[1].metrics());
    let retry = Retry {
        client,
        retries: counter(
            &m0,
            "ecsmesh_retries_total",
            &[("service", "backend-flaky")],
        ),
        attempts,
        destination_codes: counter_by(
            &m1,
            "istio_requests_total",
            &[
                ("reporter", "destination"),
                ("destination_service", "backend-flaky"),
            ],
            "response_code",
        ),
    };

    step("step 3: frontend -> backend's admin ports, which no rule allows");
    let refusal = refusal(&d, tcp);

    step(&format!(
        "step 4: {SPLIT_REQUESTS} GETs to backend, split {}/{} between v1 and v2",
        WEIGHTS.0, WEIGHTS.1
    ));
    let client = d.requests(V1, "backend", SPLIT_REQUESTS, 500.0, 16);
    let served = |a: SocketAddr| client["servers"][a.to_string()].as_u64().unwrap_or(0);
    let split = Split {
        v1: served(v1),
        v2: served(v2),
        client,
    };

    step("reading each proxy's /metrics");
    let proxies = [(0, "source"), (1, "destination")]
        .into_iter()
        .map(|(i, reporter)| proxy_stats(&d.w, i, reporter))
        .collect();
    step("removing namespaces, cgroups, eBPF programs and pins, processes");
    drop(d);
    Report {
        instances,
        hello,
        retry,
        refusal,
        split,
        proxies,
        took: started.elapsed(),
    }
}

/// What task `k` of instance `i` runs (as `run` sets it up).
fn role(i: usize, k: usize) -> String {
    match (i, k) {
        (0, _) => "the client".into(),
        (_, 0) => format!(
            "v1: :{V1} API, :{FLAKY} API answering {FAIL_PERCENT} % with 503, \
             :{ADMIN} admin (HTTP), :{TCP_ADMIN} admin (TCP)"
        ),
        _ => format!("v2: :{V2} API"),
    }
}

fn instance_info(inst: &crate::Instance) -> InstanceInfo {
    let (status, body) = inst
        .netns
        .http_get(inst.admin, "/identities")
        .expect("GET /identities");
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("/identities is JSON");
    InstanceInfo {
        name: inst.name.clone(),
        address: inst.ipv4,
        tasks: inst
            .tasks
            .iter()
            .enumerate()
            .map(|(k, t)| (t.id.clone(), t.family.clone(), role(inst.index, k)))
            .collect(),
        identities: v
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["identity"].as_str().map(str::to_owned))
            .collect(),
    }
}

fn refusal(d: &Demo, tcp: SocketAddr) -> Refusal {
    let http = d.requests(ADMIN, "backend-admin", 1, 10.0, 1);
    let conn = d.w.instances[0].tasks[0].client(&[tcp], 1, 100);
    let b = &d.w.instances[1];
    // Both denials are counted and logged before the client hears of them; poll anyway
    // (bounded) so a slow log write does not cut the report short.
    let deadline = Instant::now() + Duration::from_secs(5);
    let lines = |i: usize, needle: &str| -> Vec<String> {
        d.w.instances[i]
            .proxy_log()
            .lines()
            .map(strip_colours)
            .filter(|l| l.contains(needle))
            .collect()
    };
    let (log, source_log) = loop {
        let log = lines(1, "authorization_denied");
        let source_log = lines(0, "tunnel failed");
        if (log.len() >= 2 && !source_log.is_empty()) || Instant::now() > deadline {
            break (log, source_log);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Refusal {
        http,
        tcp_ok: conn.iter().all(|r| r.ok),
        tcp_error: conn.iter().find_map(|r| r.error.clone()),
        rejected: counter_by(
            &b.metrics(),
            "ecsmesh_tunnel_rejected_total",
            &[("side", "server")],
            "reason",
        ),
        source_failed: counter_by(
            &d.w.instances[0].metrics(),
            "ecsmesh_tcp_connections_failed_total",
            &[],
            "reason",
        ),
        log,
        source_log,
    }
}

/// A log line without its ANSI colour sequences (`ESC [ ... m`).
fn strip_colours(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn proxy_stats(w: &World, i: usize, reporter: &'static str) -> ProxyStats {
    let m = w.instances[i].metrics();
    let mut requests = BTreeMap::new();
    for s in m
        .samples
        .iter()
        .filter(|s| s.metric == "istio_requests_total")
        .filter(|s| s.labels.get("reporter") == Some(reporter))
    {
        if let prometheus_parse::Value::Counter(v) = s.value {
            let key = |k| s.labels.get(k).unwrap_or_default().to_owned();
            *requests
                .entry((key("destination_service"), key("response_code")))
                .or_default() += v;
        }
    }
    let buckets = histogram(
        &m,
        "istio_request_duration_milliseconds",
        &[("reporter", reporter)],
    );
    ProxyStats {
        instance: w.instances[i].name.clone(),
        reporter,
        requests,
        count: buckets.last().map_or(0.0, |b| b.1),
        p50_ms: quantile(0.5, &buckets),
        p99_ms: quantile(0.99, &buckets),
    }
}
