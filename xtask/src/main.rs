//! `cargo xtask setup | build | test | demo`: the project's own automation. Everything the
//! build and the tests need is installed here, idempotently, from Debian and crates.io.
mod bench;
mod build;
mod demo;
mod deploy_check;
mod python;
mod setup;
mod testrun;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing: rustc-web + rust-web-src, bpftool, iproute2, bpf-linker.
    Setup,
    /// Build the eBPF object and the `ecsmesh` binary that embeds it.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Format and lint checks, then every test (privileged ones need root).
    Test,
    /// Two simulated container instances: identities, a retry, an authorization refusal, a
    /// 90/10 split and each proxy's counts and latency quantiles, explained.
    Demo,
    /// Node mode vs sidecar mode vs a Debian mTLS sidecar pair vs no mesh: latency, CPU,
    /// memory, throughput, tasks-per-host sweep; report in target/bench/.
    Bench {
        /// Short cells, one round, one rate, a small sweep (the CI smoke run, < 5 min).
        #[arg(long)]
        quick: bool,
        /// Also run node mode with the binary built from this commit (`node-base`), side
        /// by side, and check this build's node mode against it.
        #[arg(long, value_name = "REV")]
        baseline: Option<String>,
        #[command(flatten)]
        focus: bench::Focus,
    },
    /// Validate deploy/ offline: JSON/YAML, cfn-lint, task definitions against the ECS API
    /// model, IAM policy, systemd unit (installs the Python tools into target/pyenv).
    DeployCheck {
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => setup::install(),
        Cmd::Build { release } => build::all(release).map(|_| ()),
        Cmd::Test => test(),
        Cmd::Demo => demo::run(),
        Cmd::Bench {
            quick,
            baseline,
            focus,
        } => bench::run(quick, baseline, focus),
        Cmd::DeployCheck { dir } => deploy_check::run(dir),
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Run a command, failing with its full command line when it does not succeed.
pub fn run(cmd: &mut Command) -> Result<()> {
    let line = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {line}"))?;
    if !status.success() {
        bail!("{line} failed: {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

fn test() -> Result<()> {
    let started = std::time::Instant::now();
    let built = build::all(false)?;
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo()
        .args(["clippy", "--all-targets", "--", "-D", "warnings"])
        .env("ECSMESH_EBPF_OBJECT", &built.ebpf_object))?;
    deploy_check::run(None)?;
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "the eBPF and namespace tests need root (CI runs as root); run `sudo -E cargo xtask test`"
        );
    }
    raise_open_files();
    testrun::run_all(&[
        ("ECSMESH_BIN", &built.ecsmesh),
        ("ECSMESH_EBPF_OBJECT", &built.ebpf_object),
    ])?;
    // The benchmark's smoke run: it completes, its JSON is well formed and every mode
    // carried traffic without errors.
    bench::run(true, None, bench::Focus::default())?;
    bench::smoke()?;
    println!("xtask test: all checks passed in {:.0?}", started.elapsed());
    Ok(())
}

/// The limits tests hold thousands of connections open at once (client, both proxies,
/// server): as root, make sure the hard and soft `RLIMIT_NOFILE` the test binaries inherit
/// allow it, whatever the machine's default.
fn raise_open_files() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    const WANTED: u64 = 65_536;
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let wanted = (soft.max(WANTED), hard.max(WANTED));
    if wanted == (soft, hard) {
        return;
    }
    // Raising the hard limit needs CAP_SYS_RESOURCE, which a root in a container may lack;
    // then the soft limit goes as far as the hard one allows.
    let fallback = (soft < hard).then_some((hard, hard));
    for (new_soft, new_hard) in std::iter::once(wanted).chain(fallback) {
        if setrlimit(Resource::RLIMIT_NOFILE, new_soft, new_hard).is_ok() {
            println!(
                "xtask test: RLIMIT_NOFILE {soft}/{hard} -> {new_soft}/{new_hard} (soft/hard)"
            );
            return;
        }
    }
    println!("xtask test: RLIMIT_NOFILE stays {soft}/{hard} (soft/hard)");
}
