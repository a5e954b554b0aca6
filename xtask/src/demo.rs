//! `cargo xtask demo`: builds, then runs the harness's demo scenario (`harness::demo`, the
//! same code `tests/tests/demo.rs` checks) and prints what it showed.
use std::time::Instant;

use anyhow::{Result, anyhow, bail};
use harness::Tools;

use crate::build;

pub fn run() -> Result<()> {
    let built = build::all(true)?;
    if !nix::unistd::geteuid().is_root() {
        bail!("the demo creates network namespaces, cgroups and eBPF programs: run it as root");
    }
    let tools = Tools {
        ecsmesh: built.ecsmesh,
        meshtool: built.meshtool,
    };
    let started = Instant::now();
    // The harness panics on anything unexpected; the world it built is removed while the
    // panic unwinds, so all that is left to do here is to say so.
    let report =
        std::panic::catch_unwind(|| harness::demo::run(tools, |step| println!("demo: {step}")))
            .map_err(|_| {
                anyhow!("the demo failed (the panic above says where); what it created was removed")
            })?;
    print!("{}", harness::demo::print(&report));
    println!(
        "(wall time after the build: {:.1} s)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
