//! The log filter, changeable at runtime by the operator (`POST /log_level?filter=...` on
//! the admin socket) without a restart.
use std::sync::OnceLock;

type Reload = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

static RELOAD: OnceLock<Reload> = OnceLock::new();

/// Installs the global subscriber: `format` `json` or text, on stderr, filtered by
/// `RUST_LOG` (default `info`), with the filter reloadable through [`set_filter`].
pub fn init(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // The handle's type depends on the formatter: each branch keeps its own.
    macro_rules! install {
        ($builder:expr) => {{
            let builder = $builder;
            let handle = builder.reload_handle();
            let _ = RELOAD.set(Box::new(move |spec: &str| {
                let filter = tracing_subscriber::EnvFilter::try_new(spec)
                    .map_err(|e| format!("invalid filter {spec:?}: {e}"))?;
                handle.reload(filter).map_err(|e| e.to_string())
            }));
            builder.init();
        }};
    }
    if format == "json" {
        install!(builder.json().with_filter_reloading())
    } else {
        install!(builder.with_filter_reloading())
    }
}

/// Replaces the log filter (`RUST_LOG` syntax: `debug`, `info,ecsmesh::proxy=trace`).
pub fn set_filter(spec: &str) -> Result<(), String> {
    match RELOAD.get() {
        Some(reload) => reload(spec),
        None => Err("logging is not reloadable in this process".into()),
    }
}
