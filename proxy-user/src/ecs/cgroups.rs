//! From (task id, Docker id) to the container's cgroup v2 directory, whose inode is the
//! cgroup id `bpf_get_current_cgroup_id()` returns for the container's processes — the key
//! of the eBPF "enrolled task" map.
//!
//! Where the directory is depends on how the ECS agent asks Docker to parent the
//! container (`HostConfig.CgroupParent`, built by `Task.BuildCgroupRoot` in
//! amazon-ecs-agent `agent/api/task/task_linux.go`):
//!
//! - **cgroup v2 (AL2023)**: parent `ecstasks-<task id>.slice` (`buildCgroupV2Root`;
//!   prefix `DefaultTaskCgroupV2Prefix = "ecstasks"` in `agent/config/config_unix.go`),
//!   Docker's systemd driver adds `docker-<id>.scope`. The task id is used *as is* — the
//!   agent does not strip dashes. systemd reads each `-` in a slice name as a parent
//!   boundary, and containerd's `dashesToPath` (what the agent uses to create the slice)
//!   expands it the same way, so a current 32-hex id gives
//!   `ecstasks.slice/ecstasks-<id>.slice/docker-<cid>.scope`, while an old-format UUID id
//!   gives one nested slice per dash (`ecstasks.slice/ecstasks-090eff9b.slice/
//!   ecstasks-090eff9b-1ce3.slice/…`). [`v2_task_slice`] does that expansion.
//! - **cgroup v1 (AL2)**: parent `/ecs/<task id>` (`DefaultTaskCgroupV1Prefix = "/ecs"`),
//!   Docker's cgroupfs driver adds `<cid>`, in every v1 controller
//!   (`/sys/fs/cgroup/memory/ecs/<task>/<cid>`, `…/systemd/ecs/…`). Those directories have
//!   no cgroup v2 id, so the redirect cannot key on them. It works only when cgroup2 is
//!   mounted at `/sys/fs/cgroup/unified` (systemd's "hybrid" mode, or a mount unit ordered
//!   before `docker.service`): runc's fs driver then also creates and joins the same
//!   relative path there (libcontainer `fs` appends the `""` subsystem when
//!   `IsCgroup2HybridMode()`), i.e. `/sys/fs/cgroup/unified/ecs/<task>/<cid>`. Containers
//!   started before that mount sit at the v2 root and cannot be told apart.
//!
//! With task resource limits off (`ECS_ENABLE_TASK_CPU_MEM_LIMIT=false`) the agent sets no
//! parent and Docker's defaults apply (`system.slice/docker-<cid>.scope` with the systemd
//! driver, `docker/<cid>` with cgroupfs); those are tried last.
use std::path::{Path, PathBuf};

use super::EcsError;

/// Which naming the agent on this host uses; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupLayout {
    /// AL2023, unified cgroup v2: `<root>/ecstasks.slice/ecstasks-<task>.slice/docker-<cid>.scope`.
    V2,
    /// AL2, cgroup v1 (+ cgroup2 at `<root>/unified` for the redirect): `<root>/unified/ecs/<task>/<cid>`.
    V1,
}

/// v1 controllers probed to tell "exists, but only in v1" from "does not exist".
const V1_CONTROLLERS: [&str; 4] = ["systemd", "memory", "cpu,cpuacct", "pids"];

impl CgroupLayout {
    /// Probe `root` (the cgroup filesystem root, normally `/sys/fs/cgroup`): the agent's
    /// own directories decide when tasks exist, otherwise the kind of hierarchy does.
    pub fn detect(root: &Path) -> Result<Self, EcsError> {
        let has = |rel: &str| root.join(rel).is_dir();
        if root.file_name().is_some_and(|n| n == "ecstasks.slice") || has("ecstasks.slice") {
            return Ok(Self::V2);
        }
        if ["ecs", "unified/ecs", "systemd/ecs", "memory/ecs"]
            .into_iter()
            .any(has)
        {
            return Ok(Self::V1);
        }
        // No task cgroups yet: a v1 host has controller directories, a v2 root has
        // `cgroup.controllers`.
        if has("unified") || V1_CONTROLLERS.iter().any(|c| has(c)) {
            return Ok(Self::V1);
        }
        if root.join("cgroup.controllers").is_file() {
            return Ok(Self::V2);
        }
        Err(EcsError::UnknownLayout { path: root.into() })
    }
}

/// systemd's slice expansion (containerd `dashesToPath`, runc `ExpandSlice`):
/// `a-b-c.slice` lives at `a.slice/a-b.slice/a-b-c.slice`.
fn expand_slice(name: &str) -> PathBuf {
    let Some(stem) = name.strip_suffix(".slice") else {
        return PathBuf::from(name);
    };
    let mut path = PathBuf::new();
    let mut prefix = String::new();
    for part in stem.split('-') {
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        path.push(format!("{prefix}.slice"));
    }
    path
}

/// A task's slice below the cgroup v2 root, e.g. `ecstasks.slice/ecstasks-<id>.slice`.
pub fn v2_task_slice(task_id: &str) -> PathBuf {
    expand_slice(&format!("ecstasks-{task_id}.slice"))
}

/// The container's cgroup v2 directory below `root` (the cgroup filesystem root,
/// `/sys/fs/cgroup`; for [`CgroupLayout::V2`] also accepted: `…/ecstasks.slice` itself, the
/// directory the node proxy attaches to). The first candidate that exists wins.
pub fn resolve_container_cgroup(
    root: &Path,
    layout: CgroupLayout,
    task_id: &str,
    docker_id: &str,
) -> Result<PathBuf, EcsError> {
    // Ids come from the agent; keep them from walking out of the tree.
    let safe = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    };
    let mut tried = Vec::new();
    if safe(task_id) && safe(docker_id) {
        let candidates = match layout {
            CgroupLayout::V2 => {
                let root = match root.file_name() {
                    Some(n) if n == "ecstasks.slice" => root.parent().unwrap_or(root),
                    _ => root,
                };
                let scope = format!("docker-{docker_id}.scope");
                vec![
                    root.join(v2_task_slice(task_id)).join(&scope),
                    root.join("system.slice").join(&scope),
                ]
            }
            CgroupLayout::V1 => {
                // `<root>/unified` on a hybrid host; `<root>` itself when the caller
                // passed the cgroup2 mount point.
                [root.join("unified"), root.to_path_buf()]
                    .into_iter()
                    .flat_map(|base| {
                        [
                            base.join("ecs").join(task_id).join(docker_id),
                            base.join("docker").join(docker_id),
                        ]
                    })
                    .collect()
            }
        };
        for c in candidates {
            if c.is_dir() {
                return Ok(c);
            }
            tried.push(c);
        }
        if layout == CgroupLayout::V1 {
            let v1 = V1_CONTROLLERS
                .iter()
                .map(|ctl| root.join(ctl).join("ecs").join(task_id).join(docker_id))
                .find(|p| p.is_dir());
            if let Some(v1_path) = v1 {
                return Err(EcsError::NoUnifiedHierarchy {
                    task: task_id.into(),
                    docker_id: docker_id.into(),
                    v1_path,
                });
            }
        }
    }
    let tried: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
    Err(EcsError::CgroupNotFound {
        task: task_id.into(),
        docker_id: docker_id.into(),
        tried: if tried.is_empty() {
            "nothing: unusable id".into()
        } else {
            tried.join(", ")
        },
    })
}

/// The cgroup id the eBPF programs see for processes in `dir`: its inode, but only on a
/// cgroup2 filesystem — a v1 directory's inode is some other number and would enroll
/// nothing (or the wrong thing).
pub fn cgroup_id(dir: &Path) -> Result<u64, EcsError> {
    use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, statfs};
    let fs = statfs(dir).map_err(|e| EcsError::Io {
        path: dir.into(),
        source: e.into(),
    })?;
    if fs.filesystem_type() != CGROUP2_SUPER_MAGIC {
        return Err(EcsError::NotCgroup2 { path: dir.into() });
    }
    crate::cgroup::cgroup_id(dir).map_err(|e| match e {
        crate::cgroup::CgroupError::Io { path, source } => EcsError::Io { path, source },
        other => EcsError::Io {
            path: dir.into(),
            source: std::io::Error::other(other.to_string()),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ecs::fixture_server::TempTree;

    const TASK: &str = "4d2c0a8f0b6e4b8c9a1e2f3a4b5c6d7e";
    const CID: &str = "1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f809";

    #[test]
    fn v2_slice_names_follow_systemd_expansion() {
        assert_eq!(
            v2_task_slice(TASK),
            PathBuf::from(format!("ecstasks.slice/ecstasks-{TASK}.slice"))
        );
        // Old-format (UUID) task ids: every dash opens a nested slice.
        assert_eq!(
            v2_task_slice("090eff9b-1ce3-4db6"),
            PathBuf::from(
                "ecstasks.slice/ecstasks-090eff9b.slice/ecstasks-090eff9b-1ce3.slice/\
                 ecstasks-090eff9b-1ce3-4db6.slice"
            )
        );
    }

    #[test]
    fn resolves_al2023_v2_tree() {
        let t = TempTree::new();
        let scope = format!("ecstasks.slice/ecstasks-{TASK}.slice/docker-{CID}.scope");
        t.mkdir(&scope);
        t.mkdir("ecstasks.slice/ecstasks-0ther.slice/docker-ffff.scope");
        t.touch("cgroup.controllers");
        assert_eq!(CgroupLayout::detect(t.path()).unwrap(), CgroupLayout::V2);
        let want = t.path().join(&scope);
        assert_eq!(
            resolve_container_cgroup(t.path(), CgroupLayout::V2, TASK, CID).unwrap(),
            want
        );
        // The attach directory itself is accepted as root too.
        let slice_root = t.path().join("ecstasks.slice");
        assert_eq!(CgroupLayout::detect(&slice_root).unwrap(), CgroupLayout::V2);
        assert_eq!(
            resolve_container_cgroup(&slice_root, CgroupLayout::V2, TASK, CID).unwrap(),
            want
        );
        // Old-format id, nested slices.
        let old = "090eff9b-1ce3-4db6-848a-a8d14064fd24";
        let nested = t.path().join(v2_task_slice(old)).join("docker-abcd.scope");
        t.mkdir(nested.strip_prefix(t.path()).unwrap().to_str().unwrap());
        assert_eq!(
            resolve_container_cgroup(t.path(), CgroupLayout::V2, old, "abcd").unwrap(),
            nested
        );
    }

    #[test]
    fn v2_falls_back_to_dockers_default_parent() {
        let t = TempTree::new();
        t.mkdir(&format!("system.slice/docker-{CID}.scope"));
        let got = resolve_container_cgroup(t.path(), CgroupLayout::V2, TASK, CID).unwrap();
        assert!(got.ends_with(format!("system.slice/docker-{CID}.scope")));
    }

    #[test]
    fn resolves_al2_hybrid_tree_under_the_unified_mount() {
        let t = TempTree::new();
        for ctl in ["memory", "cpu,cpuacct", "systemd", "unified"] {
            t.mkdir(&format!("{ctl}/ecs/{TASK}/{CID}"));
        }
        assert_eq!(CgroupLayout::detect(t.path()).unwrap(), CgroupLayout::V1);
        let got = resolve_container_cgroup(t.path(), CgroupLayout::V1, TASK, CID).unwrap();
        assert_eq!(got, t.path().join(format!("unified/ecs/{TASK}/{CID}")));
        // Passing the cgroup2 mount itself as root works as well.
        let unified = t.path().join("unified");
        assert_eq!(CgroupLayout::detect(&unified).unwrap(), CgroupLayout::V1);
        assert_eq!(
            resolve_container_cgroup(&unified, CgroupLayout::V1, TASK, CID).unwrap(),
            got
        );
    }

    #[test]
    fn v1_only_tree_says_cgroup2_is_missing() {
        let t = TempTree::new();
        for ctl in ["memory", "systemd"] {
            t.mkdir(&format!("{ctl}/ecs/{TASK}/{CID}"));
        }
        let err = resolve_container_cgroup(t.path(), CgroupLayout::V1, TASK, CID).unwrap_err();
        assert!(
            matches!(err, EcsError::NoUnifiedHierarchy { ref v1_path, .. }
            if v1_path == &t.path().join(format!("systemd/ecs/{TASK}/{CID}"))),
            "{err}"
        );
        assert!(err.to_string().contains("/sys/fs/cgroup/unified"), "{err}");
    }

    #[test]
    fn missing_or_hostile_ids_are_not_found() {
        let t = TempTree::new();
        t.mkdir("memory");
        assert_eq!(CgroupLayout::detect(t.path()).unwrap(), CgroupLayout::V1);
        let err = resolve_container_cgroup(t.path(), CgroupLayout::V1, TASK, CID).unwrap_err();
        assert!(matches!(err, EcsError::CgroupNotFound { .. }), "{err}");
        assert!(
            err.to_string()
                .contains(&format!("unified/ecs/{TASK}/{CID}")),
            "{err}"
        );
        t.mkdir("etc");
        let err =
            resolve_container_cgroup(t.path(), CgroupLayout::V1, "../../etc", CID).unwrap_err();
        assert!(matches!(err, EcsError::CgroupNotFound { .. }), "{err}");
        let empty = TempTree::new();
        assert!(matches!(
            CgroupLayout::detect(empty.path()),
            Err(EcsError::UnknownLayout { .. })
        ));
    }

    #[test]
    fn cgroup_id_refuses_non_cgroup2_directories() {
        let t = TempTree::new();
        assert!(matches!(
            cgroup_id(t.path()),
            Err(EcsError::NotCgroup2 { .. })
        ));
        assert!(matches!(
            cgroup_id(&t.path().join("nope")),
            Err(EcsError::Io { .. })
        ));
        // The host's own cgroup2 mount, where there is one: its id is the inode.
        if let Ok(mount) = crate::cgroup::cgroup2_mount() {
            use std::os::unix::fs::MetadataExt;
            let ino = std::fs::metadata(&mount).unwrap().ino();
            assert_eq!(cgroup_id(&mount).unwrap(), ino);
        }
    }
}
