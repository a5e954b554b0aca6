//! Byte copying between the two legs of a proxied connection, shared by the plain TCP path
//! and the mTLS tunnel. Each direction ends on its own EOF by shutting down the other
//! side's write half, so half-closed protocols (request, FIN, response) work; an error in
//! either direction ends both.
use std::{
    io,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use prometheus_client::metrics::counter::Counter;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    time::Instant,
};

/// Per-direction buffer. Kept small: memory per open connection is a design target.
pub const COPY_BUFFER: usize = 16 * 1024;

/// How long connecting to an upstream (an application, or a plain TCP destination) may
/// take, on both the outbound and the inbound side.
pub const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How a copy ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Both directions reached EOF.
    Done,
    /// No byte moved either way for the idle timeout.
    Idle,
}

/// Last time a byte moved in either direction, as nanoseconds since `start`.
struct Activity {
    start: Instant,
    last: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let nanos = self.start.elapsed().as_nanos() as u64;
        self.last.fetch_max(nanos, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_nanos(self.last.load(Ordering::Relaxed))
    }

    /// Resolves once nothing moved for `idle`.
    async fn expired(&self, idle: Duration) {
        loop {
            let deadline = self.last() + idle;
            tokio::time::sleep_until(deadline).await;
            if self.last() + idle <= Instant::now() {
                return;
            }
        }
    }
}

/// `activity` is stamped only when an idle timeout watches it (the default has none, and
/// the clock read per chunk is then not worth paying).
async fn pump<R, W>(
    mut from: R,
    mut to: W,
    bytes: &Counter,
    total: &AtomicU64,
    activity: Option<&Activity>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; COPY_BUFFER];
    loop {
        let n = from.read(&mut buf).await?;
        activity.inspect(|a| a.touch());
        if n == 0 {
            return to.shutdown().await;
        }
        to.write_all(&buf[..n]).await?;
        activity.inspect(|a| a.touch());
        bytes.inc_by(n as u64);
        total.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// How a copy ended and what it moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Copied {
    pub ended: Ended,
    pub a_to_b: u64,
    pub b_to_a: u64,
}

/// Copy `a` ⇄ `b` until both directions are done; `a_to_b`/`b_to_a` count the bytes (and
/// the result has this connection's own totals). With `idle`, the copy also ends
/// (`Ended::Idle`, both legs dropped) once no byte has moved in either direction for that
/// long.
pub async fn bidirectional<A, B>(
    a: A,
    b: B,
    a_to_b: &Counter,
    b_to_a: &Counter,
    idle: Option<Duration>,
) -> io::Result<Copied>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (ar, aw) = tokio::io::split(a);
    let (br, bw) = tokio::io::split(b);
    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
    let copied = |ended| Copied {
        ended,
        a_to_b: up.load(Ordering::Relaxed),
        b_to_a: down.load(Ordering::Relaxed),
    };
    let Some(idle) = idle else {
        tokio::try_join!(
            pump(ar, bw, a_to_b, &up, None),
            pump(br, aw, b_to_a, &down, None)
        )?;
        return Ok(copied(Ended::Done));
    };
    let activity = Activity::new();
    let copy = async {
        tokio::try_join!(
            pump(ar, bw, a_to_b, &up, Some(&activity)),
            pump(br, aw, b_to_a, &down, Some(&activity))
        )
    };
    tokio::select! {
        r = copy => r.map(|_| copied(Ended::Done)),
        () = activity.expired(idle) => Ok(copied(Ended::Idle)),
    }
}

/// A stream whose bytes are counted as they pass: what it reads (from the task) into
/// `read`, what it writes (to the task) into `written`, each both in a metric family and
/// in this connection's own total. For connections the proxy terminates (HTTP), where no
/// byte copy runs.
pub struct Counted<S> {
    inner: S,
    read: Counter,
    written: Counter,
    pub totals: std::sync::Arc<(AtomicU64, AtomicU64)>,
}

impl<S> Counted<S> {
    pub fn new(inner: S, read: Counter, written: Counter) -> Self {
        Self {
            inner,
            read,
            written,
            totals: Default::default(),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            self.read.inc_by(n);
            self.totals.0.fetch_add(n, Ordering::Relaxed);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &r {
            self.written.inc_by(*n as u64);
            self.totals.1.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A TCP socket for an upstream connection, marked so the redirect never loops it back.
pub async fn connect_marked(
    dst: std::net::SocketAddr,
    mark: u32,
) -> io::Result<tokio::net::TcpStream> {
    let socket = match dst {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    // 0 only in unprivileged unit tests (config rejects it): SO_MARK needs CAP_NET_ADMIN.
    if mark != 0 {
        socket2::SockRef::from(&socket).set_mark(mark)?;
    }
    socket.set_nodelay(true)?;
    socket.connect(dst).await
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_copy_ends_after_the_timeout_and_activity_postpones_it() {
        let (mut client, a) = duplex(1024);
        let (b, mut server) = duplex(1024);
        let (up, down) = (Counter::default(), Counter::default());
        let started = Instant::now();
        let copy = tokio::spawn(async move {
            bidirectional(a, b, &up, &down, Some(Duration::from_secs(60))).await
        });
        // Traffic every 40 s (one way, then the other) keeps it open past 60 s.
        let mut buf = [0u8; 5];
        for i in 0..3 {
            tokio::time::sleep(Duration::from_secs(40)).await;
            if i % 2 == 0 {
                client.write_all(b"hello").await.unwrap();
                server.read_exact(&mut buf).await.unwrap();
            } else {
                server.write_all(b"hello").await.unwrap();
                client.read_exact(&mut buf).await.unwrap();
            }
        }
        assert!(!copy.is_finished(), "active for 120 s, never idle for 60");
        let copied = copy.await.unwrap().unwrap();
        assert_eq!(copied.ended, Ended::Idle);
        assert_eq!(
            (copied.a_to_b, copied.b_to_a),
            (10, 5),
            "this connection's bytes"
        );
        assert_eq!(started.elapsed(), Duration::from_secs(120 + 60));
        // Both legs were dropped: each side sees EOF.
        assert_eq!(client.read(&mut buf).await.unwrap(), 0);
        assert_eq!(server.read(&mut buf).await.unwrap(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn without_idle_timeout_a_quiet_copy_stays_open() {
        let (mut client, a) = duplex(1024);
        let (b, mut server) = duplex(1024);
        let (up, down) = (Counter::default(), Counter::default());
        let copy = tokio::spawn(async move { bidirectional(a, b, &up, &down, None).await });
        tokio::time::sleep(Duration::from_secs(24 * 3600)).await;
        assert!(!copy.is_finished(), "a day of silence, still open");
        client.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        server.read_exact(&mut one).await.unwrap();
        drop(client);
        drop(server);
        assert!(copy.await.unwrap().is_ok());
    }
}
