//! Access logs, opt-in (`[access_log]`, off by default, HTTP and TCP separately): one JSON
//! line per HTTP request (at both hops) and per TCP connection (at the source hop), with
//! the ECS task IDs, families and SPIFFE IDs of both sides.
//!
//! Lines go through a bounded queue to one writer thread, so the data path never waits
//! on the disk; when the queue is full a line is dropped and counted
//! (`ecsmesh_access_log_dropped_total`).
use std::{
    io::Write,
    path::PathBuf,
    sync::mpsc::{SyncSender, TrySendError, sync_channel},
};

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;

/// Lines waiting for the writer before new ones are dropped.
const QUEUE: usize = 16 * 1024;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AccessLogSettings {
    pub http: bool,
    pub tcp: bool,
    /// Where lines go; `None`: standard output.
    pub path: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
#[error("access log {path}: {source}")]
pub struct AccessLogError {
    path: String,
    source: std::io::Error,
}

pub struct AccessLog {
    http: bool,
    tcp: bool,
    tx: Option<SyncSender<String>>,
    dropped: Counter,
}

impl AccessLog {
    /// A log that writes nothing.
    pub fn off() -> Self {
        Self {
            http: false,
            tcp: false,
            tx: None,
            dropped: Counter::default(),
        }
    }

    /// Opens the destination (appending) and starts the writer thread when either kind is
    /// on; `dropped` counts lines the full queue refused.
    pub fn start(settings: &AccessLogSettings, dropped: Counter) -> Result<Self, AccessLogError> {
        if !settings.http && !settings.tcp {
            return Ok(Self::off());
        }
        let mut out: Box<dyn Write + Send> = match &settings.path {
            None => Box::new(std::io::stdout()),
            Some(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| AccessLogError {
                        path: path.display().to_string(),
                        source,
                    })?,
            ),
        };
        let (tx, rx) = sync_channel::<String>(QUEUE);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                while let Ok(line) = rx.recv() {
                    let mut batch = line;
                    batch.push('\n');
                    // Whatever else is queued goes in the same write.
                    while let Ok(more) = rx.try_recv() {
                        batch.push_str(&more);
                        batch.push('\n');
                    }
                    if out
                        .write_all(batch.as_bytes())
                        .and_then(|()| out.flush())
                        .is_err()
                    {
                        tracing::warn!("access log write failed");
                    }
                }
            })
            .map_err(|source| AccessLogError {
                path: "writer thread".into(),
                source,
            })?;
        Ok(Self {
            http: settings.http,
            tcp: settings.tcp,
            tx: Some(tx),
            dropped,
        })
    }

    pub fn http_on(&self) -> bool {
        self.http
    }

    pub fn tcp_on(&self) -> bool {
        self.tcp
    }

    /// Queues one line (an entry serialised as JSON); never blocks.
    pub fn write(&self, entry: &impl Serialize) {
        let Some(tx) = &self.tx else { return };
        let Ok(line) = serde_json::to_string(entry) else {
            return;
        };
        match tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.inc();
            }
        }
    }
}

/// Now, as RFC 3339 UTC.
pub fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_reach_the_file_and_off_writes_nothing() {
        let path = std::env::temp_dir().join(format!("ecsmesh-access-{}.log", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let settings = AccessLogSettings {
            http: true,
            tcp: false,
            path: Some(path.clone()),
        };
        let log = AccessLog::start(&settings, Counter::default()).unwrap();
        assert!(log.http_on() && !log.tcp_on());
        log.write(&serde_json::json!({"a": 1}));
        log.write(&serde_json::json!({"b": 2}));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.lines().count() == 2 {
                assert_eq!(text, "{\"a\":1}\n{\"b\":2}\n");
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{text:?}");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        std::fs::remove_file(&path).unwrap();
        let off = AccessLog::off();
        off.write(&serde_json::json!({"c": 3}));
        assert!(!off.http_on() && !off.tcp_on());
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let t = now();
        assert!(t.ends_with('Z') && t.as_bytes()[10] == b'T', "{t}");
        assert!(
            time::OffsetDateTime::parse(&t, &time::format_description::well_known::Rfc3339).is_ok()
        );
    }
}
