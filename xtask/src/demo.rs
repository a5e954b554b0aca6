//! A two-instance cluster on this machine: tasks on instance 0 (host and bridge mode) and
//! instance 1 talk to each other's servers through their node proxies.
use anyhow::{Result, bail};
use harness::{NetworkMode, ProxyOptions, Tools, World};

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
    hop_latency(&world, host, srv1)?;
    for inst in &world.instances {
        println!("\nwhat the node proxy of {} saw (GET /metrics):", inst.name);
        let (_, body) = inst.netns.http_get(inst.admin, "/metrics")?;
        for line in body.lines().filter(|l| l.starts_with("istio_tcp")) {
            println!("  {line}");
        }
    }
    println!("\ncleaning up namespaces, cgroups and eBPF pins");
    drop(world);
    Ok(())
}

fn pingpong(cmd: std::process::Command) -> Result<(u64, u64)> {
    let out = harness::process::run(cmd);
    if !out.status.success() {
        bail!("pingpong: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok((
        v["p50_us"].as_u64().unwrap_or(0),
        v["p99_us"].as_u64().unwrap_or(0),
    ))
}

/// 1,000 ping-pongs of 64 bytes, direct (unenrolled process) and through the node proxy
/// (enrolled task), interleaved over three rounds. A figure, not a benchmark: the
/// processes are not pinned to CPUs (see `cargo xtask bench` for that).
fn hop_latency(world: &World, task: usize, target: std::net::SocketAddr) -> Result<()> {
    let args: Vec<String> = [
        "pingpong",
        &target.to_string(),
        "--count",
        "1000",
        "--size",
        "64",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let inst = &world.instances[0];
    println!("\nplain TCP proxy hop, 1,000 x 64-byte ping-pong to {target} (p50/p99 in us):");
    let mut added = Vec::new();
    for round in 1..=3 {
        let direct = pingpong(inst.unenrolled(&args))?;
        let proxied = pingpong(inst.tasks[task].meshtool(0, &args))?;
        println!(
            "  round {round}: direct {}/{}  via node proxy {}/{}",
            direct.0, direct.1, proxied.0, proxied.1
        );
        added.push((
            proxied.0 as i64 - direct.0 as i64,
            proxied.1 as i64 - direct.1 as i64,
        ));
    }
    let mut p50: Vec<i64> = added.iter().map(|a| a.0).collect();
    let mut p99: Vec<i64> = added.iter().map(|a| a.1).collect();
    p50.sort();
    p99.sort();
    println!(
        "  added by the proxy hop (median of rounds): p50 {} us, p99 {} us",
        p50[1], p99[1]
    );
    Ok(())
}
