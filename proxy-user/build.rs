//! Embeds the eBPF object built by `cargo xtask build`. The object needs a separate
//! toolchain (bpf-linker, rust-src), so a missing object is reported as the one step to
//! run, not as a linker trace.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=ECSMESH_EBPF_OBJECT");
    let object = std::env::var_os("ECSMESH_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap());
            manifest.join("../target/ebpf/bpfel-unknown-none/release/proxy-ebpf")
        });
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.is_file() {
        let have_linker = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("bpf-linker").is_file()));
        let hint = if have_linker {
            "run `cargo xtask build` (it builds the eBPF object, then this crate)"
        } else {
            "the eBPF toolchain is not installed: run `cargo xtask setup`, then `cargo xtask build`"
        };
        eprintln!(
            "error: eBPF object not found at {}: {hint}",
            object.display()
        );
        std::process::exit(1);
    }
    println!(
        "cargo:rustc-env=ECSMESH_EBPF_OBJECT={}",
        object.canonicalize().unwrap().display()
    );
}
