//! The tunnel under operations: pooling, hostile input on the tunnel port, certificate
//! refresh and trust-anchor rotation under load.
mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use common::{mesh::*, *};
use harness::{NetworkMode::Host, ProxyOptions, metrics::counter, process, world::run_client};

fn attempts_held(m: &Mesh, count: usize, hold_ms: u64) -> u64 {
    let args: Vec<String> = [
        "attempts",
        &m.ep.to_string(),
        "--count",
        &count.to_string(),
        "--hold-ms",
        &hold_ms.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = process::run(m.w.instances[0].tasks[0].meshtool(0, &args));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("attempts json");
    v["connected"].as_u64().unwrap()
}

fn client_handshakes(m: &Mesh) -> f64 {
    let ma = m.w.instances[0].metrics();
    let (id_a, id_b) = (m.w.identity(&m.fam_a), m.w.identity(&m.fam_b));
    counter(
        &ma,
        "ecsmesh_tls_handshakes_total",
        &[
            ("role", "client"),
            ("source_identity", &id_a),
            ("destination_identity", &id_b),
        ],
    )
}

#[test]
fn streams_share_pooled_connections_up_to_the_cap() {
    let m = mesh(ProxyOptions::default(), ProxyOptions::default());
    assert_eq!(attempts_held(&m, 50, 1500), 50);
    assert_eq!(
        client_handshakes(&m),
        1.0,
        "50 concurrent connections, one TLS handshake"
    );
    assert_eq!(attempts_held(&m, 150, 3000), 150);
    assert_eq!(
        client_handshakes(&m),
        2.0,
        "150 concurrent connections, cap 100: two connections"
    );
    let mb = m.w.instances[1].metrics();
    let streams = counter(&mb, "ecsmesh_tunnel_inbound_streams_total", &[]);
    assert_eq!(
        streams, 200.0,
        "every task connection became its own stream"
    );
}

#[test]
fn hostile_input_on_the_tunnel_port_leaves_the_proxy_serving() {
    let m = mesh(ProxyOptions::default(), ProxyOptions::default());
    let b = &m.w.instances[1];
    let port = std::net::SocketAddr::new(b.ipv4.into(), 15008).to_string();
    let run = |args: &[&str]| -> serde_json::Value {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let out = process::run(m.w.instances[0].unenrolled(&args));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    // Plaintext instead of TLS, and a real ClientHello followed by garbage.
    let plain = run(&[
        "raw",
        "--connect",
        &port,
        "--text",
        "GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    ]);
    assert_eq!(plain["closed_by_peer"], true, "{plain}");
    let garbage = run(&["raw", "--connect", &port, "--hello-then-garbage"]);
    assert_eq!(garbage["closed_by_peer"], true, "{garbage}");
    let mb = b.metrics();
    assert!(
        counter(
            &mb,
            "ecsmesh_tunnel_rejected_total",
            &[("reason", "tls_handshake")]
        ) >= 2.0
    );

    // A verified client that floods CONNECT streams or sends oversized headers.
    let good = valid_client_cert(&m);
    let (c, k) = (good.0.display().to_string(), good.1.display().to_string());
    let sni = sni_for(&m.w.identity(&m.fam_b));
    let target = m.ep.to_string();
    let base = [
        "tunnel",
        "--connect",
        &port,
        "--sni",
        &sni,
        "--cert",
        &c,
        "--key",
        &k,
        "--target",
        &target,
    ];
    let flood = run(&[&base[..], &["--streams", "1000"]].concat());
    let ok = flood["statuses"]
        .as_array()
        .map_or(0, |s| s.iter().filter(|v| **v == 200).count());
    assert!(
        ok <= 100,
        "at most the stream cap is served concurrently: {ok}"
    );
    let big = run(&[&base[..], &["--header-bytes", "65536"]].concat());
    assert_ne!(
        big["statuses"][0], 200,
        "oversized header block refused: {big}"
    );

    // Still live, and real traffic still flows.
    assert_eq!(b.netns.http_get(b.admin, "/live").unwrap().0, 200);
    assert_redirected(
        &m.w.instances[0].tasks[0].client(&[m.ep], 5, 2000),
        m.w.instances[0].outbound_v4(Host),
    );
}

/// Task connections at a steady pace from instance 0 to the meshed endpoint until `stop`;
/// returns (attempted, failed).
fn background_load(m: &Mesh, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(usize, usize)> {
    let place = m.w.instances[0].tasks[0].placement(0);
    let args = harness::world::client_args(&[m.ep], 4, 4096);
    let meshtool = tools().meshtool;
    let (total, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(90);
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            let mut c = std::process::Command::new(&meshtool);
            c.args(&args);
            process::place(&mut c, &place);
            let reports = run_client(c);
            total.fetch_add(reports.len(), Ordering::Relaxed);
            let bad: Vec<_> = reports.iter().filter(|r| !r.ok).collect();
            if !bad.is_empty() {
                eprintln!("load failures: {bad:?}");
            }
            failed.fetch_add(bad.len(), Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(100));
        }
        (
            total.load(Ordering::Relaxed),
            failed.load(Ordering::Relaxed),
        )
    })
}

#[test]
fn certificates_refresh_under_load_without_failures() {
    let short = ProxyOptions {
        svid_lifetime_secs: Some(4),
        ..Default::default()
    };
    let m = mesh(short.clone(), short);
    // Long-lived connections: one ping per 500 ms for 34 s, across many refreshes.
    let long_args: Vec<String> = [
        "pingpong",
        &m.ep.to_string(),
        "--count",
        "68",
        "--size",
        "64",
        "--interval-ms",
        "500",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let long = m.w.instances[0].tasks[0].meshtool(0, &long_args);
    let long = std::thread::spawn(move || process::run(long));
    let stop = Arc::new(AtomicBool::new(false));
    let load = background_load(&m, stop.clone());
    std::thread::sleep(Duration::from_secs(32));
    stop.store(true, Ordering::Relaxed);
    let (total, failed) = load.join().unwrap();
    let long = long.join().unwrap();
    let pp: serde_json::Value = serde_json::from_slice(&long.stdout).unwrap_or_default();
    assert!(
        long.status.success() && pp["count"] == 68,
        "long-lived connection survived: {pp} {}",
        String::from_utf8_lossy(&long.stderr)
    );
    assert!(total >= 100, "load ran: {total}");
    assert_eq!(failed, 0, "0 failed connections out of {total}");
    // 4 s certificates refreshed every ~2 s: new handshakes kept happening with fresh
    // certificates (an expired one would have been refused and counted as a failure).
    let handshakes = client_handshakes(&m);
    assert!(
        handshakes >= 8.0,
        "new handshakes after refreshes: {handshakes}"
    );
    assert!(
        m.w.instances[0]
            .proxy_log()
            .matches("certificate refreshed")
            .count()
            >= 8
    );
}

#[test]
fn trust_anchor_rotation_under_load_then_retiring_the_old_anchor() {
    let m = mesh(ProxyOptions::default(), ProxyOptions::default());
    let ca = m.w.ca_dir().display().to_string();
    // A certificate chained only to the first anchor.
    let old = issue(
        &m.w,
        "old-chain",
        &["--ca", &ca, "--uri", &m.w.identity(&m.fam_a)],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let load = background_load(&m, stop.clone());
    std::thread::sleep(Duration::from_secs(3));
    m.w.ca(&["rotate", "--ca", &ca]);
    wait_for_log(&m, 0, "reloaded");
    wait_for_log(&m, 1, "reloaded");
    std::thread::sleep(Duration::from_secs(4));
    // Overlap: both chains verify.
    let new = issue(
        &m.w,
        "new-chain",
        &["--ca", &ca, "--uri", &m.w.identity(&m.fam_a)],
    );
    assert_eq!(probe(&m, Some(&old), m.ep)["echo_ok"], true);
    assert_eq!(probe(&m, Some(&new), m.ep)["echo_ok"], true);
    stop.store(true, Ordering::Relaxed);
    let (total, failed) = load.join().unwrap();
    assert!(total >= 40, "load ran: {total}");
    assert_eq!(
        failed, 0,
        "0 failed connections across the rotation, of {total}"
    );

    m.w.ca(&["retire", "--ca", &ca]);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let p = probe(&m, Some(&old), m.ep);
        if p["echo_ok"] != true {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "old chain still accepted after retire"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let mb = m.w.instances[1].metrics();
    assert!(
        counter(
            &mb,
            "ecsmesh_tunnel_rejected_total",
            &[("reason", "unknown_ca")]
        ) >= 1.0
    );
    assert_eq!(
        probe(&m, Some(&new), m.ep)["echo_ok"],
        true,
        "new chain keeps working"
    );
    assert_redirected(
        &m.w.instances[0].tasks[0].client(&[m.ep], 3, 1000),
        m.w.instances[0].outbound_v4(Host),
    );
}

fn wait_for_log(m: &Mesh, inst: usize, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !m.w.instances[inst].proxy_log().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "instance {inst} never logged {needle:?}:\n{}",
            m.w.instances[inst].proxy_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
