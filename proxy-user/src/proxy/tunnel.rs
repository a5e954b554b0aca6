//! What both ends of the tunnel share: its limits and its errors.
use std::io;

/// Limit on the HTTP/2 header block a peer may send (`SETTINGS_MAX_HEADER_LIST_SIZE`): a
/// CONNECT needs a few hundred bytes; anything much larger is abuse.
pub const MAX_HEADER_LIST: u32 = 16 * 1024;
/// A TLS handshake that has not finished by then is dropped (slow or garbage clients).
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: std::net::SocketAddr,
        source: io::Error,
    },
    #[error("TLS handshake with {addr} ({reason}): {source}")]
    Handshake {
        addr: std::net::SocketAddr,
        reason: &'static str,
        source: io::Error,
    },
    #[error("HTTP/2 with {addr}: {source}")]
    Http {
        addr: std::net::SocketAddr,
        source: hyper::Error,
    },
    #[error("peer refused CONNECT {target}: {status}")]
    Refused {
        target: std::net::SocketAddr,
        status: http::StatusCode,
    },
    #[error("connecting to {addr}: timed out")]
    Timeout { addr: std::net::SocketAddr },
    /// A dial shared by several flows failed (each waiter gets the same error).
    #[error(transparent)]
    Dial(std::sync::Arc<TunnelError>),
    #[error("no certificate for {0}")]
    NoIdentity(String),
    #[error("invalid SNI for {0}")]
    Sni(String),
}

impl TunnelError {
    /// The `reason` label (`ecsmesh_tcp_connections_failed_total`, `ecsmesh-proxy-error`).
    pub fn reason(&self) -> &'static str {
        match self {
            TunnelError::Refused { .. } => "tunnel_refused",
            TunnelError::Handshake { .. } => "tunnel_handshake",
            TunnelError::Timeout { .. } => "tunnel_timeout",
            TunnelError::Dial(inner) => inner.reason(),
            _ => "tunnel_connect",
        }
    }
}

/// The metric label for a failed handshake: our verifier's reason when it was ours.
pub fn handshake_reason(e: &io::Error) -> &'static str {
    let Some(tls) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return if e.kind() == io::ErrorKind::TimedOut {
            "timeout"
        } else {
            "tls_handshake"
        };
    };
    if let Some(rejection) = crate::identity::rejection_of(tls) {
        return rejection.reason();
    }
    match tls {
        rustls::Error::NoCertificatesPresented => "no_certificate",
        rustls::Error::InvalidCertificate(_) => "bad_certificate",
        _ => "tls_handshake",
    }
}
