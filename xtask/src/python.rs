//! The project's Python tools (cfn-lint, botocore, PyYAML, moto) in a venv of its own at
//! `target/pyenv`, pinned by `xtask/requirements.txt`. Idempotent: pip runs only when the
//! venv is new or the requirements changed (a stamp in the venv holds the sha256 of the
//! requirements file it was installed from). Nothing is installed outside the workspace
//! except Debian's `python3-venv` when the system python lacks the `venv` module.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};

use crate::{run, workspace_root};

const STAMP: &str = "ecsmesh-requirements.sha256";

/// Create (or refresh) the venv and return its python.
pub fn ensure_venv() -> Result<PathBuf> {
    let root = workspace_root();
    let venv = root.join("target/pyenv");
    let python = venv.join("bin/python");
    let requirements = root.join("xtask/requirements.txt");
    let wanted = sha256_hex(&requirements)?;
    let stamp = venv.join(STAMP);
    if works(&python) && std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == wanted) {
        return Ok(python);
    }

    let started = Instant::now();
    // A venv whose base interpreter moved or whose creation was interrupted is rebuilt.
    if !works(&python) {
        create(&venv)?;
    }
    let _ = std::fs::remove_file(&stamp);
    println!(
        "xtask: installing Python tools from {} into {}",
        requirements.display(),
        venv.display()
    );
    run(Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-input",
            "--requirement",
        ])
        .arg(&requirements))?;
    std::fs::write(&stamp, format!("{wanted}\n"))
        .with_context(|| format!("writing {}", stamp.display()))?;
    println!("xtask: Python tools ready in {:.1?}", started.elapsed());
    Ok(python)
}

/// The venv's python starts and has pip.
fn works(python: &Path) -> bool {
    python.is_file()
        && Command::new(python)
            .args(["-m", "pip", "--version"])
            .output()
            .is_ok_and(|o| o.status.success())
}

fn create(venv: &Path) -> Result<()> {
    let has_venv_module = |python: &str| {
        Command::new(python)
            .args(["-c", "import venv, ensurepip"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !has_venv_module("python3") {
        if !nix::unistd::geteuid().is_root() {
            bail!(
                "python3 has no `venv`/`ensurepip` module; install Debian's python3-venv \
                 (`sudo apt-get install python3-venv`) or run as root"
            );
        }
        println!("xtask: installing python3-venv");
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get")
            .args([
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                "python3-venv",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
        if !has_venv_module("python3") {
            bail!("python3 still has no `venv` module after installing python3-venv");
        }
    }
    run(Command::new("python3")
        .args(["-m", "venv", "--clear"])
        .arg(venv))
}

/// sha256 of a file as lowercase hex, via coreutils (xtask has no hashing crate).
fn sha256_hex(path: &Path) -> Result<String> {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .context("starting sha256sum")?;
    if !out.status.success() {
        bail!(
            "sha256sum {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8(out.stdout)?;
    match text.split_whitespace().next() {
        Some(hex) if hex.len() == 64 => Ok(hex.to_owned()),
        _ => bail!("unexpected sha256sum output: {text:?}"),
    }
}
