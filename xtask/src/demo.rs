//! A two-instance cluster on this machine: tasks on instance 0 (host and bridge mode) and
//! instance 1 talk to each other's servers through their node proxies.
use anyhow::{Result, bail};
use harness::{NetworkMode, ProxyOptions, Tools, World};

use crate::build;

pub fn run() -> Result<()> {
    let built = build::all(false)?;
    if !nix::unistd::geteuid().is_root() {
        bail!("the demo creates network namespaces, cgroups and eBPF programs: run it as root");
    }
    let tools = Tools {
        ecsmesh: built.ecsmesh,
        meshtool: built.meshtool,
    };
    let mut world = World::new(tools, 2);
    let host = world.add_task(0, NetworkMode::Host, 1);
    let bridge = world.add_task(0, NetworkMode::Bridge, 1);
    let back = world.add_task(1, NetworkMode::Host, 1);
    let (srv1, srv0) = (world.instances[1].addr(8080), world.instances[0].addr(8080));
    let srv1_v6 = world.instances[1].addr6(8080);
    world.instances[1].echo_server(&[srv1, srv1_v6]);
    world.instances[0].echo_server(&[srv0]);
    for i in 0..2 {
        world.instances[i].start_proxy(&ProxyOptions::default());
        let inst = &world.instances[i];
        println!(
            "instance {} ({}, netns {}): node proxy ready, {} task(s) enrolled",
            i,
            inst.ipv4,
            inst.netns.name,
            inst.tasks.len()
        );
    }
    println!();
    let flows = [
        (0, host, srv1),
        (0, host, srv1_v6),
        (0, bridge, srv1),
        (1, back, srv0),
    ];
    for (inst, task, target) in flows {
        let t = &world.instances[inst].tasks[task];
        for r in t.client(&[target], 3, 4096) {
            let verdict = if r.ok {
                "4096 bytes echoed intact"
            } else {
                "FAILED"
            };
            println!(
                "task {} ({:?} mode) -> {}: socket peer {} (node proxy), answered by {}, {}",
                t.id,
                t.mode,
                r.target,
                r.peer.map(|p| p.to_string()).unwrap_or_default(),
                r.served_by.unwrap_or_default(),
                r.error.unwrap_or_else(|| verdict.into())
            );
        }
    }
    for inst in &world.instances {
        println!("\nwhat the node proxy of {} saw (GET /metrics):", inst.name);
        let (_, body) = inst.netns.http_get(inst.admin, "/metrics")?;
        for line in body.lines().filter(|l| l.starts_with("ecsmesh_tcp")) {
            println!("  {line}");
        }
    }
    println!("\ncleaning up namespaces, cgroups and eBPF pins");
    drop(world);
    Ok(())
}
