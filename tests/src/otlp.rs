//! An OTLP/HTTP trace receiver for the traces tests: listens inside a harness netns,
//! decodes every `ExportTraceServiceRequest` with the official proto definitions
//! (`opentelemetry-proto`), answers 200, and keeps the spans.
use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{KeyValue, any_value},
};
use prost::Message;

use crate::netns::Netns;

/// One received span, ids in lowercase hex as in `traceparent`.
#[derive(Clone, Debug)]
pub struct ReceivedSpan {
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub name: String,
    /// OTLP kinds: 2 server, 3 client.
    pub kind: i32,
    /// OTLP status codes: 0 unset, 1 ok, 2 error.
    pub status: i32,
    pub attributes: BTreeMap<String, String>,
    /// The exporting proxy's resource attributes.
    pub resource: BTreeMap<String, String>,
}

impl ReceivedSpan {
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

pub struct OtlpReceiver {
    pub addr: SocketAddr,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    /// Requests that were not a decodable OTLP export (answered 400).
    pub bad: Arc<Mutex<Vec<String>>>,
    rt: Option<tokio::runtime::Runtime>,
}

impl OtlpReceiver {
    /// Listens on `addr` inside `netns`.
    pub fn start(netns: &Netns, addr: SocketAddr) -> Self {
        let listener =
            netns.run(move || std::net::TcpListener::bind(addr).expect("bind OTLP receiver"));
        listener.set_nonblocking(true).expect("nonblocking");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("receiver runtime");
        let spans: Arc<Mutex<Vec<ReceivedSpan>>> = Arc::default();
        let bad: Arc<Mutex<Vec<String>>> = Arc::default();
        let (store, bad_store) = (spans.clone(), bad.clone());
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            while let Ok((tcp, _)) = listener.accept().await {
                let (store, bad) = (store.clone(), bad_store.clone());
                let svc = service_fn(move |req: Request<Incoming>| {
                    let (store, bad) = (store.clone(), bad.clone());
                    async move { Ok::<_, Infallible>(receive(req, &store, &bad).await) }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc),
                );
            }
        });
        Self {
            addr,
            spans,
            bad,
            rt: Some(rt),
        }
    }

    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().unwrap().clone()
    }

    /// Closes the listener and every connection: the collector is down.
    pub fn stop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(std::time::Duration::from_secs(5));
        }
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn receive(
    req: Request<Incoming>,
    store: &Mutex<Vec<ReceivedSpan>>,
    bad: &Mutex<Vec<String>>,
) -> Response<Full<bytes::Bytes>> {
    let answer = |code: u16| {
        Response::builder()
            .status(code)
            .header("content-type", "application/x-protobuf")
            .body(Full::new(bytes::Bytes::new()))
            .expect("valid response")
    };
    let ok_shape = req.method() == hyper::Method::POST
        && req.uri().path() == "/v1/traces"
        && req
            .headers()
            .get("content-type")
            .is_some_and(|v| v == "application/x-protobuf");
    let what = format!("{} {} {:?}", req.method(), req.uri(), req.headers());
    let Ok(body) = req.into_body().collect().await else {
        bad.lock().unwrap().push(format!("{what}: body"));
        return answer(400);
    };
    let decoded = match ExportTraceServiceRequest::decode(body.to_bytes()) {
        Ok(d) if ok_shape => d,
        Ok(_) => {
            bad.lock().unwrap().push(what);
            return answer(400);
        }
        Err(e) => {
            bad.lock().unwrap().push(format!("{what}: {e}"));
            return answer(400);
        }
    };
    let mut out = Vec::new();
    for rs in decoded.resource_spans {
        let resource = rs
            .resource
            .map(|r| attributes(&r.attributes))
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for s in ss.spans {
                out.push(ReceivedSpan {
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: hex(&s.parent_span_id),
                    name: s.name,
                    kind: s.kind,
                    status: s.status.map_or(0, |st| st.code),
                    attributes: attributes(&s.attributes),
                    resource: resource.clone(),
                });
            }
        }
    }
    store.lock().unwrap().extend(out);
    answer(200)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .filter_map(|kv| {
            let v = match kv.value.as_ref()?.value.as_ref()? {
                any_value::Value::StringValue(s) => s.clone(),
                any_value::Value::IntValue(i) => i.to_string(),
                any_value::Value::BoolValue(b) => b.to_string(),
                any_value::Value::DoubleValue(d) => d.to_string(),
                other => format!("{other:?}"),
            };
            Some((kv.key.clone(), v))
        })
        .collect()
}
