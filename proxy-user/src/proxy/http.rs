//! The outbound HTTP path: a task's HTTP/1.x or h2c connection to a meshed endpoint is
//! served here, and each request goes as an HTTP/2 request through the pooled mTLS tunnel
//! to the endpoint's node proxy (see `crate::l7` for the shape). Requests go to the
//! endpoint the task dialled; this path classifies each by service (its authority, or the
//! endpoint's service) for the balancing and telemetry built on it.
//!
//! A request asking for a protocol `Upgrade` (WebSocket) is carried in a CONNECT stream:
//! its head is replayed to the application as HTTP/1.1 and, after `101 Switching
//! Protocols`, the connection continues as opaque bytes both ways.
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, atomic::AtomicU64},
};

use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::{
    Mesh, TunnelError,
    detect::Protocol,
    report::{Logged, Reporter, RequestReport},
    route::{Chosen, Head, Routed},
};

use crate::{
    identity::SpiffeId,
    l7::{self, Body, OrigProto, proxy_error},
    metrics::{Metrics, istio},
    trace::HopSpan,
};

/// Largest request head a task may send (request line + headers); beyond it the client
/// gets 431 (HTTP/1) or a stream reset (h2).
pub const MAX_REQUEST_HEAD: usize = 16 * 1024;
/// Largest response head read from an upgrading application.
const MAX_UPGRADE_HEAD: usize = 64 * 1024;

/// One task connection's route through the mesh.
pub struct HttpFlow {
    pub mesh: Arc<Mesh>,
    pub metrics: Arc<Metrics>,
    pub source: SpiffeId,
    /// The source task and its family (its workload, for telemetry).
    pub source_task: crate::types::TaskId,
    pub source_family: String,
    pub expected: SpiffeId,
    pub tunnel: SocketAddr,
    /// The endpoint the task dialled, and its family.
    pub target: SocketAddr,
    pub target_family: String,
    /// That endpoint's service.
    pub service: String,
}

impl HttpFlow {
    /// Serves the task's connection until it ends, or until `drain` (task stopped).
    pub async fn serve<S>(self: Arc<Self>, io: S, proto: Protocol, drain: CancellationToken)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let this = self.clone();
        let svc = service_fn(move |req: Request<Incoming>| {
            let this = this.clone();
            async move { Ok::<_, Infallible>(this.forward(req).await) }
        });
        let io = TokioIo::new(io);
        let result = match proto {
            Protocol::Http2 => {
                let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .max_header_list_size(MAX_REQUEST_HEAD as u32)
                    .serve_connection(io, svc);
                tokio::pin!(conn);
                tokio::select! {
                    r = conn.as_mut() => r,
                    () = drain.cancelled() => Ok(()),
                }
            }
            _ => {
                let conn = hyper::server::conn::http1::Builder::new()
                    .max_buf_size(MAX_REQUEST_HEAD)
                    .serve_connection(io, svc)
                    .with_upgrades();
                tokio::pin!(conn);
                tokio::select! {
                    r = conn.as_mut() => r,
                    () = drain.cancelled() => Ok(()),
                }
            }
        };
        if let Err(e) = result {
            // Malformed requests (hyper answered 400/431 where it could), resets, ...
            self.metrics.fail("http_protocol");
            tracing::debug!(target = %self.target, error = %e, "task HTTP connection ended with error");
        }
    }

    async fn forward(&self, mut req: Request<Incoming>) -> Response<Body> {
        let started = std::time::Instant::now();
        // The source hop's span: the request leaves naming it as the parent.
        let span = self
            .metrics
            .traces()
            .map(|t| t.source(req.method(), req.headers()).propagate(&mut req));
        let protocol = istio::request_protocol(req.headers());
        let logged = Logged::capture(&self.metrics, &req);
        let service = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                req.headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            })
            .and_then(|a| {
                self.mesh
                    .discovery
                    .load()
                    .service_for_authority(&a)
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| self.service.clone());
        let request_bytes = Arc::<AtomicU64>::default();
        let resp = if req.headers().contains_key(header::UPGRADE)
            && req.version() < http::Version::HTTP_2
        {
            self.upgrade(req).await
        } else {
            self.send(req, &service, request_bytes.clone()).await
        };
        let sizes = self.report(service, protocol, &resp, started.elapsed(), span, logged);
        resp.map(|body| l7::Reported::wrap(body, request_bytes, sizes))
    }

    /// The source hop's telemetry: the destination is the endpoint of the last attempt.
    fn report(
        &self,
        service: String,
        protocol: &'static str,
        resp: &Response<Body>,
        elapsed: std::time::Duration,
        span: Option<HopSpan>,
        logged: Option<Logged>,
    ) -> istio::BodySizes {
        let chosen = resp.extensions().get::<Chosen>();
        let (destination_workload, destination_principal) = match chosen {
            Some(c) => (c.family.clone(), c.principal.clone()),
            None => (self.target_family.clone(), self.expected.to_string()),
        };
        let endpoint = chosen.map_or(self.target, |c| c.addr);
        let report = RequestReport {
            reporter: Reporter::Source,
            cluster: &self.mesh.expected.cluster,
            source_task: self.source_task.as_str(),
            source_workload: self.source_family.clone(),
            source_principal: self.source.to_string(),
            destination_workload,
            destination_principal,
            service,
            protocol,
            status: resp.status().as_u16(),
            proxy_error: l7::proxy_error_of(resp),
            endpoint: Some(endpoint.to_string()),
            original_destination: Some(self.target),
            attempts: Some(chosen.map_or(1, |c| c.attempts)),
            elapsed,
        };
        // The endpoint's task, when discovery knows it (Cloud Map instance ids).
        report.emit(&self.metrics, span, logged, || {
            let discovery = self.mesh.discovery.load();
            let task = discovery.endpoint(endpoint)?.task.as_ref()?;
            Some(task.as_str().to_owned())
        })
    }

    fn tunnel_error(&self, e: &TunnelError) -> Response<Body> {
        let reason = e.reason();
        self.metrics.fail(reason);
        tracing::warn!(target = %self.target, error = %e, "request not delivered");
        proxy_error(StatusCode::BAD_GATEWAY, reason)
    }

    /// A request of `service`: balanced over its endpoints, retried and timed out by its
    /// policy (`route`).
    async fn send(
        &self,
        req: Request<Incoming>,
        service: &str,
        request_bytes: Arc<AtomicU64>,
    ) -> Response<Body> {
        let proto = OrigProto::of(req.version());
        let (mut parts, body) = req.into_parts();
        let body = l7::Metered::new(body, request_bytes).boxed();
        let authority = parts
            .uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                parts
                    .headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| self.target.to_string());
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        let Ok(uri) = format!("http://{authority}{path}").parse() else {
            return proxy_error(StatusCode::BAD_REQUEST, "bad_request");
        };
        l7::strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(header::HOST);
        parts.headers.insert(l7::ORIG_PROTO, proto.header());
        if let Ok(v) = HeaderValue::from_str(&self.source_family) {
            parts.headers.insert(l7::SOURCE_WORKLOAD, v);
        }
        if let Ok(v) = HeaderValue::from_str(self.source_task.as_str()) {
            parts.headers.insert(l7::SOURCE_TASK, v);
        }
        let policy = self.mesh.traffic.policy(service);
        let routed = Routed {
            mesh: &self.mesh,
            metrics: &self.metrics,
            source: &self.source,
            service,
            policy,
            state: self.mesh.balancer.service(service, policy.budget),
        };
        let head = Head {
            method: parts.method,
            uri,
            headers: parts.headers,
        };
        routed.send(head, body).await
    }

    /// `Upgrade` (WebSocket and friends): the request head goes to the application over a
    /// CONNECT stream; after its `101` both connections are spliced.
    async fn upgrade(&self, mut req: Request<Incoming>) -> Response<Body> {
        let (mut stream, lease) = match self
            .mesh
            .pool
            .open(&self.source, &self.expected, self.tunnel, self.target)
            .await
        {
            Ok(x) => x,
            Err(e) => return self.tunnel_error(&e),
        };
        let mut head = format!(
            "{} {} HTTP/1.1\r\n",
            req.method(),
            req.uri().path_and_query().map_or("/", |p| p.as_str())
        )
        .into_bytes();
        for (name, value) in req.headers() {
            head.extend_from_slice(name.as_str().as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        head.extend_from_slice(b"\r\n");
        if stream.write_all(&head).await.is_err() {
            return proxy_error(StatusCode::BAD_GATEWAY, "upstream_connect");
        }
        let Some((status, headers, rest)) = read_response_head(&mut stream).await else {
            return proxy_error(StatusCode::BAD_GATEWAY, "bad_upgrade_response");
        };
        let mut resp = Response::builder().status(status);
        for (name, value) in &headers {
            resp = resp.header(name, value);
        }
        if status != StatusCode::SWITCHING_PROTOCOLS {
            // Refused: hand back what the application sent (bounded), then close.
            let mut body = rest;
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                (&mut stream)
                    .take(MAX_UPGRADE_HEAD as u64)
                    .read_to_end(&mut body),
            )
            .await;
            return resp
                .body(Full::from(body).map_err(|never| match never {}).boxed())
                .unwrap_or_else(|_| proxy_error(StatusCode::BAD_GATEWAY, "bad_upgrade_response"));
        }
        let client = hyper::upgrade::on(&mut req);
        let target = self.target;
        tokio::spawn(async move {
            let _lease = lease;
            match client.await {
                Ok(up) => {
                    let mut up = TokioIo::new(up);
                    if up.write_all(&rest).await.is_ok()
                        && let Err(e) = tokio::io::copy_bidirectional(&mut up, &mut stream).await
                    {
                        tracing::debug!(%target, error = %e, "upgraded connection ended with error");
                    }
                }
                Err(e) => tracing::debug!(%target, error = %e, "client upgrade failed"),
            }
        });
        resp.body(l7::empty())
            .unwrap_or_else(|_| proxy_error(StatusCode::BAD_GATEWAY, "bad_upgrade_response"))
    }
}

type ResponseHead = (StatusCode, Vec<(http::HeaderName, HeaderValue)>, Vec<u8>);

/// Reads an HTTP/1 response head; returns it and the bytes read past it.
async fn read_response_head<S: AsyncRead + Unpin>(stream: &mut S) -> Option<ResponseHead> {
    let mut buf = Vec::with_capacity(1024);
    let read = async {
        loop {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut parsed = httparse::Response::new(&mut headers);
            match parsed.parse(&buf) {
                Ok(httparse::Status::Complete(len)) => {
                    let status = StatusCode::from_u16(parsed.code?).ok()?;
                    let headers = parsed
                        .headers
                        .iter()
                        .filter_map(|h| {
                            Some((
                                http::HeaderName::from_bytes(h.name.as_bytes()).ok()?,
                                HeaderValue::from_bytes(h.value).ok()?,
                            ))
                        })
                        .collect();
                    return Some((status, headers, buf[len..].to_vec()));
                }
                Ok(httparse::Status::Partial) if buf.len() < MAX_UPGRADE_HEAD => continue,
                _ => return None,
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), read)
        .await
        .ok()
        .flatten()
}
