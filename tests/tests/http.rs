//! The HTTP-aware data path: protocol detection on meshed connections, HTTP through the
//! tunnel request by request, and everything that must pass intact — keep-alive, h2c,
//! large and chunked bodies, upgrades, trailers — each checked at the application, plus
//! what must stay opaque (TLS, server-speaks-first protocols, silent clients).
mod common;

use std::time::Instant;

use common::{mesh::*, *};
use harness::{NetworkMode::Host, ProxyOptions, World, metrics::counter, process};
use serde_json::Value;

const H1: u16 = 8090;
const H2: u16 = 8091;
const TLS: u16 = 8443;
/// In the harness's opaque ports: the echo server there greets first.
const GREETER: u16 = 9000;

struct Http {
    w: World,
}

/// Instance 0: a host-mode client task. Instance 1: a task whose application serves
/// HTTP/1.1 on :8090, h2c on :8091, TLS on :8443 and a greeting on :9000; service `web`
/// is the HTTP/1.1 port, `web-h2`, `web-tls` and `web-greeter` the others.
fn http_mesh(opts_b: ProxyOptions) -> Http {
    let mut w = World::new(tools(), 2);
    w.enable_mesh(TRUST_DOMAIN);
    w.add_task(0, Host, 1);
    w.add_task(1, Host, 1);
    let b = &w.instances[1];
    let (h1, h2, tls, greeter) = (b.addr(H1), b.addr(H2), b.addr(TLS), b.addr(GREETER));
    let fam_b = b.tasks[0].family.clone();
    // One service per port: a service's endpoints are interchangeable (requests are
    // balanced over them), and these speak different protocols.
    let mut text = String::new();
    for (name, ep) in [
        ("web", h1),
        ("web-h2", h2),
        ("web-tls", tls),
        ("web-greeter", greeter),
    ] {
        text += &format!(
            "[[services]]\nname = \"{name}\"\n\
             [[services.endpoints]]\naddress = \"{ep}\"\nfamily = \"{fam_b}\"\n"
        );
    }
    std::fs::write(w.workdir.join("discovery.toml"), text).unwrap();
    let args: Vec<String> = [
        "http-echo",
        "--h1",
        &h1.to_string(),
        "--h2",
        &h2.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    w.instances[1].tasks[0].server(0, &args);
    w.instances[1].echo_server(&[greeter]);
    let (cert, key) = issue(
        &w,
        "app-tls",
        &[
            "--ca",
            &w.ca_dir().display().to_string(),
            "--self-signed",
            "--uri",
            "spiffe://app.test/tls",
        ],
    );
    w.instances[1].server(&[
        "tls-server".into(),
        "--listen".into(),
        tls.to_string(),
        "--cert".into(),
        cert.display().to_string(),
        "--key".into(),
        key.display().to_string(),
    ]);
    w.instances[1].start_proxy(&opts_b);
    w.instances[0].start_proxy(&ProxyOptions::default());
    Http { w }
}

impl Http {
    /// `meshtool http-probe` from the client task.
    fn probe(&self, port: u16, case: &str) -> Value {
        let target = self.w.instances[1].addr(port).to_string();
        let host = if port == H2 { "web-h2" } else { "web" };
        let args: Vec<String> = ["http-probe", &target, "--case", case, "--host", host]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let out = process::run(self.w.instances[0].tasks[0].meshtool(0, &args));
        assert!(
            out.status.success(),
            "{case}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("probe json")
    }

    /// The body-size histograms of service `web` at the source (instance 0) and the
    /// destination (instance 1).
    fn sizes(&self) -> [Sizes; 2] {
        [(0, "source"), (1, "destination")].map(|(inst, reporter)| {
            let m = self.w.instances[inst].metrics();
            let labels = [("reporter", reporter), ("destination_service", "web")];
            Sizes {
                request: counter(&m, "istio_request_bytes_sum", &labels),
                response: counter(&m, "istio_response_bytes_sum", &labels),
                observed: counter(&m, "istio_response_bytes_count", &labels),
            }
        })
    }

    /// The sizes once `more` requests more were observed at both hops (a response's
    /// sizes are observed when its body ends, just after the client has read it).
    fn sizes_after(&self, before: &[Sizes; 2], more: f64) -> [Sizes; 2] {
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let now = self.sizes();
            if (0..2).all(|i| now[i].observed >= before[i].observed + more) {
                return now;
            }
            assert!(Instant::now() < deadline, "sizes not observed: {now:?}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Istio's `istio_requests_total` on instance `inst` as `reporter` reports it.
    fn requests(&self, inst: usize, reporter: &str) -> f64 {
        counter(
            &self.w.instances[inst].metrics(),
            "istio_requests_total",
            &[("reporter", reporter)],
        )
    }
}

#[derive(Debug)]
struct Sizes {
    request: f64,
    response: f64,
    observed: f64,
}

#[test]
fn http_passes_intact_through_the_mesh() {
    let h = http_mesh(ProxyOptions::default());
    let app = h.w.instances[1].addr(H1).to_string();

    // Keep-alive: three requests on one task connection, each seen by the application with
    // its path and Host, and by both proxies.
    let r = h.probe(H1, "keepalive");
    let responses = r["responses"].as_array().unwrap();
    assert_eq!(responses.len(), 3, "{r}");
    for (resp, path) in responses.iter().zip(["/a", "/b", "/c"]) {
        assert_eq!(resp["status"], 200, "{r}");
        assert_eq!(resp["body"]["server"], app.as_str());
        assert_eq!(resp["body"]["path"], path);
        assert_eq!(resp["body"]["host"], "web");
        assert_eq!(
            resp["body"]["version"], "HTTP/1.1",
            "the application got HTTP/1.1"
        );
        assert!(
            resp["body"]["headers"].get("ecsmesh-target").is_none(),
            "our headers stay between the proxies: {resp}"
        );
    }
    assert_eq!(h.requests(0, "source"), 3.0);
    assert_eq!(
        h.requests(1, "destination"),
        3.0,
        "the destination proxy saw each request"
    );
    // Both hops report the same requests with Istio's labels: workloads are task
    // families, principals SPIFFE IDs, the namespace the cluster.
    let (client, server) = (
        h.w.instances[0].tasks[0].family.clone(),
        h.w.instances[1].tasks[0].family.clone(),
    );
    let (client_id, server_id) = (h.w.identity(&client), h.w.identity(&server));
    for (inst, reporter, policy) in [(0, "source", "unknown"), (1, "destination", "mutual_tls")] {
        let m = h.w.instances[inst].metrics();
        let labels = [
            ("reporter", reporter),
            ("source_workload", client.as_str()),
            ("source_principal", client_id.as_str()),
            ("destination_workload", server.as_str()),
            ("destination_principal", server_id.as_str()),
            ("destination_service", "web"),
            ("response_code", "200"),
            ("response_flags", "-"),
            ("request_protocol", "http"),
            ("connection_security_policy", policy),
        ];
        assert_eq!(
            counter(&m, "istio_requests_total", &labels),
            3.0,
            "{reporter}: classified by the authority `web`, with Istio's labels"
        );
        assert_eq!(
            counter(&m, "istio_request_duration_milliseconds_count", &labels),
            3.0,
            "{reporter}: one duration observation per request"
        );
    }

    // h2c with prior knowledge reaches the application as HTTP/2.
    let r = h.probe(H2, "h2c");
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["body"]["version"], "HTTP/2.0", "{r}");
    assert_eq!(r["body"]["host"], "web-h2", "{r}");

    // A 1 MiB request body arrives byte for byte, and both hops size it (Istio's
    // `istio_request_bytes`, observed when the response body ends).
    let before = h.sizes();
    let r = h.probe(H1, "big-body");
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["body"]["len"], r["sent"]["len"], "{r}");
    assert_eq!(r["body"]["fnv"], r["sent"]["fnv"], "{r}");
    let after = h.sizes_after(&before, 1.0);
    let sent = r["sent"]["len"].as_f64().unwrap();
    for hop in 0..2 {
        assert_eq!(after[hop].request - before[hop].request, sent, "hop {hop}");
    }

    // A chunked response (no length) arrives whole, still chunked; both hops count its
    // body (`istio_response_bytes`) and an empty request body.
    let before = h.sizes();
    let r = h.probe(H1, "chunked");
    assert_eq!(r["intact"], true, "{r}");
    assert_eq!(r["transfer_encoding"], "chunked", "{r}");
    let after = h.sizes_after(&before, 1.0);
    for hop in 0..2 {
        assert_eq!(
            after[hop].response - before[hop].response,
            r["len"].as_f64().unwrap(),
            "hop {hop}"
        );
        assert_eq!(after[hop].request, before[hop].request, "hop {hop}");
    }

    // gRPC-style: h2 request with trailers; the application sees them and answers with
    // trailers of its own.
    let r = h.probe(H2, "trailers");
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["body"]["trailers"]["x-request-trailer"], "done", "{r}");
    assert_eq!(r["trailers"]["grpc-status"], "0", "{r}");
    assert_eq!(r["trailers"]["x-echo-trailer"], "done", "{r}");

    // WebSocket: 101, then frames both ways.
    let r = h.probe(H1, "upgrade");
    assert_eq!(r["status"], 101, "{r}");
    assert_eq!(r["frames_echoed"], serde_json::json!([true, true]), "{r}");
}

#[test]
fn tls_server_first_and_silent_clients_stay_opaque() {
    let h = http_mesh(ProxyOptions::default());
    let b = &h.w.instances[1];

    // TLS from the task: the ClientHello is forwarded untouched, the handshake completes
    // with the application.
    let args: Vec<String> = [
        "tunnel",
        "--connect",
        &b.addr(TLS).to_string(),
        "--sni",
        "app.test",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = process::run(h.w.instances[0].tasks[0].meshtool(0, &args));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert_eq!(
        v["tls"],
        "ok",
        "{v} {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A server-speaks-first protocol on a configured port: never delayed.
    let r = h.probe(GREETER, "server-first");
    assert_eq!(r["greeting"], b.addr(GREETER).to_string(), "{r}");
    assert!(
        r["ms"].as_u64().unwrap() < 1000,
        "greeting not delayed: {r}"
    );

    // Nothing went through the HTTP path.
    assert_eq!(h.requests(0, "source"), 0.0);
}

#[test]
fn a_client_that_sends_nothing_is_taken_as_opaque_after_the_detection_timeout() {
    let mut w = World::new(tools(), 2);
    w.enable_mesh(TRUST_DOMAIN);
    w.add_task(0, Host, 1);
    w.add_task(1, Host, 1);
    // A greeter on a port nobody listed as opaque: the client waits for the greeting,
    // detection waits for the client; the timeout breaks the tie.
    let ep = w.instances[1].addr(7000);
    w.instances[1].echo_server(&[ep]);
    let fam = w.instances[1].tasks[0].family.clone();
    w.write_discovery(&[("greeter", ep, &fam)]);
    let opts = ProxyOptions {
        detect_timeout_ms: Some(1500),
        ..Default::default()
    };
    w.instances[1].start_proxy(&ProxyOptions::default());
    w.instances[0].start_proxy(&opts);
    let args: Vec<String> = ["http-probe", &ep.to_string(), "--case", "server-first"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let started = Instant::now();
    let out = process::run(w.instances[0].tasks[0].meshtool(0, &args));
    let r: Value = serde_json::from_slice(&out.stdout).expect("probe json");
    assert_eq!(
        r["greeting"],
        ep.to_string(),
        "opaque TCP to exactly the dialled address: {r}"
    );
    let ms = r["ms"].as_u64().unwrap();
    assert!(
        (1400..4000).contains(&ms),
        "held for the detection timeout (1.5 s), not longer: {ms} ms"
    );
    assert!(started.elapsed().as_secs() < 10);
}

#[test]
fn proxy_errors_are_marked_and_bad_requests_are_refused_without_harm() {
    // Instance 1 refuses the client's identity: an authorization denial is a proxy error.
    let deny = ProxyOptions {
        allow: vec![("spiffe://mesh.test/ecs/test/nobody".into(), None, None)],
        ..Default::default()
    };
    let h = http_mesh(deny);
    let r = h.probe(H1, "keepalive");
    let first = &r["responses"][0];
    assert_eq!(first["status"], 403, "{r}");
    assert_eq!(
        first["headers"]["ecsmesh-proxy-error"], "authorization_denied",
        "a proxy-generated response says so: {r}"
    );

    // Bad input from the task: a 64 KiB request line, a header block over the limit, an
    // invalid h2 preface, a request cut off mid-way. Each gets a clear error or a close.
    let target = h.w.instances[1].addr(H1).to_string();
    let raw = |text: String| -> Value {
        let args: Vec<String> = vec![
            "raw".into(),
            "--connect".into(),
            target.clone(),
            "--half-close".into(),
            "--text".into(),
            text,
        ];
        let out = process::run(h.w.instances[0].tasks[0].meshtool(0, &args));
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    };
    let long_line = format!(
        "GET /{} HTTP/1.1\r\nHost: web\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let v = raw(long_line);
    assert_eq!(v["closed_by_peer"], true, "{v}");
    let big_headers = format!(
        "GET / HTTP/1.1\r\nHost: web\r\nx-pad: {}\r\n\r\n",
        "b".repeat(32 * 1024)
    );
    let v = raw(big_headers);
    assert_eq!(v["closed_by_peer"], true, "{v}");
    let v = raw("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nnot an h2 frame at all".into());
    assert_eq!(v["closed_by_peer"], true, "{v}");
    let v = raw("POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 100\r\n\r\nonly a part".into());
    assert_eq!(v["closed_by_peer"], true, "{v}");

    // The proxy is still serving: a good request right after.
    let r = h.probe(H2, "h2c");
    assert_eq!(r["status"], 403, "still answering (and still denying): {r}");
    let ma = h.w.instances[0].metrics();
    assert!(
        counter(
            &ma,
            "ecsmesh_tcp_connections_failed_total",
            &[("reason", "http_protocol")]
        ) >= 1.0,
        "bad input is counted"
    );
}
