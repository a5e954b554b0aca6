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
use harness::{
    NetworkMode::Host, ProxyOptions, World, metrics::counter, process, world::run_client,
};

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

/// Both proxies with their admin port on the fabric, so `ecsmesh ca` run on instance 0
/// can ask both nodes what they trust (`--node`).
fn mesh_with_reachable_admins() -> Mesh {
    let opts = ProxyOptions {
        admin_on_fabric: true,
        ..Default::default()
    };
    mesh(opts.clone(), opts)
}

/// `ecsmesh ca <step> --ca <dir> --node <A> --node <B> <extra>` run on instance 0.
fn rotation_step(m: &Mesh, step: &str, extra: &[&str]) -> std::process::Output {
    let ca = m.w.ca_dir().display().to_string();
    let (a, b) = (m.w.instances[0].admin_url(), m.w.instances[1].admin_url());
    let mut args = vec![step, "--ca", &ca, "--node", &a, "--node", &b];
    args.extend_from_slice(extra);
    m.w.ca_on(0, &args)
}

fn succeeded(out: &std::process::Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    text
}

/// Polls instance `inst`'s `/trust` until `cond` holds (15 s at most).
fn wait_for_trust(m: &Mesh, inst: usize, what: &str, cond: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let t = m.w.instances[inst].trust();
        if cond(&t) {
            return;
        }
        assert!(Instant::now() < deadline, "instance {inst}: {what}: {t}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn anchors(t: &serde_json::Value) -> Vec<String> {
    t["anchors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect()
}

/// The three rotation steps under load, each only after both nodes show the previous one:
/// no connection fails at any point, and afterwards only the new chain is accepted.
#[test]
fn trust_anchor_rotation_under_load_then_retiring_the_old_anchor() {
    let m = mesh_with_reachable_admins();
    let ca = m.w.ca_dir().display().to_string();
    let first = anchors(&m.w.instances[0].trust());
    assert_eq!(first.len(), 1);
    // A certificate chained only to the first anchor (through instance 0's issuer of
    // the time).
    let old = issued_by_a(&m, "old-chain", &m.w.identity(&m.fam_a));
    let stop = Arc::new(AtomicBool::new(false));
    let load = background_load(&m, stop.clone());
    std::thread::sleep(Duration::from_secs(2));

    // 1. Stage: every node trusts old + new, no issuer moves.
    m.w.ca(&["rotate", "--ca", &ca]);
    for i in 0..2 {
        wait_for_trust(&m, i, "trusts both anchors", |t| anchors(t).len() == 2);
        assert_eq!(
            m.w.instances[i].trust()["issuer"]["anchor"],
            first[0].as_str()
        );
    }
    let new_anchor = anchors(&m.w.instances[0].trust())[1].clone();
    std::thread::sleep(Duration::from_secs(2));

    // 2. Activate: refused by nothing now; both nodes move to issuers under the new anchor.
    let said = succeeded(&rotation_step(&m, "activate", &[]));
    assert!(
        said.contains(&format!("activated anchor {new_anchor}")),
        "{said}"
    );
    for i in 0..2 {
        wait_for_trust(&m, i, "signs under the new anchor", |t| {
            t["issuer"]["anchor"] == new_anchor.as_str()
        });
    }
    std::thread::sleep(Duration::from_secs(2));
    // Overlap: both chains verify.
    let new = issued_by_a(&m, "new-chain", &m.w.identity(&m.fam_a));
    assert_eq!(probe(&m, Some(&old), m.ep)["echo_ok"], true);
    assert_eq!(probe(&m, Some(&new), m.ep)["echo_ok"], true);

    // 3. Retire: the old anchor leaves every bundle.
    succeeded(&rotation_step(&m, "retire", &[]));
    for i in 0..2 {
        wait_for_trust(&m, i, "trusts only the new anchor", |t| {
            anchors(t) == [new_anchor.clone()]
        });
    }
    let mb = m.w.instances[1].metrics();
    assert_eq!(
        counter(
            &mb,
            "ecsmesh_trust_anchor",
            &[("fingerprint", new_anchor.as_str())]
        ),
        1.0,
        "the anchor gauge follows the bundle"
    );
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let (total, failed) = load.join().unwrap();
    assert!(total >= 40, "load ran: {total}");
    assert_eq!(
        failed, 0,
        "0 failed connections across stage, activate and retire, of {total}"
    );

    assert_ne!(
        probe(&m, Some(&old), m.ep)["echo_ok"],
        true,
        "old chain refused after retire"
    );
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

/// Today's outage on purpose: instance 1 has not got the new anchor (its bundle copy lags).
/// `ca activate` refuses and names that node; with `--force` instance 0 signs under the
/// new anchor and instance 1 refuses its certificates (`unknown_ca`).
#[test]
fn activating_before_a_node_trusts_the_new_anchor_is_refused() {
    // Instance 1 reads its bundle from its own copy, which the rotation does not reach.
    let mut w = World::new(tools(), 2);
    w.enable_mesh(TRUST_DOMAIN);
    let lagging = w.workdir.join("instance-1-bundle.pem");
    std::fs::copy(w.ca_dir().join("bundle.pem"), &lagging).unwrap();
    let reachable = ProxyOptions {
        admin_on_fabric: true,
        ..Default::default()
    };
    let m = mesh_in(
        w,
        reachable.clone(),
        ProxyOptions {
            bundle: Some(lagging),
            ..reachable
        },
    );
    let ca = m.w.ca_dir().display().to_string();
    let first = anchors(&m.w.instances[1].trust());
    m.w.ca(&["rotate", "--ca", &ca]);
    wait_for_trust(&m, 0, "trusts both anchors", |t| anchors(t).len() == 2);
    assert_eq!(anchors(&m.w.instances[1].trust()), first);

    let refused = rotation_step(&m, "activate", &[]);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "activate went ahead: {said}");
    assert!(
        said.contains(&format!("node {} (", m.w.instances[1].admin_url()))
            && said.contains("does not trust anchor"),
        "the refusal names the node and the anchor: {said}"
    );
    assert!(
        !said.contains(&format!("node {} (", m.w.instances[0].admin_url())),
        "instance 0 is ready and not named: {said}"
    );
    // Nothing was re-issued: both nodes still sign under the first anchor.
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..2 {
        assert_eq!(
            m.w.instances[i].trust()["issuer"]["anchor"],
            first[0].as_str()
        );
    }
    assert_redirected(
        &m.w.instances[0].tasks[0].client(&[m.ep], 2, 1000),
        m.w.instances[0].outbound_v4(Host),
    );

    // --force: the outage the guard prevents.
    succeeded(&rotation_step(&m, "activate", &["--force"]));
    wait_for_trust(&m, 0, "signs under the new anchor", |t| {
        t["issuer"]["anchor"] != first[0].as_str()
    });
    assert_eq!(
        m.w.instances[1].trust()["issuer"]["anchor"],
        first[0].as_str(),
        "instance 1 cannot load an issuer its bundle does not anchor"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let reports = m.w.instances[0].tasks[0].client(&[m.ep], 2, 1000);
        let rejected = counter(
            &m.w.instances[1].metrics(),
            "ecsmesh_tunnel_rejected_total",
            &[("reason", "unknown_ca")],
        );
        if reports.iter().all(|r| !r.ok) && rejected >= 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "instance 1 never refused the new chain: {reports:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
