//! Local ECS tasks of this container instance, learnt from ECS itself rather than from a
//! static config: the ECS agent's introspection API says which tasks and containers run
//! here, the cgroup layout the agent uses turns (task, container) into the cgroup the
//! eBPF map is keyed by, and Docker's `State.Health` says whether a task may take traffic.
//!
//! This module only *observes*: [`snapshot`] returns what it saw, the caller decides what
//! to enroll, drain or report. Nothing here needs privileges beyond reading the agent on
//! `127.0.0.1:51678`, the cgroup filesystem and the mounted `docker.sock`.
mod agent;
mod cgroups;
pub(crate) mod client;
mod docker;
#[cfg(test)]
mod fixture_server;
mod gate;
#[cfg(test)]
mod tests;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

pub use agent::{
    AgentContainer, AgentMetadata, AgentNetwork, AgentPort, AgentTask, DEFAULT_AGENT_URL, EcsAgent,
};
pub use cgroups::{CgroupLayout, cgroup_id, resolve_container_cgroup, v2_task_slice};
pub use docker::{ContainerInspect, DEFAULT_DOCKER_SOCKET, DockerHealth, Health};
pub use gate::{Gate, all_essential, gate};

use crate::types::TaskId;

/// Per-request deadline for the agent and Docker: both are local daemons, so anything
/// slower means they are wedged, and a discovery loop must not hang behind them.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum EcsError {
    #[error("{endpoint}: cannot connect: {source}")]
    Connect {
        endpoint: String,
        source: std::io::Error,
    },
    #[error("{endpoint}: no complete answer within {timeout:?}")]
    Timeout { endpoint: String, timeout: Duration },
    #[error("{endpoint}: {source}")]
    Http {
        endpoint: String,
        source: hyper::Error,
    },
    #[error("{endpoint}: HTTP {status}: {body}")]
    Status {
        endpoint: String,
        status: http::StatusCode,
        body: String,
    },
    #[error("{endpoint}: response body larger than {limit} bytes")]
    TooLarge { endpoint: String, limit: usize },
    #[error("{endpoint}: malformed response: {source}")]
    Json {
        endpoint: String,
        source: serde_json::Error,
    },
    #[error("{endpoint}: malformed response: {message}")]
    Unexpected { endpoint: String, message: String },
    #[error("{url}: invalid ECS agent URL: {reason}")]
    BadUrl { url: String, reason: &'static str },
    #[error("{arn:?}: not an ECS task ARN: {reason}")]
    Arn { arn: String, reason: String },
    #[error("task {task}, container {docker_id}: no cgroup directory (tried {tried})")]
    CgroupNotFound {
        task: String,
        docker_id: String,
        tried: String,
    },
    #[error(
        "task {task}, container {docker_id}: only found in cgroup v1 ({v1_path}); the eBPF \
         redirect keys on cgroup v2 ids, so mount cgroup2 (hybrid: /sys/fs/cgroup/unified)"
    )]
    NoUnifiedHierarchy {
        task: String,
        docker_id: String,
        v1_path: PathBuf,
    },
    #[error("{path}: cannot tell the ECS cgroup layout (no cgroup v2 root, no v1 controllers)")]
    UnknownLayout { path: PathBuf },
    #[error("{path}: not a cgroup v2 directory, so it has no cgroup id the eBPF programs see")]
    NotCgroup2 { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The task id is the last path segment of the task ARN, exactly as the agent derives it
/// (`arn.TaskIdFromArn` in amazon-ecs-agent): `arn:aws:ecs:<region>:<acct>:task/<cluster>/<id>`
/// (current format, 32 hex digits) and `arn:aws:ecs:<region>:<acct>:task/<uuid>` (old format).
pub fn task_id_from_arn(arn: &str) -> Result<TaskId, EcsError> {
    let err = |reason: &str| EcsError::Arn {
        arn: arn.to_owned(),
        reason: reason.to_owned(),
    };
    let Some(crate::types::Arn {
        service,
        resource: res,
        ..
    }) = crate::types::Arn::parse(arn)
    else {
        return Err(err(
            "expected arn:<partition>:ecs:<region>:<account>:task/...",
        ));
    };
    if service != "ecs" {
        return Err(err("service is not ecs"));
    }
    let Some(path) = res.strip_prefix("task/") else {
        return Err(err("resource is not task/..."));
    };
    let id = path.rsplit('/').next().unwrap_or_default();
    TaskId::new(id).map_err(|e| err(&e))
}

/// How a task's containers reach the network; decides where the redirect can send them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LocalNetworkMode {
    Host,
    Bridge,
    /// Own netns per task (ENI): not meshed by the host-netns redirect yet; reported so
    /// the caller can say so instead of silently ignoring the task.
    Awsvpc,
    /// Neither the agent nor Docker said (no docker.sock, or a mode ECS does not use).
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalContainer {
    pub name: String,
    pub docker_id: String,
    /// The container's cgroup v2 directory (feed it to [`cgroup_id`]); `None` when it
    /// could not be resolved, which is logged with the reason.
    pub cgroup: Option<PathBuf>,
    pub health: Health,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalTask {
    pub task_id: TaskId,
    pub arn: String,
    pub family: String,
    pub version: String,
    pub network_mode: LocalNetworkMode,
    pub containers: Vec<LocalContainer>,
    pub gate: Gate,
}

/// At most this many Docker inspections in flight: the daemon serialises much of its
/// work, and a host may run dozens of containers.
const DOCKER_PARALLELISM: usize = 8;

/// Everything the agent knows about this instance's tasks, joined with cgroups and health.
/// `cgroup_root` is the cgroup filesystem root (`/sys/fs/cgroup`; see
/// [`resolve_container_cgroup`]), `layout` usually [`CgroupLayout::detect`]`(cgroup_root)`.
///
/// - Tasks the agent reports as known `STOPPED` are left out: their processes and cgroups
///   are gone; a caller that diffs snapshots sees them disappear.
/// - Every container is gated as essential, because `/v1/tasks` does not carry the
///   `essential` flag (only the task definition / `DescribeTasks` do).
/// - `docker: None` turns health gating off (every container counts as having no health
///   check); with Docker, a container it cannot inspect is [`Health::Unknown`], which
///   holds the task back rather than serving an unchecked endpoint.
/// - A container whose cgroup cannot be resolved is kept with `cgroup: None` and a
///   warning (for running tasks; pending ones are expected not to have one yet).
pub async fn snapshot(
    agent: &EcsAgent,
    docker: Option<&DockerHealth>,
    cgroup_root: &Path,
    layout: CgroupLayout,
) -> Result<Vec<LocalTask>, EcsError> {
    let tasks: Vec<AgentTask> = agent
        .tasks()
        .await?
        .into_iter()
        .filter(|t| t.known_status != "STOPPED")
        .collect();
    let inspected = match docker {
        Some(docker) => inspect_all(docker, &tasks).await,
        None => HashMap::new(),
    };
    let mut out = Vec::with_capacity(tasks.len());
    for task in &tasks {
        let task_id = match task_id_from_arn(&task.arn) {
            Ok(id) => id,
            Err(e) => {
                tracing::warn!(error = %e, "ECS agent reported a task with an unusable ARN; skipped");
                continue;
            }
        };
        let health: HashMap<String, Health> = task
            .containers
            .iter()
            .filter(|c| !c.docker_id.is_empty())
            .map(|c| {
                let h = match (docker, inspected.get(&c.docker_id)) {
                    (None, _) => Health::None,
                    (Some(_), Some(i)) => i.health,
                    (Some(_), None) => Health::Unknown,
                };
                (c.docker_id.clone(), h)
            })
            .collect();
        let containers = task
            .containers
            .iter()
            .map(|c| LocalContainer {
                name: c.name.clone(),
                docker_id: c.docker_id.clone(),
                cgroup: container_cgroup(task, &task_id, c, cgroup_root, layout),
                health: health.get(&c.docker_id).copied().unwrap_or(Health::None),
            })
            .collect();
        out.push(LocalTask {
            network_mode: network_mode(task, &inspected),
            gate: gate(task, &health, all_essential),
            task_id,
            arn: task.arn.clone(),
            family: task.family.clone(),
            version: task.version.clone(),
            containers,
        });
    }
    Ok(out)
}

fn container_cgroup(
    task: &AgentTask,
    task_id: &TaskId,
    c: &AgentContainer,
    root: &Path,
    layout: CgroupLayout,
) -> Option<PathBuf> {
    let running = task.known_status == "RUNNING";
    if c.docker_id.is_empty() {
        if running {
            tracing::warn!(task = %task_id, container = %c.name, "running task's container has no Docker id; no cgroup");
        }
        return None;
    }
    match resolve_container_cgroup(root, layout, task_id.as_str(), &c.docker_id) {
        Ok(path) => Some(path),
        Err(e) if running => {
            tracing::warn!(task = %task_id, container = %c.name, error = %e, "container cgroup not resolved");
            None
        }
        Err(e) => {
            tracing::debug!(task = %task_id, container = %c.name, error = %e, "pending container has no cgroup yet");
            None
        }
    }
}

/// The agent marks awsvpc containers with `Networks[].NetworkMode = "awsvpc"`; for host and
/// bridge it says nothing, so Docker's `HostConfig.NetworkMode` decides (all containers of
/// a task share the task's mode; disagreement means we do not know).
fn network_mode(
    task: &AgentTask,
    inspected: &HashMap<String, ContainerInspect>,
) -> LocalNetworkMode {
    let awsvpc = task
        .containers
        .iter()
        .flat_map(|c| &c.networks)
        .any(|n| n.network_mode == "awsvpc");
    if awsvpc {
        return LocalNetworkMode::Awsvpc;
    }
    let mut modes = task
        .containers
        .iter()
        .filter_map(|c| inspected.get(&c.docker_id)?.network_mode.as_deref())
        .map(|m| match m {
            "host" => LocalNetworkMode::Host,
            // "default" is Docker's name for the bridge network on Linux.
            "bridge" | "default" => LocalNetworkMode::Bridge,
            _ => LocalNetworkMode::Unknown,
        });
    let first = modes.next().unwrap_or(LocalNetworkMode::Unknown);
    if modes.all(|m| m == first) {
        first
    } else {
        LocalNetworkMode::Unknown
    }
}

/// Inspect every container of the not-yet-stopped tasks, a few at a time. Failures are
/// logged and left out of the map (the caller turns a missing entry into `Unknown`).
async fn inspect_all(
    docker: &DockerHealth,
    tasks: &[AgentTask],
) -> HashMap<String, ContainerInspect> {
    let limit = Arc::new(tokio::sync::Semaphore::new(DOCKER_PARALLELISM));
    let mut set = tokio::task::JoinSet::new();
    for id in tasks
        .iter()
        .flat_map(|t| &t.containers)
        .map(|c| c.docker_id.clone())
        .filter(|id| !id.is_empty())
    {
        let docker = docker.clone();
        let limit = limit.clone();
        set.spawn(async move {
            let _permit = limit.acquire_owned().await;
            let r = docker.inspect(&id).await;
            (id, r)
        });
    }
    let mut out = HashMap::new();
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok((id, Ok(i))) => {
                out.insert(id, i);
            }
            Ok((id, Err(e))) => {
                tracing::warn!(container = %id, error = %e, "docker inspect failed; health unknown");
            }
            Err(e) => tracing::warn!(error = %e, "docker inspect task failed"),
        }
    }
    out
}
