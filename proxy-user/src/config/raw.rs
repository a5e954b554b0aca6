//! The on-disk shape, kept apart from `Config` so that validation is the only way in.
use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
};

use ipnet::IpNet;
use serde::Deserialize;

use super::{
    Config, DEFAULT_ADMIN_ADDR, DEFAULT_OUTBOUND_PORT, DEFAULT_PIN_DIR, DEFAULT_SOCKET_MARK,
    NetworkMode, TaskConfig,
};
use crate::types::TaskId;

type Invalid = (String, String);

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
    tasks: Vec<RawTask>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTask {
    id: String,
    family: String,
    network_mode: NetworkMode,
    cgroups: Vec<PathBuf>,
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> Invalid {
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
            tasks.push(TaskConfig {
                id,
                family: t.family,
                network_mode: t.network_mode,
                cgroups: t.cgroups,
            });
        }
        Ok(Config {
            instance: self.instance,
            pin_dir: self.pin_dir.unwrap_or_else(|| DEFAULT_PIN_DIR.into()),
            cgroup_root: self.cgroup_root,
            outbound_port,
            admin_addr: self.admin_addr.unwrap_or(DEFAULT_ADMIN_ADDR),
            bridge_ipv4: self.bridge_ipv4,
            bridge_ipv6: self.bridge_ipv6,
            exclude_cidrs,
            socket_mark,
            tasks,
        })
    }
}
