//! Inbound side (port 15008): verifies the caller's workload certificate, then serves
//! HTTP/2 CONNECT streams — only to endpoints of tasks enrolled on this instance (never an
//! open relay) and only where the authorization policy allows.
use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use http_body_util::BodyExt;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{
    HANDSHAKE_TIMEOUT, MAX_HEADER_LIST,
    admission::{Admission, Admitted, Denied},
    handshake_reason,
};
use crate::{
    copy,
    identity::{IdentityManager, SpiffeId, peer_identity},
    l7::{self, AppClients, Body, OrigProto, proxy_error},
    metrics::{HandshakeLabels, HttpLabels, Metrics, StreamLabels},
    types::normalise,
};

pub struct Inbound {
    pub identities: Arc<IdentityManager>,
    /// Tasks enrolled here (the identities this instance may present), discovery, policy.
    pub admission: Admission,
    pub metrics: Arc<Metrics>,
    pub socket_mark: u32,
    pub stream_cap: usize,
    /// Connections to local applications for HTTP requests.
    pub apps: Arc<AppClients>,
}

fn status(code: StatusCode) -> Response<Body> {
    Response::builder()
        .status(code)
        .body(l7::empty())
        .expect("valid response")
}

impl Inbound {
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) {
        let acceptor = TlsAcceptor::from(self.identities.server_config());
        loop {
            let (tcp, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "inbound accept failed");
                        continue;
                    }
                },
                () = shutdown.cancelled() => return,
            };
            let this = self.clone();
            let acceptor = acceptor.clone();
            let shutdown = shutdown.clone();
            tracker.spawn(async move { this.connection(acceptor, tcp, peer, shutdown).await });
        }
    }

    async fn connection(
        self: Arc<Self>,
        acceptor: TlsAcceptor,
        tcp: TcpStream,
        peer: SocketAddr,
        shutdown: CancellationToken,
    ) {
        // Without TCP_NODELAY, Nagle holds a small TLS record until the previous one is
        // acknowledged — and the peer delays that ACK until it has something to send, so
        // each response waited for the next request on the connection.
        let _ = tcp.set_nodelay(true);
        let Ok(local) = tcp.local_addr() else { return };
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                let reason = handshake_reason(&e);
                self.metrics.reject("server", reason);
                tracing::warn!(%peer, reason, error = %e, "tunnel handshake rejected");
                return;
            }
            Err(_) => {
                self.metrics.reject("server", "timeout");
                tracing::warn!(%peer, "tunnel handshake timed out");
                return;
            }
        };
        let (_, session) = tls.get_ref();
        let source = session.peer_certificates().and_then(peer_identity);
        let served = session
            .server_name()
            .and_then(|sni| self.admission.tasks.family_for_sni(sni));
        let (Some(source), Some((served_id, served_family))) = (source, served) else {
            // Unreachable with our verifier and resolver, but never serve an anonymous peer.
            self.metrics.reject("server", "no_certificate");
            return;
        };
        self.metrics
            .handshakes
            .get_or_create(&HandshakeLabels {
                role: "server",
                source_identity: source.to_string(),
                destination_identity: served_id.to_string(),
            })
            .inc();
        let this = self.clone();
        let svc = service_fn(move |req| {
            let this = this.clone();
            let (source, family) = (source.clone(), served_family.clone());
            async move { Ok::<_, Infallible>(this.stream(req, source, family, local).await) }
        });
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .max_concurrent_streams(self.stream_cap as u32)
            .max_header_list_size(MAX_HEADER_LIST)
            .serve_connection(TokioIo::new(tls), svc);
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => if let Err(e) = r { tracing::debug!(%peer, error = %e, "tunnel connection ended") },
            () = shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
        }
    }

    /// One stream: a CONNECT (opaque bytes to the endpoint) or an HTTP request.
    async fn stream(
        &self,
        req: Request<Incoming>,
        source: SpiffeId,
        family: String,
        local: SocketAddr,
    ) -> Response<Body> {
        if req.method() != Method::CONNECT {
            return self.request(req, source, family, local).await;
        }
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_default();
        let Ok(target) = authority.parse::<SocketAddr>() else {
            self.metrics.reject("server", "bad_target");
            return status(StatusCode::BAD_REQUEST);
        };
        let Admitted { ep, drain } = match self.admission.admit(target, &source, &family, local) {
            Ok(a) => a,
            Err(Denied(code, reason)) => return proxy_error(code, reason),
        };
        let target = normalise(target);
        let upstream = match copy::connect_marked(target, self.socket_mark).await {
            Ok(s) => s,
            Err(e) => {
                self.metrics.reject("server", "upstream_connect");
                tracing::warn!(%target, error = %e, "tunnel upstream connect failed");
                return status(StatusCode::BAD_GATEWAY);
            }
        };
        let labels = StreamLabels {
            source_identity: source.to_string(),
            destination_family: ep.family.clone(),
        };
        self.metrics.inbound_streams.get_or_create(&labels).inc();
        let sent = self.metrics.inbound_to_task.get_or_create(&labels).clone();
        let received = self
            .metrics
            .inbound_from_task
            .get_or_create(&labels)
            .clone();
        tokio::spawn(async move {
            match hyper::upgrade::on(req).await {
                Ok(up) => {
                    let copy = copy::bidirectional(TokioIo::new(up), upstream, &sent, &received);
                    tokio::select! {
                        r = copy => if let Err(e) = r {
                            tracing::debug!(%target, error = %e, "tunnel stream ended with error");
                        },
                        () = drain.cancelled() => tracing::debug!(%target, "task stopped: stream drained"),
                    }
                }
                Err(e) => tracing::debug!(%target, error = %e, "CONNECT upgrade failed"),
            }
        });
        status(StatusCode::OK)
    }

    /// An HTTP request from a source proxy, counted with its response.
    async fn request(
        &self,
        req: Request<Incoming>,
        source: SpiffeId,
        family: String,
        local: SocketAddr,
    ) -> Response<Body> {
        let (service, resp) = self.forward(req, source, family, local).await;
        self.metrics
            .http_requests
            .get_or_create(&HttpLabels {
                side: "inbound",
                service,
                response_code: resp.status().as_u16(),
                proxy_error: resp.headers().contains_key(&l7::PROXY_ERROR),
            })
            .inc();
        resp
    }

    /// Checked like a CONNECT, then sent to the application in the protocol the task
    /// spoke (`ecsmesh-orig-proto`). Returns the endpoint's service ("" when refused
    /// before it is known) and the response.
    async fn forward(
        &self,
        req: Request<Incoming>,
        source: SpiffeId,
        family: String,
        local: SocketAddr,
    ) -> (String, Response<Body>) {
        let header = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
        let target = header(&l7::TARGET).and_then(|t| t.parse::<SocketAddr>().ok());
        let proto = req
            .headers()
            .get(&l7::ORIG_PROTO)
            .and_then(OrigProto::parse);
        let (Some(target), Some(proto)) = (target, proto) else {
            self.metrics.reject("server", "bad_target");
            return (
                String::new(),
                proxy_error(StatusCode::BAD_REQUEST, "bad_target"),
            );
        };
        let Admitted { ep, drain } = match self.admission.admit(target, &source, &family, local) {
            Ok(a) => a,
            Err(Denied(code, reason)) => return (String::new(), proxy_error(code, reason)),
        };
        let (mut parts, body) = req.into_parts();
        parts.headers.remove(&l7::TARGET);
        parts.headers.remove(&l7::ORIG_PROTO);
        if proto != OrigProto::H2 {
            // HTTP/1: origin-form target, the authority back in `Host`.
            if let Some(authority) = parts.uri.authority().cloned()
                && !parts.headers.contains_key(hyper::header::HOST)
                && let Ok(v) = authority.as_str().parse()
            {
                parts.headers.insert(hyper::header::HOST, v);
            }
            let origin = parts
                .uri
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/")
                .to_owned();
            parts.uri = origin
                .parse()
                .unwrap_or_else(|_| "/".parse().expect("valid"));
        }
        let labels = StreamLabels {
            source_identity: source.to_string(),
            destination_family: ep.family.clone(),
        };
        self.metrics.inbound_streams.get_or_create(&labels).inc();
        let req = Request::from_parts(parts, body.boxed());
        let sent = tokio::select! {
            r = self.apps.send(normalise(target), proto, req) => r,
            () = drain.cancelled() => {
                return (ep.service, proxy_error(StatusCode::SERVICE_UNAVAILABLE, "drained"));
            }
        };
        let resp = match sent {
            Ok(mut resp) => {
                l7::strip_hop_by_hop(resp.headers_mut());
                resp
            }
            Err(e) => {
                self.metrics.reject("server", "upstream_connect");
                tracing::warn!(%target, error = %e, "request to the application failed");
                proxy_error(StatusCode::BAD_GATEWAY, "upstream_connect")
            }
        };
        (ep.service, resp)
    }
}
