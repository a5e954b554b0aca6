//! The redirect as an attacker inside a task sees it: what a process with the capabilities
//! Docker gives every container can do to get around the node proxy, and what it reaches
//! through it.
mod common;

use std::{net::SocketAddr, process::Command};

use common::{mesh::*, *};
use harness::{
    NetworkMode::{Bridge, Host},
    ProxyOptions, World,
    metrics::counter,
    process,
    world::{client_args, run_client},
};

/// The proxy's socket mark, as the README documents it.
const PROXY_MARK: &str = "0x45434d53";

fn kernel(w: &World, verdict: &str) -> f64 {
    counter(
        &w.instances[0].metrics(),
        "ecsmesh_kernel_connects_total",
        &[("verdict", verdict)],
    )
}

/// `capsh --drop=cap_net_admin -- -c "<script>"` in container 0 of task `task`.
fn without_net_admin(w: &World, task: usize, script: &str) -> Command {
    let mut cmd = Command::new("capsh");
    cmd.args(["--drop=cap_net_admin", "--", "-c", script]);
    process::place(&mut cmd, &w.instances[0].tasks[task].placement(0));
    cmd
}

#[test]
fn a_task_that_sets_the_proxy_mark_is_still_redirected() {
    let mut w = World::new(tools(), 2);
    let t = w.add_task(0, Host, 1);
    let target = w.instances[1].addr(9000);
    w.instances[1].echo_server(&[target]);
    w.instances[0].start_proxy(&ProxyOptions::default());

    // Docker's default set: CAP_NET_RAW kept (enough for SO_MARK since Linux 5.17),
    // CAP_NET_ADMIN gone.
    let caps = process::run(without_net_admin(
        &w,
        t,
        "capsh --has-p=cap_net_raw && ! capsh --has-p=cap_net_admin",
    ));
    assert!(caps.status.success(), "{caps:?}");

    let meshtool = tools().meshtool.display().to_string();
    let script = format!(
        "exec {meshtool} {} --mark {PROXY_MARK}",
        client_args(&[target], 3, 512).join(" ")
    );
    let reports = run_client(without_net_admin(&w, t, &script));
    assert_redirected(&reports, w.instances[0].outbound_v4(Host));
}

#[test]
fn a_process_in_a_child_cgroup_of_a_task_is_redirected() {
    let mut w = World::new(tools(), 2);
    let t = w.add_task(0, Bridge, 1);
    let target = w.instances[1].addr(9000);
    w.instances[1].echo_server(&[target]);
    w.instances[0].start_proxy(&ProxyOptions::default());
    let task = &w.instances[0].tasks[t];
    let mut nested = task.placement(0);
    nested.cgroup = nested.cgroup.join("nested/deeper");
    std::fs::create_dir_all(&nested.cgroup).unwrap();
    let mut cmd = Command::new(tools().meshtool);
    cmd.args(client_args(&[target], 2, 512));
    process::place(&mut cmd, &nested);
    assert_redirected(&run_client(cmd), w.instances[0].outbound_v4(Bridge));
}

/// `attempts`: how many of `count` connects to `target` succeeded, from `task`.
fn connects(w: &World, task: usize, target: SocketAddr) -> u64 {
    let args: Vec<String> = ["attempts", &target.to_string(), "--count", "1"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let out = process::run(w.instances[0].tasks[task].meshtool(0, &args));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("attempts json");
    v["connected"].as_u64().unwrap()
}

#[test]
fn a_bridge_task_cannot_reach_the_hosts_loopback_or_tunnel_out_over_port_53() {
    let mut w = World::new(tools(), 2);
    let t = w.add_task(0, Bridge, 1);
    let (dns4, dns6) = (w.instances[1].addr(53), w.instances[1].addr6(53));
    w.instances[1].echo_server(&[dns4, dns6]);
    // Instance 1's IPv6 address stands in for the VPC resolver.
    let resolver = w.instances[1].ipv6;
    w.instances[0].start_proxy(&ProxyOptions {
        dns_resolvers: vec![resolver.into()],
        ..Default::default()
    });
    // The admin port listens on the instance's loopback; 0.0.0.0 / :: would reach it if
    // the proxy dialled them from the host netns.
    for unspecified in ["0.0.0.0:15000", "[::]:15000"] {
        assert_eq!(
            connects(&w, t, unspecified.parse().unwrap()),
            0,
            "{unspecified} refused"
        );
    }
    assert_eq!(kernel(&w, "unspecified_denied"), 2.0);
    // Port 53 of an address that is not a resolver is just another port: meshed.
    let task = &w.instances[0].tasks[t];
    assert_redirected(
        &task.client(&[dns4], 2, 256),
        w.instances[0].outbound_v4(Bridge),
    );
    // The configured resolver is reached directly.
    assert_direct(&task.client(&[dns6], 1, 256));
}

#[test]
fn ipv6_without_an_ipv6_listener_is_refused_in_strict_mode_and_counted_in_permissive() {
    for strict in [true, false] {
        let mut w = World::new(tools(), 2);
        w.enable_mesh(TRUST_DOMAIN);
        let t = w.add_task(0, Bridge, 1);
        let target = w.instances[1].addr6(9000);
        w.instances[1].echo_server(&[target]);
        w.instances[0].start_proxy(&ProxyOptions {
            no_bridge_ipv6: true,
            strict,
            ..Default::default()
        });
        if strict {
            assert_eq!(connects(&w, t, target), 0, "strict: refused");
            assert_eq!(kernel(&w, "no_listener_denied"), 1.0);
        } else {
            assert_direct(&w.instances[0].tasks[t].client(&[target], 1, 256));
            assert_eq!(kernel(&w, "no_listener_passed"), 1.0);
        }
    }
}

#[test]
fn a_host_mode_task_cannot_make_the_proxy_reload() {
    let m = mesh(ProxyOptions::default(), ProxyOptions::default());
    let a = &m.w.instances[0];
    let curl = |url: &str, socket: Option<&std::path::Path>| -> String {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST"]);
        if let Some(s) = socket {
            cmd.arg("--unix-socket").arg(s);
        }
        cmd.arg(url);
        let at = match socket {
            // The operator: root on the host, outside every task.
            Some(_) => a.tasks[0].side_placement("operator"),
            None => a.tasks[0].placement(0),
        };
        process::place(&mut cmd, &at);
        String::from_utf8(process::run(cmd).stdout).unwrap()
    };
    let reloads = || a.proxy_log().matches("issuer reloaded").count();
    assert_eq!(curl("http://127.0.0.1:15000/reload", None), "403");
    assert_eq!(reloads(), 0, "the task's request changed nothing");
    // The same route on the operator's socket works.
    let socket = a.admin_socket();
    assert_eq!(curl("http://admin/reload", Some(&socket)), "200");
    assert_eq!(reloads(), 1);

    // The log level likewise: a task gets 403, the operator changes it at runtime (a bad
    // filter is refused with 400 and changes nothing).
    let changes = || a.proxy_log().matches("log filter changed").count();
    assert_eq!(
        curl("http://127.0.0.1:15000/log_level?filter=trace", None),
        "403"
    );
    assert_eq!(changes(), 0);
    assert!(!a.proxy_log().contains("DEBUG"), "info by default");
    assert_eq!(
        curl(
            "http://admin/log_level?filter=ecsmesh%3D%3D%3D",
            Some(&socket)
        ),
        "400"
    );
    assert_eq!(
        curl("http://admin/log_level?filter=debug", Some(&socket)),
        "200"
    );
    assert_eq!(changes(), 1);
    // Debug lines now appear: a task connection through the proxy logs its close at
    // debug.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !a.proxy_log().contains("DEBUG") {
        a.tasks[0].client(&[m.w.instances[1].addr(9000)], 1, 64);
        assert!(
            std::time::Instant::now() < deadline,
            "no debug line after the change"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
