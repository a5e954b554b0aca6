//! Timeouts and caps that protect the proxy from dead peers and noisy neighbours.
use std::time::Duration;

use super::raw::Invalid;

pub const DEFAULT_TUNNEL_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_TUNNEL_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_TUNNEL_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
pub const DEFAULT_TUNNEL_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_TUNNEL_HANDSHAKE_CAP: usize = 256;
pub const DEFAULT_MAX_CONNECTIONS_PER_TASK: usize = 4096;

/// Typed limits, part of [`super::Config`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Limits {
    /// HTTP/2 PING on every tunnel connection (both sides) this often.
    pub tunnel_keepalive_interval: Duration,
    /// A PING unanswered for this long closes the tunnel connection (dead peer).
    pub tunnel_keepalive_timeout: Duration,
    /// A pooled tunnel connection without streams for this long is closed.
    pub tunnel_idle_timeout: Duration,
    /// One tunnel dial: TCP connect, TLS and HTTP/2 handshakes.
    pub tunnel_connect_timeout: Duration,
    /// TLS handshakes the tunnel listener runs at once (after the ClientHello).
    pub tunnel_handshake_cap: usize,
    /// Open outbound connections per source task; more are closed at once.
    pub max_connections_per_task: usize,
    /// Opaque TCP connections with no bytes either way for this long are closed; `None`:
    /// never (database pools keep idle connections for hours).
    pub tcp_idle_timeout: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            tunnel_keepalive_interval: DEFAULT_TUNNEL_KEEPALIVE_INTERVAL,
            tunnel_keepalive_timeout: DEFAULT_TUNNEL_KEEPALIVE_TIMEOUT,
            tunnel_idle_timeout: DEFAULT_TUNNEL_IDLE_TIMEOUT,
            tunnel_connect_timeout: DEFAULT_TUNNEL_CONNECT_TIMEOUT,
            tunnel_handshake_cap: DEFAULT_TUNNEL_HANDSHAKE_CAP,
            max_connections_per_task: DEFAULT_MAX_CONNECTIONS_PER_TASK,
            tcp_idle_timeout: None,
        }
    }
}

/// The on-disk fields (top level of the TOML), as read.
#[derive(Debug, Default)]
pub(super) struct RawLimits {
    pub tunnel_keepalive_interval_secs: Option<u64>,
    pub tunnel_keepalive_timeout_secs: Option<u64>,
    pub tunnel_idle_timeout_secs: Option<u64>,
    pub tunnel_connect_timeout_secs: Option<u64>,
    pub tunnel_handshake_cap: Option<usize>,
    pub max_connections_per_task: Option<usize>,
    pub tcp_idle_timeout_secs: Option<u64>,
}

fn secs(field: &str, value: Option<u64>, default: Duration) -> Result<Duration, Invalid> {
    match value {
        None => Ok(default),
        Some(0) => Err((field.into(), "must be at least 1".into())),
        Some(s) if s > 86_400 * 365 => Err((field.into(), "must be at most a year".into())),
        Some(s) => Ok(Duration::from_secs(s)),
    }
}

fn count(field: &str, value: Option<usize>, default: usize) -> Result<usize, Invalid> {
    match value {
        None => Ok(default),
        Some(0) => Err((field.into(), "must be at least 1".into())),
        Some(n) => Ok(n),
    }
}

impl RawLimits {
    pub(super) fn validate(self) -> Result<Limits, Invalid> {
        let tcp_idle_timeout = self
            .tcp_idle_timeout_secs
            .map(|s| secs("tcp_idle_timeout_secs", Some(s), Duration::ZERO))
            .transpose()?;
        Ok(Limits {
            tunnel_keepalive_interval: secs(
                "tunnel_keepalive_interval_secs",
                self.tunnel_keepalive_interval_secs,
                DEFAULT_TUNNEL_KEEPALIVE_INTERVAL,
            )?,
            tunnel_keepalive_timeout: secs(
                "tunnel_keepalive_timeout_secs",
                self.tunnel_keepalive_timeout_secs,
                DEFAULT_TUNNEL_KEEPALIVE_TIMEOUT,
            )?,
            tunnel_idle_timeout: secs(
                "tunnel_idle_timeout_secs",
                self.tunnel_idle_timeout_secs,
                DEFAULT_TUNNEL_IDLE_TIMEOUT,
            )?,
            tunnel_connect_timeout: secs(
                "tunnel_connect_timeout_secs",
                self.tunnel_connect_timeout_secs,
                DEFAULT_TUNNEL_CONNECT_TIMEOUT,
            )?,
            tunnel_handshake_cap: count(
                "tunnel_handshake_cap",
                self.tunnel_handshake_cap,
                DEFAULT_TUNNEL_HANDSHAKE_CAP,
            )?,
            max_connections_per_task: count(
                "max_connections_per_task",
                self.max_connections_per_task,
                DEFAULT_MAX_CONNECTIONS_PER_TASK,
            )?,
            tcp_idle_timeout,
        })
    }
}
