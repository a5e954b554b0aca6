//! Opening the byte stream under a pooled tunnel connection: TCP, then mTLS. Behind a
//! trait so the pool can be tested over in-memory streams.
use std::{future::Future, net::SocketAddr, sync::Arc};

use rustls_pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tokio_rustls::{TlsConnector, client::TlsStream};

use super::tunnel::{TunnelError, handshake_reason};
use crate::{
    copy::connect_marked,
    identity::{IdentityManager, SpiffeId},
    metrics::{HandshakeLabels, Metrics},
};

/// One pool of connections per (source identity, destination identity, peer proxy).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct PoolKey {
    pub source: SpiffeId,
    pub dest: SpiffeId,
    pub tunnel: SocketAddr,
}

/// Opens the authenticated byte stream a pooled connection runs HTTP/2 on. The pool
/// bounds each dial with its connect timeout (dropping the future on expiry).
pub trait Dial: Send + Sync + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn dial(&self, key: &PoolKey) -> impl Future<Output = Result<Self::Io, TunnelError>> + Send;
    /// Which certificate a connection dialled now would present for `source`. Connections
    /// made with another take no new streams (after a refresh, new streams use the new
    /// certificate; old streams continue until they end).
    fn generation(&self, source: &SpiffeId) -> String;
}

/// The production dialler: a marked TCP socket, then TLS 1.3 with the source's
/// workload certificate, requiring the destination's.
pub struct TlsDialer {
    pub identities: Arc<IdentityManager>,
    pub metrics: Arc<Metrics>,
    pub socket_mark: u32,
}

impl Dial for TlsDialer {
    type Io = TlsStream<TcpStream>;

    async fn dial(&self, key: &PoolKey) -> Result<Self::Io, TunnelError> {
        let addr = key.tunnel;
        let tcp = connect_marked(addr, self.socket_mark)
            .await
            .map_err(|source| TunnelError::Connect { addr, source })?;
        let config = self
            .identities
            .client_config(key.source.clone(), key.dest.clone());
        let name = ServerName::try_from(key.dest.sni())
            .map_err(|_| TunnelError::Sni(key.dest.to_string()))?;
        let started = std::time::Instant::now();
        let tls = match TlsConnector::from(config).connect(name, tcp).await {
            Ok(tls) => {
                self.metrics.handshake_took("client", started.elapsed());
                tls
            }
            Err(source) => {
                let reason = handshake_reason(&source);
                self.metrics.reject("client", reason);
                tracing::warn!(source_identity = %key.source, expected = %key.dest, %addr, reason, "tunnel handshake failed");
                return Err(TunnelError::Handshake {
                    addr,
                    reason,
                    source,
                });
            }
        };
        self.metrics
            .handshakes
            .get_or_create(&HandshakeLabels {
                role: "client",
                source_identity: key.source.to_string(),
                destination_identity: key.dest.to_string(),
            })
            .inc();
        Ok(tls)
    }

    fn generation(&self, source: &SpiffeId) -> String {
        self.identities
            .current(source)
            .map(|s| s.serial.clone())
            .unwrap_or_default()
    }
}
