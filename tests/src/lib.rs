//! Host harness: builds an ECS-like world on one machine. Container instances are network
//! namespaces joined through a "fabric" bridge; tasks are cgroup v2 directories (host mode,
//! processes in the instance netns) or netns + cgroup behind a docker0-like bridge (bridge
//! mode). Everything created is owned by an RAII guard and removed on drop, also when a
//! test panics. Names carry the process id and a counter so tests can run in parallel.
pub mod aws;
pub mod boot;
pub mod capture;
pub mod cgroup;
pub mod demo;
pub mod fixture;
pub mod issuer;
pub mod metrics;
pub mod netns;
pub mod otlp;
pub mod process;
pub mod world;

use std::{
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

pub use world::{Instance, NetworkMode, ProxyOptions, Task, World};

/// Short unique token for names of kernel objects (netns names are limited in practice).
pub fn uid() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{:x}x{}",
        std::process::id() % 0xfffff,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Binaries the harness runs.
#[derive(Clone, Debug)]
pub struct Tools {
    pub ecsmesh: PathBuf,
    pub meshtool: PathBuf,
}

impl Tools {
    /// `ECSMESH_BIN` (set by `cargo xtask test`), else the workspace's debug build.
    pub fn from_env(meshtool: &str) -> Self {
        let ecsmesh = std::env::var_os("ECSMESH_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/ecsmesh")
            });
        assert!(
            ecsmesh.is_file(),
            "{} missing: run the suite with `cargo xtask test` (it builds the eBPF object and ecsmesh)",
            ecsmesh.display()
        );
        Self {
            ecsmesh,
            meshtool: meshtool.into(),
        }
    }
}

/// Run a setup command; any failure is a harness bug or a missing privilege, so panic
/// loudly with what the command said.
pub fn sh(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Like `sh`, but for cleanup: never panics (a panic in Drop would abort the test run).
pub fn sh_quiet(program: &str, args: &[&str]) {
    let _ = Command::new(program).args(args).output();
}

/// Number of entries in a pinned map, read with bpftool (an observer independent of ecsmesh).
pub fn pinned_map_len(path: &std::path::Path) -> usize {
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(path)
        .output()
        .expect("bpftool");
    assert!(
        out.status.success(),
        "bpftool map dump {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool json");
    v.as_array().map_or(0, Vec::len)
}

/// Ids of programs attached to a cgroup directory (not inherited ones).
pub fn cgroup_prog_ids(dir: &std::path::Path) -> Vec<u64> {
    let out = Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(dir)
        .output()
        .expect("bpftool");
    if !out.status.success() || out.stdout.is_empty() {
        return Vec::new();
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v.as_array()
        .map(|a| a.iter().filter_map(|p| p["id"].as_u64()).collect())
        .unwrap_or_default()
}

/// Ids of all programs loaded in the kernel.
pub fn loaded_prog_ids() -> Vec<u64> {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "list"])
        .output()
        .expect("bpftool");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v.as_array()
        .map(|a| a.iter().filter_map(|p| p["id"].as_u64()).collect())
        .unwrap_or_default()
}
