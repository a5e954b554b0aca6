//! One accept loop policy for every listener (outbound, tunnel, admin): running out of
//! file descriptors or kernel memory (`EMFILE`, `ENFILE`, `ENOBUFS`, `ENOMEM`) pauses
//! accepting for a moment instead of spinning on an error that repeats until a connection
//! closes; per-connection errors (`ECONNABORTED`, a reset before accept) are retried at
//! once. Both are counted; the warning is rate-limited.
use std::{
    io,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::metrics::{AcceptLabels, Metrics};

/// Pause after a resource error before accepting again.
pub const RESOURCE_BACKOFF: Duration = Duration::from_millis(100);
/// At most one warning per listener this often.
const WARN_EVERY: Duration = Duration::from_secs(5);

/// Something connections are accepted from (TCP and Unix listeners; fakes in tests).
pub trait Listener: Send + Sync + 'static {
    type Stream: Send + 'static;
    type Addr: Send + 'static;
    fn accept_conn(
        &self,
    ) -> impl std::future::Future<Output = io::Result<(Self::Stream, Self::Addr)>> + Send;
}

impl Listener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    type Addr = std::net::SocketAddr;
    async fn accept_conn(&self) -> io::Result<(Self::Stream, Self::Addr)> {
        self.accept().await
    }
}

impl Listener for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    type Addr = tokio::net::unix::SocketAddr;
    async fn accept_conn(&self) -> io::Result<(Self::Stream, Self::Addr)> {
        self.accept().await
    }
}

/// The label of a resource-exhaustion error, `None` for any other error.
pub fn resource_error(e: &io::Error) -> Option<&'static str> {
    match e.raw_os_error()? {
        libc::EMFILE => Some("emfile"),
        libc::ENFILE => Some("enfile"),
        libc::ENOBUFS => Some("enobufs"),
        libc::ENOMEM => Some("enomem"),
        _ => None,
    }
}

/// The accept policy of one listener (`name` labels its metrics and logs).
pub struct Acceptor {
    name: &'static str,
    metrics: Arc<Metrics>,
    backoff: Duration,
    last_warn: Option<Instant>,
}

impl Acceptor {
    pub fn new(name: &'static str, metrics: Arc<Metrics>) -> Self {
        Self {
            name,
            metrics,
            backoff: RESOURCE_BACKOFF,
            last_warn: None,
        }
    }

    /// The next connection. Cancel-safe (drop it to stop accepting).
    pub async fn accept<L: Listener>(&mut self, listener: &L) -> (L::Stream, L::Addr) {
        loop {
            let e = match listener.accept_conn().await {
                Ok(conn) => return conn,
                Err(e) => e,
            };
            let resource = resource_error(&e);
            self.metrics
                .accept_errors
                .get_or_create(&AcceptLabels {
                    listener: self.name,
                    error: resource.unwrap_or("other"),
                })
                .inc();
            let now = Instant::now();
            if self
                .last_warn
                .is_none_or(|t| now.duration_since(t) >= WARN_EVERY)
            {
                self.last_warn = Some(now);
                match resource {
                    Some(_) => {
                        tracing::warn!(listener = self.name, error = %e, backoff_ms = self.backoff.as_millis() as u64, "accept: out of resources; pausing (further errors counted in ecsmesh_accept_errors_total)")
                    }
                    None => {
                        tracing::warn!(listener = self.name, error = %e, "accept failed; retrying")
                    }
                }
            }
            if resource.is_some() {
                tokio::time::sleep(self.backoff).await;
            } else {
                // ECONNABORTED and the like concern one connection: go on, but let other
                // tasks run should an error ever repeat.
                tokio::task::yield_now().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::VecDeque, sync::Mutex};

    use super::*;

    /// Hands out the scripted results in order, then pends forever.
    struct Script(Mutex<VecDeque<io::Result<u32>>>);

    impl Listener for Script {
        type Stream = u32;
        type Addr = ();
        async fn accept_conn(&self) -> io::Result<(u32, ())> {
            let next = self.0.lock().unwrap().pop_front();
            match next {
                Some(r) => r.map(|n| (n, ())),
                None => std::future::pending().await,
            }
        }
    }

    fn errors(m: &Metrics, name: &'static str, error: &'static str) -> u64 {
        m.accept_errors
            .get_or_create(&AcceptLabels {
                listener: name,
                error,
            })
            .get()
    }

    #[tokio::test(start_paused = true)]
    async fn emfile_backs_off_then_accepts() {
        let metrics = Arc::new(Metrics::default());
        let script = Script(Mutex::new(
            [
                Err(io::Error::from_raw_os_error(libc::EMFILE)),
                Err(io::Error::from_raw_os_error(libc::EMFILE)),
                Err(io::Error::from_raw_os_error(libc::ENFILE)),
                Ok(7),
            ]
            .into(),
        ));
        let mut acceptor = Acceptor::new("test", metrics.clone());
        let started = tokio::time::Instant::now();
        let (conn, ()) = acceptor.accept(&script).await;
        assert_eq!(conn, 7);
        assert_eq!(
            started.elapsed(),
            3 * RESOURCE_BACKOFF,
            "one pause per resource error, no spinning"
        );
        assert_eq!(errors(&metrics, "test", "emfile"), 2);
        assert_eq!(errors(&metrics, "test", "enfile"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn per_connection_errors_are_retried_at_once() {
        let metrics = Arc::new(Metrics::default());
        let script = Script(Mutex::new(
            [
                Err(io::Error::from_raw_os_error(libc::ECONNABORTED)),
                Err(io::Error::from_raw_os_error(libc::ENOBUFS)),
                Ok(1),
            ]
            .into(),
        ));
        let mut acceptor = Acceptor::new("test", metrics.clone());
        let started = tokio::time::Instant::now();
        assert_eq!(acceptor.accept(&script).await.0, 1);
        assert_eq!(started.elapsed(), RESOURCE_BACKOFF, "only ENOBUFS paused");
        assert_eq!(errors(&metrics, "test", "other"), 1);
        assert_eq!(errors(&metrics, "test", "enobufs"), 1);
    }

    #[test]
    fn only_resource_errors_are_classed_as_such() {
        for (errno, label) in [
            (libc::EMFILE, Some("emfile")),
            (libc::ENFILE, Some("enfile")),
            (libc::ENOBUFS, Some("enobufs")),
            (libc::ENOMEM, Some("enomem")),
            (libc::ECONNABORTED, None),
            (libc::EPERM, None),
        ] {
            assert_eq!(
                resource_error(&io::Error::from_raw_os_error(errno)),
                label,
                "errno {errno}"
            );
        }
    }
}
