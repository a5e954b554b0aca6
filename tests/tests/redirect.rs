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
        counter(&m, "ecsmesh_tcp_connections_opened_total", &[("source_task", &a.tasks[task].id)])
    };
    assert_eq!(opened(host), 2.0);
    assert_eq!(opened(bridge), 3.0);
    let sent = counter(&m, "ecsmesh_tcp_sent_bytes_total", &[("source_task", &a.tasks[host].id)]);
    assert_eq!(sent, 2.0 * 4096.0, "bytes from the task towards the server");
    let received =
        counter(&m, "ecsmesh_tcp_received_bytes_total", &[("source_task", &a.tasks[host].id)]);
    // The echo plus the server's greeting line ("10.0.0.2:9000\n", "[fd00::2]:9000\n").
    assert_eq!(received, 2.0 * 4096.0 + 14.0 + 15.0);
}

#[test]
fn two_hundred_concurrent_connections_reach_their_own_destinations() {
    let mut w = World::new(tools(), 2);
    let tasks: Vec<_> = [Host, Host, Bridge, Bridge].into_iter().map(|m| (w.add_task(0, m, 1), m)).collect();
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
            let targets: Vec<SocketAddr> =
                v4[i * 25..(i + 1) * 25].iter().chain(&v6[i * 25..(i + 1) * 25]).copied().collect();
            let cmd = a.tasks[*task].meshtool(0, &client_args(&targets, 1, 32 * 1024));
            std::thread::spawn(move || run_client(cmd))
        })
        .collect();
    let mut total = 0;
    for ((_, mode), h) in tasks.iter().zip(handles) {
        let reports = h.join().unwrap();
        total += reports.len();
        for r in &reports {
            let via = if r.target.is_ipv4() { a.outbound_v4(*mode) } else { a.outbound_v6(*mode) };
            assert_redirected(std::slice::from_ref(r), via);
        }
    }
    assert_eq!(total, 200);
    let m = a.metrics();
    assert_eq!(counter(&m, "ecsmesh_tcp_connections_opened_total", &[]), 200.0);
}
