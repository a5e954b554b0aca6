//! Outbound side: a pool of mTLS + HTTP/2 connections keyed by (source identity,
//! destination identity, destination proxy). A connection carries up to `stream_cap`
//! concurrent streams; beyond that another one opens.
//!
//! Dialling: a dial is shared by up to `stream_cap` flows waiting for it (a burst of
//! task connections shares one handshake; a burst beyond the cap dials as many
//! connections as it needs, at once), and no lock is held while it runs: the dial is a
//! task of its own, bounded by the connect timeout, and waiters watch its outcome. A
//! failed dial hands its error to its waiters; the next flow dials again.
//!
//! Dead peers: HTTP/2 PINGs (keepalive, also while idle) close a connection whose peer
//! stopped answering; a closed connection leaves the pool and new flows dial a new one.
//! A connection without streams for the idle timeout is closed.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use hyper::{
    Method, Request, Response, StatusCode, client::conn::http2::SendRequest, upgrade::Upgraded,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{sync::watch, time::Instant};

use super::{
    dial::{Dial, PoolKey, TlsDialer},
    tunnel::{MAX_HEADER_LIST, TunnelError},
};
use crate::{
    config::Limits,
    identity::SpiffeId,
    l7::{Body, empty},
    metrics::{Metrics, ReasonLabels},
};

#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// Streams per connection before another connection opens.
    pub stream_cap: usize,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    pub idle_timeout: Duration,
    /// One dial: TCP, TLS and HTTP/2 handshakes.
    pub connect_timeout: Duration,
}

impl PoolSettings {
    pub fn new(stream_cap: usize, limits: &Limits) -> Self {
        Self {
            stream_cap,
            keepalive_interval: limits.tunnel_keepalive_interval,
            keepalive_timeout: limits.tunnel_keepalive_timeout,
            idle_timeout: limits.tunnel_idle_timeout,
            connect_timeout: limits.tunnel_connect_timeout,
        }
    }
}

struct Conn {
    sender: SendRequest<Body>,
    active: AtomicUsize,
    /// Set (under the pool lock) when the connection must take no new stream: it ended,
    /// failed a request, or is being closed idle.
    closed: AtomicBool,
    /// When the last stream ended; `None` while streams are open.
    idle_since: Mutex<Option<Instant>>,
    generation: String,
}

impl Conn {
    fn usable(&self) -> bool {
        !self.closed.load(Ordering::Acquire) && !self.sender.is_closed()
    }

    fn idle_since(&self) -> Option<Instant> {
        *self.idle_since.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_idle_since(&self, at: Option<Instant>) {
        *self.idle_since.lock().unwrap_or_else(|p| p.into_inner()) = at;
    }
}

/// Sends requests on one pooled tunnel connection.
pub type Sender = SendRequest<Body>;
/// Holds one stream slot on a pooled connection; released on drop.
pub struct StreamLease(Arc<Conn>);

impl Drop for StreamLease {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.set_idle_since(Some(Instant::now()));
        }
    }
}

/// Outcome of a shared dial: the connection itself went into the group.
type Dialled = Option<Result<(), Arc<TunnelError>>>;

/// A dial in flight and how many flows wait for it.
struct Dialing {
    id: u64,
    outcome: watch::Receiver<Dialled>,
    waiters: usize,
}

#[derive(Default)]
struct Group {
    conns: Vec<Arc<Conn>>,
    dialing: Vec<Dialing>,
}

struct Shared<D> {
    dialer: D,
    metrics: Arc<Metrics>,
    settings: PoolSettings,
    groups: Mutex<HashMap<PoolKey, Group>>,
    next_dial: std::sync::atomic::AtomicU64,
}

pub struct TunnelPool<D: Dial = TlsDialer> {
    inner: Arc<Shared<D>>,
}

impl<D: Dial> TunnelPool<D> {
    pub fn new(dialer: D, metrics: Arc<Metrics>, settings: PoolSettings) -> Self {
        Self {
            inner: Arc::new(Shared {
                dialer,
                metrics,
                settings,
                groups: Mutex::default(),
                next_dial: Default::default(),
            }),
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
        // (GOAWAY, keepalive) between our check and the request.
        let mut last = None;
        for _ in 0..2 {
            let lease = self.lease(&key).await?;
            match connect_stream(&lease.0, tunnel, target).await {
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
        let (mut sender, lease) = self.sender(source, dest, tunnel).await?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|source| TunnelError::Http {
                addr: tunnel,
                source,
            })?;
        Ok((resp, lease))
    }

    /// A ready request sender on a pooled connection to `tunnel` and its stream slot:
    /// nothing is sent yet, so an error here means no byte of a request left.
    pub async fn sender(
        &self,
        source: &SpiffeId,
        dest: &SpiffeId,
        tunnel: SocketAddr,
    ) -> Result<(Sender, StreamLease), TunnelError> {
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
        // was sent: take another (the closed one leaves the pool).
        let mut lease = self.lease(&key).await?;
        let mut sender = lease.0.sender.clone();
        if sender.ready().await.is_err() {
            lease.0.closed.store(true, Ordering::Release);
            lease = self.lease(&key).await?;
            sender = lease.0.sender.clone();
            sender.ready().await.map_err(http)?;
        }
        Ok((sender, lease))
    }

    /// A stream slot on a usable connection, dialling (or joining a dial in flight that
    /// has room) when every connection is full. The map lock is only held to look and to
    /// count. Each round waits for a dial to finish; callers bound the whole (a flow that
    /// keeps losing the race for the new slots dials again).
    async fn lease(&self, key: &PoolKey) -> Result<StreamLease, TunnelError> {
        loop {
            let mut waiter = {
                let mut groups = self.inner.groups.lock().unwrap_or_else(|p| p.into_inner());
                let generation = self.inner.dialer.generation(&key.source);
                let group = groups.entry(key.clone()).or_default();
                group
                    .conns
                    .retain(|c| c.usable() && c.generation == generation);
                let cap = self.inner.settings.stream_cap;
                if let Some(c) = group
                    .conns
                    .iter()
                    .find(|c| c.active.load(Ordering::Acquire) < cap)
                {
                    c.active.fetch_add(1, Ordering::AcqRel);
                    c.set_idle_since(None);
                    return Ok(StreamLease(c.clone()));
                }
                match group.dialing.iter_mut().find(|d| d.waiters < cap) {
                    Some(d) => {
                        d.waiters += 1;
                        d.outcome.clone()
                    }
                    None => {
                        let (tx, rx) = watch::channel(None);
                        let id = self.inner.next_dial.fetch_add(1, Ordering::Relaxed);
                        group.dialing.push(Dialing {
                            id,
                            outcome: rx.clone(),
                            waiters: 1,
                        });
                        let dial =
                            Shared::dial(self.inner.clone(), key.clone(), id, generation, tx);
                        tokio::spawn(dial);
                        rx
                    }
                }
            };
            let outcome = waiter
                .wait_for(Option::is_some)
                .await
                .map(|r| r.clone().expect("waited for Some"));
            match outcome {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => return Err(TunnelError::Dial(e)),
                // The dial task went away without an outcome (runtime shutting down).
                Err(_) => return Err(TunnelError::Timeout { addr: key.tunnel }),
            }
        }
    }

    /// Connections in the pool for `key` (tests).
    #[cfg(test)]
    fn pooled(&self, key: &PoolKey) -> usize {
        let groups = self.inner.groups.lock().unwrap();
        groups
            .get(key)
            .map_or(0, |g| g.conns.iter().filter(|c| c.usable()).count())
    }
}

impl<D: Dial> Shared<D> {
    /// The shared dial of `key`: bounded by the connect timeout, then the outcome goes to
    /// every waiter (the connection into the group first).
    async fn dial(
        self: Arc<Self>,
        key: PoolKey,
        id: u64,
        generation: String,
        tx: watch::Sender<Dialled>,
    ) {
        let addr = key.tunnel;
        let result = match tokio::time::timeout(
            self.settings.connect_timeout,
            self.connect(&key, generation),
        )
        .await
        {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(Arc::new(e)),
            Err(_) => {
                self.metrics.reject("client", "timeout");
                tracing::warn!(source_identity = %key.source, expected = %key.dest, %addr, "tunnel dial timed out");
                Err(Arc::new(TunnelError::Timeout { addr }))
            }
        };
        {
            let mut groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
            let group = groups.entry(key).or_default();
            group.dialing.retain(|d| d.id != id);
            if let Ok(conn) = &result {
                group.conns.push(conn.clone());
            }
        }
        let _ = tx.send(Some(result.map(|_| ())));
    }

    async fn connect(
        self: &Arc<Self>,
        key: &PoolKey,
        generation: String,
    ) -> Result<Arc<Conn>, TunnelError> {
        let addr = key.tunnel;
        let io = self.dialer.dial(key).await?;
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(self.settings.keepalive_interval)
            .keep_alive_timeout(self.settings.keepalive_timeout)
            .keep_alive_while_idle(true)
            .max_header_list_size(MAX_HEADER_LIST)
            .handshake(TokioIo::new(io))
            .await
            .map_err(|source| TunnelError::Http { addr, source })?;
        let conn = Arc::new(Conn {
            sender,
            active: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            idle_since: Mutex::new(Some(Instant::now())),
            generation,
        });
        tokio::spawn(drive(
            Arc::downgrade(self),
            key.clone(),
            conn.clone(),
            connection,
        ));
        tracing::debug!(source_identity = %key.source, destination_identity = %key.dest, %addr, "tunnel connection opened");
        Ok(conn)
    }
}

/// Runs one connection until it ends (peer, error, keepalive timeout) or has been idle
/// for the idle timeout; then takes it out of the pool and counts why.
async fn drive<D: Dial, F>(pool: Weak<Shared<D>>, key: PoolKey, conn: Arc<Conn>, connection: F)
where
    F: std::future::Future<Output = hyper::Result<()>>,
{
    let Some(idle) = pool.upgrade().map(|p| p.settings.idle_timeout) else {
        return;
    };
    tokio::pin!(connection);
    let reason = loop {
        let wake = conn.idle_since().unwrap_or_else(Instant::now) + idle;
        tokio::select! {
            r = connection.as_mut() => break match r {
                Ok(()) => "closed",
                Err(e) if e.is_timeout() => {
                    tracing::warn!(addr = %key.tunnel, destination_identity = %key.dest, "tunnel peer stopped answering keepalive pings; connection closed");
                    "keepalive_timeout"
                }
                Err(e) => {
                    tracing::debug!(addr = %key.tunnel, error = %e, "tunnel connection ended");
                    "error"
                }
            },
            () = tokio::time::sleep_until(wake) => {
                let Some(shared) = pool.upgrade() else { return };
                // Leases count under this lock: no stream can start while we decide.
                let _groups = shared.groups.lock().unwrap_or_else(|p| p.into_inner());
                let idle_for = conn.idle_since().map(|t| t.elapsed());
                if conn.active.load(Ordering::Acquire) == 0 && idle_for.is_some_and(|d| d >= idle) {
                    conn.closed.store(true, Ordering::Release);
                    break "idle";
                }
            }
        }
    };
    conn.closed.store(true, Ordering::Release);
    let Some(shared) = pool.upgrade() else { return };
    shared
        .metrics
        .tunnel_closed
        .get_or_create(&ReasonLabels { reason })
        .inc();
    let mut groups = shared.groups.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(group) = groups.get_mut(&key) {
        group.conns.retain(|c| !Arc::ptr_eq(c, &conn));
        if group.conns.is_empty() && group.dialing.is_empty() {
            groups.remove(&key);
        }
    }
    tracing::debug!(addr = %key.tunnel, reason, "tunnel connection closed");
}

async fn connect_stream(
    conn: &Conn,
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
    let mut sender = conn.sender.clone();
    if let Err(e) = sender.ready().await {
        // Not ready means closed: no new stream goes to this connection.
        conn.closed.store(true, Ordering::Release);
        return Err(http(e));
    }
    let resp = sender.send_request(req).await.map_err(http)?;
    if resp.status() != StatusCode::OK {
        return Err(TunnelError::Refused {
            target,
            status: resp.status(),
        });
    }
    Ok(TokioIo::new(hyper::upgrade::on(resp).await.map_err(http)?))
}

#[cfg(test)]
mod tests;
