//! Admin HTTP endpoint: liveness, readiness and metrics for the ECS health check and
//! Prometheus.
//!
//! Two doors with one router: the TCP admin address serves the read-only routes to
//! anyone who can reach it — host-mode tasks share the host's loopback, so that includes
//! tasks — and refuses the mutating ones (`POST /reload`); the admin Unix socket (root
//! only, mode 0600, a path no task has mounted) serves every route to the operator.
use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;

use crate::{
    accept::{Acceptor, Listener},
    identity::IdentityManager,
    metrics::Metrics,
};

pub struct AdminState {
    /// True once programs are attached, certificates issued and listeners bound.
    pub ready: AtomicBool,
    pub metrics: Arc<Metrics>,
    /// Present when the mesh (mTLS) is configured: `POST /reload` re-reads the trust
    /// bundle and issuer, `/identities` lists the certificates held.
    pub identities: Option<Arc<IdentityManager>>,
    /// Present with the mesh: `POST /reload` also re-reads the discovery file.
    pub discovery: Option<Arc<crate::discovery::Sources>>,
    /// Present with the mesh: `/endpoints` shows discovery and the balancer's state.
    pub mesh: Option<Arc<crate::proxy::Mesh>>,
    /// The node's enrolled tasks: `/identities` also lists those without a certificate.
    pub tasks: Option<Arc<crate::tasks::TaskTable>>,
    /// `/config_dump`: the effective configuration, as `check-config` prints it (paths,
    /// never key material: the config holds none).
    pub config_dump: String,
}

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

/// Who is asking: anyone on the TCP address, or the operator on the Unix socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    Network,
    Operator,
}

/// One admin request, as `route` needs it.
pub struct AdminRequest<'a> {
    pub method: &'a hyper::Method,
    pub path: &'a str,
    /// The `Accept` header (`/metrics` format).
    pub accept: Option<&'a str>,
    /// The query string (`POST /log_level?filter=...`).
    pub query: Option<&'a str>,
}

fn route(state: &AdminState, caller: Caller, req: AdminRequest<'_>) -> Response<Full<Bytes>> {
    let AdminRequest {
        method,
        path,
        accept,
        query,
    } = req;
    match (method, path) {
        (&hyper::Method::POST, "/log_level") if caller != Caller::Operator => respond(
            StatusCode::FORBIDDEN,
            "text/plain",
            "POST /log_level is served on the admin socket only (see admin_socket)\n".into(),
        ),
        (&hyper::Method::POST, "/log_level") => {
            let filter = percent_decode(
                query
                    .unwrap_or_default()
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("filter="))
                    .unwrap_or_default(),
            );
            let filter = filter.as_str();
            match crate::logging::set_filter(filter) {
                Ok(()) => {
                    tracing::info!(filter, "log filter changed by the operator");
                    respond(
                        StatusCode::OK,
                        "text/plain",
                        format!("log filter: {filter}\n"),
                    )
                }
                Err(e) => respond(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")),
            }
        }
        (&hyper::Method::POST, "/reload") if caller != Caller::Operator => respond(
            StatusCode::FORBIDDEN,
            "text/plain",
            "POST /reload is served on the admin socket only (see admin_socket)\n".into(),
        ),
        (&hyper::Method::POST, "/reload") => match (&state.identities, &state.discovery) {
            (None, None) => respond(
                StatusCode::NOT_FOUND,
                "text/plain",
                "no identity configured\n".into(),
            ),
            (ids, discovery) => {
                let ids = ids.as_ref().map(|i| i.reload().map_err(|e| e.to_string()));
                let eps = discovery.as_ref().map(|d| d.reload_file());
                match (ids.transpose(), eps.transpose()) {
                    (Ok(_), Ok(_)) => respond(StatusCode::OK, "text/plain", "reloaded\n".into()),
                    (Err(e), _) | (_, Err(e)) => respond(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "text/plain",
                        format!("{e}\n"),
                    ),
                }
            }
        },
        (_, "/trust") => match &state.identities {
            Some(ids) => respond(
                StatusCode::OK,
                "application/json",
                serde_json::to_string(&*ids.trust_status()).expect("the trust status serialises"),
            ),
            None => respond(
                StatusCode::NOT_FOUND,
                "text/plain",
                "no identity configured\n".into(),
            ),
        },
        (_, "/endpoints") => match &state.mesh {
            Some(mesh) => respond(
                StatusCode::OK,
                "application/json",
                mesh.endpoints_report().to_string(),
            ),
            None => respond(
                StatusCode::NOT_FOUND,
                "text/plain",
                "no mesh configured\n".into(),
            ),
        },
        (_, "/config_dump") => respond(
            StatusCode::OK,
            "application/json",
            state.config_dump.clone(),
        ),
        (_, "/identities") => respond(
            StatusCode::OK,
            "application/json",
            identities_json(state).to_string(),
        ),
        _ => route_get(state, path, accept),
    }
}

/// The certificates held (identity, serial, expiry), then every enrolled task that has
/// none (`"error": "no_identity"`: its meshed connections fail until it gets one).
fn identities_json(state: &AdminState) -> serde_json::Value {
    let Some(ids) = &state.identities else {
        return serde_json::Value::Array(Vec::new());
    };
    let mut list: Vec<serde_json::Value> = ids
        .identities()
        .iter()
        .filter_map(|id| ids.current(id))
        .map(|svid| {
            serde_json::json!({
                "identity": svid.id.to_string(),
                "serial": svid.serial,
                "not_after": svid.not_after.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            })
        })
        .collect();
    for (_, task) in state.tasks.iter().flat_map(|t| t.all()) {
        let held = task
            .identity
            .as_ref()
            .is_some_and(|id| ids.current(id).is_some());
        if !held {
            list.push(serde_json::json!({
                "task": task.id.as_str(),
                "family": task.family,
                "identity": null,
                "error": "no_identity",
            }));
        }
    }
    serde_json::Value::Array(list)
}

/// `%XX` escapes of a query value decoded (`+` is a space); bad escapes stay as they are.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
                continue;
            }
            (b'+', _) => out.push(b' '),
            (b, _) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn route_get(state: &AdminState, path: &str, accept: Option<&str>) -> Response<Full<Bytes>> {
    match path {
        "/live" => respond(StatusCode::OK, "text/plain", "live\n".into()),
        "/ready" if state.ready.load(Ordering::Acquire) => {
            respond(StatusCode::OK, "text/plain", "ready\n".into())
        }
        "/ready" => respond(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready\n".into(),
        ),
        "/metrics" if crate::metrics::classic::wants_openmetrics(accept) => respond(
            StatusCode::OK,
            crate::metrics::classic::OPENMETRICS_CONTENT_TYPE,
            state.metrics.encode(),
        ),
        "/metrics" => respond(
            StatusCode::OK,
            crate::metrics::classic::CONTENT_TYPE,
            state.metrics.encode_classic(),
        ),
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

/// Serves the admin routes on `listener` until `shutdown`; `caller` says which routes.
pub async fn serve<L>(
    listener: L,
    caller: Caller,
    state: Arc<AdminState>,
    shutdown: CancellationToken,
) where
    L: Listener,
    L::Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let name = match caller {
        Caller::Network => "admin",
        Caller::Operator => "admin_socket",
    };
    let mut acceptor = Acceptor::new(name, state.metrics.clone());
    loop {
        let (stream, _) = tokio::select! {
            conn = acceptor.accept(&listener) => conn,
            () = shutdown.cancelled() => return,
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let accept = req
                    .headers()
                    .get(hyper::header::ACCEPT)
                    .and_then(|v| v.to_str().ok());
                let resp = route(
                    &state,
                    caller,
                    AdminRequest {
                        method: req.method(),
                        path: req.uri().path(),
                        accept,
                        query: req.uri().query(),
                    },
                );
                async move { Ok::<_, Infallible>(resp) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!(error = %e, "admin connection ended with error");
            }
        });
    }
}

/// Binds the operator's admin socket: parent directory 0700, socket 0600, a stale socket
/// of a previous run replaced.
pub fn bind_socket(path: &std::path::Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    #[test]
    fn query_values_are_percent_decoded() {
        assert_eq!(
            super::percent_decode("info%2Cecsmesh%3A%3Aproxy%3Ddebug"),
            "info,ecsmesh::proxy=debug"
        );
        assert_eq!(super::percent_decode("a+b%zz%4"), "a b%zz%4");
    }
}
