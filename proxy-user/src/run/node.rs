//! The steps of a node proxy's life, each a value that owns what the next step needs:
//! [`Bound`] (listeners, identities, admin up but not ready) → [`Installed`] (programs
//! attached, tasks enrolled) → [`Serving`] (accept loops, ready) → drained.
use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use tokio::{net::TcpListener, signal::unix::Signal};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{
    DRAIN_TIMEOUT, RunError, bind, cloud, ecs, install_failed, mesh, prepare, shutdown_now, sweep,
};
use crate::{
    admin::{self, AdminState},
    config::Config,
    ebpf::{self, Redirect},
    metrics::Metrics,
    proxy::Outbound,
    tasks::{TaskRef, TaskTable},
};

/// Shared by every step: what the proxy serves and how it stops.
struct Core {
    metrics: Arc<Metrics>,
    cloudmap_metrics: crate::cloudmap::CloudMapMetrics,
    tasks: Arc<TaskTable>,
    state: Arc<AdminState>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

/// Step 1, bind: every listener is bound and the identity material loaded (local tasks
/// have their certificates) before anything touches the kernel, so bad input fails the
/// start with nothing attached. Admin answers, not ready.
pub(super) struct Bound {
    core: Core,
    outbound: Vec<TcpListener>,
    mesh: Option<mesh::MeshParts>,
    /// Task-table index of each of the config's static tasks, in config order.
    static_tasks: Vec<u32>,
}

impl Bound {
    pub fn bind(config: &Config) -> Result<Self, RunError> {
        let admin_listener = bind("admin_addr", config.admin_addr)?;
        let admin_socket =
            admin::bind_socket(&config.admin_socket).map_err(|source| RunError::AdminSocket {
                path: config.admin_socket.clone(),
                source,
            })?;
        let outbound = config
            .outbound_listen_addrs()
            .into_iter()
            .map(|addr| bind("outbound_port", addr))
            .collect::<Result<_, _>>()?;
        let cloudmap_metrics = crate::cloudmap::CloudMapMetrics::default();
        let metrics = Arc::new(Metrics::with_extra(|registry| {
            if config.cloudmap.is_some() {
                cloudmap_metrics.register(registry);
            }
        }));
        metrics.set_max_series(config.metrics.max_series_per_metric);
        metrics.set_access_log(
            crate::access_log::AccessLog::start(
                &config.access_log,
                metrics.access_log_dropped.clone(),
            )
            .map_err(RunError::AccessLog)?,
        );
        if let Some(settings) = &config.traces {
            metrics.set_traces(
                crate::trace::Traces::start(
                    settings,
                    crate::trace::ProxyIdentity {
                        cluster: &config.cluster,
                        instance: &config.instance,
                    },
                    metrics.trace_spans.clone(),
                )
                .map_err(RunError::Traces)?,
            );
        }
        if let Some(n) = raise_open_files() {
            metrics
                .open_files_limit
                .set(n.try_into().unwrap_or(i64::MAX));
        }
        // Static tasks get the first indexes; their certificates are issued before ready.
        let tasks = Arc::new(TaskTable::default());
        let static_tasks = config
            .tasks
            .iter()
            .map(|t| {
                tasks.insert(TaskRef::new(
                    t.id.clone(),
                    t.family.clone(),
                    t.identity.clone(),
                    true,
                ))
            })
            .collect();
        let mesh = mesh::parts(config, &metrics, &tasks)?;
        let state = Arc::new(AdminState {
            ready: Default::default(),
            metrics: metrics.clone(),
            identities: mesh.as_ref().map(|m| m.identities.clone()),
            discovery: mesh.as_ref().map(|m| m.sources.clone()),
            mesh: mesh.as_ref().map(|m| m.mesh.clone()),
            tasks: Some(tasks.clone()),
            config_dump: serde_json::to_string_pretty(config).unwrap_or_default(),
        });
        let shutdown = CancellationToken::new();
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
        Ok(Self {
            core: Core {
                metrics,
                cloudmap_metrics,
                tasks,
                state,
                shutdown,
                tracker: TaskTracker::new(),
            },
            outbound,
            mesh,
            static_tasks,
        })
    }

    /// Step 2, install: load the programs, enrol what is known (static tasks, and the ECS
    /// tasks of the last run from the state file), then attach — beside a previous
    /// proxy's programs, which are detached only after ours are in place.
    pub fn install(self, config: &Config) -> Result<Installed, RunError> {
        let core = self.core;
        let takeover = ebpf::attached(&config.pin_dir);
        let initial: Vec<_> = self
            .static_tasks
            .iter()
            .copied()
            .zip(config.tasks.iter())
            .collect();
        let handles = self
            .mesh
            .as_ref()
            .map(|parts| (parts.identities.clone(), parts.mesh.expected.clone()));
        let static_arns = initial
            .iter()
            .filter_map(|(index, t)| t.arn.clone().map(|arn| (*index, arn)))
            .collect();
        let (prepared, reconciler) =
            match prepare(config, &initial, &core.tasks, &handles, &core.metrics) {
                Ok(x) => x,
                Err(e) => return Err(install_failed(config, takeover, e)),
            };
        let (redirect, orig_dst) = match prepared.attach() {
            Ok(x) => x,
            Err(e) => return Err(install_failed(config, takeover, e.into())),
        };
        core.metrics.kernel.set(redirect.stats_handle());
        let orig_dst = Arc::new(orig_dst);
        tokio::spawn(sweep(
            orig_dst.clone(),
            core.metrics.clone(),
            core.shutdown.clone(),
        ));
        let outbound = Arc::new(Outbound {
            orig_dst,
            tasks: core.tasks.clone(),
            metrics: core.metrics.clone(),
            socket_mark: config.socket_mark,
            mode: config.mode,
            mesh: self.mesh.as_ref().map(|m| m.mesh.clone()),
            opaque_ports: config.opaque_ports.clone(),
            detect_timeout: config.detect_timeout,
            max_connections_per_task: config.limits.max_connections_per_task,
            tcp_idle_timeout: config.limits.tcp_idle_timeout,
            cluster: config.cluster.clone(),
        });
        Ok(Installed {
            core,
            redirect,
            reconciler,
            outbound,
            listeners: self.outbound,
            mesh: self.mesh,
            static_arns,
        })
    }
}

/// Two sockets per proxied connection: the usual soft limit of 1024 would cap the node at
/// a few hundred connections. The new soft limit, when raised.
fn raise_open_files() -> Option<u64> {
    match crate::rlimit::raise_nofile() {
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
    }
}

/// Attached and enrolled; nothing accepted yet.
pub(super) struct Installed {
    core: Core,
    redirect: Redirect,
    reconciler: Option<ecs::Reconciler>,
    outbound: Arc<Outbound>,
    listeners: Vec<TcpListener>,
    mesh: Option<mesh::MeshParts>,
    /// Listed tasks with an ECS task ARN (a sidecar's task): in issuer mode their
    /// certificates are asked for by ARN before ready.
    static_arns: Vec<(u32, String)>,
}

impl Installed {
    /// Step 3, serve: the accept loops start, then the proxy waits for discovery to sync
    /// once (the ECS agent's first answer, Cloud Map's first refresh) and reports ready.
    /// `None`: SIGTERM came first; the redirect stays attached for the next proxy.
    pub async fn serve(
        self,
        config: &Config,
        sigterm: &mut Signal,
    ) -> Result<Option<Serving>, RunError> {
        let Self {
            core,
            redirect,
            reconciler,
            outbound,
            listeners,
            mesh,
            static_arns,
        } = self;
        let (shutdown, tracker) = (&core.shutdown, &core.tracker);
        let identities = mesh.as_ref().map(|m| m.identities.clone());
        let discovery = mesh.as_ref().map(|m| m.sources.clone());
        tokio::spawn(super::sweep::run(
            core.metrics.clone(),
            core.tasks.clone(),
            mesh.as_ref().map(|m| (m.mesh.clone(), m.sources.clone())),
            config.metrics.series_grace,
            shutdown.clone(),
        ));
        if let Some(parts) = mesh {
            parts.identities.spawn_background(shutdown.clone());
            parts.sources.spawn_watch(shutdown.clone());
            for listener in parts.listeners {
                tracing::info!(addr = ?listener.local_addr().ok(), endpoints = config.discovery.len(), "tunnel listener ready");
                tokio::spawn(parts.inbound.clone().serve(
                    listener,
                    shutdown.clone(),
                    tracker.clone(),
                ));
            }
        }
        for listener in listeners {
            tracing::info!(addr = ?listener.local_addr().ok(), "outbound listener ready");
            tokio::spawn(
                outbound
                    .clone()
                    .serve(listener, shutdown.clone(), tracker.clone()),
            );
        }
        if let Some(identities) = identities.filter(|i| i.remote().is_some()) {
            for (index, arn) in static_arns {
                // Ready means the task can make meshed connections: wait for its certificate.
                let mut backoff = Duration::from_secs(1);
                loop {
                    match identities.obtain(&arn).await {
                        Ok(svid) => {
                            tracing::info!(task = arn, identity = %svid.id, serial = %svid.serial, "certificate issued by the issuer");
                            core.tasks.set_identity(index, svid.id.clone());
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(task = arn, error = %e, retry_in = ?backoff, "no certificate from the issuer yet; not ready")
                        }
                    }
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        _ = sigterm.recv() => return shutdown_now(redirect).map(|()| None),
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
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
                    _ = sigterm.recv() => return shutdown_now(redirect).map(|()| None),
                }
            }
            tokio::spawn(reconciler.run(settings.poll_interval, shutdown.clone()));
        }
        if let (Some(settings), Some(discovery)) = (&config.cloudmap, discovery) {
            let mut synced = cloud::start_cloudmap(
                settings,
                discovery,
                config.inbound_port(),
                core.cloudmap_metrics.clone(),
                shutdown.clone(),
            )
            .await
            .map_err(RunError::CloudMap)?;
            tokio::select! {
                r = synced.wait_for(|s| *s) => { let _ = r; }
                _ = sigterm.recv() => return shutdown_now(redirect).map(|()| None),
            }
        }
        core.state.ready.store(true, Ordering::Release);
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
        Ok(Some(Serving {
            core,
            redirect,
            ready_attribute,
        }))
    }
}

/// Ready and accepting.
pub(super) struct Serving {
    core: Core,
    redirect: Redirect,
    ready_attribute: Option<cloud::ReadyAttribute>,
}

impl Serving {
    /// Step 4, drain: not ready, attribute withdrawn, the redirect left attached (only
    /// `ecsmesh uninstall` detaches: tasks wait, fail-closed, for the next proxy), then
    /// open connections get `DRAIN_TIMEOUT` to finish.
    pub async fn drain(self, config: &Config) {
        let Self {
            core,
            redirect,
            ready_attribute,
        } = self;
        core.state.ready.store(false, Ordering::Release);
        if let Some(attribute) = &ready_attribute {
            attribute.withdraw().await;
        }
        let kernel = redirect.kernel_stats();
        if config.uninstall_on_exit {
            match redirect.uninstall() {
                Ok(()) => {
                    tracing::info!(?kernel, pin_dir = %config.pin_dir.display(), "redirect detached and unpinned (the task is stopping)")
                }
                Err(e) => {
                    tracing::error!(error = %e, pin_dir = %config.pin_dir.display(), "could not remove every pin")
                }
            }
        } else {
            redirect.release();
            tracing::info!(?kernel, "redirect left attached and pinned");
        }
        core.shutdown.cancel();
        core.tracker.close();
        if tokio::time::timeout(DRAIN_TIMEOUT, core.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                open = core.tracker.len(),
                "drain timeout; closing remaining connections"
            );
        }
        if core.metrics.traces().is_some() {
            // The last spans go out (each batch within the export timeout), off the
            // runtime's workers.
            let metrics = core.metrics.clone();
            let _ = tokio::task::spawn_blocking(move || {
                if let Some(traces) = metrics.traces() {
                    traces.shutdown();
                }
            })
            .await;
        }
        let _ = std::fs::remove_file(&config.admin_socket);
    }
}
