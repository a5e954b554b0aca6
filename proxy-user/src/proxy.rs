//! The outbound listener: accepts connections the kernel redirected, recovers where each
//! was going and for which task, and forwards plain TCP there.
use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpListener, TcpSocket, TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    ebpf::OrigDstSource,
    metrics::Metrics,
    types::{OrigDst, TaskId, normalise},
};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const COPY_BUFFER: usize = 16 * 1024;

pub struct Outbound {
    pub orig_dst: Arc<dyn OrigDstSource>,
    /// Indexed by the kernel's `task_index`.
    pub tasks: Arc<Vec<TaskId>>,
    pub metrics: Arc<Metrics>,
    /// SO_MARK for upstream sockets, so the redirect never loops them back to us.
    pub socket_mark: u32,
}

impl Outbound {
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) {
        loop {
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "outbound accept failed");
                        continue;
                    }
                },
                () = shutdown.cancelled() => return,
            };
            let this = self.clone();
            tracker.spawn(async move { this.handle(stream, normalise(peer)).await });
        }
    }

    async fn handle(&self, client: TcpStream, peer: SocketAddr) {
        let Some((dst, task_index)) = self.orig_dst.claim(peer) else {
            self.metrics.fail("no_original_destination");
            tracing::warn!(%peer, "no original destination recorded; closing");
            return;
        };
        let Some(task) = self.tasks.get(task_index as usize) else {
            self.metrics.fail("unknown_task");
            tracing::warn!(%peer, task_index, "connection from an unknown task index; closing");
            return;
        };
        let labels = Metrics::task(task.as_str());
        self.metrics.opened.get_or_create(&labels).inc();
        let result = self.forward(client, dst, &labels).await;
        self.metrics.closed.get_or_create(&labels).inc();
        match result {
            Ok(()) => tracing::debug!(%peer, %dst, %task, "connection closed"),
            Err(e) => {
                tracing::debug!(%peer, %dst, %task, error = %e, "connection ended with error")
            }
        }
    }

    async fn forward(
        &self,
        client: TcpStream,
        dst: OrigDst,
        labels: &crate::metrics::TaskLabels,
    ) -> io::Result<()> {
        let upstream = match tokio::time::timeout(CONNECT_TIMEOUT, self.connect(dst.0)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                self.metrics.fail("upstream_connect");
                return Err(e);
            }
            Err(_) => {
                self.metrics.fail("upstream_connect_timeout");
                return Err(io::ErrorKind::TimedOut.into());
            }
        };
        let _ = client.set_nodelay(true);
        let (cr, cw) = client.into_split();
        let (ur, uw) = upstream.into_split();
        let sent = self.metrics.sent.get_or_create(labels).clone();
        let received = self.metrics.received.get_or_create(labels).clone();
        // Each direction ends on its own EOF by shutting down the other side's write half,
        // so half-closed protocols (request, FIN, response) work. An error in either
        // direction drops both, closing the sockets.
        tokio::try_join!(pump(cr, uw, &sent), pump(ur, cw, &received))?;
        Ok(())
    }

    async fn connect(&self, dst: SocketAddr) -> io::Result<TcpStream> {
        let socket = match dst {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        // 0 only in unprivileged unit tests (config rejects it): SO_MARK needs CAP_NET_ADMIN.
        if self.socket_mark != 0 {
            socket2::SockRef::from(&socket).set_mark(self.socket_mark)?;
        }
        socket.set_nodelay(true)?;
        socket.connect(dst).await
    }
}

async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    bytes: &prometheus_client::metrics::counter::Counter,
) -> io::Result<()> {
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

#[cfg(test)]
mod tests;
