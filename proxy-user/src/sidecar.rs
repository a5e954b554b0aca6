//! `ecsmesh sidecar` in an ECS task (`awsvpc`: every container shares the task's netns):
//! the task it serves comes from the task metadata endpoint the ECS agent gives every
//! container (`ECS_CONTAINER_METADATA_URI_V4`), never from a per-task file.
//!
//! - The redirect attaches at the **task's** cgroup (`ecstasks-<id>.slice` below the host
//!   cgroup filesystem the sidecar mounts, `cgroup_root`), so containers that start later
//!   (the app waits for the sidecar to be `HEALTHY`) are redirected from their first
//!   connect: nothing to race. The sidecar's own container is below it too; the programs
//!   exempt the proxy's own cgroup.
//! - The task's certificate is asked of the issuer by task ARN, proven by the task's own
//!   IAM role (`[identity] attestation = "task_role"`).
//! - Pins go to `<pin_dir>/<task id>` and are removed on SIGTERM: the task is stopping.
use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde::Deserialize;

use crate::{
    config::{Config, IdentitySource, NetworkMode, TaskConfig},
    ecs::{task_id_from_arn, v2_task_slice},
    identity::remote::{Attestation, wire},
};

pub const METADATA_ENV: &str = "ECS_CONTAINER_METADATA_URI_V4";

#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error(
        "the config lists no task and {METADATA_ENV} is not set: run in an ECS task (the agent \
         sets it) or list the one task in the config"
    )]
    NotInEcs,
    #[error("task metadata at {url}: {message}")]
    Metadata { url: String, message: String },
    #[error("{0}")]
    Config(String),
}

/// `GET ${ECS_CONTAINER_METADATA_URI_V4}/task`, the fields used.
#[derive(Debug, Deserialize)]
pub struct TaskMetadata {
    #[serde(rename = "TaskARN")]
    pub task_arn: String,
    #[serde(rename = "Family")]
    pub family: String,
    #[serde(rename = "Cluster", default)]
    pub cluster: String,
}

/// The one task this sidecar serves, from the metadata endpoint; the config with it and
/// with the attach point moved to the task's cgroup.
pub async fn from_task_metadata(mut config: Config) -> Result<Config, SidecarError> {
    let base = std::env::var(METADATA_ENV).map_err(|_| SidecarError::NotInEcs)?;
    let meta = fetch(&base).await?;
    let (pin_root, host_cgroups) = (config.pin_dir.clone(), config.cgroup_root.clone());
    apply(&mut config, meta)?;
    for dir in stale_pin_dirs(&pin_root, &host_cgroups) {
        match crate::ebpf::uninstall(&dir) {
            Ok(()) => {
                tracing::info!(pin_dir = %dir.display(), "sidecar: removed the pins of a task that is gone")
            }
            Err(e) => {
                tracing::warn!(pin_dir = %dir.display(), error = %e, "sidecar: could not remove a gone task's pins")
            }
        }
    }
    Ok(config)
}

/// Pin directories below `pin_root` of tasks whose cgroup is gone: a sidecar killed
/// without SIGTERM (OOM, `kill -9`) leaves its pins; the next sidecar that starts on the
/// instance removes them. Entries that are not task ids are never touched.
pub fn stale_pin_dirs(pin_root: &Path, cgroup_root: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(pin_root) else {
        return Vec::new();
    };
    let mut stale: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let id = crate::types::TaskId::new(&name).ok()?;
            (!cgroup_root.join(v2_task_slice(id.as_str())).exists()).then(|| e.path())
        })
        .collect();
    stale.sort();
    stale
}

async fn fetch(base: &str) -> Result<TaskMetadata, SidecarError> {
    let url = format!("{}/task", base.trim_end_matches('/'));
    let err = |message: String| SidecarError::Metadata {
        url: url.clone(),
        message,
    };
    let uri: http::Uri = url.parse().map_err(|e| err(format!("{e}")))?;
    let target = wire::authority(&uri).map_err(err)?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let (status, body) = wire::http_call(&target, None, http::Method::GET, path, &[], Bytes::new())
        .await
        .map_err(err)?;
    if status != 200 {
        return Err(err(format!("HTTP {status}")));
    }
    serde_json::from_str(&body).map_err(|e| err(e.to_string()))
}

/// The config for `meta`'s task: `cgroup_root` is the host's cgroup filesystem as the
/// sidecar sees it; the task's cgroup below it becomes the attach point and the task.
pub fn apply(config: &mut Config, meta: TaskMetadata) -> Result<(), SidecarError> {
    let id = task_id_from_arn(&meta.task_arn)
        .map_err(|e| SidecarError::Config(format!("task metadata: {e}")))?;
    // The cluster ECS says (an ARN or a name) wins over the config's (default "default").
    let named = meta.cluster.rsplit('/').next().unwrap_or_default();
    if !named.is_empty() && named != config.cluster {
        tracing::info!(
            config = config.cluster,
            ecs = named,
            "sidecar: cluster from task metadata"
        );
        config.cluster = named.to_owned();
    }
    match config.identity.as_ref().map(|i| &i.source) {
        None => {}
        Some(IdentitySource::Issuer {
            attestation: Attestation::TaskRole(_),
            ..
        }) => {}
        Some(_) => {
            return Err(SidecarError::Config(
                "a sidecar that learns its task from ECS gets its certificate from the issuer \
                 with its task role: set [identity] issuer_url and attestation = \"task_role\""
                    .into(),
            ));
        }
    }
    let cgroup = task_cgroup(&config.cgroup_root, id.as_str())?;
    tracing::info!(task = %meta.task_arn, family = meta.family, cgroup = %cgroup.display(), "sidecar: task from the ECS task metadata endpoint");
    config.cgroup_root = cgroup.clone();
    // Pins of their own (several tasks' sidecars share the host's bpffs), removed when the
    // task stops: ECS stops the app containers, which wait for the sidecar, first.
    config.pin_dir = config.pin_dir.join(id.as_str());
    config.uninstall_on_exit = true;
    config.tasks = vec![TaskConfig {
        id,
        family: meta.family,
        network_mode: NetworkMode::Host,
        cgroups: vec![cgroup],
        identity: None,
        arn: Some(meta.task_arn),
    }];
    Ok(())
}

/// `<root>/ecstasks.slice/ecstasks-<id>.slice` (cgroup v2, the systemd driver AL2023 uses),
/// which must exist.
fn task_cgroup(root: &Path, task_id: &str) -> Result<PathBuf, SidecarError> {
    let dir = root.join(v2_task_slice(task_id));
    if !dir.is_dir() {
        return Err(SidecarError::Config(format!(
            "{}: the task's cgroup is not there (cgroup_root must be the host's cgroup v2 \
             filesystem as mounted in the sidecar, e.g. /host/sys/fs/cgroup)",
            dir.display()
        )));
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ARN: &str =
        "arn:aws:ecs:eu-west-1:123456789012:task/prod/0123456789abcdef0123456789abcdef";

    fn config(root: &Path, extra: &str) -> Config {
        let text = format!(
            "instance = \"i-1\"\ncgroup_root = \"{}\"\n{extra}",
            root.display()
        );
        Config::parse(Path::new("t.toml"), &text).unwrap()
    }

    fn meta() -> TaskMetadata {
        serde_json::from_str(&format!(
            r#"{{"Cluster":"arn:aws:ecs:eu-west-1:123456789012:cluster/prod","TaskARN":"{ARN}",
                "Family":"orders","Revision":"3","Containers":[{{"DockerId":"abc","Name":"app"}}]}}"#
        ))
        .unwrap()
    }

    #[test]
    fn the_task_comes_from_metadata_and_its_cgroup_is_the_attach_point() {
        let root = std::env::temp_dir().join(format!("ecsmesh-sidecar-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let mut c = config(&root, "");
        let e = apply(&mut c, meta()).unwrap_err().to_string();
        assert!(e.contains("task's cgroup is not there"), "{e}");
        let slice = root.join("ecstasks.slice/ecstasks-0123456789abcdef0123456789abcdef.slice");
        std::fs::create_dir_all(&slice).unwrap();
        apply(&mut c, meta()).unwrap();
        assert_eq!(c.cgroup_root, slice);
        assert!(c.uninstall_on_exit);
        assert!(c.pin_dir.ends_with("0123456789abcdef0123456789abcdef"));
        assert_eq!(c.cluster, "prod");
        let [t] = c.tasks.as_slice() else {
            panic!("one task")
        };
        assert_eq!((t.family.as_str(), t.arn.as_deref()), ("orders", Some(ARN)));
        assert_eq!(t.cgroups, vec![slice.clone()]);
        assert!(c.check_sidecar().is_ok());
        // File-mode identity cannot name a task learnt from ECS.
        std::fs::write(root.join("b.pem"), "").unwrap();
        let file_mode = format!(
            "[identity]\ntrust_domain = \"t.test\"\nbundle = \"{0}/b.pem\"\nissuer_dir = \"{0}\"\n",
            root.display()
        );
        let e = apply(&mut config(&root, &file_mode), meta())
            .unwrap_err()
            .to_string();
        assert!(e.contains("task_role"), "{e}");
        let _ = std::fs::remove_dir_all(&root);
    }
}
