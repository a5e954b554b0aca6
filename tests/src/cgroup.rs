//! cgroup v2 directories with guaranteed cleanup. The mount point is detected (it is
//! `/sys/fs/cgroup/unified` on hybrid hosts like these).
use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

pub fn cgroup2_mount() -> PathBuf {
    let info = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    info.lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            if right.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            left.split_whitespace().nth(4).map(PathBuf::from)
        })
        .expect("no cgroup2 mount: the harness needs cgroup v2")
}

/// A cgroup subtree owned by a test. Drop kills every process in it and removes it.
pub struct CgroupTree {
    root: PathBuf,
}

impl CgroupTree {
    pub fn new(name: &str) -> Self {
        let root = cgroup2_mount().join("ecsmesh-test").join(name);
        fs::create_dir_all(&root).unwrap_or_else(|e| panic!("mkdir {}: {e}", root.display()));
        Self { root }
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    /// Create (if needed) a child directory, relative to the tree root.
    pub fn dir(&self, rel: &str) -> PathBuf {
        let p = self.root.join(rel);
        fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        p
    }
}

fn subdirs_deepest_first(dir: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                subdirs_deepest_first(&e.path(), out);
            }
        }
    }
    out.push(dir.to_path_buf());
}

fn populated(dir: &Path) -> bool {
    fs::read_to_string(dir.join("cgroup.events"))
        .map(|s| s.lines().any(|l| l == "populated 1"))
        .unwrap_or(false)
}

impl Drop for CgroupTree {
    fn drop(&mut self) {
        // cgroup.kill (kernel >= 5.14) SIGKILLs the whole subtree at once.
        let _ = fs::write(self.root.join("cgroup.kill"), "1");
        let deadline = Instant::now() + Duration::from_secs(10);
        while populated(&self.root) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut dirs = Vec::new();
        subdirs_deepest_first(&self.root, &mut dirs);
        for d in dirs {
            let _ = fs::remove_dir(&d);
        }
        // The shared parent goes when the last tree is gone.
        if let Some(parent) = self.root.parent() {
            let _ = fs::remove_dir(parent);
        }
    }
}
