//! The tracer against a loopback OTLP/HTTP receiver that decodes with the official proto
//! definitions: propagation and parent links through two hops, sampling, drops.
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use http::{HeaderMap, HeaderValue, Method, Response};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest, common::v1::any_value, trace::v1::Span,
};
use prost::Message;

use super::*;

type Received = Arc<Mutex<Vec<ExportTraceServiceRequest>>>;

/// An OTLP/HTTP receiver on loopback: every request decoded, answered 200.
async fn receiver() -> (SocketAddr, Received) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let got: Received = Arc::default();
    let store = got.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let store = store.clone();
            let svc = service_fn(move |req: http::Request<Incoming>| {
                let store = store.clone();
                async move {
                    assert_eq!(req.uri().path(), "/v1/traces");
                    assert_eq!(req.headers()["content-type"], "application/x-protobuf");
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    let decoded = ExportTraceServiceRequest::decode(body).unwrap();
                    store.lock().unwrap().push(decoded);
                    Ok::<_, Infallible>(Response::new(Full::new(bytes::Bytes::new())))
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc),
            );
        }
    });
    (addr, got)
}

fn settings(endpoint: String, sample_ratio: f64) -> TraceSettings {
    TraceSettings {
        otlp_endpoint: endpoint,
        ca_file: None,
        sample_ratio,
        max_queue: 64,
        max_batch: 16,
        export_interval: Duration::from_millis(50),
        export_timeout: Duration::from_secs(2),
    }
}

fn start(settings: &TraceSettings) -> (Traces, TraceCounters) {
    let counters = TraceCounters::default();
    let traces = Traces::start(
        settings,
        ProxyIdentity {
            cluster: "c1",
            instance: "i-1",
        },
        counters.clone(),
    )
    .unwrap();
    (traces, counters)
}

/// (version, trace id, parent id, flags) of a `traceparent`.
fn parse(headers: &HeaderMap) -> (String, String, String, String) {
    let v = headers["traceparent"].to_str().unwrap();
    let parts: Vec<&str> = v.split('-').collect();
    assert_eq!(parts.len(), 4, "{v}");
    (
        parts[0].into(),
        parts[1].into(),
        parts[2].into(),
        parts[3].into(),
    )
}

async fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(t) = f() {
            return t;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn spans(got: &Received) -> Vec<Span> {
    got.lock()
        .unwrap()
        .iter()
        .flat_map(|r| &r.resource_spans)
        .flat_map(|r| &r.scope_spans)
        .flat_map(|s| s.spans.clone())
        .collect()
}

fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.clone())
        .map(|v| match v {
            any_value::Value::StringValue(s) => s,
            any_value::Value::IntValue(i) => i.to_string(),
            other => format!("{other:?}"),
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hops_link_parent_to_child_and_export() {
    let (addr, got) = receiver().await;
    let (traces, counters) = start(&settings(format!("http://{addr}/v1/traces"), 0.0));

    // The task sent a sampled traceparent (and a tracestate): honoured although new
    // traces are not sampled here.
    let client_trace = "0af7651916cd43dd8448eb211c80319c";
    let client_span = "b7ad6b7169203331";
    let mut headers = HeaderMap::new();
    headers.insert(
        "traceparent",
        HeaderValue::from_str(&format!("00-{client_trace}-{client_span}-01")).unwrap(),
    );
    headers.insert("tracestate", HeaderValue::from_static("vendor=x"));
    let mut source = traces.source(&Method::GET, &headers);
    assert!(source.recording());
    source.inject(&mut headers);
    let (version, trace_id, source_id, flags) = parse(&headers);
    assert_eq!((version.as_str(), flags.as_str()), ("00", "01"));
    assert_eq!(trace_id, client_trace);
    assert_ne!(source_id, client_span, "a new parent-id at each hop");
    assert_eq!(headers["tracestate"], "vendor=x", "tracestate carried on");

    let mut dest = traces.destination(&Method::GET, &headers);
    dest.inject(&mut headers);
    let (_, dest_trace, dest_id, _) = parse(&headers);
    assert_eq!(dest_trace, client_trace);
    assert_ne!(dest_id, source_id);
    dest.set([KeyValue::new(attr::SOURCE_TASK, "task-a")]);
    source.set([KeyValue::new(attr::SOURCE_TASK, "task-a")]);
    dest.finish(503, None);
    source.finish(200, None);

    let spans = wait_for("two spans", || {
        let s = spans(&got);
        (s.len() == 2).then_some(s)
    })
    .await;
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let by_id = |id: &str| spans.iter().find(|s| hex(&s.span_id) == id).unwrap();
    let (s, d) = (by_id(&source_id), by_id(&dest_id));
    assert_eq!(hex(&s.parent_span_id), client_span);
    assert_eq!(hex(&d.parent_span_id), source_id);
    assert_eq!(hex(&s.trace_id), client_trace);
    // OTLP kinds: 2 = server, 3 = client.
    assert_eq!((s.kind, d.kind), (3, 2));
    assert_eq!(attr(d, attr::STATUS).as_deref(), Some("503"));
    assert_eq!(attr(s, attr::SOURCE_TASK).as_deref(), Some("task-a"));
    // Status code 2 = error (5xx), 0 = unset.
    assert_eq!(d.status.as_ref().map(|st| st.code), Some(2));
    assert_eq!(s.status.as_ref().map_or(0, |st| st.code), 0);
    let resource = got.lock().unwrap()[0].resource_spans[0]
        .resource
        .clone()
        .unwrap();
    let res_attr = |k: &str| {
        resource
            .attributes
            .iter()
            .find(|kv| kv.key == k)
            .and_then(|kv| kv.value.clone()?.value)
    };
    assert_eq!(
        res_attr(attr::CLUSTER),
        Some(any_value::Value::StringValue("c1".into()))
    );
    assert_eq!(
        res_attr(attr::CONTAINER_INSTANCE),
        Some(any_value::Value::StringValue("i-1".into()))
    );
    assert_eq!(counters.exported.get(), 2);
    assert_eq!(counters.dropped.get(), 0);
    traces.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsampled_traces_propagate_and_export_nothing() {
    let (addr, got) = receiver().await;
    let (traces, counters) = start(&settings(format!("http://{addr}/v1/traces"), 0.0));
    // No traceparent: a new trace, not sampled at ratio 0, still propagated.
    let mut headers = HeaderMap::new();
    let span = traces.source(&Method::POST, &headers);
    assert!(!span.recording());
    span.inject(&mut headers);
    let (_, trace_id, span_id, flags) = parse(&headers);
    assert_eq!(flags, "00");
    assert!(trace_id != "0".repeat(32) && span_id != "0".repeat(16));
    assert!(headers.get("tracestate").is_none(), "no empty tracestate");
    // The next hop follows the caller's decision (not sampled) with a new parent-id.
    let dest = traces.destination(&Method::POST, &headers);
    assert!(!dest.recording());
    dest.inject(&mut headers);
    let (_, next_trace, next_id, next_flags) = parse(&headers);
    assert_eq!((next_trace, next_flags), (trace_id, "00".to_owned()));
    assert_ne!(next_id, span_id);
    dest.finish(200, None);
    span.finish(200, None);
    // A sampled one afterwards is exported alone: the unsampled never reached the queue.
    let mut sampled = HeaderMap::new();
    sampled.insert(
        "traceparent",
        HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
    );
    traces.source(&Method::GET, &sampled).finish(200, None);
    wait_for("the sampled span", || {
        (counters.exported.get() == 1).then_some(())
    })
    .await;
    assert_eq!(spans(&got).len(), 1);
    traces.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_down_drops_and_counts_without_blocking() {
    // A port nothing listens on: bound, then closed.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut s = settings(format!("http://{addr}/v1/traces"), 1.0);
    s.max_queue = 8;
    s.max_batch = 8;
    let (traces, counters) = start(&s);
    let started = Instant::now();
    for _ in 0..100 {
        traces
            .source(&Method::GET, &HeaderMap::new())
            .finish(200, None);
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "ending spans never waits for the exporter"
    );
    wait_for("every span counted as dropped", || {
        (counters.dropped.get() == 100).then_some(())
    })
    .await;
    assert_eq!(counters.exported.get(), 0);
    traces.shutdown();
}
