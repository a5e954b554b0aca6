//! `http-requests`: a fixed number of HTTP/1.1 requests at a fixed rate over keep-alive
//! connections, for the retry, balancing and traffic-shifting tests. Reports what the
//! client saw: statuses, proxy-made errors (`ecsmesh-proxy-error`), which server answered
//! (`x-served-by`), latency percentiles.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

pub struct Plan {
    pub target: SocketAddr,
    pub count: u64,
    pub rate: f64,
    pub method: String,
    pub host: String,
    pub connections: usize,
    pub max: Duration,
    /// Extra request headers (`name: value`).
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// Report each response body (parsed as JSON), in the order the answers came.
    pub keep_bodies: bool,
}

#[derive(Default)]
struct Seen {
    statuses: BTreeMap<u16, u64>,
    proxy_errors: BTreeMap<String, u64>,
    servers: BTreeMap<String, u64>,
    /// Send errors (connection failed or closed under the request).
    errors: u64,
    latencies_us: Vec<u64>,
    bodies: Vec<Value>,
}

pub fn run(plan: Plan) -> anyhow::Result<Value> {
    let method = Method::from_bytes(plan.method.as_bytes())?;
    anyhow::ensure!(plan.rate > 0.0, "--rate must be positive");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    rt.block_on(async {
        let mut workers = Vec::new();
        for _ in 0..plan.connections.max(1) {
            let (seen, next, method, host) = (
                seen.clone(),
                next.clone(),
                method.clone(),
                plan.host.clone(),
            );
            let (target, count, rate, max) = (plan.target, plan.count, plan.rate, plan.max);
            let (headers, keep) = (plan.headers.clone(), plan.keep_bodies);
            workers.push(tokio::spawn(async move {
                let mut sender = None;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count || start.elapsed() > max {
                        return;
                    }
                    let due = start + Duration::from_secs_f64(i as f64 / rate);
                    tokio::time::sleep_until(due.into()).await;
                    let mut req = Request::builder()
                        .method(method.clone())
                        .uri(format!("/r/{i}"))
                        .header(http::header::HOST, &host)
                        .body(Full::new(Bytes::from_static(b"x")))
                        .expect("valid request");
                    for (name, value) in &headers {
                        req.headers_mut().append(name.clone(), value.clone());
                    }
                    let t = Instant::now();
                    let result = send(&mut sender, target, req).await;
                    let mut s = seen.lock().unwrap();
                    match result {
                        Ok((status, proxy_error, served_by, body)) => {
                            if keep {
                                s.bodies.push(
                                    serde_json::from_slice(&body)
                                        .unwrap_or_else(|_| json!(String::from_utf8_lossy(&body))),
                                );
                            }
                            *s.statuses.entry(status).or_default() += 1;
                            if let Some(r) = proxy_error {
                                *s.proxy_errors.entry(r).or_default() += 1;
                            }
                            if let Some(by) = served_by {
                                *s.servers.entry(by).or_default() += 1;
                            }
                            s.latencies_us.push(t.elapsed().as_micros() as u64);
                        }
                        Err(_) => {
                            s.errors += 1;
                            sender = None;
                        }
                    }
                }
            }));
        }
        for w in workers {
            let _ = w.await;
        }
    });
    let mut s = std::mem::take(&mut *seen.lock().unwrap());
    s.latencies_us.sort_unstable();
    let pct = |p: f64| -> u64 {
        if s.latencies_us.is_empty() {
            return 0;
        }
        let i = ((s.latencies_us.len() as f64 * p).ceil() as usize).saturating_sub(1);
        s.latencies_us[i.min(s.latencies_us.len() - 1)]
    };
    let ok: u64 = s
        .statuses
        .iter()
        .filter(|(c, _)| (200..300).contains(*c))
        .map(|(_, n)| n)
        .sum();
    Ok(json!({
        "sent": s.statuses.values().sum::<u64>() + s.errors,
        "ok": ok,
        "errors": s.errors,
        "statuses": s.statuses,
        "proxy_errors": s.proxy_errors,
        "servers": s.servers,
        "p50_us": pct(0.5),
        "p99_us": pct(0.99),
        "max_us": s.latencies_us.last().copied().unwrap_or(0),
        "elapsed_ms": start.elapsed().as_millis() as u64,
        "bodies": s.bodies,
    }))
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// Sends on the kept connection, opening one when there is none (or it closed).
async fn send(
    sender: &mut Option<Sender>,
    target: SocketAddr,
    req: Request<Full<Bytes>>,
) -> anyhow::Result<(u16, Option<String>, Option<String>, Bytes)> {
    if sender.as_ref().is_none_or(|s| s.is_closed()) {
        let tcp = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect(target),
        )
        .await??;
        tcp.set_nodelay(true)?;
        let (s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        *sender = Some(s);
    }
    let s = sender.as_mut().expect("set above");
    s.ready().await?;
    let resp = tokio::time::timeout(Duration::from_secs(30), s.send_request(req)).await??;
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (status, proxy_error, served_by) = (
        resp.status().as_u16(),
        header("ecsmesh-proxy-error"),
        header("x-served-by"),
    );
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, proxy_error, served_by, body))
}
