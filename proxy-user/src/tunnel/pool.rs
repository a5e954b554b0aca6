//! Outbound side: a pool of mTLS + HTTP/2 connections keyed by (source identity,
//! destination identity, destination proxy). A connection carries up to `cap` concurrent
//! streams; beyond that another one opens. Dialling is serialised per key so a burst of
//! task connections shares one handshake instead of racing to open many.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use hyper::{
    Method, Request, Response, StatusCode, client::conn::http2::SendRequest, upgrade::Upgraded,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;
use tokio_rustls::TlsConnector;

use super::{HANDSHAKE_TIMEOUT, TunnelError, handshake_reason};
use crate::{
    copy::connect_marked,
    identity::{IdentityManager, SpiffeId},
    l7::{Body, empty},
    metrics::{HandshakeLabels, Metrics},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct PoolKey {
    source: SpiffeId,
    dest: SpiffeId,
    tunnel: SocketAddr,
}

struct Conn {
    sender: SendRequest<Body>,
    active: AtomicUsize,
    /// Serial of the source certificate this connection authenticated with. After a
    /// refresh, new streams go to a connection made with the new certificate; streams on
    /// the old one continue until they end.
    serial: String,
}

/// Holds one stream slot on a pooled connection; released on drop.
pub struct StreamLease(Arc<Conn>);

impl Drop for StreamLease {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

type Group = Arc<tokio::sync::Mutex<Vec<Arc<Conn>>>>;

pub struct TunnelPool {
    identities: Arc<IdentityManager>,
    metrics: Arc<Metrics>,
    cap: usize,
    socket_mark: u32,
    groups: Mutex<HashMap<PoolKey, Group>>,
}

impl TunnelPool {
    pub fn new(
        identities: Arc<IdentityManager>,
        metrics: Arc<Metrics>,
        cap: usize,
        socket_mark: u32,
    ) -> Self {
        Self {
            identities,
            metrics,
            cap,
            socket_mark,
            groups: Mutex::default(),
        }
    }

    /// Open a tunnelled stream to `target` through the proxy at `tunnel`, authenticated as
    /// `source` and requiring the far side to prove `dest`.
    pub async fn open(
        &self,
        source: &SpiffeId,
        dest: &SpiffeId,
        tunnel: SocketAddr,
        target: SocketAddr,
    ) -> Result<(TokioIo<Upgraded>, StreamLease), TunnelError> {
        let key = PoolKey {
            source: source.clone(),
            dest: dest.clone(),
            tunnel,
        };
        // One retry on a fresh connection: a pooled one may have been closed by the peer
        // (GOAWAY, idle timeout) between our check and the request.
        let mut last = None;
        for _ in 0..2 {
            let lease = self.lease(&key).await?;
            match self.connect_stream(&lease.0.sender, tunnel, target).await {
                Ok(io) => return Ok((io, lease)),
                Err(e @ TunnelError::Refused { .. }) => return Err(e),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("loop ran"))
    }

    /// Send one HTTP request through the tunnel at `tunnel`, authenticated as `source`,
    /// the far side proving `dest`. The lease holds the stream slot: keep it until the
    /// response body is done.
    pub async fn request(
        &self,
        source: &SpiffeId,
        dest: &SpiffeId,
        tunnel: SocketAddr,
        req: Request<Body>,
    ) -> Result<(Response<hyper::body::Incoming>, StreamLease), TunnelError> {
        let key = PoolKey {
            source: source.clone(),
            dest: dest.clone(),
            tunnel,
        };
        let http = |source| TunnelError::Http {
            addr: tunnel,
            source,
        };
        // A pooled connection closed by the peer meanwhile fails `ready()` before anything
        // was sent: take another (the closed one is dropped from the pool on the next lease).
        let mut lease = self.lease(&key).await?;
        let mut sender = lease.0.sender.clone();
        if sender.ready().await.is_err() {
            lease = self.lease(&key).await?;
            sender = lease.0.sender.clone();
            sender.ready().await.map_err(http)?;
        }
        let resp = sender.send_request(req).await.map_err(http)?;
        Ok((resp, lease))
    }

    async fn connect_stream(
        &self,
        sender: &SendRequest<Body>,
        tunnel: SocketAddr,
        target: SocketAddr,
    ) -> Result<TokioIo<Upgraded>, TunnelError> {
        let http = |source| TunnelError::Http {
            addr: tunnel,
            source,
        };
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(target.to_string())
            .body(empty())
            .expect("authority-form CONNECT request is valid");
        let mut sender = sender.clone();
        sender.ready().await.map_err(http)?;
        let resp = sender.send_request(req).await.map_err(http)?;
        if resp.status() != StatusCode::OK {
            return Err(TunnelError::Refused {
                target,
                status: resp.status(),
            });
        }
        Ok(TokioIo::new(hyper::upgrade::on(resp).await.map_err(http)?))
    }

    async fn lease(&self, key: &PoolKey) -> Result<StreamLease, TunnelError> {
        let group = self
            .groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        let mut conns = group.lock().await;
        let serial = self
            .identities
            .current(&key.source)
            .map(|s| s.serial.clone())
            .unwrap_or_default();
        conns.retain(|c| !c.sender.is_closed() && c.serial == serial);
        if let Some(c) = conns
            .iter()
            .find(|c| c.active.load(Ordering::Acquire) < self.cap)
        {
            c.active.fetch_add(1, Ordering::AcqRel);
            return Ok(StreamLease(c.clone()));
        }
        let conn = self.dial(key).await?;
        conn.active.fetch_add(1, Ordering::AcqRel);
        conns.push(conn.clone());
        Ok(StreamLease(conn))
    }

    async fn dial(&self, key: &PoolKey) -> Result<Arc<Conn>, TunnelError> {
        let addr = key.tunnel;
        let tcp = connect_marked(addr, self.socket_mark)
            .await
            .map_err(|source| TunnelError::Connect { addr, source })?;
        let serial = self
            .identities
            .current(&key.source)
            .map(|s| s.serial.clone())
            .unwrap_or_default();
        let config = self
            .identities
            .client_config(key.source.clone(), key.dest.clone());
        let name = ServerName::try_from(key.dest.sni())
            .map_err(|_| TunnelError::Sni(key.dest.to_string()))?;
        let handshake = TlsConnector::from(config).connect(name, tcp);
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(source)) => {
                let reason = handshake_reason(&source);
                self.metrics.reject("client", reason);
                tracing::warn!(source_identity = %key.source, expected = %key.dest, %addr, reason, "tunnel handshake failed");
                return Err(TunnelError::Handshake {
                    addr,
                    reason,
                    source,
                });
            }
            Err(_) => {
                self.metrics.reject("client", "timeout");
                return Err(TunnelError::Handshake {
                    addr,
                    reason: "timeout",
                    source: std::io::ErrorKind::TimedOut.into(),
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
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .max_header_list_size(super::MAX_HEADER_LIST)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|source| TunnelError::Http { addr, source })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%addr, error = %e, "tunnel connection ended");
            }
        });
        tracing::debug!(source_identity = %key.source, destination_identity = %key.dest, %addr, "tunnel connection opened");
        Ok(Arc::new(Conn {
            sender,
            active: AtomicUsize::new(0),
            serial,
        }))
    }
}
