//! Toolchain installation. The recipe is the one proven on our CI machines: Debian's
//! `rustc-web` (with `rust-web-src` for `-Z build-std=core`) compiles the eBPF crate, and
//! `bpf-linker` is built against the libLLVM that rustup's stable toolchain ships, so the
//! linker and the bitcode agree on the LLVM major version. Nothing is downloaded outside
//! Debian and crates.io.
use std::{path::Path, process::Command};

use anyhow::{Context, Result, bail};

use crate::run as exec;

pub const BPF_RUSTC: &str = "/usr/bin/rustc";
const RUST_SRC_CORE: &str = "/usr/lib/rustlib/src/rust/library/core";
pub const STUNNEL: &str = "/usr/bin/stunnel4";
pub const PROMTOOL: &str = "/usr/bin/promtool";
pub const PLOT_FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

pub fn on_path(tool: &str) -> bool {
    which(tool).is_some()
}

pub fn which(tool: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    let mut dirs: Vec<_> = std::env::split_paths(&path).collect();
    // `cargo install` puts bpf-linker here; it may not be on a fresh shell's PATH.
    if let Some(home) = std::env::var_os("CARGO_HOME")
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo").into_os_string()))
    {
        dirs.push(Path::new(&home).join("bin"));
    }
    dirs.into_iter().map(|d| d.join(tool)).find(|p| p.is_file())
}

pub fn missing_apt_packages() -> Vec<&'static str> {
    let mut need = Vec::new();
    if !Path::new(BPF_RUSTC).exists() {
        need.push("rustc-web");
    }
    if !Path::new(RUST_SRC_CORE).is_dir() {
        need.push("rust-web-src");
    }
    if !on_path("bpftool") && !Path::new("/usr/sbin/bpftool").exists() {
        need.push("bpftool");
    }
    if !on_path("ip") && !Path::new("/usr/sbin/ip").exists() && !Path::new("/sbin/ip").exists() {
        need.push("iproute2");
    }
    // `cargo xtask bench`: the outside reference (a pair of mTLS sidecars from Debian) and
    // the font the plot's text is drawn with.
    if !Path::new(STUNNEL).exists() {
        need.push("stunnel4");
    }
    if !Path::new(PLOT_FONT).exists() {
        need.push("fonts-dejavu-core");
    }
    // The proxy and the issuer verify AWS's HTTPS endpoints against the system's roots
    // (and refuse to start without any).
    if !Path::new("/etc/ssl/certs/ca-certificates.crt").exists() {
        need.push("ca-certificates");
    }
    // The metrics tests: `promtool check metrics` on the proxies' exposition.
    if !Path::new(PROMTOOL).exists() {
        need.push("prometheus");
    }
    need
}

pub fn toolchain_ready() -> bool {
    missing_apt_packages().is_empty() && which("bpf-linker").is_some()
}

pub fn install() -> Result<()> {
    let need = missing_apt_packages();
    if !need.is_empty() {
        println!("xtask setup: installing {}", need.join(" "));
        exec(Command::new("apt-get").args(["update", "-qq"]))?;
        exec(
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(&need)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    if which("bpf-linker").is_none() {
        install_bpf_linker()?;
    }
    println!(
        "xtask setup: eBPF toolchain ready (rustc {}, bpf-linker {})",
        BPF_RUSTC,
        which("bpf-linker").unwrap().display()
    );
    Ok(())
}

fn install_bpf_linker() -> Result<()> {
    let out = Command::new("rustc")
        .args(["+stable", "--print", "sysroot"])
        .output();
    let out = match out {
        Ok(o) if o.status.success() => o,
        _ => Command::new("rustc")
            .args(["--print", "sysroot"])
            .output()
            .context("rustc --print sysroot")?,
    };
    let sysroot = String::from_utf8(out.stdout)?.trim().to_owned();
    let lib = std::fs::read_dir(Path::new(&sysroot).join("lib"))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libLLVM.so."))
        })
        .with_context(|| format!("no libLLVM.so.* in {sysroot}/lib"))?;
    let name = lib.file_name().unwrap().to_string_lossy().into_owned();
    let major: String = name["libLLVM.so.".len()..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    if major.is_empty() {
        bail!("cannot read the LLVM major version from {name}");
    }
    let home = std::env::var("HOME").context("HOME")?;
    let prefix = Path::new(&home).join(".local/bpf-llvm");
    let libdir = prefix.join("lib");
    std::fs::create_dir_all(&libdir)?;
    for link in [libdir.join("libLLVM.so"), libdir.join(&name)] {
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&lib, &link)?;
    }
    println!(
        "xtask setup: building bpf-linker against LLVM {major} ({})",
        lib.display()
    );
    exec(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{major}"))
            .env("LLVM_PREFIX", &prefix),
    )
}
