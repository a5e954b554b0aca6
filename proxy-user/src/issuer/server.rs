//! The issuer's TLS listener: TLS 1.3 on ring, HTTP/1.1, one request per connection.
//!
//! Client certificates are optional at the TLS layer ([`OptionalClientCert`]): `/v1/attest`
//! has none, and a node certificate that does not verify must get a typed refusal
//! (`bad_node_certificate`, `foreign_trust_domain`, ...) rather than a failed handshake.
//! The handshake signature is still verified, so presenting a certificate proves holding
//! its key; the chain is judged by the handler ([`super::service`]).
//!
//! Hostile clients are bounded everywhere: handshake, header and body timeouts, a body
//! limit, a whole-connection limit, and a cap on concurrent connections.
use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::{
    DistinguishedName, ServerConfig,
    crypto::WebPkiSupportedAlgorithms,
    server::danger::{ClientCertVerified, ClientCertVerifier},
};
use rustls_pki_types::{CertificateDer, UnixTime};
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{
    Refused,
    ca_source::{Authority, ServerCert},
    metrics::{Endpoint, IssuerMetrics},
    service::{Service, Subject},
};
use crate::identity::protocol::{
    ATTEST_PATH, MAX_BODY, NODE_PATH, Reason, Refusal, SVID_PATH, TASK_PATH,
};

pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Everything one connection may take, handshake to last byte.
pub const CONNECTION_MAX: Duration = Duration::from_secs(30);
pub const MAX_CONNECTIONS: usize = 1024;
/// An oversized body is read and dropped up to this much (and within [`BODY_TIMEOUT`])
/// before the 413, so the client gets the answer instead of a reset: closing a socket
/// with unread data resets it, and a client still writing never reads the 413. Beyond
/// it, the connection is just closed.
const DRAIN_LIMIT: u64 = 16 * 1024 * 1024;

/// Accepts any client certificate (or none) but verifies the TLS 1.3 handshake signature.
#[derive(Debug)]
pub struct OptionalClientCert {
    algs: WebPkiSupportedAlgorithms,
}

impl OptionalClientCert {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            algs: crate::identity::provider().signature_verification_algorithms,
        })
    }
}

impl ClientCertVerifier for OptionalClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // The chain is judged per request, with a typed refusal (see the module docs).
        Ok(ClientCertVerified::assertion())
    }

    crate::identity::verify::handshake_signatures!();
}

pub fn tls_config(authority: Arc<Authority>) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(crate::identity::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(OptionalClientCert::new())
        .with_cert_resolver(Arc::new(ServerCert(authority)));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

pub struct App {
    pub service: Service,
    pub metrics: Arc<IssuerMetrics>,
}

/// Accepts connections until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    app: Arc<App>,
    shutdown: CancellationToken,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "issuer accept");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "issuer at {MAX_CONNECTIONS} connections; refusing one");
            continue;
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let conn = async {
                let tls =
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "issuer TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "issuer TLS handshake timed out");
                            return;
                        }
                    };
                let certs: Option<Arc<[CertificateDer<'static>]>> =
                    tls.get_ref().1.peer_certificates().map(Arc::from);
                let svc = service_fn(move |req| {
                    let app = app.clone();
                    let certs = certs.clone();
                    async move { Ok::<_, Infallible>(handle(&app, certs.as_deref(), req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            };
            if tokio::time::timeout(CONNECTION_MAX, conn).await.is_err() {
                tracing::debug!(%peer, "issuer connection exceeded {CONNECTION_MAX:?}");
            }
        });
    }
}

async fn handle(
    app: &App,
    certs: Option<&[CertificateDer<'static>]>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let endpoint = match req.uri().path() {
        ATTEST_PATH => Endpoint::Attest,
        NODE_PATH => Endpoint::Node,
        SVID_PATH => Endpoint::Svid,
        TASK_PATH => Endpoint::Task,
        path => {
            let message = format!("no such endpoint {path}");
            return refusal(StatusCode::NOT_FOUND, Reason::BadRequest, message);
        }
    };
    if req.method() != Method::POST {
        app.metrics.record(endpoint, Err(Reason::BadRequest));
        let message = format!("{} takes POST", req.uri().path());
        tracing::warn!(
            endpoint = endpoint.as_str(),
            reason = Reason::BadRequest.as_str(),
            detail = message,
            "refused"
        );
        return refusal(StatusCode::METHOD_NOT_ALLOWED, Reason::BadRequest, message);
    }
    let mut who = Subject::default();
    let result = match read_body(req).await {
        Err(r) => Err(r),
        Ok(body) => {
            let s = &app.service;
            match endpoint {
                Endpoint::Attest => match parse(&body) {
                    Ok(r) => s.attest(r, &mut who).await,
                    Err(e) => Err(e),
                },
                Endpoint::Node => match parse(&body) {
                    Ok(r) => s.renew_node(certs, r, &mut who).await,
                    Err(e) => Err(e),
                },
                Endpoint::Svid => match parse(&body) {
                    Ok(r) => s.svid(certs, r, &mut who).await,
                    Err(e) => Err(e),
                },
                Endpoint::Task => match parse(&body) {
                    Ok(r) => s.task_svid(r, &mut who).await,
                    Err(e) => Err(e),
                },
            }
        }
    };
    app.metrics
        .record(endpoint, result.as_ref().map(|_| ()).map_err(|r| r.reason));
    let (instance, task) = (who.instance.as_deref(), who.task.as_deref());
    match result {
        Ok(issued) => {
            tracing::info!(
                endpoint = endpoint.as_str(),
                instance,
                task,
                spiffe_id = issued.spiffe_id,
                "issued"
            );
            json(StatusCode::OK, &issued)
        }
        Err(r) => {
            tracing::warn!(
                endpoint = endpoint.as_str(),
                reason = r.reason.as_str(),
                instance,
                task,
                detail = r.message,
                "refused"
            );
            let status = StatusCode::from_u16(r.reason.status()).unwrap_or(StatusCode::FORBIDDEN);
            refusal(status, r.reason, r.message)
        }
    }
}

/// The whole body, within [`MAX_BODY`] and [`BODY_TIMEOUT`].
async fn read_body(req: Request<Incoming>) -> Result<Bytes, Refused> {
    let too_large = || {
        Refused::new(
            Reason::BodyTooLarge,
            format!("the body exceeds {MAX_BODY} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let body = req.into_body();
    let deadline = tokio::time::Instant::now() + BODY_TIMEOUT;
    if let Some(n) = declared
        && n > MAX_BODY as u64
    {
        if n <= MAX_BODY as u64 + DRAIN_LIMIT {
            let _ = tokio::time::timeout_at(deadline, drain(body)).await;
        }
        return Err(too_large());
    }
    let mut body = body;
    let mut buf = Vec::new();
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => {
                return Err(Refused::new(
                    Reason::BadRequest,
                    "body not received in time",
                ));
            }
            Ok(None) => return Ok(Bytes::from(buf)),
            Ok(Some(Err(e))) => return Err(Refused::new(Reason::BadRequest, e.to_string())),
            Ok(Some(Ok(f))) => f,
        };
        if let Some(d) = frame.data_ref() {
            if buf.len() + d.len() > MAX_BODY {
                let _ = tokio::time::timeout_at(deadline, drain(body)).await;
                return Err(too_large());
            }
            buf.extend_from_slice(d);
        }
    }
}

/// Reads and drops what is left of a body, up to [`DRAIN_LIMIT`].
async fn drain(mut body: Incoming) {
    let mut left = DRAIN_LIMIT;
    while left > 0
        && let Some(Ok(f)) = body.frame().await
    {
        left = left.saturating_sub(f.data_ref().map_or(0, |d| d.len() as u64));
    }
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, Refused> {
    serde_json::from_slice(body).map_err(|e| Refused::new(Reason::BadRequest, e.to_string()))
}

fn refusal(status: StatusCode, reason: Reason, message: String) -> Response<Full<Bytes>> {
    let body = Refusal {
        error: reason.as_str().to_owned(),
        message,
    };
    json(status, &body)
}

fn json(status: StatusCode, body: &impl serde::Serialize) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(bytes)))
        .expect("static response parts are valid")
}
