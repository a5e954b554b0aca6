//! Inbound side (port 15008): verifies the caller's workload certificate, then serves
//! HTTP/2 CONNECT streams — only to endpoints of tasks enrolled on this instance (never an
//! open relay) and only where the authorization policy allows.
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, atomic::AtomicU64},
    time::SystemTime,
};

use http_body_util::BodyExt;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tokio_rustls::{LazyConfigAcceptor, server::TlsStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{
    admission::{Admission, Admitted, Denied},
    report::{Logged, Reporter, RequestReport},
    tunnel::{HANDSHAKE_TIMEOUT, MAX_HEADER_LIST, handshake_reason},
};

use crate::{
    accept::Acceptor,
    config::Limits,
    copy,
    identity::{IdentityManager, SpiffeId, peer_identity},
    l7::{self, AppClients, Body, OrigProto, proxy_error},
    metrics::{HandshakeLabels, Metrics, StreamLabels, istio},
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
    /// Keepalive (dead clients), `tcp_idle_timeout`.
    pub limits: Limits,
    /// Slots for TLS handshakes past the ClientHello (`tunnel_handshake_cap`).
    pub handshake_slots: Arc<Semaphore>,
    /// The ECS cluster (the namespace of workloads in telemetry).
    pub cluster: String,
}

/// Counts a handshake holding a slot in `ecsmesh_tunnel_handshakes_in_progress`.
struct InProgress<'a>(&'a Metrics);

impl Drop for InProgress<'_> {
    fn drop(&mut self) {
        self.0.handshakes_in_progress.dec();
    }
}

/// Who is on the other end of a tunnel connection, and as whom this node answered.
struct Peer {
    /// The source workload's identity (its certificate).
    source: SpiffeId,
    /// The identity this node presented (chosen by SNI), the local task's.
    served: SpiffeId,
    /// That local task's family.
    family: String,
    local: SocketAddr,
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
        let config = self.identities.server_config();
        let mut acceptor = Acceptor::new("tunnel", self.metrics.clone());
        loop {
            let (tcp, peer) = tokio::select! {
                conn = acceptor.accept(&listener) => conn,
                () = shutdown.cancelled() => return,
            };
            let this = self.clone();
            let config = config.clone();
            let shutdown = shutdown.clone();
            tracker.spawn(async move { this.connection(config, tcp, peer, shutdown).await });
        }
    }

    /// The server side of the TLS handshake, within `HANDSHAKE_TIMEOUT` of accept. The
    /// ClientHello is read without a slot, so peers that send nothing or half a hello
    /// hold only their socket until the timeout; the expensive part (key exchange,
    /// signing, verifying the client chain) runs in one of `tunnel_handshake_cap` slots.
    async fn handshake(
        &self,
        config: Arc<rustls::ServerConfig>,
        tcp: TcpStream,
        peer: SocketAddr,
    ) -> Option<TlsStream<TcpStream>> {
        let started = tokio::time::Instant::now();
        let deadline = started + HANDSHAKE_TIMEOUT;
        let fail = |reason: &'static str, error: Option<&std::io::Error>| {
            self.metrics.reject("server", reason);
            match error {
                Some(e) => tracing::warn!(%peer, reason, error = %e, "tunnel handshake rejected"),
                None => tracing::warn!(%peer, reason, "tunnel handshake did not finish in time"),
            }
            None
        };
        let lazy = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp);
        let start = match tokio::time::timeout_at(deadline, lazy).await {
            Ok(Ok(start)) => start,
            Ok(Err(e)) => return fail(handshake_reason(&e), Some(&e)),
            Err(_) => return fail("timeout", None),
        };
        let slot = tokio::time::timeout_at(deadline, self.handshake_slots.acquire()).await;
        let Ok(Ok(_slot)) = slot else {
            return fail("handshake_cap", None);
        };
        self.metrics.handshakes_in_progress.inc();
        let _in_progress = InProgress(&self.metrics);
        match tokio::time::timeout_at(deadline, start.into_stream(config)).await {
            Ok(Ok(tls)) => {
                self.metrics.handshake_took("server", started.elapsed());
                Some(tls)
            }
            Ok(Err(e)) => fail(handshake_reason(&e), Some(&e)),
            Err(_) => fail("timeout", None),
        }
    }

    async fn connection(
        self: Arc<Self>,
        config: Arc<rustls::ServerConfig>,
        tcp: TcpStream,
        peer: SocketAddr,
        shutdown: CancellationToken,
    ) {
        // Without TCP_NODELAY, Nagle holds a small TLS record until the previous one is
        // acknowledged — and the peer delays that ACK until it has something to send, so
        // each response waited for the next request on the connection.
        let _ = tcp.set_nodelay(true);
        let Ok(local) = tcp.local_addr() else { return };
        let Some(tls) = self.handshake(config, tcp, peer).await else {
            return;
        };
        let (_, session) = tls.get_ref();
        let source = session.peer_certificates().and_then(peer_identity);
        let expires = session.peer_certificates().and_then(chain_expiry);
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
            let peer = Peer {
                source: source.clone(),
                served: served_id.clone(),
                family: served_family.clone(),
                local,
            };
            async move { Ok::<_, Infallible>(this.stream(req, peer).await) }
        });
        // Keepalive PINGs drop a client that went away without closing (its streams end).
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(self.limits.tunnel_keepalive_interval)
            .keep_alive_timeout(self.limits.tunnel_keepalive_timeout)
            .max_concurrent_streams(self.stream_cap as u32)
            .max_header_list_size(MAX_HEADER_LIST)
            .serve_connection(TokioIo::new(tls), svc);
        tokio::pin!(conn);
        // A peer is trusted only while its certificates are valid: at the first expiry in
        // its chain the connection takes no new streams (GOAWAY), so a cut-off node's
        // pooled tunnels end with its certificate instead of living on.
        let lapse = async {
            match expires.map(|at| at.duration_since(SystemTime::now())) {
                Some(Ok(left)) => tokio::time::sleep(left).await,
                Some(Err(_)) => {}
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = conn.as_mut() => if let Err(e) = r { tracing::debug!(%peer, error = %e, "tunnel connection ended") },
            () = lapse => {
                tracing::info!(%peer, "peer certificate expired: tunnel connection takes no new streams");
                self.metrics.reject("server", "peer_certificate_expired");
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
            () = shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
        }
    }

    /// One stream: a CONNECT (opaque bytes to the endpoint) or an HTTP request.
    async fn stream(&self, req: Request<Incoming>, peer: Peer) -> Response<Body> {
        if req.method() != Method::CONNECT {
            return self.request(req, peer).await;
        }
        let Peer {
            source,
            family,
            local,
            ..
        } = peer;
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
        let connect = copy::connect_marked(target, self.socket_mark);
        let upstream = match tokio::time::timeout(copy::UPSTREAM_CONNECT_TIMEOUT, connect).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                self.metrics.reject("server", "upstream_connect");
                tracing::warn!(%target, error = %e, "tunnel upstream connect failed");
                return status(StatusCode::BAD_GATEWAY);
            }
            Err(_) => {
                self.metrics.reject("server", "upstream_connect_timeout");
                tracing::warn!(%target, "tunnel upstream connect timed out");
                return status(StatusCode::GATEWAY_TIMEOUT);
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
        let (idle, metrics) = (self.limits.tcp_idle_timeout, self.metrics.clone());
        tokio::spawn(async move {
            match hyper::upgrade::on(req).await {
                Ok(up) => {
                    let copy =
                        copy::bidirectional(TokioIo::new(up), upstream, &sent, &received, idle);
                    tokio::select! {
                        r = copy => match r {
                            Ok(c) if c.ended == copy::Ended::Done => {}
                            Ok(_) => {
                                metrics.tcp_idle_timeouts.inc();
                                tracing::debug!(%target, "tunnel stream closed: idle timeout");
                            }
                            Err(e) => tracing::debug!(%target, error = %e, "tunnel stream ended with error"),
                        },
                        () = drain.cancelled() => tracing::debug!(%target, "task stopped: stream drained"),
                    }
                }
                Err(e) => tracing::debug!(%target, error = %e, "CONNECT upgrade failed"),
            }
        });
        status(StatusCode::OK)
    }

    /// An HTTP request from a source proxy, reported with its response (the destination
    /// hop of Istio's request metrics).
    async fn request(&self, mut req: Request<Incoming>, peer: Peer) -> Response<Body> {
        let started = std::time::Instant::now();
        let protocol = istio::request_protocol(req.headers());
        // The destination hop's span, child of the source span; the application gets a
        // `traceparent` naming it.
        let span = self.metrics.traces().map(|t| {
            t.destination(req.method(), req.headers())
                .propagate(&mut req)
        });
        let mut take = |name: &http::HeaderName| {
            req.headers_mut()
                .remove(name)
                .and_then(|v| v.to_str().ok().map(str::to_owned))
                .unwrap_or_else(|| "unknown".to_owned())
        };
        let source_workload = take(&l7::SOURCE_WORKLOAD);
        let source_task = take(&l7::SOURCE_TASK);
        let logged = Logged::capture(&self.metrics, &req);
        let target = req
            .headers()
            .get(&l7::TARGET)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let source_principal = peer.source.to_string();
        let destination_principal = peer.served.to_string();
        // The workload the source reached: the local task its certificate (by SNI) names.
        let workload = peer.family.clone();
        let request_bytes = Arc::<AtomicU64>::default();
        let req = req.map(|body| l7::Metered::new(body, request_bytes.clone()).boxed());
        let (service, resp) = self
            .forward(req, peer.source, peer.family, peer.local)
            .await;
        let report = RequestReport {
            reporter: Reporter::Destination,
            cluster: &self.cluster,
            source_task: &source_task,
            source_workload,
            source_principal,
            destination_workload: workload,
            destination_principal,
            service,
            protocol,
            status: resp.status().as_u16(),
            proxy_error: l7::proxy_error_of(&resp),
            endpoint: target,
            original_destination: None,
            attempts: None,
            elapsed: started.elapsed(),
        };
        // The local task serving the identity the source reached.
        let sizes = report.emit(&self.metrics, span, logged, || {
            let tasks = self.admission.tasks.all();
            let (_, task) = tasks
                .iter()
                .find(|(_, t)| t.identity.as_ref() == Some(&peer.served))?;
            Some(task.id.as_str().to_owned())
        });
        resp.map(|body| l7::Reported::wrap(body, request_bytes, sizes))
    }

    /// Checked like a CONNECT, then sent to the application in the protocol the task
    /// spoke (`ecsmesh-orig-proto`). Returns the endpoint's service ("" when refused
    /// before it is known) and the response.
    async fn forward(
        &self,
        req: Request<Body>,
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
        let req = Request::from_parts(parts, body);
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

/// The earliest `notAfter` of a verified peer chain.
fn chain_expiry(chain: &[rustls_pki_types::CertificateDer<'_>]) -> Option<SystemTime> {
    chain
        .iter()
        .filter_map(|c| crate::identity::verify::CertInfo::parse(c).ok())
        .map(|i| i.not_after)
        .min()
}
