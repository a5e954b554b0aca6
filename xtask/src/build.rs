//! Builds the eBPF object with Debian's rustc (which has the library sources that
//! `-Z build-std=core` needs) and then the userspace binary that embeds it. aya-build's
//! build-script route is not used: it runs `rustup run nightly`, which these machines lack.
use std::{path::PathBuf, process::Command};

use anyhow::Result;

use crate::{cargo, run, setup, workspace_root};

pub struct Built {
    pub ebpf_object: PathBuf,
    pub ecsmesh: PathBuf,
    pub meshtool: PathBuf,
}

pub fn ebpf() -> Result<PathBuf> {
    if !setup::toolchain_ready() {
        setup::install()?;
    }
    let root = workspace_root();
    let target_dir = root.join("target/ebpf");
    let linker_dir = setup::which("bpf-linker")
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let path = std::env::join_paths(std::iter::once(linker_dir).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))?;
    run(cargo()
        .args([
            "build",
            "-p",
            "proxy-ebpf",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTC", setup::BPF_RUSTC)
        .env("RUSTC_BOOTSTRAP", "1")
        .env("PATH", path)
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTFLAGS"))?;
    Ok(target_dir.join("bpfel-unknown-none/release/proxy-ebpf"))
}

pub fn all(release: bool) -> Result<Built> {
    let ebpf_object = ebpf()?;
    let mut cmd: Command = cargo();
    cmd.args(["build", "-p", "proxy-user", "-p", "ecsmesh-tests", "--bins"]);
    if release {
        cmd.arg("--release");
    }
    run(cmd.env("ECSMESH_EBPF_OBJECT", &ebpf_object))?;
    let profile = if release { "release" } else { "debug" };
    let bin = workspace_root().join("target").join(profile);
    Ok(Built {
        ebpf_object,
        ecsmesh: bin.join("ecsmesh"),
        meshtool: bin.join("meshtool"),
    })
}
