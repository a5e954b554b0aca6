//! `ecsmesh run`: the node lifecycle (bind, install, serve, drain; the steps are in
//! `node.rs`), and what the steps share: errors, binding, the install helpers.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;

mod cloud;
mod ecs;
mod mesh;
mod node;
mod sweep;

use crate::{
    config::Config,
    ebpf::{self, EbpfError, PinError, Redirect},
    identity::IdentityError,
    metrics::Metrics,
    tasks::TaskTable,
};

/// How long open connections may finish after the redirect is detached.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// An entry whose client closed this long ago was never going to be accepted.
const UNCLAIMED_GRACE: Duration = Duration::from_secs(10);

async fn sweep(map: Arc<ebpf::OrigDstMap>, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(UNCLAIMED_GRACE / 2);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let m = map.clone();
        let swept = tokio::task::spawn_blocking(move || m.sweep(UNCLAIMED_GRACE))
            .await
            .unwrap_or(0);
        for _ in 0..swept {
            metrics.fail("never_accepted");
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{field}: cannot listen on {addr}: {source}")]
    Bind {
        field: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("admin_socket: cannot listen on {path}: {source}")]
    AdminSocket {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Ebpf(#[from] EbpfError),
    #[error("uninstalling: {0}")]
    Uninstall(#[from] PinError),
    #[error("installing signal handlers: {0}")]
    Signal(std::io::Error),
    #[error("access_log: {0}")]
    AccessLog(crate::access_log::AccessLogError),
    #[error("traces: {0}")]
    Traces(crate::trace::ExportError),
    #[error("identity: {0}")]
    Identity(#[from] IdentityError),
    #[error("ecs: {0}")]
    Ecs(crate::ecs::EcsError),
    #[error("cloudmap: {0}")]
    CloudMap(crate::cloudmap::CloudMapError),
}

/// SIGTERM before the proxy became ready: nothing to drain; the redirect stays attached.
fn shutdown_now(redirect: Redirect) -> Result<(), RunError> {
    tracing::info!("SIGTERM before ready: stopping; the redirect stays attached");
    redirect.release();
    Ok(())
}

pub(crate) fn bind(field: &'static str, addr: SocketAddr) -> Result<TcpListener, RunError> {
    let err = |source| RunError::Bind {
        field,
        addr,
        source,
    };
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(err)?;
    if addr.is_ipv6() {
        // v4-mapped clients are served by the IPv4 listener (the kernel keys them as IPv4).
        socket2::SockRef::from(&socket)
            .set_only_v6(true)
            .map_err(err)?;
    }
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    socket.listen(1024).map_err(err)
}

/// The node lifecycle: bind (everything that can fail on user input), install (load,
/// enrol what is known, attach — taking over from a previous proxy without a gap), serve
/// (accept loops; ready once discovery synced), drain on SIGTERM/SIGINT.
pub async fn run(config: Arc<Config>) -> Result<(), RunError> {
    tracing::info!(
        config = %serde_json::to_string(&*config).unwrap_or_default(),
        "configuration loaded"
    );
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(RunError::Signal)?;
    let bound = node::Bound::bind(&config)?;
    let installed = bound.install(&config)?;
    let Some(serving) = installed.serve(&config, &mut sigterm).await? else {
        return Ok(());
    };
    let after = if config.uninstall_on_exit {
        "the redirect is removed (the task is stopping)"
    } else {
        "the redirect stays attached until the next proxy takes over"
    };
    tokio::select! {
        _ = sigterm.recv() => tracing::info!("SIGTERM: draining; {after}"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: draining; {after}"),
    }
    serving.drain(&config).await;
    Ok(())
}

type MeshHandles = Option<(
    Arc<crate::identity::IdentityManager>,
    Arc<crate::proxy::ExpectedIdentity>,
)>;

/// Install step 1 with the ECS reconciler, which restores the last run's tasks from the
/// state file into the enrolment before anything is attached.
fn prepare(
    config: &Config,
    initial: &[(u32, &crate::config::TaskConfig)],
    tasks: &Arc<TaskTable>,
    mesh: &MeshHandles,
    metrics: &Arc<Metrics>,
) -> Result<(ebpf::Prepared, Option<ecs::Reconciler>), RunError> {
    let prepared = Redirect::prepare(config, initial)?;
    let Some(settings) = &config.ecs else {
        return Ok((prepared, None));
    };
    let default_mode = if config.bridge_ipv4.is_some() || config.bridge_ipv6.is_some() {
        crate::config::NetworkMode::Bridge
    } else {
        crate::config::NetworkMode::Host
    };
    let node = ecs::NodeSide {
        attach_root: config.cgroup_root.clone(),
        state_file: config.state_dir.join(ecs::STATE_FILE),
        default_mode,
    };
    let mut reconciler = ecs::Reconciler::new(
        settings,
        node,
        tasks.clone(),
        prepared.enroller(),
        mesh.clone(),
        metrics.clone(),
    )
    .map_err(RunError::Ecs)?;
    let restored = reconciler.restore();
    if restored > 0 || prepared.takeover() {
        tracing::info!(
            restored,
            "ECS tasks of the last run enrolled before attaching"
        );
    }
    Ok((prepared, Some(reconciler)))
}

/// A failed install leaves the kernel as it found it: a first install is removed whole,
/// a previous proxy's installation (a takeover) is left attached and untouched.
fn install_failed(config: &Config, takeover: bool, e: RunError) -> RunError {
    if !takeover && let Err(cleanup) = ebpf::uninstall(&config.pin_dir) {
        tracing::error!(error = %cleanup, "cleaning up after a failed install");
    }
    e
}
