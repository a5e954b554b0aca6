//! Client for the ECS container agent's introspection API (`:51678`), the one source that
//! knows which tasks the agent placed on *this* instance without AWS credentials.
//!
//! Field names follow the agent's own response types (amazon-ecs-agent
//! `ecs-agent/introspection/v1/response.go`, `agent/handlers/v1/response.go`) and the
//! "Amazon ECS container introspection" page of the ECS developer guide. Unknown fields
//! are ignored on purpose: newer agents add fields, and an extra field must never break
//! discovery.
use std::time::Duration;

use http::Uri;

use super::{
    DEFAULT_TIMEOUT, EcsError,
    client::{get_json, null_as_empty},
};

/// Where the agent listens on the host (`ECS_AGENT_INTROSPECTION` port, loopback only).
pub const DEFAULT_AGENT_URL: &str = "http://127.0.0.1:51678";

/// A host with many tasks lists each with its containers; 16 MiB is far above any real
/// answer and still bounds memory if something else answers on the port.
const BODY_LIMIT: usize = 16 << 20;

/// `GET /v1/metadata`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct AgentMetadata {
    #[serde(rename = "Cluster")]
    pub cluster: String,
    /// `null` until the agent has registered the instance.
    #[serde(rename = "ContainerInstanceArn", default)]
    pub container_instance_arn: Option<String>,
    #[serde(rename = "Version", default)]
    pub version: String,
}

#[derive(Debug, serde::Deserialize)]
struct TasksResponse {
    #[serde(rename = "Tasks", default, deserialize_with = "null_as_empty")]
    tasks: Vec<AgentTask>,
}

/// One entry of `GET /v1/tasks`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct AgentTask {
    #[serde(rename = "Arn")]
    pub arn: String,
    /// `RUNNING` or `STOPPED`; the agent omits it (empty here) while its own desired
    /// status is not one the ECS backend knows, e.g. known RUNNING but desired PENDING.
    #[serde(rename = "DesiredStatus", default)]
    pub desired_status: String,
    /// `PENDING`, `RUNNING` or `STOPPED` (the agent maps its finer states to these).
    #[serde(rename = "KnownStatus")]
    pub known_status: String,
    #[serde(rename = "Family", default)]
    pub family: String,
    #[serde(rename = "Version", default)]
    pub version: String,
    /// Only the task's own containers: the agent hides its internal ones (awsvpc pause,
    /// firelens/namespace helpers).
    #[serde(rename = "Containers", default, deserialize_with = "null_as_empty")]
    pub containers: Vec<AgentContainer>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct AgentContainer {
    /// Empty until Docker created the container.
    #[serde(rename = "DockerId", default)]
    pub docker_id: String,
    #[serde(rename = "DockerName", default)]
    pub docker_name: String,
    /// The container name from the task definition.
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "Image", default)]
    pub image: String,
    #[serde(rename = "Ports", default, deserialize_with = "null_as_empty")]
    pub ports: Vec<AgentPort>,
    /// Present only for awsvpc tasks (the agent fills it from the task's ENI).
    #[serde(rename = "Networks", default, deserialize_with = "null_as_empty")]
    pub networks: Vec<AgentNetwork>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct AgentPort {
    #[serde(rename = "ContainerPort", default)]
    pub container_port: u16,
    #[serde(rename = "Protocol", default)]
    pub protocol: String,
    #[serde(rename = "HostPort", default)]
    pub host_port: u16,
    #[serde(rename = "HostIp", default)]
    pub host_ip: String,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct AgentNetwork {
    #[serde(rename = "NetworkMode", default)]
    pub network_mode: String,
    #[serde(rename = "IPv4Addresses", default, deserialize_with = "null_as_empty")]
    pub ipv4_addresses: Vec<String>,
    #[serde(rename = "IPv6Addresses", default, deserialize_with = "null_as_empty")]
    pub ipv6_addresses: Vec<String>,
}

/// The agent's introspection endpoint; cheap to clone, one connection per request.
#[derive(Debug, Clone)]
pub struct EcsAgent {
    host: String,
    port: u16,
    /// Base path without a trailing slash ("" for the agent itself).
    base_path: String,
    base_url: String,
    timeout: Duration,
}

impl Default for EcsAgent {
    fn default() -> Self {
        Self::new(Uri::from_static(DEFAULT_AGENT_URL)).expect("the default agent URL is valid")
    }
}

impl EcsAgent {
    /// `base_url` is `http://host[:port][/prefix]`; the agent speaks plain HTTP only.
    pub fn new(base_url: Uri) -> Result<Self, EcsError> {
        let bad = |reason| EcsError::BadUrl {
            url: base_url.to_string(),
            reason,
        };
        if base_url.scheme_str() != Some("http") {
            return Err(bad("scheme must be http"));
        }
        let host = base_url.host().ok_or_else(|| bad("no host"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = base_url.port_u16().unwrap_or(80);
        let base_path = base_url.path().trim_end_matches('/').to_owned();
        Ok(Self {
            host,
            port,
            base_path,
            base_url: base_url.to_string().trim_end_matches('/').to_owned(),
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// Override the per-request deadline (default [`DEFAULT_TIMEOUT`]).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub async fn metadata(&self) -> Result<AgentMetadata, EcsError> {
        self.get("/v1/metadata").await
    }

    pub async fn tasks(&self) -> Result<Vec<AgentTask>, EcsError> {
        self.get::<TasksResponse>("/v1/tasks")
            .await
            .map(|r| r.tasks)
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, EcsError> {
        let endpoint = format!("ECS agent GET {}{path}", self.base_url);
        let authority = if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let connect = tokio::net::TcpStream::connect((self.host.as_str(), self.port));
        let full_path = format!("{}{path}", self.base_path);
        get_json(
            &endpoint,
            connect,
            &authority,
            &full_path,
            self.timeout,
            BODY_LIMIT,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls() {
        let a = EcsAgent::default();
        assert_eq!(
            (a.host.as_str(), a.port, a.base_path.as_str()),
            ("127.0.0.1", 51678, "")
        );
        let b = EcsAgent::new("http://[::1]:8080/prefix/".parse().unwrap()).unwrap();
        assert_eq!(
            (b.host.as_str(), b.port, b.base_path.as_str()),
            ("::1", 8080, "/prefix")
        );
        assert!(EcsAgent::new("https://127.0.0.1:51678".parse().unwrap()).is_err());
        assert!(EcsAgent::new("/v1/tasks".parse().unwrap()).is_err());
    }

    #[test]
    fn go_nulls_and_omitted_fields_parse() {
        let t: TasksResponse = serde_json::from_str(
            r#"{"Tasks":[{"Arn":"arn:aws:ecs:us-east-1:1:task/c/abc","KnownStatus":"RUNNING",
               "Family":"f","Version":"1","Containers":[{"DockerId":"d","Name":"n",
               "Networks":null,"Ports":null,"SomethingNew":{"x":1}}]}]}"#,
        )
        .unwrap();
        assert_eq!(t.tasks[0].desired_status, "");
        assert!(t.tasks[0].containers[0].networks.is_empty());
        let m: AgentMetadata =
            serde_json::from_str(r#"{"Cluster":"c","ContainerInstanceArn":null,"Version":"v"}"#)
                .unwrap();
        assert_eq!(m.container_instance_arn, None);
    }
}
