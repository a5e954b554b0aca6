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
    let path = Path::new("/proc/self/cgroup");
    let text = std::fs::read_to_string(path).map_err(|source| CgroupError::Io {
        path: path.into(),
        source,
    })?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or(CgroupError::NoUnifiedLine)?;
    Ok(cgroup2_mount()?.join(rel.trim_start_matches('/')))
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
}
