//! The pool over in-memory streams: a fake dialler hands out one end of a duplex pipe,
//! a local hyper HTTP/2 server runs on the other. Paused time: keepalive, idle and dial
//! timeouts elapse instantly.
use std::{
    convert::Infallible,
    pin::Pin,
    task::{Context, Poll},
};

use http_body_util::Empty;
use hyper::{body::Bytes, service::service_fn};
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};

use super::*;

/// Stands in for a frozen (SIGSTOPped) peer: once `frozen`, reads and writes never finish.
struct Freezable {
    inner: DuplexStream,
    frozen: Arc<AtomicBool>,
}

impl AsyncRead for Freezable {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.frozen.load(Ordering::Acquire) {
            return Poll::Pending;
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Freezable {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.frozen.load(Ordering::Acquire) {
            return Poll::Pending;
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[derive(Default)]
struct FakeDialer {
    /// Dials started, per tunnel port.
    dials: Mutex<HashMap<u16, usize>>,
    /// Each dial takes this long.
    delay: Duration,
    /// Dials to this port never finish.
    stuck_port: Option<u16>,
    /// This many first dials fail.
    fail_first: AtomicUsize,
    /// Freezes the server side of every connection made so far.
    frozen: Arc<AtomicBool>,
}

impl FakeDialer {
    fn dials(&self, port: u16) -> usize {
        self.dials.lock().unwrap().get(&port).copied().unwrap_or(0)
    }
}

impl Dial for FakeDialer {
    type Io = DuplexStream;

    async fn dial(&self, key: &PoolKey) -> Result<DuplexStream, TunnelError> {
        *self
            .dials
            .lock()
            .unwrap()
            .entry(key.tunnel.port())
            .or_default() += 1;
        tokio::time::sleep(self.delay).await;
        if Some(key.tunnel.port()) == self.stuck_port {
            std::future::pending::<()>().await;
        }
        if self
            .fail_first
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(TunnelError::Connect {
                addr: key.tunnel,
                source: std::io::ErrorKind::ConnectionRefused.into(),
            });
        }
        let (client, server) = tokio::io::duplex(64 * 1024);
        let io = Freezable {
            inner: server,
            frozen: self.frozen.clone(),
        };
        tokio::spawn(async move {
            let svc = service_fn(|_req| async {
                Ok::<_, Infallible>(hyper::Response::new(Empty::<Bytes>::new()))
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(io), svc)
                .await;
        });
        Ok(client)
    }

    fn generation(&self, _source: &SpiffeId) -> String {
        "1".into()
    }
}

fn settings(stream_cap: usize) -> PoolSettings {
    PoolSettings {
        stream_cap,
        keepalive_interval: Duration::from_secs(1),
        keepalive_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(30),
        connect_timeout: Duration::from_secs(5),
    }
}

fn key(port: u16) -> PoolKey {
    PoolKey {
        source: SpiffeId::parse("spiffe://t.test/a").unwrap(),
        dest: SpiffeId::parse("spiffe://t.test/b").unwrap(),
        tunnel: SocketAddr::from(([127, 0, 0, 1], port)),
    }
}

fn pool(dialer: FakeDialer, stream_cap: usize) -> (Arc<TunnelPool<FakeDialer>>, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::default());
    let pool = TunnelPool::new(dialer, metrics.clone(), settings(stream_cap));
    (Arc::new(pool), metrics)
}

fn dialer(pool: &TunnelPool<FakeDialer>) -> &FakeDialer {
    &pool.inner.dialer
}

async fn get(
    pool: &TunnelPool<FakeDialer>,
    port: u16,
) -> Result<(Response<hyper::body::Incoming>, StreamLease), TunnelError> {
    let k = key(port);
    let req = Request::builder().uri("/").body(empty()).unwrap();
    pool.request(&k.source, &k.dest, k.tunnel, req).await
}

fn closed(metrics: &Metrics, reason: &'static str) -> u64 {
    metrics
        .tunnel_closed
        .get_or_create(&ReasonLabels { reason })
        .get()
}

#[tokio::test(start_paused = true)]
async fn a_burst_shares_one_dial_and_the_stream_cap_opens_more() {
    let (pool, _) = pool(
        FakeDialer {
            delay: Duration::from_millis(100),
            ..Default::default()
        },
        5,
    );
    let started = Instant::now();
    let burst: Vec<_> = (0..12)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { get(&pool, 1).await })
        })
        .collect();
    let mut held = Vec::new();
    for t in burst {
        let (resp, lease) = t.await.unwrap().expect("request through the pool");
        assert_eq!(resp.status(), StatusCode::OK);
        held.push(lease);
    }
    assert_eq!(
        dialer(&pool).dials(1),
        3,
        "12 concurrent streams, cap 5: three connections"
    );
    assert_eq!(
        started.elapsed(),
        Duration::from_millis(100),
        "the three dials ran at once, not one after another"
    );
    drop(held);
    let burst: Vec<_> = (0..5)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { get(&pool, 1).await.map(|_| ()) })
        })
        .collect();
    for t in burst {
        t.await.unwrap().unwrap();
    }
    assert_eq!(dialer(&pool).dials(1), 3, "pooled connections reused");
}

#[tokio::test(start_paused = true)]
async fn no_lock_is_held_across_a_dial() {
    let (pool, metrics) = pool(
        FakeDialer {
            stuck_port: Some(1),
            ..Default::default()
        },
        100,
    );
    let started = Instant::now();
    let stuck: Vec<_> = (0..3)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { get(&pool, 1).await.map(|_| ()) })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(10)).await;
    // Another peer is served while the dial to the first hangs.
    get(&pool, 2)
        .await
        .expect("a dial elsewhere is not blocked");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(
        dialer(&pool).dials(1),
        1,
        "waiters joined the dial in flight"
    );
    for t in stuck {
        let e = t.await.unwrap().unwrap_err();
        assert_eq!(e.reason(), "tunnel_timeout", "{e}");
    }
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(5),
        "the dial's own timeout"
    );
    assert_eq!(
        metrics
            .rejected
            .get_or_create(&crate::metrics::RejectLabels {
                side: "client",
                reason: "timeout"
            })
            .get(),
        1
    );
    // The next flow dials again.
    let _ = tokio::time::timeout(Duration::from_secs(1), get(&pool, 1)).await;
    assert_eq!(dialer(&pool).dials(1), 2);
}

#[tokio::test(start_paused = true)]
async fn a_failed_dial_wakes_every_waiter_and_the_next_flow_retries() {
    let (pool, _) = pool(
        FakeDialer {
            delay: Duration::from_millis(50),
            fail_first: AtomicUsize::new(1),
            ..Default::default()
        },
        100,
    );
    let waiters: Vec<_> = (0..5)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { get(&pool, 1).await.map(|_| ()) })
        })
        .collect();
    for t in waiters {
        let e = t.await.unwrap().unwrap_err();
        assert!(matches!(e, TunnelError::Dial(_)), "{e}");
        assert_eq!(e.reason(), "tunnel_connect");
    }
    assert_eq!(dialer(&pool).dials(1), 1, "one dial, one error for all");
    get(&pool, 1).await.expect("the next flow dials again");
    assert_eq!(dialer(&pool).dials(1), 2);
}

#[tokio::test(start_paused = true)]
async fn a_silently_dead_peer_is_detected_by_keepalive_and_replaced() {
    let (pool, metrics) = pool(FakeDialer::default(), 100);
    drop(get(&pool, 1).await.expect("healthy"));
    assert_eq!(pool.pooled(&key(1)), 1);
    dialer(&pool).frozen.store(true, Ordering::Release);
    let started = Instant::now();
    let e = get(&pool, 1)
        .await
        .map(|_| ())
        .expect_err("the frozen peer never answers");
    let took = started.elapsed();
    assert!(
        took <= Duration::from_secs(2) + Duration::from_millis(100),
        "failed after {took:?}, keepalive bound is interval + timeout = 2 s: {e}"
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(closed(&metrics, "keepalive_timeout"), 1);
    assert_eq!(pool.pooled(&key(1)), 0, "the dead connection left the pool");
    dialer(&pool).frozen.store(false, Ordering::Release);
    drop(get(&pool, 1).await.expect("a new connection"));
    assert_eq!(dialer(&pool).dials(1), 2);
}

#[tokio::test(start_paused = true)]
async fn idle_connections_close_busy_ones_stay() {
    let (pool, metrics) = pool(FakeDialer::default(), 100);
    let (_resp, lease) = get(&pool, 1).await.unwrap();
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(pool.pooled(&key(1)), 1, "a stream is open: not idle");
    drop(lease);
    tokio::time::sleep(Duration::from_secs(29)).await;
    assert_eq!(pool.pooled(&key(1)), 1, "idle for less than the timeout");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(pool.pooled(&key(1)), 0);
    assert_eq!(closed(&metrics, "idle"), 1);
    assert_eq!(closed(&metrics, "keepalive_timeout"), 0);
    assert!(
        pool.inner.groups.lock().unwrap().is_empty(),
        "no empty group left"
    );
    drop(get(&pool, 1).await.unwrap());
    assert_eq!(dialer(&pool).dials(1), 2);
}
