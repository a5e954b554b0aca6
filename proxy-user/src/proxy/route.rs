//! One HTTP request of a service, on the outbound side: the balancer picks an endpoint
//! per attempt, failures are retried on another endpoint within the service's retry
//! budget, and the connect / per-try / whole-request timeouts answer 504.
//!
//! What may be retried:
//! - the request never left (no tunnel stream, the destination's health gate or drain
//!   refused it): any method, the application has not seen it;
//! - a retry status (default 502, 503, 504), a reset before the response headers, or a
//!   per-try timeout: only idempotent methods or routes marked retryable;
//! - and only while the body was small enough to keep (`retry_body_limit`).
use std::{
    collections::VecDeque,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as _, Frame, SizeHint};
use tokio::time::Instant;

use super::{Mesh, TunnelError};
use crate::{
    balance::{Outcome, ServiceState},
    config::ServicePolicy,
    discovery::Endpoint,
    identity::SpiffeId,
    l7::{self, Body, Guarded, proxy_error},
    metrics::{EndpointLabels, Metrics, ServiceReasonLabels},
};

/// Destination refusals that mean the application never saw the request.
const NOT_DELIVERED: [&str; 2] = ["not_serving", "drained"];

/// The endpoint that answered (or last failed) a request, in its response's extensions:
/// the source hop's telemetry reports it as the destination.
#[derive(Clone, Debug)]
pub struct Chosen {
    pub addr: std::net::SocketAddr,
    pub family: String,
    pub principal: String,
    /// Attempts the request took (1: no retry).
    pub attempts: u32,
}

/// The request head, kept to build each attempt.
pub struct Head {
    pub method: Method,
    /// `http://authority/path` as sent through the tunnel.
    pub uri: Uri,
    pub headers: HeaderMap,
}

/// A request body: whole in memory (can be sent again) or streamed (once).
enum ReqBody {
    Replay(Bytes),
    Once(Option<Body>),
}

impl ReqBody {
    /// Reads up to `limit` bytes: a body that ends within it is kept whole; otherwise what
    /// was read goes first and the rest streams behind it.
    async fn read(body: Body, limit: usize) -> Result<Self, hyper::Error> {
        if body.is_end_stream() {
            return Ok(Self::Replay(Bytes::new()));
        }
        if body.size_hint().lower() > limit as u64 {
            return Ok(Self::Once(Some(body)));
        }
        let mut body = body;
        let mut read: VecDeque<Frame<Bytes>> = VecDeque::new();
        let mut size = 0usize;
        loop {
            match body.frame().await {
                None => {
                    let mut all = Vec::with_capacity(size);
                    for f in read {
                        if let Ok(d) = f.into_data() {
                            all.extend_from_slice(&d);
                        }
                    }
                    return Ok(Self::Replay(all.into()));
                }
                Some(frame) => {
                    let frame = frame?;
                    let trailers = frame.is_trailers();
                    size += frame.data_ref().map_or(0, Bytes::len);
                    read.push_back(frame);
                    if size > limit || trailers {
                        return Ok(Self::Once(Some(Replayed { read, rest: body }.boxed())));
                    }
                }
            }
        }
    }

    /// Whether another attempt can still send the body (kept whole, or not sent yet).
    fn available(&self) -> bool {
        matches!(self, Self::Replay(_) | Self::Once(Some(_)))
    }

    fn take(&mut self) -> Body {
        match self {
            Self::Replay(b) => Full::new(b.clone()).map_err(|never| match never {}).boxed(),
            Self::Once(b) => b.take().unwrap_or_else(l7::empty),
        }
    }
}

/// Frames already read, then the rest of the body.
struct Replayed {
    read: VecDeque<Frame<Bytes>>,
    rest: Body,
}

impl hyper::body::Body for Replayed {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some(f) = self.read.pop_front() {
            return Poll::Ready(Some(Ok(f)));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.read.is_empty() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut h = self.rest.size_hint();
        let n: u64 = self
            .read
            .iter()
            .filter_map(|f| f.data_ref())
            .map(|d| d.len() as u64)
            .sum();
        h.set_lower(h.lower() + n);
        if let Some(u) = h.upper() {
            h.set_upper(u + n);
        }
        h
    }
}

/// How an attempt failed, and whether the application may have seen the request.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Failed {
    /// Never sent: no tunnel stream, or the destination refused it before the app.
    NotSent(&'static str),
    /// Possibly seen by the application.
    Maybe(&'static str),
}

/// What the flow knows of the task's request and its service.
pub struct Routed<'a> {
    pub mesh: &'a Mesh,
    pub metrics: &'a Metrics,
    pub source: &'a SpiffeId,
    pub service: &'a str,
    pub policy: &'a ServicePolicy,
    pub state: Arc<ServiceState>,
}

impl Routed<'_> {
    fn count(
        &self,
        family: &prometheus_client::metrics::family::Family<
            ServiceReasonLabels,
            prometheus_client::metrics::counter::Counter,
        >,
        reason: &'static str,
    ) {
        family
            .get_or_create(&ServiceReasonLabels {
                service: self.service.to_owned(),
                reason,
            })
            .inc();
    }

    /// Sends the request, balancing and retrying; always answers.
    pub async fn send(&self, head: Head, body: Body) -> Response<Body> {
        let started = Instant::now();
        let deadline = self.policy.request_timeout.map(|t| started + t);
        let work = self.attempts(head, body, deadline);
        match deadline {
            None => work.await,
            Some(at) => match tokio::time::timeout_at(at, work).await {
                Ok(r) => r,
                Err(_) => {
                    self.count(&self.metrics.timeouts, "request");
                    proxy_error(StatusCode::GATEWAY_TIMEOUT, "request_timeout")
                }
            },
        }
    }

    async fn attempts(&self, head: Head, body: Body, deadline: Option<Instant>) -> Response<Body> {
        let retryable = self.policy.retryable(&head.method, head.uri.path());
        // Only a request that may be retried after it was sent is read ahead (a POST
        // streams at once: a gRPC stream waiting for its first answer must not wait on
        // us); any request can still be retried when it never left.
        let mut body = if retryable && self.policy.max_attempts > 1 {
            match ReqBody::read(body, self.policy.retry_body_limit).await {
                Ok(b) => b,
                Err(_) => return proxy_error(StatusCode::BAD_REQUEST, "request_body"),
            }
        } else {
            ReqBody::Once(Some(body))
        };
        self.state.budget.deposit(std::time::Instant::now());
        let mut rng = fastrand::Rng::new();
        let mut tried: Vec<std::net::SocketAddr> = Vec::new();
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let discovery = self.mesh.discovery.load();
            let endpoints = discovery.service(self.service);
            let Some(flight) =
                self.state
                    .pick(endpoints, &tried, std::time::Instant::now(), &mut rng)
            else {
                return proxy_error(StatusCode::SERVICE_UNAVAILABLE, "no_endpoints");
            };
            let Some(ep) = endpoints.iter().find(|e| e.addr == flight.addr()).cloned() else {
                return proxy_error(StatusCode::SERVICE_UNAVAILABLE, "no_endpoints");
            };
            drop(discovery);
            tried.push(ep.addr);
            self.metrics
                .endpoint_requests
                .get_or_create(&EndpointLabels {
                    service: self.service.to_owned(),
                    endpoint: ep.addr.to_string(),
                })
                .inc();
            // The identity the endpoint must prove: rendered once, used for the tunnel
            // stream and reported with the response.
            let expected = self.mesh.expected.for_endpoint(&ep);
            let result = match &expected {
                Some(id) => self.once(&head, &mut body, &ep, id).await,
                None => Err(Failed::NotSent("no_identity")),
            };
            let now = std::time::Instant::now();
            let rtt = now.saturating_duration_since(flight.started());
            let failed = match &result {
                Ok(resp) => match l7::proxy_error_of(resp) {
                    Some(r) if NOT_DELIVERED.contains(&r) => Some(Failed::NotSent("unavailable")),
                    _ if self.policy.retry_statuses.contains(&resp.status().as_u16()) => {
                        Some(Failed::Maybe("status"))
                    }
                    _ => None,
                },
                Err(f) => Some(*f),
            };
            let chosen = Chosen {
                addr: ep.addr,
                attempts: attempt,
                family: ep.family.clone(),
                principal: expected.map(|id| id.to_string()).unwrap_or_default(),
            };
            let Some(failed) = failed else {
                flight.finish(Outcome::Success(rtt), now);
                let mut resp = result.unwrap_or_else(|_| unreachable!("a success is a response"));
                resp.extensions_mut().insert(chosen);
                return resp;
            };
            flight.finish(Outcome::Failure(rtt), now);
            let (may, reason) = match failed {
                Failed::NotSent(r) => (true, r),
                Failed::Maybe(r) => (retryable, r),
            };
            let again = may
                && attempt < self.policy.max_attempts
                && body.available()
                && deadline.is_none_or(|d| Instant::now() < d);
            if again && !self.state.budget.try_withdraw(std::time::Instant::now()) {
                self.count(&self.metrics.retry_budget_exhausted, reason);
                return self.answer(result, chosen);
            }
            if !again {
                return self.answer(result, chosen);
            }
            self.count(&self.metrics.retries, reason);
            tokio::time::sleep(crate::balance::backoff(attempt, &mut rng)).await;
        }
    }

    fn answer(&self, result: Result<Response<Body>, Failed>, chosen: Chosen) -> Response<Body> {
        let mut resp = match result {
            Ok(resp) => resp,
            Err(Failed::NotSent(r) | Failed::Maybe(r)) => {
                let status = match r {
                    "connect_timeout" | "per_try_timeout" => StatusCode::GATEWAY_TIMEOUT,
                    _ => StatusCode::BAD_GATEWAY,
                };
                proxy_error(status, r)
            }
        };
        resp.extensions_mut().insert(chosen);
        resp
    }

    /// One attempt at `ep`: a tunnel stream within the connect timeout, then the response
    /// headers within the per-try timeout.
    async fn once(
        &self,
        head: &Head,
        body: &mut ReqBody,
        ep: &Endpoint,
        expected: &SpiffeId,
    ) -> Result<Response<Body>, Failed> {
        let sender = tokio::time::timeout(
            self.policy.connect_timeout,
            self.mesh.pool.sender(self.source, expected, ep.tunnel),
        )
        .await;
        let (mut sender, lease) = match sender {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                self.metrics.fail(e.reason());
                tracing::debug!(endpoint = %ep.addr, error = %e, "no tunnel stream");
                return Err(Failed::NotSent(connect_reason(&e)));
            }
            Err(_) => {
                self.count(&self.metrics.timeouts, "connect");
                return Err(Failed::NotSent("connect_timeout"));
            }
        };
        let mut req = Request::new(body.take());
        *req.method_mut() = head.method.clone();
        *req.uri_mut() = head.uri.clone();
        *req.version_mut() = Version::HTTP_2;
        *req.headers_mut() = head.headers.clone();
        req.headers_mut().insert(
            l7::TARGET,
            HeaderValue::from_str(&ep.addr.to_string()).expect("an address is a valid value"),
        );
        let sent = sender.send_request(req);
        let resp = match self.policy.per_try_timeout {
            None => sent.await,
            Some(t) => match tokio::time::timeout(t, sent).await {
                Ok(r) => r,
                Err(_) => {
                    self.count(&self.metrics.timeouts, "per_try");
                    return Err(Failed::Maybe("per_try_timeout"));
                }
            },
        };
        match resp {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                l7::strip_hop_by_hop(&mut parts.headers);
                Ok(Response::from_parts(
                    parts,
                    Guarded::wrap(body.boxed(), lease),
                ))
            }
            Err(e) => {
                tracing::debug!(endpoint = %ep.addr, error = %e, "request reset before its response");
                Err(Failed::Maybe("reset"))
            }
        }
    }
}

fn connect_reason(e: &TunnelError) -> &'static str {
    match e {
        TunnelError::Timeout { .. } => "connect_timeout",
        _ => "connect",
    }
}
