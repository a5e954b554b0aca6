//! Runs every test binary of the workspace one after another and prints how long each
//! took. Unlike `cargo test`, which stops at the first failing binary, every binary runs,
//! so one failure never hides another; the run fails at the end naming each failing one.
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// Threads per test binary (the privileged tests each build a small cluster of namespaces;
/// more than this on 2 cores only makes them slower).
const TEST_THREADS: &str = "4";

struct Binary {
    /// `package::target` (`ecsmesh-tests::mesh_ops`, `ecsmesh::lib`).
    name: String,
    exe: PathBuf,
    /// The package's directory: `cargo test` runs each binary there.
    dir: PathBuf,
}

struct Outcome {
    name: String,
    took: Duration,
    ok: bool,
}

/// Builds the test binaries with `env`, then runs each (and the doc tests).
pub fn run_all(env: &[(&str, &Path)]) -> Result<()> {
    let binaries = build(env)?;
    let mut outcomes = Vec::new();
    for b in &binaries {
        println!("xtask test: running {}", b.name);
        let started = Instant::now();
        let status = Command::new(&b.exe)
            .args(["--test-threads", TEST_THREADS])
            .current_dir(&b.dir)
            .envs(env.iter().map(|(k, v)| (k, v.as_os_str())))
            .status()
            .with_context(|| format!("starting {}", b.exe.display()))?;
        outcomes.push(Outcome {
            name: b.name.clone(),
            took: started.elapsed(),
            ok: status.success(),
        });
    }
    let started = Instant::now();
    let doc = super::cargo()
        .args(["test", "--doc"])
        .envs(env.iter().map(|(k, v)| (k, v.as_os_str())))
        .status()
        .context("cargo test --doc")?;
    outcomes.push(Outcome {
        name: "doc tests".into(),
        took: started.elapsed(),
        ok: doc.success(),
    });

    println!("xtask test: time per test binary");
    for o in &outcomes {
        println!(
            "  {:>7.1} s  {}  {}",
            o.took.as_secs_f64(),
            if o.ok { "ok    " } else { "FAILED" },
            o.name
        );
    }
    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|o| !o.ok)
        .map(|o| o.name.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("failing test binaries: {}", failed.join(", "));
    }
    Ok(())
}

/// `cargo test --no-run --message-format=json`: every test executable with its package.
fn build(env: &[(&str, &Path)]) -> Result<Vec<Binary>> {
    let out = super::cargo()
        .args(["test", "--no-run", "--message-format=json"])
        .envs(env.iter().map(|(k, v)| (k, v.as_os_str())))
        .stderr(Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the tests failed: {}", out.status);
    }
    let mut binaries = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" || msg["profile"]["test"] != true {
            continue;
        }
        let Some(exe) = msg["executable"].as_str() else {
            continue;
        };
        let manifest = msg["manifest_path"]
            .as_str()
            .context("artifact without manifest_path")?;
        let package = msg["package_id"]
            .as_str()
            .and_then(package_name)
            .unwrap_or("?");
        let target = msg["target"]["name"].as_str().unwrap_or("?");
        let kind = msg["target"]["kind"][0].as_str().unwrap_or("?");
        binaries.push(Binary {
            name: if kind == "test" {
                format!("{package}::{target}")
            } else {
                format!("{package}::{target} ({kind})")
            },
            exe: PathBuf::from(exe),
            dir: Path::new(manifest)
                .parent()
                .context("manifest path without a directory")?
                .to_owned(),
        });
    }
    if binaries.is_empty() {
        bail!("cargo test --no-run listed no test binary");
    }
    Ok(binaries)
}

/// The package name in a cargo package id: `path+file:///…/tests#ecsmesh-tests@0.1.0`
/// or `path+file:///…/xtask#0.1.0` (name = last path segment).
fn package_name(id: &str) -> Option<&str> {
    let (path, frag) = id.rsplit_once('#')?;
    match frag.split_once('@') {
        Some((name, _)) => Some(name),
        None => path.rsplit('/').next(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn package_names_come_from_either_id_shape() {
        use super::package_name;
        assert_eq!(
            package_name("path+file:///w/tests#ecsmesh-tests@0.1.0"),
            Some("ecsmesh-tests")
        );
        assert_eq!(package_name("path+file:///w/xtask#0.1.0"), Some("xtask"));
    }
}
