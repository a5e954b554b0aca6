//! Reacting to changes of a few files (the trust bundle and issuer, the discovery file):
//! their directories are watched, not the files, because tools replace files by rename,
//! which a watch on the old file would miss.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use tokio_util::sync::CancellationToken;

/// Quiet time after the last change before acting on it: a CA rotation writes several
/// files, and reloading between them would only produce transient errors.
pub const DEBOUNCE: Duration = Duration::from_millis(200);

/// A running watch; changes stop being reported when it is dropped.
pub struct Watch {
    _watcher: notify::RecommendedWatcher,
    rx: tokio::sync::mpsc::UnboundedReceiver<()>,
}

/// Watches `files` (absolute paths) for changes.
///
/// Only changes count. inotify also reports opens and closes (`Access`), and a reload
/// opens the files: reacting to those made every reload schedule the next one, 5 times a
/// second for ever, once anything (a sidecar, `ca status`, the reload itself) had read
/// them.
pub fn files(files: Vec<PathBuf>) -> notify::Result<Watch> {
    use notify::Watcher;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let mut dirs: Vec<PathBuf> = files
        .iter()
        .map(|f| f.parent().unwrap_or(Path::new(".")).to_owned())
        .collect();
    dirs.sort();
    dirs.dedup();
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if let Ok(ev) = ev
            && !matches!(ev.kind, notify::EventKind::Access(_))
            && ev.paths.iter().any(|p| files.iter().any(|w| w == p))
        {
            let _ = tx.send(());
        }
    })?;
    for dir in dirs {
        watcher.watch(&dir, notify::RecursiveMode::NonRecursive)?;
    }
    Ok(Watch {
        _watcher: watcher,
        rx,
    })
}

impl Watch {
    /// Calls `on_change` once the files have been quiet for `DEBOUNCE` after a change,
    /// until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken, mut on_change: impl FnMut()) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                ev = self.rx.recv() => if ev.is_none() { return },
            }
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(DEBOUNCE) => break,
                    ev = self.rx.recv() => if ev.is_none() { return },
                }
            }
            on_change();
        }
    }
}

/// Watches `files` and calls `reload` (with its trigger, for the log) once they changed
/// and on every SIGHUP, until `shutdown`. Either that cannot be set up is logged, not
/// fatal: the other reload paths still work. Needs a tokio runtime.
pub fn reload_on_change_or_sighup(
    what: &'static str,
    files_: Vec<PathBuf>,
    shutdown: CancellationToken,
    reload: impl Fn(&str) + Clone + Send + 'static,
) {
    match files(files_) {
        Ok(watch) => {
            let on_change = reload.clone();
            tokio::spawn(watch.run(shutdown.clone(), move || on_change("file change")));
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot watch the {what}; reload on SIGHUP or POST /reload only")
        }
    }
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(mut hup) => {
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        Some(()) = hup.recv() => reload("SIGHUP"),
                    }
                }
            });
        }
        Err(e) => tracing::error!(error = %e, "cannot handle SIGHUP"),
    }
}

/// An absolute form of `p` (watch events carry absolute paths).
pub fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_owned())
}
