//! What both node proxies share for HTTP through the tunnel.
//!
//! Shape (Linkerd's): the source proxy terminates the task's HTTP/1.x or h2c connection
//! and sends each request as an HTTP/2 request over the pooled mTLS connection to the
//! destination's node proxy — the same connections that carry CONNECT streams — with two
//! headers of ours: `ecsmesh-target` (the endpoint, `ip:port`) and `ecsmesh-orig-proto`
//! (`HTTP/1.1`, `HTTP/1.0` or `h2`). The destination proxy checks the request like a
//! CONNECT (local endpoint, identity, authorization, health gate), then speaks the
//! original protocol to the application. Both proxies see every request (telemetry,
//! retries and per-request balancing build on that), requests of many task connections
//! share one multiplexed connection, and a response a proxy generated carries
//! `ecsmesh-proxy-error: <reason>` so it is never mistaken for the application's.
use std::{
    collections::HashMap,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full, combinators::BoxBody};
use hyper::body::{Frame, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo};

mod metered;
pub use metered::{Metered, Reported};

pub type Body = BoxBody<Bytes, hyper::Error>;

pub const PROXY_ERROR: HeaderName = HeaderName::from_static("ecsmesh-proxy-error");
pub const TARGET: HeaderName = HeaderName::from_static("ecsmesh-target");
pub const ORIG_PROTO: HeaderName = HeaderName::from_static("ecsmesh-orig-proto");
/// The source task's family, for the destination hop's telemetry (its workload label);
/// the identity itself comes from the peer certificate, never from a header.
pub const SOURCE_WORKLOAD: HeaderName = HeaderName::from_static("ecsmesh-source-workload");
/// The source task's ECS task ID, for the destination hop's access log.
pub const SOURCE_TASK: HeaderName = HeaderName::from_static("ecsmesh-source-task");

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A response the proxy made itself: `status`, `ecsmesh-proxy-error: reason`, the reason
/// as a one-line body.
/// The reason of a proxy-made answer (`ecsmesh-proxy-error`), `None` for the
/// application's.
pub fn proxy_error_of<B>(resp: &Response<B>) -> Option<&str> {
    resp.headers()
        .get(&PROXY_ERROR)
        .and_then(|v| v.to_str().ok())
}

pub fn proxy_error(status: StatusCode, reason: &'static str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(PROXY_ERROR, reason)
        .header(header::CONTENT_TYPE, "text/plain")
        .body(
            Full::new(Bytes::from(format!("ecsmesh: {reason}\n")))
                .map_err(|never| match never {})
                .boxed(),
        )
        .expect("static response parts are valid")
}

/// The protocol the task spoke, so the destination proxy speaks it to the application.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OrigProto {
    Http10,
    Http11,
    H2,
}

impl OrigProto {
    pub fn of(version: http::Version) -> Self {
        match version {
            http::Version::HTTP_2 => Self::H2,
            http::Version::HTTP_10 | http::Version::HTTP_09 => Self::Http10,
            _ => Self::Http11,
        }
    }

    pub fn header(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            Self::Http10 => "HTTP/1.0",
            Self::Http11 => "HTTP/1.1",
            Self::H2 => "h2",
        })
    }

    pub fn parse(v: &HeaderValue) -> Option<Self> {
        match v.as_bytes() {
            b"HTTP/1.0" => Some(Self::Http10),
            b"HTTP/1.1" => Some(Self::Http11),
            b"h2" => Some(Self::H2),
            _ => None,
        }
    }

    pub fn version(self) -> http::Version {
        match self {
            Self::Http10 => http::Version::HTTP_10,
            Self::Http11 => http::Version::HTTP_11,
            Self::H2 => http::Version::HTTP_2,
        }
    }
}

/// Removes the headers that describe one hop's connection (RFC 9110 §7.6.1), which an
/// HTTP/2 hop must not carry; `te: trailers` survives (gRPC needs it).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::try_from(n.trim()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        headers.remove(name);
    }
    if headers
        .get(header::TE)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        headers.remove(header::TE);
    }
}

/// A body that holds `guard` until it ends (a tunnel stream slot, for one).
pub struct Guarded<G, B = Body> {
    inner: B,
    _guard: G,
}

impl<G: Send + Sync + Unpin + 'static> Guarded<G> {
    pub fn wrap<B>(inner: B, guard: G) -> Body
    where
        B: hyper::body::Body<Data = Bytes, Error = hyper::Error> + Send + Sync + Unpin + 'static,
    {
        Guarded {
            inner,
            _guard: guard,
        }
        .boxed()
    }
}

impl<G: Unpin, B> hyper::body::Body for Guarded<G, B>
where
    B: hyper::body::Body<Data = Bytes, Error = hyper::Error> + Unpin,
{
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Connections from the destination proxy to local applications, per (endpoint,
/// protocol): HTTP/1 connections are reused one request at a time, an h2 connection is
/// shared by all requests.
#[derive(Default)]
pub struct AppClients {
    idle: Mutex<HashMap<(SocketAddr, OrigProto), Vec<AppSender>>>,
}

enum AppSender {
    H1(hyper::client::conn::http1::SendRequest<Body>),
    H2(hyper::client::conn::http2::SendRequest<Body>),
}

impl AppSender {
    fn usable(&self) -> bool {
        match self {
            Self::H1(s) => s.is_ready(),
            Self::H2(s) => s.is_ready(),
        }
    }
}

/// Returns an HTTP/1 connection to the pool when the response body that used it is done.
struct ParkWhenReady {
    pool: Arc<AppClients>,
    key: (SocketAddr, OrigProto),
    sender: Option<hyper::client::conn::http1::SendRequest<Body>>,
}

impl Drop for ParkWhenReady {
    fn drop(&mut self) {
        let Some(mut s) = self.sender.take() else {
            return;
        };
        let (pool, key) = (self.pool.clone(), self.key);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if s.ready().await.is_ok() {
                    pool.park(key, s);
                }
            });
        }
    }
}

/// Why a request could not reach the application.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("connect {0}: {1}")]
    Connect(SocketAddr, std::io::Error),
    #[error("connect {0}: timed out")]
    ConnectTimeout(SocketAddr),
    #[error("{0}: {1}")]
    Http(SocketAddr, hyper::Error),
}

impl AppClients {
    /// Sends `req` to the application at `target` in `proto`.
    pub async fn send(
        self: &Arc<Self>,
        target: SocketAddr,
        proto: OrigProto,
        mut req: Request<Body>,
    ) -> Result<Response<Body>, AppError> {
        *req.version_mut() = proto.version();
        let key = (target, proto);
        let pooled = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            let list = idle.entry(key).or_default();
            list.retain(AppSender::usable);
            match proto {
                OrigProto::H2 => list.first().map(|s| match s {
                    AppSender::H2(s) => AppSender::H2(s.clone()),
                    AppSender::H1(_) => unreachable!("h2 key holds h2 senders"),
                }),
                _ => list.pop(),
            }
        };
        let sender = match pooled {
            Some(s) => s,
            None => self.connect(target, proto).await?,
        };
        let http = |e| AppError::Http(target, e);
        match sender {
            AppSender::H1(mut s) => {
                let resp = s.send_request(req).await.map_err(http)?;
                // The connection takes the next request once this response's body has been
                // read: park it then (HTTP/1.0 connections close after one exchange).
                let park = (proto != OrigProto::Http10).then(|| ParkWhenReady {
                    pool: self.clone(),
                    key,
                    sender: Some(s),
                });
                Ok(resp.map(|b| Guarded::wrap(b.boxed(), park)))
            }
            AppSender::H2(mut s) => {
                Ok(s.send_request(req).await.map_err(http)?.map(BodyExt::boxed))
            }
        }
    }

    fn park(&self, key: (SocketAddr, OrigProto), s: hyper::client::conn::http1::SendRequest<Body>) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.entry(key).or_default();
        // Bounded: a burst of parallel requests leaves at most this many idle connections.
        if list.len() < 64 {
            list.push(AppSender::H1(s));
        }
    }

    async fn connect(&self, target: SocketAddr, proto: OrigProto) -> Result<AppSender, AppError> {
        let tcp = tokio::time::timeout(
            crate::copy::UPSTREAM_CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect(target),
        )
        .await
        .map_err(|_| AppError::ConnectTimeout(target))?
        .map_err(|e| AppError::Connect(target, e))?;
        let _ = tcp.set_nodelay(true);
        let io = TokioIo::new(tcp);
        let http = |e| AppError::Http(target, e);
        Ok(match proto {
            OrigProto::H2 => {
                let (s, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                    .handshake(io)
                    .await
                    .map_err(http)?;
                tokio::spawn(conn);
                let s2 = s.clone();
                self.idle
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry((target, proto))
                    .or_default()
                    .push(AppSender::H2(s2));
                AppSender::H2(s)
            }
            _ => {
                let (s, conn) = hyper::client::conn::http1::Builder::new()
                    .handshake(io)
                    .await
                    .map_err(http)?;
                tokio::spawn(conn.with_upgrades());
                AppSender::H1(s)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_and_te_trailers_stays() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, x-hop".parse().unwrap());
        h.insert("x-hop", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert(header::TE, "trailers".parse().unwrap());
        h.insert("x-app", "kept".parse().unwrap());
        strip_hop_by_hop(&mut h);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(h.contains_key(header::TE) && h.contains_key("x-app"));
        h.insert(header::TE, "gzip".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert!(!h.contains_key(header::TE));
    }

    #[test]
    fn orig_proto_round_trips_through_its_header() {
        for p in [OrigProto::Http10, OrigProto::Http11, OrigProto::H2] {
            assert_eq!(OrigProto::parse(&p.header()), Some(p));
            assert_eq!(OrigProto::of(p.version()), p);
        }
        assert_eq!(OrigProto::parse(&HeaderValue::from_static("spdy")), None);
    }
}
