//! cgroup v2 facts the redirect needs. On these hosts v2 may be mounted at `/sys/fs/cgroup`
//! (unified) or `/sys/fs/cgroup/unified` (hybrid), so the mount point is read from
//! `/proc/self/mountinfo`, never assumed.
use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup2 filesystem is mounted (looked in /proc/self/mountinfo)")]
    NoCgroup2,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("/proc/self/cgroup has no cgroup v2 (\"0::\") line")]
    NoUnifiedLine,
}

/// The cgroup2 mount point, parsed from a mountinfo text (field 5 is the mount point,
/// the filesystem type follows the " - " separator).
pub fn cgroup2_mount_from(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        (fstype == "cgroup2").then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
    })
}

pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = std::fs::read_to_string(path).map_err(|source| CgroupError::Io {
        path: path.into(),
        source,
    })?;
    cgroup2_mount_from(&text).ok_or(CgroupError::NoCgroup2)
}

/// On cgroup v2 the cgroup id that `bpf_get_current_cgroup_id()` returns is the inode
/// number of the cgroup's directory.
pub fn cgroup_id(dir: &Path) -> Result<u64, CgroupError> {
    std::fs::metadata(dir)
        .map(|m| m.ino())
        .map_err(|source| CgroupError::Io {
            path: dir.into(),
            source,
        })
}

/// Path of the calling process's cgroup v2 directory.
pub fn own_cgroup() -> Result<PathBuf, CgroupError> {
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|source| CgroupError::Io {
            path: path.into(),
            source,
        })
    };
    let text = read(Path::new("/proc/self/cgroup"))?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or(CgroupError::NoUnifiedLine)?;
    let mountinfo = read(Path::new("/proc/self/mountinfo"))?;
    own_cgroup_from(&mountinfo, rel).ok_or(CgroupError::NoCgroup2)
}

/// The directory of cgroup `rel` (as `/proc/self/cgroup` names it) under the first cgroup2
/// mount whose root (mountinfo field 4) contains it. In a container the host's cgroupfs
/// may be mounted too (e.g. at `/host/sys/fs/cgroup`); seen from the container's cgroup
/// namespace its root lies outside (`/../..`), so it is not mistaken for the container's
/// own, whatever the mount order.
pub fn own_cgroup_from(mountinfo: &str, rel: &str) -> Option<PathBuf> {
    let rel = Path::new(rel.trim());
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mut fields = left.split_whitespace();
        let root = Path::new(fields.nth(3)?);
        let mount_point = fields.next()?;
        let below = rel.strip_prefix(root).ok()?;
        Some(Path::new(mount_point).join(below))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_hybrid_and_unified_mounts() {
        let hybrid = "35 25 0:30 / /sys/fs/cgroup/cpu rw,relatime shared:9 - cgroup cgroup rw,cpu\n\
                      36 25 0:31 / /sys/fs/cgroup/unified rw,relatime shared:10 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount_from(hybrid),
            Some("/sys/fs/cgroup/unified".into())
        );
        let unified =
            "30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(cgroup2_mount_from(unified), Some("/sys/fs/cgroup".into()));
        assert_eq!(
            cgroup2_mount_from("1 2 0:1 / / rw - ext4 /dev/vda rw\n"),
            None
        );
    }

    #[test]
    fn own_cgroup_skips_a_host_cgroupfs_mounted_first() {
        // A container (cgroup namespace) with the host's cgroupfs mounted before its own.
        let container = "60 50 0:26 /../../.. /host/sys/fs/cgroup ro,relatime - cgroup2 cgroup2 rw\n\
                         61 50 0:26 / /sys/fs/cgroup ro,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            own_cgroup_from(container, "/"),
            Some("/sys/fs/cgroup".into())
        );
        // A host: the process's cgroup below the mount.
        let host = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n";
        assert_eq!(
            own_cgroup_from(host, "/system.slice/ecsmesh.service\n"),
            Some("/sys/fs/cgroup/system.slice/ecsmesh.service".into())
        );
        // A bind mount of a subtree only matches cgroups inside it.
        let sub = "40 23 0:26 /ecstasks.slice /t rw - cgroup2 cgroup2 rw\n\
                   30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            own_cgroup_from(sub, "/system.slice/x"),
            Some("/sys/fs/cgroup/system.slice/x".into())
        );
        assert_eq!(
            own_cgroup_from(sub, "/ecstasks.slice/a"),
            Some("/t/a".into())
        );
    }
}
