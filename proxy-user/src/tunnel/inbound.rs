//! Inbound side (port 15008): verifies the caller's workload certificate, then serves
//! HTTP/2 CONNECT streams — only to endpoints of tasks enrolled on this instance (never an
//! open relay) and only where the authorization policy allows.
use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::Empty;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{HANDSHAKE_TIMEOUT, MAX_HEADER_LIST, handshake_reason};
use crate::{
    authz::Policy,
    copy,
    discovery::Discovery,
    identity::{IdentityManager, SpiffeId, peer_identity},
    metrics::{HandshakeLabels, Metrics, StreamLabels},
    tasks::TaskTable,
    types::normalise,
};

pub struct Inbound {
    pub identities: Arc<IdentityManager>,
    /// Tasks enrolled here: which identities this instance may present, and whether the
    /// task behind an endpoint takes new connections.
    pub tasks: Arc<TaskTable>,
    pub discovery: Arc<ArcSwap<Discovery>>,
    pub policy: Policy,
    pub metrics: Arc<Metrics>,
    pub socket_mark: u32,
    pub stream_cap: usize,
}

fn status(code: StatusCode) -> Response<Empty<Bytes>> {
    Response::builder()
        .status(code)
        .body(Empty::new())
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
            .and_then(|sni| self.tasks.family_for_sni(sni));
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

    fn deny(
        &self,
        reason: &'static str,
        source: &SpiffeId,
        target: &str,
        family: &str,
    ) -> Response<Empty<Bytes>> {
        self.metrics.reject("server", reason);
        tracing::warn!(source_identity = %source, destination_family = family, %target, reason, "tunnel stream denied");
        status(StatusCode::FORBIDDEN)
    }

    /// One CONNECT stream. `family` is the task family whose identity this TLS connection
    /// presented: the target must be an endpoint of that family, so a client can never
    /// verify one workload and reach another.
    async fn stream(
        &self,
        req: Request<Incoming>,
        source: SpiffeId,
        family: String,
        local: SocketAddr,
    ) -> Response<Empty<Bytes>> {
        if req.method() != Method::CONNECT {
            return status(StatusCode::METHOD_NOT_ALLOWED);
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
        let target = normalise(target);
        let local_ip = normalise(local).ip();
        let discovery = self.discovery.load();
        let Some(ep) = discovery
            .endpoint(target)
            .filter(|ep| normalise(ep.tunnel).ip() == local_ip)
        else {
            return self.deny("not_local_endpoint", &source, &authority, &family);
        };
        if ep.family != family {
            return self.deny("identity_mismatch", &source, &authority, &ep.family);
        }
        if !self.policy.allows(&source, &ep.family, target.port()) {
            return self.deny("authorization_denied", &source, &authority, &ep.family);
        }
        // Health gate: a task that is starting, unhealthy or stopping takes no new streams.
        if !self.tasks.serving(&ep.family, ep.task.as_ref()) {
            self.metrics.reject("server", "not_serving");
            tracing::info!(source_identity = %source, %target, family = %ep.family, "endpoint not serving (health gate)");
            return status(StatusCode::SERVICE_UNAVAILABLE);
        }
        let drain = ep
            .task
            .as_ref()
            .and_then(|id| self.tasks.find(id))
            .map(|(_, t)| t.drain.clone())
            .unwrap_or_default();
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
}
