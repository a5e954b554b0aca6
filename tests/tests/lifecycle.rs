//! Install, stop, crash and uninstall: what each leaves in the kernel, and instance isolation.
mod common;

use std::{process::Command, time::Duration};

use common::*;
use harness::{
    NetworkMode::Host,
    ProxyOptions, World, cgroup_prog_ids, loaded_prog_ids,
    metrics::counter,
    process::{self, spawn_logged},
    world::{client_args, run_client},
};

fn attempts(w: &World, inst: usize, task: usize, target: std::net::SocketAddr, n: usize) -> u64 {
    let args = vec![
        "attempts".into(),
        target.to_string(),
        "--count".into(),
        n.to_string(),
    ];
    let out = process::run(w.instances[inst].tasks[task].meshtool(0, &args));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("attempts json");
    v["connected"].as_u64().unwrap()
}

/// `ecsmesh uninstall --pin-dir`, which must succeed.
fn uninstall(pin_dir: &std::path::Path) {
    let out = Command::new(&tools().ecsmesh)
        .arg("uninstall")
        .arg("--pin-dir")
        .arg(pin_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Crash the instance's proxy: pins and links stay behind.
fn kill_9(instance: &mut harness::Instance) {
    let proxy = instance.proxy.take().expect("proxy running");
    proxy.proc.signal(nix::sys::signal::Signal::SIGKILL);
}

#[test]
fn two_instances_on_one_kernel_are_isolated_and_uninstall_one_leaves_the_other() {
    let mut w = World::new(tools(), 2);
    let ta = w.add_task(0, Host, 1);
    let tb = w.add_task(1, Host, 1);
    let (to_b, to_a) = (w.instances[1].addr(9000), w.instances[0].addr(9000));
    w.instances[1].echo_server(&[to_b]);
    w.instances[0].echo_server(&[to_a]);
    w.instances[0].start_proxy(&ProxyOptions::default());
    w.instances[1].start_proxy(&ProxyOptions::default());

    assert_redirected(
        &w.instances[0].tasks[ta].client(&[to_b], 3, 100),
        w.instances[0].outbound_v4(Host),
    );
    assert_redirected(
        &w.instances[1].tasks[tb].client(&[to_a], 2, 100),
        w.instances[1].outbound_v4(Host),
    );
    let (ma, mb) = (w.instances[0].metrics(), w.instances[1].metrics());
    let opened = |m, task: &str| {
        counter(
            m,
            "ecsmesh_tcp_connections_opened_total",
            &[("source_task", task)],
        )
    };
    let (ida, idb) = (
        w.instances[0].tasks[ta].id.clone(),
        w.instances[1].tasks[tb].id.clone(),
    );
    assert_eq!((opened(&ma, &ida), opened(&ma, &idb)), (3.0, 0.0));
    assert_eq!((opened(&mb, &ida), opened(&mb, &idb)), (0.0, 2.0));

    // Crash instance 0's proxy and uninstall it; instance 1 keeps working.
    let a = &mut w.instances[0];
    kill_9(a);
    uninstall(&a.pin_dir);
    assert!(!a.pin_dir.exists());
    assert!(
        w.instances[1]
            .pin_dir
            .join("link_ecsmesh_connect4")
            .exists()
    );
    assert_redirected(
        &w.instances[1].tasks[tb].client(&[to_a], 1, 100),
        w.instances[1].outbound_v4(Host),
    );
    assert_direct(&w.instances[0].tasks[ta].client(&[to_b], 1, 100));
}

#[test]
fn sigterm_detaches_and_unpins_so_tasks_connect_directly() {
    let mut w = World::new(tools(), 2);
    let task = w.add_task(0, Host, 1);
    let target = w.instances[1].addr(9000);
    w.instances[1].echo_server(&[target]);
    w.instances[0].start_proxy(&ProxyOptions::default());
    let a = &mut w.instances[0];
    let ours = cgroup_prog_ids(&a.cgroup_root);
    assert_eq!(
        ours.len(),
        3,
        "connect4, connect6, sockops attached to the instance cgroup"
    );
    assert_redirected(
        &a.tasks[task].client(&[target], 1, 100),
        a.outbound_v4(Host),
    );

    a.stop_proxy();
    assert!(!a.pin_dir.exists(), "pin dir removed on SIGTERM");
    assert!(cgroup_prog_ids(&a.cgroup_root).is_empty());
    let loaded = loaded_prog_ids();
    assert!(
        ours.iter().all(|id| !loaded.contains(id)),
        "programs unloaded"
    );
    // Today's behaviour after a clean stop: fail-open, tasks connect directly.
    assert_direct(&a.tasks[task].client(&[target], 1, 100));
}

#[test]
fn kill_9_fails_closed_until_uninstall_removes_everything() {
    let mut w = World::new(tools(), 2);
    let task = w.add_task(0, Host, 1);
    let target = w.instances[1].addr(9000);
    w.instances[1].echo_server(&[target]);
    w.instances[0].start_proxy(&ProxyOptions::default());
    let ours = cgroup_prog_ids(&w.instances[0].cgroup_root);
    let a = &mut w.instances[0];
    kill_9(a);

    // Pinned redirect to a dead listener: enrolled tasks cannot connect (fail-closed).
    assert!(a.pin_dir.join("link_ecsmesh_connect4").exists());
    assert_eq!(cgroup_prog_ids(&a.cgroup_root), ours);
    assert_eq!(attempts(&w, 0, task, target, 5), 0);

    let a = &w.instances[0];
    uninstall(&a.pin_dir);
    assert!(!a.pin_dir.exists());
    assert!(cgroup_prog_ids(&a.cgroup_root).is_empty());
    let loaded = loaded_prog_ids();
    assert!(
        ours.iter().all(|id| !loaded.contains(id)),
        "programs unloaded after uninstall"
    );
    assert_direct(&a.tasks[task].client(&[target], 1, 100));
    // Idempotent.
    uninstall(&a.pin_dir);
}

#[test]
fn bad_config_exits_with_a_one_line_error_and_attaches_nothing() {
    let mut w = World::new(tools(), 1);
    w.add_task(0, Host, 1);
    let good = w.instances[0].config_text(&ProxyOptions::default());
    let missing = w.cgroups.path().join("no-such-cgroup");
    let cases: Vec<(String, &str)> = vec![
        (
            good.replacen("outbound_port", "bogus_field = 1\noutbound_port", 1),
            "bogus_field",
        ),
        (
            good.replace("exclude_cidrs = []", "exclude_cidrs = [\"10.0.0.0/33\"]"),
            "exclude_cidrs[0]",
        ),
        (
            good.replacen(
                "cgroups = [",
                &format!("cgroups = [\"{}\", ", missing.display()),
                1,
            ),
            "tasks[0].cgroups[0]",
        ),
        (good.clone(), "outbound_port"), // with the port taken, below
    ];
    // Occupy the outbound port inside the instance for the last case.
    w.instances[0].echo_server(&["127.0.0.1:15001".parse().unwrap()]);
    let a = &w.instances[0];
    for (text, field) in cases {
        let (cmd, _) = a.proxy_command(&text, None);
        let log = w.workdir.join("bad.log");
        let mut p = spawn_logged(cmd, "ecsmesh", &log);
        let st = p
            .wait_timeout(Duration::from_secs(10))
            .expect("bad config must exit");
        let stderr = std::fs::read_to_string(&log).unwrap();
        assert!(!st.success(), "{field}: exit status should be non-zero");
        let last = stderr.lines().last().unwrap_or_default();
        assert!(
            last.starts_with("ecsmesh: error:") && last.contains(field),
            "{field}: {stderr}"
        );
        assert!(!a.pin_dir.exists(), "{field}: nothing pinned");
        assert!(
            cgroup_prog_ids(&a.cgroup_root).is_empty(),
            "{field}: nothing attached"
        );
    }
    // The proxy did not take over the port: the squatter still answers.
    let r = run_client(a.unenrolled(&client_args(&["127.0.0.1:15001".parse().unwrap()], 1, 10)));
    assert_all_ok(&r);
}
