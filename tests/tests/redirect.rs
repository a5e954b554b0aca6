//! The eBPF redirect on real kernels: enrolled tasks' connect() reaches the node proxy,
//! the proxy recovers the original destination, everything else goes direct.
mod common;

use std::net::SocketAddr;

use common::*;
use harness::{
    NetworkMode::{Bridge, Host},
    ProxyOptions, World,
    metrics::counter,
    world::{client_args, run_client},
};

#[test]
fn enrolled_tasks_go_through_the_proxy_in_host_and_bridge_mode() {
    let mut w = World::new(tools(), 2);
    let host = w.add_task(0, Host, 1);
    let bridge = w.add_task(0, Bridge, 2);
    let (t4, t6) = (w.instances[1].addr(9000), w.instances[1].addr6(9000));
    w.instances[1].echo_server(&[t4, t6]);
    w.instances[0].start_proxy(&ProxyOptions::default());
    let a = &w.instances[0];

    for (task, mode) in [(host, Host), (bridge, Bridge)] {
        let t = &a.tasks[task];
        assert_redirected(&t.client(&[t4], 1, 4096), a.outbound_v4(mode));
        assert_redirected(&t.client(&[t6], 1, 4096), a.outbound_v6(mode));
    }
    // The bridge task's second container is part of the same task.
    let second = run_client(a.tasks[bridge].meshtool(1, &client_args(&[t4], 1, 100)));
    assert_redirected(&second, a.outbound_v4(Bridge));

    // An unenrolled process in the same netns connects directly.
    assert_direct(&run_client(a.unenrolled(&client_args(&[t4, t6], 1, 100))));

    let m = a.metrics();
    let opened = |task: usize| {
        counter(
            &m,
            "istio_tcp_connections_opened_total",
            &[("source_workload", &a.tasks[task].family)],
        )
    };
    assert_eq!(opened(host), 2.0);
    assert_eq!(opened(bridge), 3.0);
    let sent = counter(
        &m,
        "istio_tcp_received_bytes_total",
        &[("source_workload", &a.tasks[host].family)],
    );
    assert_eq!(sent, 2.0 * 4096.0, "bytes from the task towards the server");
    let received = counter(
        &m,
        "istio_tcp_sent_bytes_total",
        &[("source_workload", &a.tasks[host].family)],
    );
    // The echo plus the server's greeting line ("10.0.0.2:9000\n", "[fd00::2]:9000\n").
    assert_eq!(received, 2.0 * 4096.0 + 14.0 + 15.0);
}

#[test]
fn two_hundred_concurrent_connections_reach_their_own_destinations() {
    let mut w = World::new(tools(), 2);
    let tasks: Vec<_> = [Host, Host, Bridge, Bridge]
        .into_iter()
        .map(|m| (w.add_task(0, m, 1), m))
        .collect();
    let b = &w.instances[1];
    let v4: Vec<SocketAddr> = (0..100).map(|p| b.addr(10_000 + p)).collect();
    let v6: Vec<SocketAddr> = (0..100).map(|p| b.addr6(10_000 + p)).collect();
    let all: Vec<SocketAddr> = v4.iter().chain(&v6).copied().collect();
    w.instances[1].echo_server(&all);
    w.instances[0].start_proxy(&ProxyOptions::default());
    let a = &w.instances[0];

    // Each task opens 50 concurrent connections (25 v4 + 25 v6), all tasks at once:
    // 200 connections, each to its own destination (100 ports per family).
    let handles: Vec<_> = tasks
        .iter()
        .enumerate()
        .map(|(i, (task, _))| {
            let targets: Vec<SocketAddr> = v4[i * 25..(i + 1) * 25]
                .iter()
                .chain(&v6[i * 25..(i + 1) * 25])
                .copied()
                .collect();
            let cmd = a.tasks[*task].meshtool(0, &client_args(&targets, 1, 32 * 1024));
            std::thread::spawn(move || run_client(cmd))
        })
        .collect();
    let mut total = 0;
    for ((_, mode), h) in tasks.iter().zip(handles) {
        let reports = h.join().unwrap();
        total += reports.len();
        for r in &reports {
            let via = if r.target.is_ipv4() {
                a.outbound_v4(*mode)
            } else {
                a.outbound_v6(*mode)
            };
            assert_redirected(std::slice::from_ref(r), via);
        }
    }
    assert_eq!(total, 200);
    let m = a.metrics();
    assert_eq!(
        counter(&m, "istio_tcp_connections_opened_total", &[]),
        200.0
    );
}

#[test]
fn excluded_destinations_and_udp_are_not_redirected() {
    let mut w = World::new(tools(), 2);
    let task = w.add_task(0, Host, 1);
    // Link-local service addresses inside instance 0, like the ECS agent's and IMDS.
    w.instances[0]
        .netns
        .ip(&["addr", "add", "169.254.169.254/32", "dev", "lo"]);
    w.instances[0]
        .netns
        .ip(&["addr", "add", "169.254.170.2/32", "dev", "lo"]);
    w.instances[1]
        .netns
        .ip(&["addr", "add", "10.0.0.12/24", "dev", "eth0"]);
    let p = |s: &str| s.parse::<SocketAddr>().unwrap();
    let local = [
        p("127.0.0.1:9100"),
        p("[::1]:9100"),
        p("169.254.169.254:80"),
        p("169.254.170.2:80"),
    ];
    w.instances[0].echo_server(&local);
    let remote = [
        p("10.0.0.2:9000"),
        p("[fd00::2]:9000"),
        p("10.0.0.12:9000"),
        p("10.0.0.12:53"),
    ];
    w.instances[1].echo_server(&remote);
    let opts = ProxyOptions {
        exclude_cidrs: vec!["10.0.0.2/32".into(), "fd00::2/128".into()],
        dns_resolvers: vec!["10.0.0.12".parse().unwrap()],
        ..Default::default()
    };
    w.instances[0].start_proxy(&opts);
    let a = &w.instances[0];
    let t = &a.tasks[task];

    // Loopback, link-local, configured CIDRs (both families), and a configured resolver's
    // port 53 (port 53 elsewhere is redirected: see zero_trust.rs).
    let direct = [
        local[0],
        local[1],
        local[2],
        local[3],
        p("[::ffff:169.254.169.254]:80"), // v4-mapped: unwrapped before the exclusion check
        p("[::ffff:127.0.0.1]:9100"),
        remote[0],
        remote[1],
        p("[::ffff:10.0.0.2]:9000"),
        remote[3],
    ];
    assert_direct(&t.client(&direct, 1, 512));

    // Control: the same task's other destinations are redirected, including v4-mapped
    // ones, which the proxy must look up under their IPv4 key.
    assert_redirected(&t.client(&[remote[2]], 1, 512), a.outbound_v4(Host));
    let mapped = t.client(&[p("[::ffff:10.0.0.12]:9000")], 1, 512);
    assert_all_ok(&mapped);
    assert_eq!(
        mapped[0].peer,
        Some(p("[::ffff:127.0.0.1]:15001")),
        "{mapped:?}"
    );
    assert_eq!(mapped[0].served_by.as_deref(), Some("10.0.0.12:9000"));

    // UDP connect() is never rewritten.
    let out = harness::process::run(t.meshtool(0, &["udp".into(), "10.0.0.12:9000".into()]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["peer"], "10.0.0.12:9000");
    let m = a.metrics();
    assert_eq!(counter(&m, "istio_tcp_connections_opened_total", &[]), 2.0);
}

/// A proxy in a task's cgroup would be exempt together with that task (the kernel exempts
/// the proxy by cgroup, since a socket mark can be forged): refused at start.
#[test]
fn a_proxy_inside_an_enrolled_cgroup_refuses_to_start() {
    let mut w = World::new(tools(), 2);
    let task = w.add_task(0, Host, 2);
    let cgroup = w.instances[0].tasks[task].cgroups[1].clone();
    let a = &w.instances[0];
    let text = a.config_text(&ProxyOptions::default());
    let (cmd, _) = a.proxy_command(&text, Some(&cgroup));
    let log = w.workdir.join("inside.log");
    let mut p = harness::process::spawn_logged(cmd, "ecsmesh", &log);
    let st = p
        .wait_timeout(std::time::Duration::from_secs(10))
        .expect("the proxy must exit");
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(!st.success(), "{stderr}");
    assert!(stderr.contains("is the proxy's own cgroup"), "{stderr}");
    assert!(
        harness::cgroup_prog_ids(&a.cgroup_root).is_empty(),
        "nothing attached"
    );
    assert!(!a.pin_dir.exists(), "nothing pinned");
}
