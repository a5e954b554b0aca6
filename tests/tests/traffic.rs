//! Retries with a budget, per-request balancing, timeouts and traffic shifting, measured
//! at the client task: every request goes through the real node proxies and the mTLS
//! tunnel to `http-echo` applications that inject 503s or delay their answers.
mod common;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use common::{mesh::*, *};
use harness::{NetworkMode::Host, ProxyOptions, World, metrics::counter, process};
use serde_json::Value;

/// One application of the destination task: its port, the service it serves, its subset
/// and weight, and its `http-echo` fault flags.
struct App {
    port: u16,
    service: &'static str,
    subset: Option<(&'static str, u32)>,
    faults: &'static [&'static str],
}

const fn app(port: u16, service: &'static str, faults: &'static [&'static str]) -> App {
    App {
        port,
        service,
        subset: None,
        faults,
    }
}

struct Traffic {
    w: World,
}

fn discovery_text(w: &World, apps: &[App]) -> String {
    let b = &w.instances[1];
    let family = b.tasks[0].family.clone();
    let mut by_service: BTreeMap<&str, Vec<&App>> = BTreeMap::new();
    for a in apps {
        by_service.entry(a.service).or_default().push(a);
    }
    let mut text = String::new();
    for (service, apps) in by_service {
        text += &format!("[[services]]\nname = \"{service}\"\n");
        for a in apps {
            text += &format!(
                "[[services.endpoints]]\naddress = \"{}\"\nfamily = \"{family}\"\n",
                b.addr(a.port)
            );
            if let Some((subset, weight)) = a.subset {
                text += &format!("subset = \"{subset}\"\nweight = {weight}\n");
            }
        }
    }
    text
}

/// Instance 1: one host-mode task running an `http-echo` per app; instance 0: the client
/// task. `policy` goes into the source proxy's config (the `[services.*]` tables).
fn traffic(apps: &[App], policy: &str) -> Traffic {
    traffic_with(apps, policy, |_| String::new())
}

/// `traffic` with more services in the discovery file (`extra` gets the world).
fn traffic_with(apps: &[App], policy: &str, extra: impl Fn(&World) -> String) -> Traffic {
    let mut w = World::new(tools(), 2);
    w.enable_mesh(TRUST_DOMAIN);
    w.add_task(0, Host, 1);
    w.add_task(1, Host, 1);
    let text = discovery_text(&w, apps) + &extra(&w);
    std::fs::write(w.workdir.join("discovery.toml"), text).unwrap();
    for a in apps {
        let mut args = vec!["http-echo".to_string(), "--h1".into()];
        args.push(w.instances[1].addr(a.port).to_string());
        args.extend(a.faults.iter().map(|s| s.to_string()));
        w.instances[1].tasks[0].server(0, &args);
    }
    w.instances[1].start_proxy(&ProxyOptions::default());
    w.instances[0].start_proxy(&ProxyOptions {
        extra_toml: policy.to_owned(),
        ..Default::default()
    });
    Traffic { w }
}

impl Traffic {
    fn addr(&self, port: u16) -> SocketAddr {
        self.w.instances[1].addr(port)
    }

    fn requests_cmd(
        &self,
        port: u16,
        host: &str,
        method: &str,
        count: u64,
        rate: f64,
    ) -> std::process::Command {
        let args: Vec<String> = [
            "http-requests",
            &self.addr(port).to_string(),
            "--count",
            &count.to_string(),
            "--rate",
            &rate.to_string(),
            "--method",
            method,
            "--host",
            host,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        self.w.instances[0].tasks[0].meshtool(0, &args)
    }

    /// `count` requests at `rate` from the client task, dialling the app on `port` with
    /// `Host: host`.
    fn requests(&self, port: u16, host: &str, method: &str, count: u64, rate: f64) -> Value {
        let out = process::run(self.requests_cmd(port, host, method, count, rate));
        assert!(
            out.status.success(),
            "http-requests: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("http-requests json")
    }

    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        counter(&self.w.instances[0].metrics(), name, labels)
    }

    fn served(&self, r: &Value, port: u16) -> u64 {
        r["servers"][self.addr(port).to_string()]
            .as_u64()
            .unwrap_or(0)
    }
}

const FLAKY: &[&str] = &["--fail-percent", "30"];
const DOWN: &[&str] = &["--fail-percent", "100"];
const SLOW: &[&str] = &["--delay-ms", "50"];

#[test]
fn retries_hide_a_flaky_endpoint_posts_are_not_retried_and_slow_endpoints_get_little() {
    let t = traffic(
        &[
            app(8101, "orders", FLAKY),
            app(8102, "orders", &[]),
            app(8103, "orders", &[]),
            app(8104, "flaky", FLAKY),
            app(8105, "slow", SLOW),
            app(8106, "slow", &[]),
            app(8107, "slow", &[]),
        ],
        "",
    );
    // 2,000 GETs at 200 req/s at a service whose first endpoint answers 503 to 30 %.
    let r = t.requests(8101, "orders", "GET", 2000, 200.0);
    assert_eq!(r["sent"], 2000, "{r}");
    let ok = r["ok"].as_u64().unwrap();
    assert!(ok >= 1998, "at least 99.9 % succeed: {r}");
    let retried = t.metric(
        "ecsmesh_retries_total",
        &[("service", "orders"), ("reason", "status")],
    );
    assert!(
        retried >= 1.0,
        "the 503s were retried, not balanced away only"
    );
    eprintln!(
        "orders: {ok}/2000 ok, {retried} retries, split {}",
        r["servers"]
    );

    // A POST is not retried: the one endpoint of `flaky` fails 3 of every 10 requests, and
    // the client sees exactly those.
    let r = t.requests(8104, "flaky", "POST", 200, 100.0);
    assert_eq!(r["statuses"]["503"], 60, "{r}");
    assert_eq!(r["ok"], 140, "{r}");
    // The same endpoint with GETs: each failure is retried (on it, the only one), up to 3
    // attempts. Concurrent requests share the endpoint's failure pattern, so a retry can
    // land on a failing turn too: about 0.3³ ≈ 3 % still fail, against the POSTs' 30 %.
    let r = t.requests(8104, "flaky", "GET", 200, 100.0);
    let failed = 200 - r["ok"].as_u64().unwrap();
    assert!(
        failed <= 12,
        "GETs are retried: {failed} of 200 failed: {r}"
    );
    assert!(
        t.metric("ecsmesh_retries_total", &[("service", "flaky")]) >= 50.0,
        "about 30 % of 200 GETs were retried"
    );
    assert_eq!(
        t.metric("ecsmesh_retries_total", &[("service", "flaky")]),
        t.metric("ecsmesh_endpoint_requests_total", &[("service", "flaky")]) - 400.0,
        "every attempt past the first of each of the 400 requests is a retry"
    );
    // Istio's request metrics: the source hop counts each of the 400 requests once, the
    // destination hop every attempt.
    let flaky = [("destination_service", "flaky")];
    assert_eq!(
        t.metric("istio_requests_total", &[flaky[0], ("reporter", "source")]),
        400.0
    );
    let attempts = t.metric("ecsmesh_endpoint_requests_total", &[("service", "flaky")]);
    assert_eq!(
        counter(
            &t.w.instances[1].metrics(),
            "istio_requests_total",
            &[flaky[0], ("reporter", "destination")]
        ),
        attempts
    );

    // One endpoint 50 ms slower than the others gets few requests, although the client
    // dials that one.
    let r = t.requests(8105, "slow", "GET", 2000, 400.0);
    assert_eq!(r["ok"], 2000, "{r}");
    let slow = t.served(&r, 8105);
    eprintln!(
        "slow: the 50 ms endpoint got {slow} of 2000, split {}",
        r["servers"]
    );
    assert!(slow < 300, "under 15 %: {slow} of 2000 ({})", r["servers"]);
    // Healthy traffic fires no timeout.
    assert_eq!(t.metric("ecsmesh_timeouts_total", &[]), 0.0);

    // `/endpoints` shows what the balancer learnt: the flaky endpoint's estimate carries
    // its failures, above both healthy ones.
    let a = &t.w.instances[0];
    let (status, body) = a.netns.http_get(a.admin, "/endpoints").unwrap();
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let orders = v["services"]["orders"].as_array().expect("orders listed");
    assert_eq!(orders.len(), 3, "{v}");
    let ewma = |port: u16| {
        let addr = t.addr(port).to_string();
        let e = orders
            .iter()
            .find(|e| e["address"] == addr.as_str())
            .unwrap();
        e["balancer"]["ewma_ms"]
            .as_f64()
            .expect("the balancer knows it")
    };
    assert!(ewma(8101) > ewma(8102) && ewma(8101) > ewma(8103), "{v}");
    // `/config_dump`: the effective config, as check-config prints it.
    let (status, body) = a.netns.http_get(a.admin, "/config_dump").unwrap();
    assert_eq!(status, 200);
    let c: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(c["traffic"]["defaults"]["max_attempts"], 3, "{c}");
    assert!(!body.contains("PRIVATE KEY"));

    // `/metrics` after all that traffic (retries, ejections, timeouts counters): classic
    // Prometheus text by default, and `promtool check metrics` accepts it.
    let (status, text) = a.netns.http_get(a.admin, "/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(!text.contains("# EOF"), "classic format, not OpenMetrics");
    assert!(
        text.contains("# TYPE ecsmesh_retries_total counter"),
        "{text}"
    );
    // The standard process series, under their usual names.
    let scrape = a.metrics();
    for name in [
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_cpu_seconds_total",
    ] {
        assert!(counter(&scrape, name, &[]) > 0.0, "{name} in {text}");
    }
    promtool_check(&text);
    // Every series the deploy/ dashboard queries exists under that name.
    let dashboard = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana-dashboard.json"),
    )
    .unwrap();
    let mut names: Vec<&str> = dashboard
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| {
            ["istio_", "ecsmesh_", "process_"]
                .iter()
                .any(|p| w.starts_with(p))
        })
        .collect();
    names.sort();
    names.dedup();
    assert!(names.len() >= 6, "{names:?}");
    for name in names {
        assert!(
            text.contains(name),
            "the dashboard queries {name}, /metrics has no such series"
        );
    }
}

/// `promtool check metrics` (Debian's `prometheus`, installed by `cargo xtask setup`).
fn promtool_check(text: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("/usr/bin/promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus): run `cargo xtask setup`");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Exit 0: parses, no lint. Exit 3: parses, lint only. The one lint allowed is on the
    // name Istio itself gives its duration histogram (dashboards query it by that name).
    let lint_only = out.status.code() == Some(3)
        && report.lines().filter(|l| !l.trim().is_empty()).all(|l| {
            l.starts_with("istio_request_duration_milliseconds use base unit \"seconds\"")
        });
    assert!(
        out.status.success() || lint_only,
        "promtool check metrics: {report}\n{text}"
    );
}

#[test]
fn the_retry_budget_caps_retries_when_every_endpoint_fails() {
    let t = traffic(
        &[app(8111, "down", DOWN), app(8112, "down", DOWN)],
        "[services.down]\nper_try_timeout_ms = 1000\n",
    );
    let started = Instant::now();
    let r = t.requests(8111, "down", "GET", 3000, 100.0);
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(r["sent"], 3000, "{r}");
    assert_eq!(r["ok"], 0, "{r}");
    let retries = t.metric("ecsmesh_retries_total", &[("service", "down")]);
    let refused = t.metric(
        "ecsmesh_retry_budget_exhausted_total",
        &[("service", "down")],
    );
    // The budget's window moves in whole seconds: a run that ends a few ms into its 31st
    // second may use that second's allowance too.
    let bound = 0.2 * 3000.0 + 10.0 * secs.ceil();
    eprintln!(
        "down: {retries} retries over {secs:.1} s (bound {bound:.0}), {refused} refused by the budget, p99 {} us",
        r["p99_us"]
    );
    assert!(
        retries <= bound,
        "retries {retries} > 20 % + 10/s = {bound}"
    );
    assert!(refused > 0.0, "the budget ran out");
    assert!(
        r["p99_us"].as_u64().unwrap() < 1_000_000,
        "failures come back fast, under the per-try timeout: {r}"
    );
}

#[test]
fn subsets_split_by_weight_and_shift_at_runtime_without_failures() {
    let mut apps = [
        app(8121, "cart", &[]),
        app(8122, "cart", &[]),
        app(8123, "cart", &[]),
    ];
    apps[0].subset = Some(("v1", 90));
    apps[1].subset = Some(("v1", 90));
    apps[2].subset = Some(("v2", 10));
    let t = traffic(&apps, "");
    let r = t.requests(8121, "cart", "GET", 5000, 500.0);
    assert_eq!(r["ok"], 5000, "{r}");
    let v2 = t.served(&r, 8123) as f64 / 5000.0;
    eprintln!("cart 90/10: v2 got {:.1} %", v2 * 100.0);
    assert!((v2 - 0.10).abs() <= 0.03, "v2 got {v2}: {}", r["servers"]);

    // Shift to 0/100 while 16 keep-alive connections send load.
    let load = t
        .requests_cmd(8121, "cart", "GET", 3000, 300.0)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    apps[0].subset = Some(("v1", 0));
    apps[1].subset = Some(("v1", 0));
    apps[2].subset = Some(("v2", 100));
    let path = t.w.workdir.join("discovery.toml");
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, discovery_text(&t.w, &apps)).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !t.w.instances[0]
        .proxy_log()
        .contains("discovery file reloaded")
    {
        assert!(
            Instant::now() < deadline,
            "the proxy did not reload the file"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = load.wait_with_output().unwrap();
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["ok"], 3000, "no request failed during the shift: {r}");
    // Afterwards the old subset gets nothing new.
    let r = t.requests(8121, "cart", "GET", 500, 250.0);
    assert_eq!(t.served(&r, 8123), 500, "{}", r["servers"]);
}

#[test]
fn a_crashed_endpoint_is_retried_elsewhere_and_each_timeout_fires() {
    // `void`: an endpoint whose node proxy never answers (its tunnel address is an
    // unused address on the harness's own fabric bridge: the SYN goes nowhere).
    // `db`: two opaque TCP endpoints, balanced per connection.
    let void = |w: &World| {
        let family = w.instances[1].tasks[0].family.clone();
        let mut text = format!(
            "[[services]]\nname = \"void\"\n[[services.endpoints]]\naddress = \"{}\"\n\
             family = \"{family}\"\ntunnel = \"10.0.0.250:15008\"\n",
            w.instances[1].addr(8135)
        );
        text += "[[services]]\nname = \"db\"\n";
        for port in [8141, 8142] {
            text += &format!(
                "[[services.endpoints]]\naddress = \"{}\"\nfamily = \"{family}\"\n",
                w.instances[1].addr(port)
            );
        }
        text
    };
    let mut t = {
        let mut t = traffic_with(
            &[
                app(8131, "shop", &[]),
                app(8132, "shop", &[]),
                app(8133, "late", &["--delay-ms", "400"]),
                app(8134, "later", &["--delay-ms", "400"]),
            ],
            "[services.late]\nper_try_timeout_ms = 100\nmax_attempts = 1\n\
             [services.later]\nrequest_timeout_ms = 150\n\
             [services.void]\nconnect_timeout_ms = 200\nmax_attempts = 1\n\
             [services.db]\nbalance = true\n",
            void,
        );
        // The application behind 8132 crashes: its port refuses connections.
        t.w.instances[1].tasks[0].kill_server(1);
        t
    };
    // Opaque TCP of a service with `balance = true`: connections dialled to a crashed
    // endpoint are carried to the other one before their first byte.
    for port in [8141, 8142] {
        let addr = t.addr(port).to_string();
        t.w.instances[1].tasks[0].server(0, &["echo".into(), addr]);
    }
    t.w.instances[1].tasks[0].kill_server(3);
    let reports = t.w.instances[0].tasks[0].client(&[t.addr(8141)], 20, 64);
    let live = t.addr(8142).to_string();
    for r in &reports {
        assert!(r.ok, "{r:?}");
        assert_eq!(r.served_by.as_deref(), Some(live.as_str()), "{r:?}");
    }
    assert!(t.metric("ecsmesh_retries_total", &[("service", "db")]) >= 1.0);

    // HTTP: the client dials the crashed one.
    let r = t.requests(8132, "shop", "GET", 200, 100.0);
    assert_eq!(r["ok"], 200, "the client never notices: {r}");
    assert_eq!(t.served(&r, 8132), 0);

    let r = t.requests(8133, "late", "GET", 5, 10.0);
    assert_eq!(r["proxy_errors"]["per_try_timeout"], 5, "{r}");
    assert_eq!(r["statuses"]["504"], 5, "{r}");
    assert_eq!(
        t.metric(
            "ecsmesh_timeouts_total",
            &[("service", "late"), ("reason", "per_try")]
        ),
        5.0
    );
    let r = t.requests(8134, "later", "GET", 5, 10.0);
    assert_eq!(r["proxy_errors"]["request_timeout"], 5, "{r}");
    assert_eq!(
        t.metric(
            "ecsmesh_timeouts_total",
            &[("service", "later"), ("reason", "request")]
        ),
        5.0
    );
    let r = t.requests(8135, "void", "GET", 3, 10.0);
    assert_eq!(r["proxy_errors"]["connect_timeout"], 3, "{r}");
    assert!(r["max_us"].as_u64().unwrap() < 2_000_000, "{r}");
    assert_eq!(
        t.metric(
            "ecsmesh_timeouts_total",
            &[("service", "void"), ("reason", "connect")]
        ),
        3.0
    );
    assert_eq!(
        t.metric("ecsmesh_timeouts_total", &[("service", "shop")]),
        0.0,
        "none on healthy traffic"
    );
}

/// Access log files of a test, removed when it ends (pass or fail).
struct Logs(Vec<std::path::PathBuf>);

impl Drop for Logs {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn read_lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

#[test]
fn access_logs_name_both_tasks_at_both_hops() {
    let id = format!("{}-{}", std::process::id(), harness::uid());
    let logs = Logs(
        (0..2)
            .map(|i| std::env::temp_dir().join(format!("ecsmesh-access-{id}-{i}.log")))
            .collect(),
    );
    let toml = |i: usize| {
        format!(
            "[access_log]\nhttp = true\ntcp = true\npath = \"{}\"\n",
            logs.0[i].display()
        )
    };
    let mut t = traffic(&[app(8161, "shop", &[])], &toml(0));
    t.w.instances[1].stop_proxy();
    t.w.instances[1].start_proxy(&ProxyOptions {
        extra_toml: toml(1),
        ..Default::default()
    });
    let r = t.requests(8161, "shop", "GET", 10, 50.0);
    assert_eq!(r["ok"], 10, "{r}");
    let (client, server) = (&t.w.instances[0].tasks[0], &t.w.instances[1].tasks[0]);
    let endpoint = t.addr(8161).to_string();
    // Lines are written off the data path: wait for them (bounded).
    let deadline = Instant::now() + Duration::from_secs(10);
    let (mut src, mut dst) = (Vec::new(), Vec::new());
    while Instant::now() < deadline {
        (src, dst) = (read_lines(&logs.0[0]), read_lines(&logs.0[1]));
        let http = |v: &[Value]| v.iter().filter(|l| l["kind"] == "http").count();
        let tcp = src.iter().filter(|l| l["kind"] == "tcp").count();
        if http(&src) == 10 && http(&dst) == 10 && tcp >= 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let http_src: Vec<&Value> = src.iter().filter(|l| l["kind"] == "http").collect();
    let http_dst: Vec<&Value> = dst.iter().filter(|l| l["kind"] == "http").collect();
    assert_eq!(
        (http_src.len(), http_dst.len()),
        (10, 10),
        "{src:?}\n{dst:?}"
    );
    for l in &http_src {
        assert_eq!(l["reporter"], "source", "{l}");
        assert_eq!(l["source_task"], client.id.as_str(), "{l}");
        assert_eq!(l["source_workload"], client.family.as_str(), "{l}");
        assert_eq!(l["destination_workload"], server.family.as_str(), "{l}");
        assert_eq!(
            l["destination_principal"],
            t.w.identity(&server.family),
            "{l}"
        );
        assert_eq!(l["endpoint"], endpoint.as_str(), "{l}");
        assert_eq!(
            (l["status"].clone(), l["attempts"].clone()),
            (200.into(), 1.into())
        );
    }
    for l in &http_dst {
        assert_eq!(l["reporter"], "destination", "{l}");
        assert_eq!(l["source_task"], client.id.as_str(), "{l}");
        assert_eq!(l["source_principal"], t.w.identity(&client.family), "{l}");
        assert_eq!(l["destination_task"], server.id.as_str(), "{l}");
        assert_eq!(l["status"], 200, "{l}");
    }
    // The task connections that carried them, with their bytes.
    let tcp: Vec<&Value> = src.iter().filter(|l| l["kind"] == "tcp").collect();
    assert!(!tcp.is_empty(), "{src:?}");
    for l in &tcp {
        assert_eq!(l["source_task"], client.id.as_str(), "{l}");
        assert_eq!(l["original_destination"], endpoint.as_str(), "{l}");
        assert_eq!(l["destination_workload"], server.family.as_str(), "{l}");
        assert!(l["request_bytes"].as_u64().unwrap() > 0, "{l}");
        assert!(l["response_bytes"].as_u64().unwrap() > 0, "{l}");
    }
    // The duration histograms: each closed connection, each tunnel handshake (one pooled
    // connection, seen from both sides).
    let (ma, mb) = (t.w.instances[0].metrics(), t.w.instances[1].metrics());
    let count = |m, name, labels: &[(&str, &str)]| counter(m, name, labels);
    // Every connection the client opened was closed and observed once (the client has
    // exited; the proxy finishes each connection's bookkeeping right after, so poll).
    let mine = [("source_workload", client.family.as_str())];
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = t.w.instances[0].metrics();
        let opened = counter(&m, "istio_tcp_connections_opened_total", &mine);
        let observed = counter(&m, "ecsmesh_tcp_connection_duration_seconds_count", &mine);
        if observed == opened && opened >= tcp.len() as f64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{observed} durations for {opened} connections"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        count(
            &ma,
            "ecsmesh_tunnel_handshake_duration_seconds_count",
            &[("role", "client")]
        ),
        1.0
    );
    assert_eq!(
        count(
            &mb,
            "ecsmesh_tunnel_handshake_duration_seconds_count",
            &[("role", "server")]
        ),
        1.0
    );
}
