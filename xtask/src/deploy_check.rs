//! `cargo xtask deploy-check`: offline validation of the deploy artefacts (JSON and YAML
//! syntax, cfn-lint on the CloudFormation template, the task definitions against
//! botocore's ECS model, the IAM policy, the systemd unit, the Dockerfile's shape, the
//! user data's `ecsmesh bootstrap` flags, the daemon's docker.sock mount, the issuer
//! service) by `deploy/check.py`, run with the project's venv. Which role grants which
//! AWS call is a unit test of proxy-user (`aws::permissions`), next to the calls.
use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};

use crate::{python, workspace_root};

pub fn run(dir: Option<PathBuf>) -> Result<()> {
    let python = python::ensure_venv()?;
    let root = workspace_root();
    let dir = dir.unwrap_or_else(|| root.join("deploy"));
    let script = root.join("deploy/check.py");
    let status = Command::new(&python)
        .arg(&script)
        .arg(&dir)
        .status()
        .with_context(|| format!("starting {} {}", python.display(), script.display()))?;
    if !status.success() {
        bail!(
            "deploy-check: the artefacts in {} failed validation ({status}); the FAIL lines above name each check",
            dir.display()
        );
    }
    Ok(())
}
