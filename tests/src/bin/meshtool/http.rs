//! HTTP workloads for the data-path tests: `http-echo` (an application that reports what
//! it received) and `http-probe` (a client that exercises one HTTP feature and reports
//! what came back). Both print JSON; the server prints READY once listening.
use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Body, Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type Out = BoxBody<Bytes, Infallible>;

fn full(b: impl Into<Bytes>) -> Out {
    Full::new(b.into()).boxed()
}

/// FNV-1a: a checksum that proves a body arrived intact, byte for byte.
pub fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Deterministic body of `len` bytes.
pub fn body_bytes(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// Faults `http-echo` injects, for the retry and balancing tests.
#[derive(Clone, Copy, Default)]
pub struct Faults {
    pub fail_percent: u8,
    pub delay: Duration,
}

impl Faults {
    /// Request `n` (from 0) fails when it crosses a multiple of 100/fail_percent: the
    /// failures are spread evenly (30 %: 3 of every 10), not in runs.
    fn fails(&self, n: u64) -> bool {
        let p = u64::from(self.fail_percent);
        (n + 1) * p / 100 > n * p / 100
    }
}

/// `http-echo`: HTTP/1.1 (with upgrades) on every `h1` address, h2c on every `h2` one.
pub fn serve(h1: Vec<SocketAddr>, h2: Vec<SocketAddr>, faults: Faults) -> anyhow::Result<()> {
    let served = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let mut listeners = Vec::new();
        for (addr, is_h2) in h1
            .iter()
            .map(|a| (*a, false))
            .chain(h2.iter().map(|a| (*a, true)))
        {
            listeners.push((tokio::net::TcpListener::bind(addr).await?, addr, is_h2));
        }
        println!("READY");
        let mut tasks = Vec::new();
        for (listener, addr, is_h2) in listeners {
            let served = served.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        continue;
                    };
                    tokio::spawn(connection(tcp, addr, is_h2, faults, served.clone()));
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        Ok(())
    })
}

async fn connection(
    tcp: tokio::net::TcpStream,
    addr: SocketAddr,
    is_h2: bool,
    faults: Faults,
    served: std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let served = served.clone();
        async move {
            let n = served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if !faults.delay.is_zero() {
                tokio::time::sleep(faults.delay).await;
            }
            if faults.fails(n) {
                let _ = req.into_body().collect().await;
                return Ok::<_, Infallible>(
                    Response::builder()
                        .status(StatusCode::SERVICE_UNAVAILABLE)
                        .header("x-served-by", addr.to_string())
                        .body(full("injected 503\n"))
                        .unwrap(),
                );
            }
            Ok::<_, Infallible>(handle(req, addr).await)
        }
    });
    let io = TokioIo::new(tcp);
    if is_h2 {
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(io, svc)
            .await;
    } else {
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(io, svc)
            .with_upgrades()
            .await;
    }
}

async fn handle(mut req: Request<Incoming>, addr: SocketAddr) -> Response<Out> {
    let path = req.uri().path().to_owned();
    if path == "/upgrade" && req.headers().contains_key(header::UPGRADE) {
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let mut up = TokioIo::new(up);
                let mut buf = [0u8; 4096];
                while let Ok(n) = up.read(&mut buf).await {
                    if n == 0 || up.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        return Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::UPGRADE, "websocket")
            .header(header::CONNECTION, "upgrade")
            .body(full(""))
            .unwrap();
    }
    if path == "/chunked" {
        let n: usize = req
            .uri()
            .query()
            .and_then(|q| q.strip_prefix("n="))
            .and_then(|n| n.parse().ok())
            .unwrap_or(10);
        let chunks = (0..n)
            .map(|i| Frame::data(Bytes::from(format!("chunk-{i}\n"))))
            .collect();
        return Response::new(frames(chunks));
    }
    let (parts, body) = req.into_parts();
    let collected = match body.collect().await {
        Ok(c) => c,
        Err(e) => {
            return Response::builder()
                .status(400)
                .body(full(e.to_string()))
                .unwrap();
        }
    };
    let trailers = collected.trailers().cloned();
    let data = collected.to_bytes();
    let report = json!({
        "server": addr.to_string(),
        "method": parts.method.as_str(),
        "path": parts.uri.path_and_query().map(|p| p.as_str()),
        "version": format!("{:?}", parts.version),
        "host": parts.headers.get(header::HOST).and_then(|h| h.to_str().ok())
            .or_else(|| parts.uri.authority().map(|a| a.as_str())),
        "headers": headers_json(&parts.headers),
        "len": data.len(),
        "fnv": fnv(&data),
        "trailers": trailers.as_ref().map(headers_json),
    });
    let body = serde_json::to_vec(&report).unwrap();
    match trailers {
        // gRPC style: answer with trailers of our own.
        Some(t) => {
            let mut out = HeaderMap::new();
            out.insert("grpc-status", "0".parse().unwrap());
            if let Some(v) = t.get("x-request-trailer") {
                out.insert("x-echo-trailer", v.clone());
            }
            Response::new(frames(vec![
                Frame::data(Bytes::from(body)),
                Frame::trailers(out),
            ]))
        }
        None => Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .header("x-served-by", addr.to_string())
            .body(full(body))
            .unwrap(),
    }
}

fn headers_json(h: &HeaderMap) -> Value {
    let m: BTreeMap<String, String> = h
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    json!(m)
}

/// A body of prepared frames, one per poll (so each data frame is its own chunk).
struct Frames(std::collections::VecDeque<Frame<Bytes>>);

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(Ok))
    }
}

fn frames(items: Vec<Frame<Bytes>>) -> Out {
    Frames(items.into()).boxed()
}

/// `http-probe`: one case against `target` (an address the task dials), with `Host`
/// `host`. Prints a JSON report; exits non-zero only for local errors.
pub fn probe(target: SocketAddr, host: &str, case: &str) -> anyhow::Result<Value> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(30), probe_case(target, host, case)).await
    })
    .map_err(|_| anyhow::anyhow!("probe timed out"))?
}

async fn h1(
    target: SocketAddr,
) -> anyhow::Result<hyper::client::conn::http1::SendRequest<BoxBody<Bytes, Infallible>>> {
    let tcp = tokio::net::TcpStream::connect(target).await?;
    let (s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn.with_upgrades());
    Ok(s)
}

async fn response_json(resp: Response<Incoming>) -> anyhow::Result<Value> {
    let status = resp.status().as_u16();
    let headers = headers_json(resp.headers());
    let collected = resp.into_body().collect().await?;
    let trailers = collected.trailers().map(headers_json);
    let bytes = collected.to_bytes();
    let body: Value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    Ok(
        json!({ "status": status, "headers": headers, "body": body, "trailers": trailers, "len": bytes.len() }),
    )
}

async fn probe_case(target: SocketAddr, host: &str, case: &str) -> anyhow::Result<Value> {
    let get = |path: &str| {
        Request::get(path)
            .header(header::HOST, host)
            .body(full(""))
            .unwrap()
    };
    match case {
        // Three requests on one HTTP/1.1 connection.
        "keepalive" => {
            let mut s = h1(target).await?;
            let mut out = Vec::new();
            for p in ["/a", "/b", "/c"] {
                s.ready().await?;
                out.push(response_json(s.send_request(get(p)).await?).await?);
            }
            Ok(json!({ "responses": out }))
        }
        "h2c" => {
            let tcp = tokio::net::TcpStream::connect(target).await?;
            let (mut s, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                    .await?;
            tokio::spawn(conn);
            let req = Request::get(format!("http://{host}/h2"))
                .body(full(""))
                .unwrap();
            Ok(response_json(s.send_request(req).await?).await?)
        }
        "big-body" => {
            let data = body_bytes(1 << 20);
            let sent = json!({ "len": data.len(), "fnv": fnv(&data) });
            let mut s = h1(target).await?;
            let req = Request::post("/upload")
                .header(header::HOST, host)
                .body(full(data))
                .unwrap();
            let mut r = response_json(s.send_request(req).await?).await?;
            r["sent"] = sent;
            Ok(r)
        }
        "chunked" => {
            let mut s = h1(target).await?;
            let resp = s.send_request(get("/chunked?n=50")).await?;
            let te = resp
                .headers()
                .get(header::TRANSFER_ENCODING)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = resp.into_body().collect().await?.to_bytes();
            let expected: String = (0..50).map(|i| format!("chunk-{i}\n")).collect();
            Ok(
                json!({ "transfer_encoding": te, "intact": body == expected.as_bytes(), "len": body.len() }),
            )
        }
        "upgrade" => {
            let mut s = h1(target).await?;
            let req = Request::get("/upgrade")
                .header(header::HOST, host)
                .header(header::UPGRADE, "websocket")
                .header(header::CONNECTION, "upgrade")
                .header("sec-websocket-version", "13")
                .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
                .body(full(""))
                .unwrap();
            let resp = s.send_request(req).await?;
            let status = resp.status().as_u16();
            if status != 101 {
                return Ok(json!({ "status": status }));
            }
            let mut up = TokioIo::new(hyper::upgrade::on(resp).await?);
            // Masked WebSocket text frames ("hello", then 3000 bytes), echoed back as is.
            let mut frames = Vec::new();
            for payload in [b"hello".to_vec(), body_bytes(3000)] {
                frames.push(ws_frame(&payload));
            }
            let mut echoed = Vec::new();
            for f in &frames {
                up.write_all(f).await?;
                let mut got = vec![0u8; f.len()];
                up.read_exact(&mut got).await?;
                echoed.push(got == *f);
            }
            Ok(json!({ "status": status, "frames_echoed": echoed }))
        }
        "trailers" => {
            let tcp = tokio::net::TcpStream::connect(target).await?;
            let (mut s, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                    .await?;
            tokio::spawn(conn);
            let mut t = HeaderMap::new();
            t.insert("x-request-trailer", "done".parse().unwrap());
            // gRPC's shape: one length-prefixed message, then trailers.
            let body = frames(vec![
                Frame::data(Bytes::from_static(b"\x00\x00\x00\x00\x05hello")),
                Frame::trailers(t),
            ]);
            let req = Request::post(format!("http://{host}/pkg.Service/Method"))
                .header(header::CONTENT_TYPE, "application/grpc")
                .header(header::TE, "trailers")
                .body(body)
                .unwrap();
            Ok(response_json(s.send_request(req).await?).await?)
        }
        // Connect and wait for the server's greeting without sending anything.
        "server-first" => {
            let started = Instant::now();
            let mut tcp = tokio::net::TcpStream::connect(target).await?;
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while tcp.read_exact(&mut b).await.is_ok() && b[0] != b'\n' {
                    line.push(b[0]);
                }
            })
            .await;
            Ok(json!({
                "greeting": String::from_utf8_lossy(&line),
                "timed_out": read.is_err(),
                "ms": started.elapsed().as_millis() as u64,
            }))
        }
        other => anyhow::bail!("unknown case {other:?}"),
    }
}

/// A masked client-to-server WebSocket text frame (RFC 6455 §5.2).
fn ws_frame(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x81];
    let mask = [0x12, 0x34, 0x56, 0x78];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}
