//! Container health from Docker, over the host's `docker.sock` mounted into the daemon
//! task. The node proxy cannot read other tasks' metadata endpoints (their paths are
//! agent-generated secrets), but Docker runs the task definition's `healthCheck` and
//! keeps the result in `State.Health` of `GET /containers/{id}/json` (Docker Engine API,
//! ContainerInspect). `State.Health` is absent when the container has no health check.
use std::{path::PathBuf, time::Duration};

use super::{DEFAULT_TIMEOUT, EcsError, client::get_json};

/// Where Docker listens on ECS-optimized AMIs (and where the daemon task mounts it).
pub const DEFAULT_DOCKER_SOCKET: &str = "/var/run/docker.sock";

/// An inspect answer is a few KiB; anything near this is not Docker.
const BODY_LIMIT: usize = 4 << 20;

/// A container's health as Docker reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// No health check configured (`State.Health` absent, or Docker's `"none"`).
    None,
    Starting,
    Healthy,
    Unhealthy,
    /// Docker was asked but did not answer usefully (container gone, socket error): the
    /// gate treats this as "not yet", never as healthy.
    Unknown,
}

/// The parts of ContainerInspect discovery uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInspect {
    pub health: Health,
    /// `HostConfig.NetworkMode`: `bridge`/`default`, `host`, `none`, `container:<id>`
    /// (awsvpc containers join the pause container's netns this way), or a network name.
    pub network_mode: Option<String>,
}

#[derive(serde::Deserialize)]
struct Inspect {
    #[serde(rename = "State")]
    state: State,
    #[serde(rename = "HostConfig", default)]
    host_config: Option<HostConfig>,
}

#[derive(serde::Deserialize)]
struct State {
    #[serde(rename = "Health", default)]
    health: Option<HealthState>,
}

#[derive(serde::Deserialize)]
struct HealthState {
    #[serde(rename = "Status")]
    status: String,
}

#[derive(serde::Deserialize)]
struct HostConfig {
    #[serde(rename = "NetworkMode", default)]
    network_mode: Option<String>,
}

/// Docker over its Unix socket; cheap to clone, one connection per request.
#[derive(Debug, Clone)]
pub struct DockerHealth {
    socket: PathBuf,
    timeout: Duration,
}

impl DockerHealth {
    pub fn new(socket_path: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket_path.into(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Override the per-request deadline (default [`DEFAULT_TIMEOUT`]).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub async fn health(&self, container_id: &str) -> Result<Health, EcsError> {
        self.inspect(container_id).await.map(|i| i.health)
    }

    pub async fn inspect(&self, container_id: &str) -> Result<ContainerInspect, EcsError> {
        let path = format!("/containers/{container_id}/json");
        let endpoint = format!("docker GET {path} (unix:{})", self.socket.display());
        // Ids and names are [A-Za-z0-9_.-]; anything else would change the request path.
        if container_id.is_empty()
            || !container_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        {
            return Err(EcsError::Unexpected {
                endpoint,
                message: format!("{container_id:?} is not a container id"),
            });
        }
        let connect = tokio::net::UnixStream::connect(&self.socket);
        let raw: Inspect = get_json(
            &endpoint,
            connect,
            "localhost",
            &path,
            self.timeout,
            BODY_LIMIT,
        )
        .await?;
        let health = match raw.state.health.map(|h| h.status) {
            None => Health::None,
            Some(s) => match s.as_str() {
                "none" | "" => Health::None,
                "starting" => Health::Starting,
                "healthy" => Health::Healthy,
                "unhealthy" => Health::Unhealthy,
                other => {
                    return Err(EcsError::Unexpected {
                        endpoint,
                        message: format!("unknown State.Health.Status {other:?}"),
                    });
                }
            },
        };
        Ok(ContainerInspect {
            health,
            network_mode: raw.host_config.and_then(|h| h.network_mode),
        })
    }
}
