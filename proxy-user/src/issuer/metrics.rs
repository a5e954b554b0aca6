//! `ecsmesh_issuer_requests_total{endpoint, result}` and the plain-HTTP admin listener
//! that serves it (`/metrics`) with `/ready`.
use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use http_body_util::Full;
use hyper::{Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use tokio_util::sync::CancellationToken;

use crate::identity::protocol::Reason;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    endpoint: &'static str,
    result: &'static str,
}

/// The endpoints counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Attest,
    Node,
    Svid,
    Task,
}

impl Endpoint {
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Attest => "attest",
            Endpoint::Node => "node",
            Endpoint::Svid => "svid",
            Endpoint::Task => "task",
        }
    }
}

pub struct IssuerMetrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
}

impl Default for IssuerMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("ecsmesh_issuer");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Issuer requests by endpoint and result (issued, or the refusal reason)",
            requests.clone(),
        );
        Self { registry, requests }
    }
}

impl IssuerMetrics {
    pub fn record(&self, endpoint: Endpoint, result: Result<(), Reason>) {
        let result = match result {
            Ok(()) => "issued",
            Err(r) => r.as_str(),
        };
        self.requests
            .get_or_create(&RequestLabels {
                endpoint: endpoint.as_str(),
                result,
            })
            .inc();
    }

    /// The count of one series (tests).
    #[cfg(test)]
    pub fn count(&self, endpoint: Endpoint, result: &'static str) -> u64 {
        self.requests
            .get_or_create(&RequestLabels {
                endpoint: endpoint.as_str(),
                result,
            })
            .get()
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Serves `/metrics` and `/ready` on `addr` until `shutdown`.
pub async fn serve_admin(
    addr: SocketAddr,
    metrics: Arc<IssuerMetrics>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "issuer admin listening (/metrics, /ready)");
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept");
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                async move {
                    let (status, body) = match req.uri().path() {
                        "/metrics" => (StatusCode::OK, metrics.encode()),
                        "/ready" => (StatusCode::OK, "ready\n".to_owned()),
                        _ => (StatusCode::NOT_FOUND, "not found\n".to_owned()),
                    };
                    Ok::<_, Infallible>(
                        Response::builder()
                            .status(status)
                            .header("content-type", "text/plain; version=0.0.4")
                            .body(Full::new(Bytes::from(body)))
                            .expect("static response parts are valid"),
                    )
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(super::server::HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(super::server::CONNECTION_MAX, conn).await;
        });
    }
}
