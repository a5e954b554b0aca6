//! `cargo xtask bench --baseline <rev>`: the `ecsmesh` binary of another commit, built from
//! a clean export of that commit with its own `cargo xtask build --release`, for the
//! `node-base` mode. The export is kept under `target/bench/baseline/` and reused while the
//! commit is the same.
use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

use super::{Cell, report::median};
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
///
/// Both are paired by round: the median over rounds of (node − node-base) p50 and of
/// node / node-base CPU, each pair measured in the same round, minutes apart at most. On a
/// shared VM a cell's level moves by more than the bound from round to round (direct's own
/// p50 moved 145–387 µs in one run); pairing cancels what the two modes share, where the
/// difference of two separate medians (each relative to direct) does not.
pub struct Verdict {
    pub rate: u64,
    pub p50_delta_us: f64,
    pub cpu_ratio: f64,
    pub rounds: usize,
}

pub fn compare(cells: &[Cell]) -> Vec<Verdict> {
    let keep = |mode: &str| -> Vec<&Cell> {
        cells
            .iter()
            .filter(|c| c.kind == "keepalive" && c.mode == mode)
            .collect()
    };
    let (node, base) = (keep("node"), keep("node-base"));
    let mut rates: Vec<u64> = node.iter().map(|c| c.rate as u64).collect();
    rates.sort();
    rates.dedup();
    rates
        .into_iter()
        .filter_map(|rate| {
            let pairs: Vec<(&Cell, &Cell)> = node
                .iter()
                .filter(|n| n.rate as u64 == rate)
                .filter_map(|n| {
                    base.iter()
                        .find(|b| b.rate as u64 == rate && b.round == n.round)
                        .map(|b| (*n, *b))
                })
                .collect();
            if pairs.is_empty() {
                return None;
            }
            Some(Verdict {
                rate,
                p50_delta_us: median(
                    pairs
                        .iter()
                        .map(|(n, b)| n.load.p50_us as f64 - b.load.p50_us as f64)
                        .collect(),
                ),
                cpu_ratio: median(
                    pairs
                        .iter()
                        .map(|(n, b)| n.cpu_cores / b.cpu_cores)
                        .collect(),
                ),
                rounds: pairs.len(),
            })
        })
        .collect()
}
