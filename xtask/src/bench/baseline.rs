//! `cargo xtask bench --baseline <rev>`: the `ecsmesh` binary of another commit, built from
//! a clean export of that commit with its own `cargo xtask build --release`, for the
//! `node-base` mode. The export is kept under `target/bench/baseline/` and reused while the
//! commit is the same.
use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

use super::report::Agg;
use crate::{run, workspace_root};

pub struct Baseline {
    pub commit: String,
    pub subject: String,
    pub ecsmesh: PathBuf,
}

impl Baseline {
    pub fn describe(&self) -> String {
        format!("{} ({})", &self.commit[..12], self.subject)
    }
}

fn git(args: &[&str]) -> Result<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(workspace_root())
        .output()
        .context("running git")?;
    if !out.status.success() {
        bail!(
            "git {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

pub fn build(rev: &str) -> Result<Baseline> {
    let commit = git(&["rev-parse", "--verify", &format!("{rev}^{{commit}}")])
        .with_context(|| format!("--baseline {rev}: not a commit of this repository"))?;
    let subject = git(&["log", "-1", "--format=%s", &commit])?;
    let src = workspace_root().join("target/bench/baseline");
    let stamp = src.join(".ecsmesh-commit");
    let ecsmesh = src.join("target/release/ecsmesh");
    let built = std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == commit);
    if !(built && ecsmesh.exists()) {
        println!(
            "xtask bench: building the baseline {commit} in {}",
            src.display()
        );
        // Keep the export's target/ (an incremental rebuild), replace its sources.
        for entry in std::fs::read_dir(&src).into_iter().flatten().flatten() {
            if entry.file_name() != "target" {
                let p = entry.path();
                if p.is_dir() {
                    std::fs::remove_dir_all(&p)?;
                } else {
                    std::fs::remove_file(&p)?;
                }
            }
        }
        std::fs::create_dir_all(&src)?;
        let mut archive = Command::new("git")
            .args(["archive", "--format=tar", &commit])
            .current_dir(workspace_root())
            .stdout(Stdio::piped())
            .spawn()
            .context("git archive")?;
        let tar = Command::new("tar")
            .arg("-x")
            .arg("-C")
            .arg(&src)
            .stdin(archive.stdout.take().context("git archive stdout")?)
            .status()
            .context("tar")?;
        if !archive.wait()?.success() || !tar.success() {
            bail!("exporting {commit} into {} failed", src.display());
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        run(Command::new(cargo)
            .args(["xtask", "build", "--release"])
            .current_dir(&src)
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("ECSMESH_EBPF_OBJECT"))?;
        std::fs::write(&stamp, &commit)?;
    }
    if !ecsmesh.exists() {
        bail!("the baseline build left no {}", ecsmesh.display());
    }
    Ok(Baseline {
        commit,
        subject,
        ecsmesh,
    })
}

/// The bound for a change on the opaque path: node mode of this build against
/// `node-base` in the same run, added p50 within +15 µs and mesh CPU within +10 %.
pub struct Verdict {
    pub rate: u64,
    pub p50_delta_us: f64,
    pub cpu_ratio: f64,
}

pub fn compare(keep: &BTreeMap<String, BTreeMap<u64, Agg>>) -> Vec<Verdict> {
    let (Some(node), Some(base)) = (keep.get("node"), keep.get("node-base")) else {
        return Vec::new();
    };
    node.iter()
        .filter_map(|(rate, n)| {
            base.get(rate).map(|b| Verdict {
                rate: *rate,
                p50_delta_us: n.added_p50 - b.added_p50,
                cpu_ratio: n.cpu / b.cpu,
            })
        })
        .collect()
}
