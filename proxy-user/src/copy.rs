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
    }
}

/// Copy `a` ⇄ `b` until both directions are done; `a_to_b`/`b_to_a` count the bytes.
/// With `idle`, the copy also ends (`Ended::Idle`, both legs dropped) once no byte has
/// moved in either direction for that long.
pub async fn bidirectional<A, B>(
    a: A,
    b: B,
    a_to_b: &Counter,
    b_to_a: &Counter,
    idle: Option<Duration>,
) -> io::Result<Ended>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (ar, aw) = tokio::io::split(a);
    let (br, bw) = tokio::io::split(b);
    let Some(idle) = idle else {
        tokio::try_join!(pump(ar, bw, a_to_b, None), pump(br, aw, b_to_a, None))?;
        return Ok(Ended::Done);
    };
    let activity = Activity::new();
    let copy = async {
        tokio::try_join!(
            pump(ar, bw, a_to_b, Some(&activity)),
            pump(br, aw, b_to_a, Some(&activity))
        )
    };
    tokio::select! {
        r = copy => r.map(|_| Ended::Done),
        () = activity.expired(idle) => Ok(Ended::Idle),
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
        let ended = copy.await.unwrap().unwrap();
        assert_eq!(ended, Ended::Idle);
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
