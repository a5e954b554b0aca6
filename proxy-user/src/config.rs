//! Node proxy configuration: TOML, parsed and validated once at start into an `Arc<Config>`.
//! Every error names the file position and the field, on one line, because operators read
//! these in `journalctl`/CloudWatch where multi-line snippets get mangled.
mod identity;
mod limits;
mod raw;
mod traces;
mod traffic;

pub use limits::Limits;
pub use traffic::{ServicePolicy, Traffic};

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
};

use std::time::Duration;

use ipnet::IpNet;

use crate::{
    authz::Policy,
    discovery::Discovery,
    identity::{IdentityTemplate, SpiffeId, TrustDomain},
    types::TaskId,
};

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/ecsmesh";
/// Default admin socket: `<dir>/<instance>.sock`.
pub const DEFAULT_ADMIN_SOCKET_DIR: &str = "/run/ecsmesh";
/// Default state directory: `<dir>/<instance>`.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/ecsmesh";
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;
pub const DEFAULT_ADMIN_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15000);
/// SO_MARK on the proxy's upstream sockets ("ECMS"), for host firewall rules. The eBPF
/// programs do not trust it: a task with CAP_NET_RAW can set any mark. They exempt the
/// proxy by its cgroup.
pub const DEFAULT_SOCKET_MARK: u32 = 0x4543_4d53;
/// DNS resolvers reachable on TCP port 53 without the mesh when `dns_resolvers` is not set,
/// besides the host's `/etc/resolv.conf` nameservers: the Amazon VPC resolver's link-local
/// addresses (IPv4 and the Nitro IPv6 one).
pub const VPC_RESOLVERS: [IpAddr; 2] = [
    IpAddr::V4(Ipv4Addr::new(169, 254, 169, 253)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0253)),
];
/// Server-speaks-first ports (linkerd2-proxy's default list): SMTP, submission, MySQL,
/// Galera, PostgreSQL, Redis, Elasticsearch transport, memcached.
pub const DEFAULT_OPAQUE_PORTS: [u16; 8] = [25, 587, 3306, 4444, 5432, 6379, 9300, 11211];
pub const DEFAULT_DETECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Where the host's resolvers are listed (the VPC base+2 address on an ECS instance).
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The I/O error is in the message, not a `source`: callers print the chain
    /// (`{e:#}`), which would say it twice.
    #[error("{path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message} (in `{source_line}`)")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
        source_line: String,
    },
    #[error("{path}: {field}: {message}")]
    Invalid {
        path: PathBuf,
        field: String,
        message: String,
    },
}

/// How a task reaches the node proxy; decides the redirect address written into the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// Task shares the instance's netns: redirect to loopback.
    Host,
    /// Task sits behind the instance's docker bridge: redirect to the bridge address.
    Bridge,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct TaskConfig {
    pub id: TaskId,
    pub family: String,
    pub network_mode: NetworkMode,
    pub cgroups: Vec<PathBuf>,
    /// The task's workload identity (rendered from the template) when the mesh is on.
    pub identity: Option<SpiffeId>,
    /// The ECS task ARN, when known (a sidecar learns it from the task metadata endpoint):
    /// in issuer mode the task's certificate is asked for by ARN.
    pub arn: Option<String>,
}

/// What happens to connections towards destinations discovery does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Forward them as plain TCP.
    #[default]
    Permissive,
    /// Close them: every flow of an enrolled task must be a verified mesh flow.
    Strict,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct IdentitySettings {
    pub trust_domain: TrustDomain,
    pub bundle: PathBuf,
    pub source: IdentitySource,
    pub svid_lifetime: Duration,
    pub template: IdentityTemplate,
    pub allowed_trust_domains: Vec<TrustDomain>,
}

/// Where the node's SVIDs come from.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentitySource {
    /// File mode (`issuer_dir`): an issuing CA key on this node. For offline use, the
    /// harness and the demo.
    IssuerDir(PathBuf),
    /// Issuer mode (`issuer_url`): no CA key here. A node attests with its instance
    /// identity document from IMDS; a sidecar with its task's IAM role.
    Issuer {
        #[serde(serialize_with = "display")]
        url: http::Uri,
        attestation: crate::identity::remote::Attestation,
    },
}

/// Where local tasks come from when they are not listed in the config: the ECS agent.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EcsSettings {
    #[serde(serialize_with = "display")]
    pub agent_url: http::Uri,
    /// Docker Engine API socket for container health; no health gating without it.
    pub docker_socket: Option<PathBuf>,
    /// Root of the host's cgroup filesystem as mounted in the proxy's container.
    pub cgroup_root: PathBuf,
    /// The agent's cgroup naming: `v2` (AL2023), `v1` (AL2), or `None` to detect it.
    pub layout: Option<crate::ecs::CgroupLayout>,
    pub poll_interval: Duration,
    /// Publish the `ecsmesh.ready` container-instance attribute once ready.
    pub publish_ready_attribute: bool,
    pub aws_endpoint: Option<String>,
    pub region: Option<String>,
}

pub const DEFAULT_INBOUND_PORT: u16 = 15008;
pub const DEFAULT_STREAM_CAP: usize = 100;

#[derive(Debug, Clone, serde::Serialize)]
pub struct Config {
    /// Name of this container instance, used in logs and metrics.
    pub instance: String,
    pub pin_dir: PathBuf,
    /// cgroup v2 directory the programs attach to; every task cgroup must be below it.
    pub cgroup_root: PathBuf,
    pub outbound_port: u16,
    pub admin_addr: SocketAddr,
    pub bridge_ipv4: Option<Ipv4Addr>,
    pub bridge_ipv6: Option<Ipv6Addr>,
    pub exclude_cidrs: Vec<IpNet>,
    /// Addresses tasks may reach on TCP port 53 without the mesh; port 53 of any other
    /// address is redirected like any port.
    pub dns_resolvers: Vec<IpAddr>,
    /// Unix socket serving every admin route, including the mutating ones (`POST
    /// /reload`) that the TCP admin address refuses: tasks can reach TCP, not this file.
    pub admin_socket: PathBuf,
    /// Destination ports never read before forwarding (server-speaks-first protocols):
    /// carried as opaque TCP without protocol detection.
    pub opaque_ports: Vec<u16>,
    /// How long a meshed connection may send nothing before it is taken as opaque TCP.
    pub detect_timeout: Duration,
    /// Where the proxy keeps what must survive a restart (the ECS tasks it enrolled).
    pub state_dir: PathBuf,
    /// Detach and unpin on SIGTERM instead of leaving the redirect for a successor: an
    /// ECS sidecar, whose task is going away (its app containers stop before it).
    pub uninstall_on_exit: bool,
    pub socket_mark: u32,
    pub tasks: Vec<TaskConfig>,
    /// ECS cluster name, part of workload identities.
    pub cluster: String,
    pub mode: Mode,
    /// mTLS tunnel listener (HBONE-style HTTP/2 CONNECT); `None`: both families on
    /// `DEFAULT_INBOUND_PORT` (see `inbound_listen_addrs`).
    pub inbound_addr: Option<SocketAddr>,
    /// Streams per pooled tunnel connection before another connection opens.
    pub tunnel_stream_cap: usize,
    /// Keepalive, timeouts and caps against dead peers and noisy tasks.
    pub limits: Limits,
    /// Retries, budget, timeouts and balancing, per service.
    pub traffic: Traffic,
    /// Access logs (HTTP, TCP), off by default.
    pub access_log: crate::access_log::AccessLogSettings,
    /// `[metrics]`: how long series of stopped tasks stay, how many each metric holds.
    pub metrics: MetricsSettings,
    /// Traces exported over OTLP/HTTP; `None`: no tracer (traceparent passes untouched).
    pub traces: Option<crate::trace::TraceSettings>,
    /// Meshed endpoints; empty without `discovery_file`.
    #[serde(skip)]
    pub discovery: Discovery,
    pub discovery_file: Option<PathBuf>,
    /// mTLS identity; without it the proxy forwards plain TCP only.
    pub identity: Option<IdentitySettings>,
    pub authorization: Policy,
    /// Discover local tasks from the ECS agent (in addition to `tasks`).
    pub ecs: Option<EcsSettings>,
    /// Meshed endpoints from AWS Cloud Map (in addition to `discovery_file`).
    pub cloudmap: Option<CloudMapSettings>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MetricsSettings {
    /// Series naming a task that left (its workload, SPIFFE ID or endpoint no longer on
    /// this node or in discovery) are removed this long after it left.
    #[serde(rename = "series_grace_secs", serialize_with = "secs")]
    pub series_grace: Duration,
    pub max_series_per_metric: usize,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        Self {
            series_grace: Duration::from_secs(300),
            max_series_per_metric: crate::metrics::DEFAULT_MAX_SERIES,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct CloudMapSettings {
    pub namespace: String,
    pub services: Vec<String>,
    pub refresh: Duration,
    /// Endpoint override (tests: moto on loopback).
    pub endpoint: Option<String>,
    pub region: Option<String>,
}

/// Reads a TOML config file and turns it into `T` with `validate` (raw form → typed
/// values, or the field and what is wrong with it): one error format for every config
/// file of the binary (node proxy, issuer).
pub(crate) fn load_toml<R: serde::de::DeserializeOwned, T, F: Into<String>>(
    path: &Path,
    validate: impl FnOnce(R) -> Result<T, (F, String)>,
) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
        path: path.into(),
        error,
    })?;
    parse_toml(path, &text, validate)
}

/// [`load_toml`] for text already read.
pub(crate) fn parse_toml<R: serde::de::DeserializeOwned, T, F: Into<String>>(
    path: &Path,
    text: &str,
    validate: impl FnOnce(R) -> Result<T, (F, String)>,
) -> Result<T, ConfigError> {
    let raw: R = toml::from_str(text).map_err(|e| {
        let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
        ConfigError::Parse {
            path: path.into(),
            line,
            column,
            message: e.message().replace('\n', " "),
            // The offending line names the field even when the message does not
            // ("invalid type: string, expected u16").
            source_line: text
                .lines()
                .nth(line - 1)
                .unwrap_or_default()
                .trim()
                .to_owned(),
        }
    })?;
    validate(raw).map_err(|(field, message)| ConfigError::Invalid {
        path: path.into(),
        field: field.into(),
        message,
    })
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        load_toml(path, raw::RawConfig::validate)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        parse_toml(path, text, raw::RawConfig::validate)
    }

    /// A sidecar serves exactly one task and shares its network namespace, so the task
    /// reaches it on loopback (`host` mode from the proxy's point of view).
    pub fn check_sidecar(&self) -> Result<(), ConfigError> {
        let invalid = |message: &str| ConfigError::Invalid {
            path: PathBuf::from("sidecar"),
            field: "tasks".into(),
            message: message.into(),
        };
        match self.tasks.as_slice() {
            [t] if t.network_mode == NetworkMode::Host => Ok(()),
            [_] => Err(invalid(
                "a sidecar shares its task's netns: use network_mode = \"host\"",
            )),
            _ => Err(invalid("a sidecar enrols exactly one task")),
        }
    }

    /// Addresses the outbound listener must bind: one per redirect target in use.
    /// The tunnel port peers dial.
    pub fn inbound_port(&self) -> u16 {
        self.inbound_addr.map_or(DEFAULT_INBOUND_PORT, |a| a.port())
    }

    /// Where the tunnel listens, and whether failing to bind there is fatal: by default
    /// `0.0.0.0` and `[::]` (an instance reached over IPv6 must be reachable through the
    /// tunnel too; a host without IPv6 gets a warning, not an error); exactly the
    /// configured address otherwise.
    pub fn inbound_listen_addrs(&self) -> Vec<(SocketAddr, bool)> {
        match self.inbound_addr {
            Some(addr) => vec![(addr, true)],
            None => vec![
                ((Ipv4Addr::UNSPECIFIED, DEFAULT_INBOUND_PORT).into(), true),
                ((Ipv6Addr::UNSPECIFIED, DEFAULT_INBOUND_PORT).into(), false),
            ],
        }
    }

    pub fn outbound_listen_addrs(&self) -> Vec<SocketAddr> {
        let mut ips: Vec<IpAddr> = Vec::new();
        // Tasks discovered from ECS may use either mode: listen where both reach us.
        let ecs_modes = self
            .ecs
            .as_ref()
            .map(|_| [NetworkMode::Host, NetworkMode::Bridge])
            .into_iter()
            .flatten();
        let modes = self.tasks.iter().map(|t| t.network_mode).chain(ecs_modes);
        for mode in modes {
            let wanted: Vec<IpAddr> = match mode {
                NetworkMode::Host => vec![Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()],
                NetworkMode::Bridge => self
                    .bridge_ipv4
                    .map(IpAddr::from)
                    .into_iter()
                    .chain(self.bridge_ipv6.map(IpAddr::from))
                    .collect(),
            };
            for ip in wanted {
                if !ips.contains(&ip) {
                    ips.push(ip);
                }
            }
        }
        ips.into_iter()
            .map(|ip| SocketAddr::new(ip, self.outbound_port))
            .collect()
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, column)
}

#[cfg(test)]
mod tests;

/// Nameservers in resolv.conf text (`nameserver <addr>` lines; zone ids dropped).
pub fn resolv_conf_nameservers(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter_map(|a| a.split('%').next()?.parse().ok())
        .collect()
}

pub(crate) fn display<T: std::fmt::Display, S: serde::Serializer>(
    v: &T,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn secs<S: serde::Serializer>(v: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(v.as_secs_f64())
}
