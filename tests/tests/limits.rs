//! Dead peers and limits: a frozen peer proxy, thousands of connections under a low
//! soft open-files limit, a flood of half-open TLS handshakes, the per-task cap.
mod common;

use std::time::{Duration, Instant};

use common::{mesh::*, *};
use harness::{
    ProxyOptions,
    metrics::counter,
    process::{self, Frozen},
    world::run_client,
};

/// One task connection to the meshed endpoint: (echo ok, how long it took).
fn one_flow(m: &Mesh) -> (bool, Duration) {
    let started = Instant::now();
    let reports = m.w.instances[0].tasks[0].client(&[m.ep], 1, 256);
    (reports.iter().all(|r| r.ok), started.elapsed())
}

fn opts(top_level: &str) -> ProxyOptions {
    ProxyOptions {
        top_level_toml: top_level.to_owned(),
        ..Default::default()
    }
}

#[test]
fn a_frozen_peer_fails_new_flows_within_the_keepalive_bound_and_recovers() {
    // Keepalive: PING every 1 s, dead after 1 s without the answer; a dial gives up after 2 s.
    let fast = "tunnel_keepalive_interval_secs = 1\ntunnel_keepalive_timeout_secs = 1\n\
                tunnel_connect_timeout_secs = 2\n";
    let m = mesh(opts(fast), opts(fast));
    let (ok, _) = one_flow(&m);
    assert!(ok, "a pooled tunnel is established");
    let pid = m.w.instances[1].proxy_pid().expect("peer proxy running");
    let frozen = Frozen::stop(pid);
    // The pooled connection looks fine to the kernel (the frozen process's sockets still
    // ACK); only the PINGs find out. Without them the flow would wait for the outbound
    // connect timeout (10 s).
    let (ok, took) = one_flow(&m);
    eprintln!("flow to the frozen peer failed after {took:?}");
    assert!(!ok, "the frozen peer cannot serve");
    assert!(
        took < Duration::from_secs(7),
        "the flow failed after {took:?}; bound: keepalive 2 s + dial timeout 2 s"
    );
    let ma = m.w.instances[0].metrics();
    assert!(
        counter(
            &ma,
            "ecsmesh_tunnel_connections_closed_total",
            &[("reason", "keepalive_timeout")]
        ) >= 1.0,
        "the dead connection was closed by keepalive:\n{}",
        m.w.instances[0].proxy_log()
    );
    drop(frozen);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (ok, _) = one_flow(&m);
        if ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "flows did not recover after SIGCONT:\n{}",
            m.w.instances[0].proxy_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

const FLOOD: usize = 5_000;

#[test]
fn five_thousand_connections_through_the_mesh_under_a_soft_limit_of_1024() {
    // Each proxied connection costs the source proxy one socket and the destination proxy
    // one; the client and the echo server one each.
    let needed = FLOOD as u64 + 1_000;
    let hard = process::nofile_hard();
    assert!(
        hard >= needed,
        "this test needs a hard RLIMIT_NOFILE of at least {needed} (ulimit -Hn is {hard}); \
         raise it for the test runner"
    );
    let o = ProxyOptions {
        nofile_soft: Some(1024),
        top_level_toml: format!("max_connections_per_task = {}\n", FLOOD * 2),
        ..Default::default()
    };
    let m = mesh(o.clone(), o);
    for inst in &m.w.instances {
        let limit = counter(&inst.metrics(), "ecsmesh_open_files_limit", &[]);
        assert!(
            limit >= needed as f64,
            "{}: soft limit {limit} not raised",
            inst.name
        );
    }
    let args: Vec<String> = ["flood", &m.ep.to_string(), "--count", &FLOOD.to_string()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let out = process::run(m.w.instances[0].tasks[0].meshtool(0, &args));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("flood json");
    eprintln!("flood: {report}");
    assert_eq!(report["connected"], FLOOD, "{report}");
    assert_eq!(
        report["echoed"],
        FLOOD,
        "{report}\n{}",
        m.w.instances[0].proxy_log()
    );
    let ma = m.w.instances[0].metrics();
    assert_eq!(counter(&ma, "ecsmesh_accept_errors_total", &[]), 0.0);
}

#[test]
fn half_open_handshakes_do_not_delay_a_good_client_and_the_cap_holds() {
    const CAP: usize = 4;
    let m = mesh(
        ProxyOptions::default(),
        opts(&format!("tunnel_handshake_cap = {CAP}\n")),
    );
    let tunnel = m.w.instances[1].tunnel_addr().to_string();
    let half_open = |kind: &str, n: usize| {
        let sni = sni_for(&m.w.identity(&m.fam_b));
        let args: Vec<String> = [
            "half-open",
            &tunnel,
            kind,
            &n.to_string(),
            "--sni",
            &sni,
            "--hold-ms",
            "20000",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut cmd = m.w.instances[0].unenrolled(&args);
        cmd.stderr(std::process::Stdio::inherit());
        process::spawn_ready(cmd, "half-open")
    };
    // Many more stalled peers than slots: silent ones and ones that stop mid-ClientHello.
    let silent = half_open("--silent", 300);
    let partial = half_open("--partial", 300);
    // The first flow of task A dials B: a fresh TLS handshake behind the flood.
    let (ok, took) = one_flow(&m);
    assert!(ok, "{}", m.w.instances[0].proxy_log());
    assert!(
        took < Duration::from_secs(2),
        "a good client waited {took:?} behind 600 stalled handshakes"
    );
    eprintln!("good flow behind 600 half-open handshakes: {took:?}");
    drop((silent, partial));

    // Peers that send a whole ClientHello and stall hold a slot each until the handshake
    // timeout: never more than the cap at once; the slots come back when they time out.
    let full = half_open("--full", CAP + 6);
    let in_progress = || {
        let mb = m.w.instances[1].metrics();
        counter(&mb, "ecsmesh_tunnel_handshakes_in_progress", &[])
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while in_progress() < CAP as f64 {
        assert!(
            Instant::now() < deadline,
            "slots never filled: {}",
            in_progress()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for _ in 0..10 {
        let held = in_progress();
        assert_eq!(
            held,
            CAP as f64,
            "{} stalled handshakes, cap {CAP}",
            CAP + 6
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let deadline = Instant::now() + Duration::from_secs(25);
    while in_progress() > 0.0 {
        assert!(
            Instant::now() < deadline,
            "stalled handshakes never released their slots: {}",
            in_progress()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Every staller is refused and counted: the slot holders when the handshake times
    // out; the others either got a slot in the last instant before their own deadline
    // (also `timeout`) or never got one (`handshake_cap`) — which of the two is a race
    // between timers of the same 10 s deadline, so only the sum is fixed.
    let mb = m.w.instances[1].metrics();
    let rejected = |reason| {
        counter(
            &mb,
            "ecsmesh_tunnel_rejected_total",
            &[("side", "server"), ("reason", reason)],
        )
    };
    let (timeout, capped) = (rejected("timeout"), rejected("handshake_cap"));
    assert!(
        timeout >= CAP as f64 && timeout + capped >= (CAP + 6) as f64,
        "timeout {timeout}, handshake_cap {capped}, stallers {}",
        CAP + 6
    );
    let (ok, took) = one_flow(&m);
    assert!(ok && took < Duration::from_secs(2), "{ok} {took:?}");
    drop(full);
}

#[test]
fn a_task_beyond_its_connection_cap_is_refused_and_counted() {
    let m = mesh(
        opts("max_connections_per_task = 20\n"),
        ProxyOptions::default(),
    );
    let args: Vec<String> = ["flood", &m.ep.to_string(), "--count", "30"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let out = process::run(m.w.instances[0].tasks[0].meshtool(0, &args));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("flood json");
    assert_eq!(report["connected"], 30, "{report}");
    assert_eq!(report["echoed"], 20, "{report}");
    let ma = m.w.instances[0].metrics();
    assert_eq!(
        counter(
            &ma,
            "ecsmesh_tcp_connections_failed_total",
            &[("reason", "task_connection_limit")]
        ),
        10.0
    );
    // Slots come back when connections close.
    let reports = run_client(
        m.w.instances[0].tasks[0].meshtool(0, &harness::world::client_args(&[m.ep], 20, 64)),
    );
    assert_all_ok(&reports);
}
