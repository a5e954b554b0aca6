//! Byte copying between the two legs of a proxied connection, shared by the plain TCP path
//! and the mTLS tunnel. Each direction ends on its own EOF by shutting down the other
//! side's write half, so half-closed protocols (request, FIN, response) work; an error in
//! either direction ends both.
use std::io;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Per-direction buffer. Kept small: memory per open connection is a design target.
pub const COPY_BUFFER: usize = 16 * 1024;

async fn pump<R, W>(mut from: R, mut to: W, bytes: &Counter) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; COPY_BUFFER];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        to.write_all(&buf[..n]).await?;
        bytes.inc_by(n as u64);
    }
}

/// Copy `a` ⇄ `b` until both directions are done; `a_to_b`/`b_to_a` count the bytes.
pub async fn bidirectional<A, B>(a: A, b: B, a_to_b: &Counter, b_to_a: &Counter) -> io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (ar, aw) = tokio::io::split(a);
    let (br, bw) = tokio::io::split(b);
    tokio::try_join!(pump(ar, bw, a_to_b), pump(br, aw, b_to_a))?;
    Ok(())
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
