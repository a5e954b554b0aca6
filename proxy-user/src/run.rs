//! `ecsmesh run`: bind, install the redirect, serve, and on SIGTERM/SIGINT detach first
//! (so tasks stop being steered at a proxy that is going away), then drain.
use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use tokio::net::{TcpListener, TcpSocket};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

mod cloud;
mod ecs;
mod mesh;

use crate::{
    admin::{self, AdminState},
    config::Config,
    ebpf::{self, EbpfError, PinError, Redirect},
    identity::IdentityError,
    metrics::Metrics,
    proxy::Outbound,
    tasks::{TaskRef, TaskTable},
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

pub async fn run(config: Arc<Config>) -> Result<(), RunError> {
    tracing::info!(
        config = %serde_json::to_string(&*config).unwrap_or_default(),
        "configuration loaded"
    );
    // Two sockets per proxied connection: the usual soft limit of 1024 would cap the
    // node at a few hundred connections.
    let nofile = match crate::rlimit::raise_nofile() {
        Ok(n) => {
            tracing::info!(
                soft_before = n.before,
                soft = n.after,
                hard = n.hard,
                "open files limit (RLIMIT_NOFILE)"
            );
            Some(n.after)
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not raise the open files limit (RLIMIT_NOFILE)");
            None
        }
    };
    // Everything that can fail on user input is checked before anything is attached.
    let admin_listener = bind("admin_addr", config.admin_addr)?;
    let admin_socket =
        admin::bind_socket(&config.admin_socket).map_err(|source| RunError::AdminSocket {
            path: config.admin_socket.clone(),
            source,
        })?;
    let outbound: Vec<_> = config
        .outbound_listen_addrs()
        .into_iter()
        .map(|addr| bind("outbound_port", addr))
        .collect::<Result<_, _>>()?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(RunError::Signal)?;
    let cloudmap_metrics = crate::cloudmap::CloudMapMetrics::default();
    let metrics = Arc::new(Metrics::with_extra(|registry| {
        if config.cloudmap.is_some() {
            cloudmap_metrics.register(registry);
        }
    }));
    if let Some(n) = nofile {
        metrics
            .open_files_limit
            .set(n.try_into().unwrap_or(i64::MAX));
    }
    // Static tasks get the first indexes; their certificates are issued before ready.
    let tasks = Arc::new(TaskTable::default());
    let initial: Vec<(u32, &crate::config::TaskConfig)> = config
        .tasks
        .iter()
        .map(|t| {
            let task = TaskRef::new(t.id.clone(), t.family.clone(), t.identity.clone(), true);
            (tasks.insert(task), t)
        })
        .collect();
    let mesh = mesh::parts(&config, &metrics, &tasks)?;
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let state = Arc::new(AdminState {
        ready: Default::default(),
        metrics: metrics.clone(),
        identities: mesh.as_ref().map(|m| m.identities.clone()),
    });
    tokio::spawn(admin::serve(
        admin_listener,
        admin::Caller::Network,
        state.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(admin::serve(
        admin_socket,
        admin::Caller::Operator,
        state.clone(),
        shutdown.clone(),
    ));

    // Install, step 1: load, configure, enrol what is known (static tasks, and the ECS
    // tasks of the last run from the state file), before anything is attached.
    let takeover = ebpf::attached(&config.pin_dir);
    let mesh_handles = mesh
        .as_ref()
        .map(|parts| (parts.identities.clone(), parts.mesh.expected.clone()));
    let (prepared, reconciler) = match prepare(&config, &initial, &tasks, &mesh_handles, &metrics) {
        Ok(x) => x,
        Err(e) => return Err(install_failed(&config, takeover, e)),
    };
    // Step 2: attach (taking over from a previous proxy's programs without a gap).
    let (redirect, orig_dst) = match prepared.attach() {
        Ok(x) => x,
        Err(e) => return Err(install_failed(&config, takeover, e.into())),
    };
    metrics.kernel.set(redirect.stats_handle());
    let orig_dst = Arc::new(orig_dst);
    tokio::spawn(sweep(orig_dst.clone(), metrics.clone(), shutdown.clone()));
    let mesh_discovery = mesh.as_ref().map(|m| m.mesh.discovery.clone());
    let proxy = Arc::new(Outbound {
        orig_dst,
        tasks: tasks.clone(),
        metrics: metrics.clone(),
        socket_mark: config.socket_mark,
        mode: config.mode,
        mesh: mesh.as_ref().map(|m| m.mesh.clone()),
        opaque_ports: config.opaque_ports.clone(),
        detect_timeout: config.detect_timeout,
        max_connections_per_task: config.limits.max_connections_per_task,
        tcp_idle_timeout: config.limits.tcp_idle_timeout,
    });
    if let Some(parts) = mesh {
        parts.identities.spawn_background(shutdown.clone());
        for listener in parts.listeners {
            tracing::info!(addr = ?listener.local_addr().ok(), endpoints = config.discovery.len(), "tunnel listener ready");
            tokio::spawn(
                parts
                    .inbound
                    .clone()
                    .serve(listener, shutdown.clone(), tracker.clone()),
            );
        }
    }
    for listener in outbound {
        tracing::info!(addr = ?listener.local_addr().ok(), "outbound listener ready");
        tokio::spawn(
            proxy
                .clone()
                .serve(listener, shutdown.clone(), tracker.clone()),
        );
    }
    if let (Some(settings), Some(mut reconciler)) = (&config.ecs, reconciler) {
        // Ready means discovery synced once: wait (bounded by shutdown) for a first
        // successful poll of the agent.
        loop {
            match reconciler.sync().await {
                Ok(()) => break,
                Err(e) => tracing::warn!(error = %e, "waiting for the ECS agent"),
            }
            tokio::select! {
                () = tokio::time::sleep(settings.poll_interval) => {}
                _ = sigterm.recv() => return shutdown_now(redirect),
            }
        }
        tokio::spawn(reconciler.run(settings.poll_interval, shutdown.clone()));
    }
    if let (Some(settings), Some(discovery)) = (&config.cloudmap, mesh_discovery.as_ref()) {
        let mut synced = cloud::start_cloudmap(
            settings,
            config.discovery.clone(),
            discovery.clone(),
            config.inbound_port(),
            cloudmap_metrics.clone(),
            shutdown.clone(),
        )
        .await
        .map_err(RunError::CloudMap)?;
        // Ready means discovery synced once.
        tokio::select! {
            r = synced.wait_for(|s| *s) => { let _ = r; }
            _ = sigterm.recv() => return shutdown_now(redirect),
        }
    }
    state.ready.store(true, Ordering::Release);
    let ready_attribute = match config.ecs.as_ref().filter(|e| e.publish_ready_attribute) {
        Some(settings) => match cloud::ReadyAttribute::publish(settings).await {
            Ok(a) => Some(a),
            Err(e) => {
                tracing::warn!(error = %e, "could not publish ecsmesh.ready; placement constraints will not see this instance");
                None
            }
        },
        None => None,
    };
    tracing::info!(instance = %config.instance, "ready");

    tokio::select! {
        _ = sigterm.recv() => tracing::info!("SIGTERM: draining; the redirect stays attached until the next proxy takes over"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: draining; the redirect stays attached until the next proxy takes over"),
    }
    state.ready.store(false, Ordering::Release);
    if let Some(attribute) = &ready_attribute {
        attribute.withdraw().await;
    }
    let kernel = redirect.kernel_stats();
    // Only `ecsmesh uninstall` detaches: tasks wait (fail-closed) for the next proxy.
    redirect.release();
    tracing::info!(?kernel, "redirect left attached and pinned");
    shutdown.cancel();
    tracker.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = tracker.len(),
            "drain timeout; closing remaining connections"
        );
    }
    let _ = std::fs::remove_file(&config.admin_socket);
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
