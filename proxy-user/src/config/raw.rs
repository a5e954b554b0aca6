//! The on-disk shape, kept apart from `Config` so that validation is the only way in.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
};

use ipnet::IpNet;
use serde::Deserialize;

use super::{
    CloudMapSettings, Config, DEFAULT_ADMIN_ADDR, DEFAULT_ADMIN_SOCKET_DIR, DEFAULT_INBOUND_PORT,
    DEFAULT_OUTBOUND_PORT, DEFAULT_PIN_DIR, DEFAULT_SOCKET_MARK, DEFAULT_STATE_DIR,
    DEFAULT_STREAM_CAP, EcsSettings, MetricsSettings, Mode, NetworkMode, TaskConfig,
};
use crate::{
    authz::{AllowRule, Policy},
    discovery::Discovery,
    identity::TemplateVars,
    types::TaskId,
};

pub(super) type Invalid = (String, String);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    instance: String,
    #[serde(default)]
    pin_dir: Option<PathBuf>,
    cgroup_root: PathBuf,
    #[serde(default)]
    outbound_port: Option<u16>,
    #[serde(default)]
    admin_addr: Option<SocketAddr>,
    #[serde(default)]
    bridge_ipv4: Option<Ipv4Addr>,
    #[serde(default)]
    bridge_ipv6: Option<Ipv6Addr>,
    #[serde(default)]
    exclude_cidrs: Vec<String>,
    #[serde(default)]
    socket_mark: Option<u32>,
    #[serde(default)]
    dns_resolvers: Option<Vec<IpAddr>>,
    #[serde(default)]
    admin_socket: Option<PathBuf>,
    #[serde(default)]
    state_dir: Option<PathBuf>,
    #[serde(default)]
    opaque_ports: Option<Vec<u16>>,
    #[serde(default)]
    detect_timeout_ms: Option<u64>,
    #[serde(default)]
    tasks: Vec<RawTask>,
    #[serde(default)]
    cluster: Option<String>,
    #[serde(default)]
    mode: Mode,
    #[serde(default)]
    inbound_addr: Option<SocketAddr>,
    #[serde(default)]
    tunnel_stream_cap: Option<usize>,
    #[serde(default)]
    tunnel_keepalive_interval_secs: Option<u64>,
    #[serde(default)]
    tunnel_keepalive_timeout_secs: Option<u64>,
    #[serde(default)]
    tunnel_idle_timeout_secs: Option<u64>,
    #[serde(default)]
    tunnel_connect_timeout_secs: Option<u64>,
    #[serde(default)]
    tunnel_handshake_cap: Option<usize>,
    #[serde(default)]
    max_connections_per_task: Option<usize>,
    #[serde(default)]
    tcp_idle_timeout_secs: Option<u64>,
    #[serde(default)]
    discovery_file: Option<PathBuf>,
    #[serde(default)]
    identity: Option<super::identity::RawIdentity>,
    #[serde(default)]
    authorization: RawAuthorization,
    #[serde(default)]
    ecs: Option<RawEcs>,
    #[serde(default)]
    cloudmap: Option<RawCloudMap>,
    #[serde(default)]
    access_log: Option<RawAccessLog>,
    #[serde(default)]
    metrics: Option<RawMetrics>,
    traces: Option<super::traces::RawTraces>,
    #[serde(default)]
    traffic: Option<super::traffic::RawPolicy>,
    #[serde(default)]
    services: std::collections::BTreeMap<String, super::traffic::RawPolicy>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccessLog {
    #[serde(default)]
    http: bool,
    #[serde(default)]
    tcp: bool,
    #[serde(default)]
    path: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    #[serde(default)]
    series_grace_secs: Option<f64>,
    #[serde(default)]
    max_series_per_metric: Option<usize>,
}

impl RawMetrics {
    fn validate(this: Option<Self>) -> Result<MetricsSettings, (String, String)> {
        let d = MetricsSettings::default();
        let Some(m) = this else { return Ok(d) };
        let grace = match m.series_grace_secs {
            None => d.series_grace,
            Some(s) if s.is_finite() && s > 0.0 && s <= 86_400.0 => {
                std::time::Duration::from_secs_f64(s)
            }
            Some(_) => {
                return Err(invalid(
                    "metrics.series_grace_secs",
                    "must be more than 0 and at most 86400",
                ));
            }
        };
        let max = match m.max_series_per_metric {
            None => d.max_series_per_metric,
            Some(n) if (1..=1_000_000).contains(&n) => n,
            Some(_) => {
                return Err(invalid(
                    "metrics.max_series_per_metric",
                    "must be from 1 to 1000000",
                ));
            }
        };
        Ok(MetricsSettings {
            series_grace: grace,
            max_series_per_metric: max,
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEcs {
    #[serde(default)]
    agent_url: Option<String>,
    #[serde(default)]
    docker_socket: Option<PathBuf>,
    cgroup_root: PathBuf,
    #[serde(default)]
    layout: Option<String>,
    #[serde(default)]
    poll_interval_ms: Option<u64>,
    #[serde(default)]
    publish_ready_attribute: bool,
    #[serde(default)]
    aws_endpoint: Option<String>,
    #[serde(default)]
    region: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCloudMap {
    namespace: String,
    services: Vec<String>,
    #[serde(default)]
    refresh_ms: Option<u64>,
    #[serde(default)]
    endpoint: Option<String>,
    #[serde(default)]
    region: Option<String>,
}

impl RawCloudMap {
    fn validate(self) -> Result<CloudMapSettings, Invalid> {
        if self.namespace.is_empty() {
            return Err(invalid("cloudmap.namespace", "must not be empty"));
        }
        if self.services.is_empty() || self.services.iter().any(String::is_empty) {
            return Err(invalid(
                "cloudmap.services",
                "list at least one non-empty service name",
            ));
        }
        let refresh = self.refresh_ms.unwrap_or(10_000);
        if refresh < 100 {
            return Err(invalid("cloudmap.refresh_ms", "must be at least 100"));
        }
        Ok(CloudMapSettings {
            namespace: self.namespace,
            services: self.services,
            refresh: std::time::Duration::from_millis(refresh),
            endpoint: self.endpoint,
            region: self.region,
        })
    }
}

impl RawEcs {
    fn validate(self) -> Result<EcsSettings, Invalid> {
        let agent_url = self
            .agent_url
            .unwrap_or_else(|| crate::ecs::DEFAULT_AGENT_URL.to_owned());
        let agent_url = agent_url
            .parse::<http::Uri>()
            .map_err(|e| invalid("ecs.agent_url", format!("{agent_url:?}: {e}")))?;
        // What the agent client accepts (plain http, a host), checked now.
        crate::ecs::EcsAgent::new(agent_url.clone())
            .map_err(|e| invalid("ecs.agent_url", e.to_string()))?;
        if !self.cgroup_root.is_dir() {
            return Err(invalid(
                "ecs.cgroup_root",
                format!("{}: not a directory", self.cgroup_root.display()),
            ));
        }
        let layout = match self.layout.as_deref() {
            None | Some("auto") => None,
            Some("v1") => Some(crate::ecs::CgroupLayout::V1),
            Some("v2") => Some(crate::ecs::CgroupLayout::V2),
            Some(other) => {
                return Err(invalid(
                    "ecs.layout",
                    format!("{other:?}: expected auto, v1 or v2"),
                ));
            }
        };
        let poll = self.poll_interval_ms.unwrap_or(2000);
        if poll < 100 {
            return Err(invalid("ecs.poll_interval_ms", "must be at least 100"));
        }
        Ok(EcsSettings {
            agent_url,
            docker_socket: self.docker_socket,
            cgroup_root: self.cgroup_root,
            layout,
            poll_interval: std::time::Duration::from_millis(poll),
            publish_ready_attribute: self.publish_ready_attribute,
            aws_endpoint: self.aws_endpoint,
            region: self.region,
        })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuthorization {
    #[serde(default)]
    allow: Vec<AllowRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTask {
    id: String,
    family: String,
    network_mode: NetworkMode,
    cgroups: Vec<PathBuf>,
    /// Template inputs beyond the family.
    #[serde(default)]
    service: Option<String>,
    #[serde(default)]
    task_role: Option<String>,
}

pub(super) fn invalid(field: impl Into<String>, message: impl Into<String>) -> Invalid {
    (field.into(), message.into())
}

impl RawConfig {
    pub(super) fn validate(self) -> Result<Config, Invalid> {
        if self.instance.is_empty() {
            return Err(invalid("instance", "must not be empty"));
        }
        if !self.cgroup_root.is_dir() {
            return Err(invalid(
                "cgroup_root",
                format!("{}: no such cgroup directory", self.cgroup_root.display()),
            ));
        }
        let outbound_port = self.outbound_port.unwrap_or(DEFAULT_OUTBOUND_PORT);
        if outbound_port == 0 {
            return Err(invalid("outbound_port", "must not be 0"));
        }
        let exclude_cidrs = self
            .exclude_cidrs
            .iter()
            .enumerate()
            .map(|(i, s)| {
                s.parse::<IpNet>()
                    .map_err(|e| invalid(format!("exclude_cidrs[{i}]"), format!("{s:?}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let socket_mark = self.socket_mark.unwrap_or(DEFAULT_SOCKET_MARK);
        if socket_mark == 0 {
            return Err(invalid("socket_mark", "must not be 0"));
        }
        let dns_resolvers = match self.dns_resolvers {
            Some(list) => list,
            None => {
                let mut list = std::fs::read_to_string(super::RESOLV_CONF)
                    .map(|t| super::resolv_conf_nameservers(&t))
                    .unwrap_or_default();
                list.extend(super::VPC_RESOLVERS);
                list
            }
        };
        if let Some(bad) = dns_resolvers
            .iter()
            .find(|a| a.is_unspecified() || a.is_loopback())
        {
            return Err(invalid(
                "dns_resolvers",
                format!("{bad} is not a resolver address (loopback is never redirected anyway)"),
            ));
        }
        let pin_dir = self.pin_dir.unwrap_or_else(|| DEFAULT_PIN_DIR.into());
        let admin_socket = self.admin_socket.unwrap_or_else(|| {
            PathBuf::from(DEFAULT_ADMIN_SOCKET_DIR).join(format!("{}.sock", self.instance))
        });
        if !admin_socket.is_absolute() {
            return Err(invalid("admin_socket", "must be an absolute path"));
        }
        let opaque_ports = self
            .opaque_ports
            .unwrap_or_else(|| super::DEFAULT_OPAQUE_PORTS.to_vec());
        if opaque_ports.contains(&0) {
            return Err(invalid("opaque_ports", "port 0 is not a destination port"));
        }
        let detect_timeout = match self.detect_timeout_ms {
            None => super::DEFAULT_DETECT_TIMEOUT,
            Some(0) => return Err(invalid("detect_timeout_ms", "must be at least 1")),
            Some(ms) => std::time::Duration::from_millis(ms),
        };
        let state_dir = self
            .state_dir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR).join(&self.instance));
        if !state_dir.is_absolute() {
            return Err(invalid("state_dir", "must be an absolute path"));
        }
        let ecs = self.ecs.map(RawEcs::validate).transpose()?;
        let cloudmap = self.cloudmap.map(RawCloudMap::validate).transpose()?;
        let cluster = self.cluster.unwrap_or_else(|| "default".to_owned());
        if cluster.is_empty() {
            return Err(invalid("cluster", "must not be empty"));
        }
        let identity = self.identity.map(|i| i.validate()).transpose()?;
        let template = identity.as_ref().map(|i| i.template.clone());
        let inbound_addr = self.inbound_addr;
        let inbound_port = inbound_addr.map_or(DEFAULT_INBOUND_PORT, |a| a.port());
        let tunnel_stream_cap = self.tunnel_stream_cap.unwrap_or(DEFAULT_STREAM_CAP);
        if tunnel_stream_cap == 0 {
            return Err(invalid("tunnel_stream_cap", "must be at least 1"));
        }
        let limits = super::limits::RawLimits {
            tunnel_keepalive_interval_secs: self.tunnel_keepalive_interval_secs,
            tunnel_keepalive_timeout_secs: self.tunnel_keepalive_timeout_secs,
            tunnel_idle_timeout_secs: self.tunnel_idle_timeout_secs,
            tunnel_connect_timeout_secs: self.tunnel_connect_timeout_secs,
            tunnel_handshake_cap: self.tunnel_handshake_cap,
            max_connections_per_task: self.max_connections_per_task,
            tcp_idle_timeout_secs: self.tcp_idle_timeout_secs,
        }
        .validate()?;
        let traffic = super::traffic::validate(self.traffic, self.services)?;
        let access_log = match self.access_log {
            None => crate::access_log::AccessLogSettings::default(),
            Some(a) => {
                if a.path.as_ref().is_some_and(|p| !p.is_absolute()) {
                    return Err(invalid("access_log.path", "must be an absolute path"));
                }
                crate::access_log::AccessLogSettings {
                    http: a.http,
                    tcp: a.tcp,
                    path: a.path,
                }
            }
        };
        let metrics = RawMetrics::validate(self.metrics)?;
        let traces = self.traces.map(|t| t.validate()).transpose()?;
        let discovery = match &self.discovery_file {
            Some(path) => Discovery::load(path, inbound_port)
                .map_err(|e| invalid("discovery_file", e.to_string()))?,
            None => Discovery::default(),
        };
        if !discovery.is_empty() && identity.is_none() {
            return Err(invalid(
                "discovery_file",
                "meshed endpoints need an [identity] section",
            ));
        }
        if cloudmap.is_some() && identity.is_none() {
            return Err(invalid(
                "cloudmap",
                "meshed endpoints need an [identity] section",
            ));
        }
        if self.mode == Mode::Strict && identity.is_none() {
            return Err(invalid("mode", "strict mode needs an [identity] section"));
        }
        let mut tasks = Vec::with_capacity(self.tasks.len());
        let mut seen = std::collections::HashSet::new();
        for (i, t) in self.tasks.into_iter().enumerate() {
            let id = TaskId::new(&t.id).map_err(|e| invalid(format!("tasks[{i}].id"), e))?;
            if !seen.insert(id.clone()) {
                return Err(invalid(
                    format!("tasks[{i}].id"),
                    format!("duplicate task id {id}"),
                ));
            }
            if t.cgroups.is_empty() {
                return Err(invalid(
                    format!("tasks[{i}].cgroups"),
                    "at least one cgroup needed",
                ));
            }
            for (j, cg) in t.cgroups.iter().enumerate() {
                let field = format!("tasks[{i}].cgroups[{j}]");
                if !cg.is_dir() {
                    return Err(invalid(field, format!("{}: no such cgroup", cg.display())));
                }
                if !cg.starts_with(&self.cgroup_root) {
                    return Err(invalid(
                        field,
                        format!(
                            "{} is not below cgroup_root {}",
                            cg.display(),
                            self.cgroup_root.display()
                        ),
                    ));
                }
            }
            if t.network_mode == NetworkMode::Bridge
                && self.bridge_ipv4.is_none()
                && self.bridge_ipv6.is_none()
            {
                return Err(invalid(
                    format!("tasks[{i}].network_mode"),
                    "bridge mode needs bridge_ipv4 or bridge_ipv6 (the proxy listens there)",
                ));
            }
            let task_identity = match (&identity, &template) {
                (Some(idn), Some(tpl)) => Some(
                    tpl.render(&TemplateVars {
                        trust_domain: idn.trust_domain.clone(),
                        cluster: cluster.clone(),
                        family: t.family.clone(),
                        service: t.service.clone(),
                        task_role: t.task_role.clone(),
                    })
                    .map_err(|e| invalid(format!("tasks[{i}]"), format!("identity: {e}")))?,
                ),
                _ => None,
            };
            tasks.push(TaskConfig {
                id,
                family: t.family,
                network_mode: t.network_mode,
                cgroups: t.cgroups,
                identity: task_identity,
                arn: None,
            });
        }
        Ok(Config {
            instance: self.instance,
            pin_dir,
            uninstall_on_exit: false,
            cgroup_root: self.cgroup_root,
            outbound_port,
            admin_addr: self.admin_addr.unwrap_or(DEFAULT_ADMIN_ADDR),
            bridge_ipv4: self.bridge_ipv4,
            bridge_ipv6: self.bridge_ipv6,
            exclude_cidrs,
            dns_resolvers,
            admin_socket,
            opaque_ports,
            detect_timeout,
            state_dir,
            socket_mark,
            tasks,
            cluster,
            mode: self.mode,
            inbound_addr,
            tunnel_stream_cap,
            limits,
            traffic,
            access_log,
            metrics,
            traces,
            discovery,
            discovery_file: self.discovery_file,
            identity,
            authorization: Policy {
                allow: self.authorization.allow,
            },
            ecs,
            cloudmap,
        })
    }
}
