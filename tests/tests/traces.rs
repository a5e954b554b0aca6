//! Traces through the real node proxies: an OTLP/HTTP receiver in the harness (decoding
//! with the official OpenTelemetry proto definitions) gets one span per hop — the
//! source proxy's client span, child of the task's own `traceparent`; the destination
//! proxy's server span, child of the source span; the application receives a
//! `traceparent` naming the destination span — with the ECS task IDs, families, SPIFFE
//! IDs, cluster and container instance. A retried request has one source span and one
//! destination span per attempt. With the receiver down, requests are unaffected and
//! the dropped spans are counted.
mod common;

use std::time::{Duration, Instant};

use common::{mesh::*, *};
use harness::{
    NetworkMode::Host,
    ProxyOptions, World,
    metrics::counter,
    otlp::{OtlpReceiver, ReceivedSpan},
    process,
    world::CLUSTER,
};
use serde_json::Value;

const WEB: u16 = 8090;
/// Answers every other request 503 (`--fail-percent 50`): each retried once.
const FLAKY: u16 = 8091;
const COLLECTOR: u16 = 4318;
/// The task's own trace context, as its tracing library would send it.
const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

struct Traces {
    w: World,
    receiver: OtlpReceiver,
}

/// Instance 0: the client task and the collector (in its netns, reached by both proxies
/// over the fabric). Instance 1: the server task, `web` and `flaky`.
fn traces_mesh() -> Traces {
    let mut w = World::new(tools(), 2);
    w.enable_mesh(TRUST_DOMAIN);
    w.add_task(0, Host, 1);
    w.add_task(1, Host, 1);
    let b = &w.instances[1];
    let family = b.tasks[0].family.clone();
    let mut text = String::new();
    for (name, port) in [("web", WEB), ("flaky", FLAKY)] {
        text += &format!(
            "[[services]]\nname = \"{name}\"\n[[services.endpoints]]\naddress = \"{}\"\nfamily = \"{family}\"\n",
            b.addr(port)
        );
    }
    std::fs::write(w.workdir.join("discovery.toml"), text).unwrap();
    let web = vec!["http-echo".into(), "--h1".into(), b.addr(WEB).to_string()];
    let flaky = vec![
        "http-echo".into(),
        "--h1".into(),
        b.addr(FLAKY).to_string(),
        "--fail-percent".into(),
        "50".into(),
    ];
    w.instances[1].tasks[0].server(0, &web);
    w.instances[1].tasks[0].server(0, &flaky);
    let collector = w.instances[0].addr(COLLECTOR);
    let receiver = OtlpReceiver::start(&w.instances[0].netns, collector);
    let opts = ProxyOptions {
        extra_toml: format!(
            "\n[traces]\notlp_endpoint = \"http://{collector}/v1/traces\"\nsample_ratio = 1.0\n\
             export_interval_ms = 100\nexport_timeout_ms = 2000\n"
        ),
        ..Default::default()
    };
    w.instances[1].start_proxy(&opts);
    w.instances[0].start_proxy(&opts);
    Traces { w, receiver }
}

impl Traces {
    /// `count` requests, one connection, from the client task to `port` as `host`.
    fn requests(&self, port: u16, host: &str, count: u64, headers: &[&str]) -> Value {
        let mut args: Vec<String> = [
            "http-requests",
            &self.w.instances[1].addr(port).to_string(),
            "--count",
            &count.to_string(),
            "--rate",
            "50",
            "--connections",
            "1",
            "--host",
            host,
            "--keep-bodies",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for h in headers {
            args.extend(["--header".to_owned(), (*h).to_owned()]);
        }
        let out = process::run(self.w.instances[0].tasks[0].meshtool(0, &args));
        assert!(
            out.status.success(),
            "http-requests: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("http-requests json")
    }

    /// Polls the receiver until `n` spans arrived (bounded).
    fn spans(&self, n: usize) -> Vec<ReceivedSpan> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let spans = self.receiver.spans();
            if spans.len() >= n {
                assert_eq!(spans.len(), n, "exactly one span per hop: {spans:#?}");
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {n} spans arrived: {spans:#?}",
                spans.len()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn metric(&self, inst: usize, name: &str) -> f64 {
        counter(&self.w.instances[inst].metrics(), name, &[])
    }
}

/// (trace id, parent id, flags) of the `traceparent` the application saw.
fn app_traceparent(body: &Value) -> (String, String, String) {
    let tp = body["headers"]["traceparent"]
        .as_str()
        .unwrap_or_else(|| panic!("the application got no traceparent: {body}"));
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{tp}");
    assert_eq!(parts[0], "00", "{tp}");
    (parts[1].into(), parts[2].into(), parts[3].into())
}

fn by_id<'a>(spans: &'a [ReceivedSpan], id: &str) -> &'a ReceivedSpan {
    spans
        .iter()
        .find(|s| s.span_id == id)
        .unwrap_or_else(|| panic!("no span {id}: {spans:#?}"))
}

#[test]
fn one_span_per_hop_linked_with_task_attributes_and_drops_counted_when_collector_down() {
    let t = traces_mesh();
    let (a, b) = (&t.w.instances[0], &t.w.instances[1]);
    let (client_task, server_task) = (&a.tasks[0], &b.tasks[0]);
    let (client_id, server_id) = (
        t.w.identity(&client_task.family),
        t.w.identity(&server_task.family),
    );

    // 1. The task sends its own sampled traceparent (and a tracestate): 3 requests.
    let r = t.requests(
        WEB,
        "web",
        3,
        &[
            &format!("traceparent: 00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"),
            "tracestate: app=1",
        ],
    );
    assert_eq!(r["ok"], 3, "{r}");
    let spans = t.spans(6);
    let bodies = r["bodies"].as_array().unwrap();
    for body in bodies {
        let (trace, parent, flags) = app_traceparent(body);
        assert_eq!(trace, CLIENT_TRACE, "the task's trace continues");
        assert_eq!(flags, "01", "sampled");
        assert_eq!(body["headers"]["tracestate"], "app=1", "tracestate carried");
        // The application's parent is the destination proxy's server span ...
        let dest = by_id(&spans, &parent);
        assert_eq!(dest.kind, 2, "server span at the destination: {dest:?}");
        assert_eq!(dest.trace_id, CLIENT_TRACE);
        // ... whose parent is the source proxy's client span ...
        let source = by_id(&spans, &dest.parent_span_id);
        assert_eq!(source.kind, 3, "client span at the source: {source:?}");
        // ... whose parent is the task's span.
        assert_eq!(source.parent_span_id, CLIENT_SPAN, "{source:?}");
        assert_eq!(source.trace_id, CLIENT_TRACE);
        for (span, instance) in [(source, a), (dest, b)] {
            let who = format!("{span:?}");
            assert_eq!(span.name, "GET", "{who}");
            assert_eq!(
                span.attr("ecsmesh.source.task_id"),
                Some(client_task.id.as_str()),
                "{who}"
            );
            assert_eq!(
                span.attr("ecsmesh.source.family"),
                Some(client_task.family.as_str()),
                "{who}"
            );
            assert_eq!(
                span.attr("ecsmesh.source.principal"),
                Some(client_id.as_str()),
                "{who}"
            );
            assert_eq!(
                span.attr("ecsmesh.destination.family"),
                Some(server_task.family.as_str()),
                "{who}"
            );
            assert_eq!(
                span.attr("ecsmesh.destination.principal"),
                Some(server_id.as_str()),
                "{who}"
            );
            assert_eq!(
                span.attr("ecsmesh.destination.service"),
                Some("web"),
                "{who}"
            );
            assert_eq!(span.attr("http.response.status_code"), Some("200"), "{who}");
            assert_eq!(span.status, 0, "no error: {who}");
            assert_eq!(
                span.resource.get("service.name").map(String::as_str),
                Some("ecsmesh")
            );
            assert_eq!(
                span.resource.get("ecsmesh.cluster").map(String::as_str),
                Some(CLUSTER)
            );
            assert_eq!(
                span.resource.get("ecsmesh.container_instance"),
                Some(&instance.name),
                "exported by the hop's own proxy: {who}"
            );
        }
        assert_eq!(
            dest.attr("ecsmesh.destination.task_id"),
            Some(server_task.id.as_str())
        );
        assert_eq!(source.attr("ecsmesh.attempts"), Some("1"));
    }
    let mut parents: Vec<_> = bodies.iter().map(|b| app_traceparent(b).1).collect();
    parents.sort();
    parents.dedup();
    assert_eq!(parents.len(), 3, "one destination span per request");

    // 2. No traceparent from the task: the source proxy starts a trace (sampled at 1.0).
    let r = t.requests(WEB, "web", 2, &[]);
    assert_eq!(r["ok"], 2, "{r}");
    let spans = t.spans(10);
    for body in r["bodies"].as_array().unwrap() {
        let (trace, parent, flags) = app_traceparent(body);
        assert_ne!(trace, CLIENT_TRACE);
        assert_eq!(flags, "01");
        let dest = by_id(&spans, &parent);
        let source = by_id(&spans, &dest.parent_span_id);
        assert_eq!(source.parent_span_id, "", "a root span: {source:?}");
        assert_eq!(source.trace_id, trace);
        assert!(body["headers"].get("tracestate").is_none(), "{body}");
    }

    // 3. A retried request (`flaky` fails every other answer): one source span, one
    //    destination span per attempt, each a child of the source span; the failed
    //    attempt is an error.
    let r = t.requests(FLAKY, "flaky", 2, &[]);
    assert_eq!(r["ok"], 2, "retries hide the 503s: {r}");
    // Request 1 succeeds at once; request 2 fails once and is retried.
    let spans = t.spans(15);
    let retried = spans
        .iter()
        .find(|s| s.kind == 3 && s.attr("ecsmesh.attempts") == Some("2"))
        .unwrap_or_else(|| panic!("a retried source span: {spans:#?}"));
    let attempts: Vec<_> = spans
        .iter()
        .filter(|s| s.parent_span_id == retried.span_id)
        .collect();
    assert_eq!(
        attempts.len(),
        2,
        "one destination span per attempt: {attempts:#?}"
    );
    let mut statuses: Vec<_> = attempts
        .iter()
        .map(|s| (s.attr("http.response.status_code").unwrap_or(""), s.status))
        .collect();
    statuses.sort();
    assert_eq!(statuses, [("200", 0), ("503", 2)], "{attempts:#?}");
    assert_eq!(retried.attr("http.response.status_code"), Some("200"));
    assert!(t.receiver.bad.lock().unwrap().is_empty());
    for inst in [0, 1] {
        assert_eq!(t.metric(inst, "ecsmesh_trace_spans_dropped_total"), 0.0);
    }
    assert_eq!(
        t.metric(0, "ecsmesh_trace_spans_exported_total")
            + t.metric(1, "ecsmesh_trace_spans_exported_total"),
        15.0
    );

    // 4. The collector goes down: requests are unaffected, the spans are dropped and
    //    counted at both proxies.
    let mut t = t;
    t.receiver.stop();
    let r = t.requests(WEB, "web", 20, &[]);
    assert_eq!(r["ok"], 20, "{r}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let dropped: Vec<f64> = [0, 1]
            .iter()
            .map(|&i| t.metric(i, "ecsmesh_trace_spans_dropped_total"))
            .collect();
        if dropped.iter().all(|&d| d >= 20.0) {
            assert!(dropped.iter().all(|&d| d == 20.0), "{dropped:?}");
            break;
        }
        assert!(Instant::now() < deadline, "drops counted: {dropped:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
