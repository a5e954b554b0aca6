//! Install, stop, crash and uninstall: what each leaves in the kernel, and instance isolation.
mod common;

use std::{
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use common::*;
use harness::{
    NetworkMode::Host,
    ProxyOptions, World, cgroup_prog_ids, loaded_prog_ids,
    metrics::counter,
    process::{self, spawn_logged},
    world::{ConnReport, client_args, run_client},
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

/// Background load: one connection at a time from instance 0's task `task` to `target`
/// (`pause` between them) until `stop` is set or 40 s pass; each report with the time
/// its client started.
fn task_load(
    w: &World,
    task: usize,
    target: std::net::SocketAddr,
    pause: Duration,
) -> (
    Arc<AtomicBool>,
    std::thread::JoinHandle<Vec<(Instant, ConnReport)>>,
) {
    let place = w.instances[0].tasks[task].placement(0);
    let meshtool = tools().meshtool;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let load = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(40);
        let mut seen = Vec::new();
        while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
            let mut c = Command::new(&meshtool);
            c.args(client_args(&[target], 1, 64));
            process::place(&mut c, &place);
            let at = Instant::now();
            seen.extend(run_client(c).into_iter().map(|r| (at, r)));
            std::thread::sleep(pause);
        }
        seen
    });
    (stop, load)
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
            "istio_tcp_connections_opened_total",
            &[("source_workload", task)],
        )
    };
    let (ida, idb) = (
        w.instances[0].tasks[ta].family.clone(),
        w.instances[1].tasks[tb].family.clone(),
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
fn sigterm_leaves_the_redirect_attached_and_the_next_proxy_takes_over() {
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
    assert!(
        a.pin_dir.join("link_ecsmesh_connect4").exists(),
        "pins kept on SIGTERM"
    );
    assert_eq!(cgroup_prog_ids(&a.cgroup_root), ours, "still attached");
    // Fail-closed until the next proxy: no task connection goes out directly.
    assert_eq!(attempts(&w, 0, task, target, 3), 0);

    let a = &mut w.instances[0];
    a.start_proxy(&ProxyOptions::default());
    assert!(a.proxy_log().contains("taking over"));
    let theirs = cgroup_prog_ids(&a.cgroup_root);
    assert_eq!(theirs.len(), 3, "exactly the new programs: {theirs:?}");
    assert!(
        ours.iter().all(|id| !theirs.contains(id)),
        "the old programs were detached"
    );
    let loaded = loaded_prog_ids();
    assert!(ours.iter().all(|id| !loaded.contains(id)), "and unloaded");
    assert_redirected(
        &a.tasks[task].client(&[target], 2, 100),
        a.outbound_v4(Host),
    );
}

/// Connections from a task while its node proxy is stopped, restarted, killed and
/// restarted: every one either goes through a proxy or fails; none goes out directly
/// (a direct connection would show the target, not the proxy, as its socket's peer).
#[test]
fn restarts_under_load_never_let_a_connection_out_directly() {
    let mut w = World::new(tools(), 2);
    let task = w.add_task(0, Host, 1);
    let target = w.instances[1].addr(9000);
    w.instances[1].echo_server(&[target]);
    w.instances[0].start_proxy(&ProxyOptions::default());
    let proxy = w.instances[0].outbound_v4(Host);
    let (stop, load) = task_load(&w, task, target, Duration::from_millis(20));
    let pause = || std::thread::sleep(Duration::from_millis(1500));
    pause();
    w.instances[0].stop_proxy();
    pause();
    w.instances[0].start_proxy(&ProxyOptions::default());
    pause();
    kill_9(&mut w.instances[0]);
    pause();
    w.instances[0].start_proxy(&ProxyOptions::default());
    pause();
    stop.store(true, Ordering::Relaxed);
    let reports: Vec<_> = load.join().unwrap().into_iter().map(|(_, r)| r).collect();
    let direct: Vec<_> = reports
        .iter()
        .filter(|r| r.ok && r.peer != Some(proxy))
        .collect();
    assert!(
        direct.is_empty(),
        "connections that bypassed the proxy: {direct:?}"
    );
    let (ok, failed) = (
        reports.iter().filter(|r| r.ok).count(),
        reports.iter().filter(|r| !r.ok).count(),
    );
    assert!(failed >= 1, "the load ran through the gaps ({ok} ok)");
    assert!(
        ok >= 20,
        "traffic flowed between and after the restarts: {ok} ok, {failed} failed"
    );
    assert!(
        reports.last().is_some_and(|r| r.ok),
        "traffic resumed: {:?}",
        reports.last()
    );
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

/// An ECS daemon-service upgrade stops the old task before it starts the new one. The
/// part the proxy owns — SIGTERM to the old one, the new one attached and serving — is
/// measured here: connections in that window fail (fail-closed), none goes out directly,
/// and the gap is printed (`--nocapture`) for deploy/README's upgrade section. What ECS
/// adds on a real instance (stop timeout, image pull, container start) comes on top.
#[test]
fn an_upgrade_by_stop_then_start_is_fail_closed_for_a_measured_gap() {
    let mut w = World::new(tools(), 2);
    let task = w.add_task(0, Host, 1);
    let target = w.instances[1].addr(9000);
    w.instances[1].echo_server(&[target]);
    w.instances[0].start_proxy(&ProxyOptions::default());
    let proxy = w.instances[0].outbound_v4(Host);
    let (stop, load) = task_load(&w, task, target, Duration::from_millis(10));
    std::thread::sleep(Duration::from_secs(1));
    let t0 = Instant::now();
    w.instances[0].stop_proxy();
    let stopped = t0.elapsed();
    w.instances[0].start_proxy(&ProxyOptions::default());
    let started = t0.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let seen = load.join().unwrap();
    let direct = seen
        .iter()
        .filter(|(_, r)| r.ok && r.peer != Some(proxy))
        .count();
    assert_eq!(direct, 0, "no connection bypassed the proxy");
    let last_ok_before = seen
        .iter()
        .filter(|(at, r)| *at < t0 && r.ok)
        .map(|(at, _)| *at)
        .max()
        .expect("traffic before the upgrade");
    let first_ok_after = seen
        .iter()
        .filter(|(at, r)| *at >= t0 && r.ok)
        .map(|(at, _)| *at)
        .min()
        .expect("traffic after the upgrade");
    let failed = seen.iter().filter(|(_, r)| !r.ok).count();
    let gap = first_ok_after - last_ok_before;
    eprintln!(
        "upgrade gap: {} ms between the last attempt that worked before and the first after \
         ({failed} refused); SIGTERM to exit {} ms, to the new proxy ready {} ms",
        gap.as_millis(),
        stopped.as_millis(),
        started.as_millis()
    );
    // Whether an attempt lands inside a window this short depends on scheduling, so the
    // refusals are reported, not required (restarts_under_load… requires them).
    assert!(gap < Duration::from_secs(20), "gap {gap:?}");
}
