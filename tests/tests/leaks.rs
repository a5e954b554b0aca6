//! Original-destination bookkeeping must not leak kernel map entries, whatever happens to
//! the connection: normal close, refused connect, or a proxy that never accepts.
mod common;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use common::*;
use harness::{
    NetworkMode::Host, ProxyOptions, World, pinned_map_len, process, world::client_args,
};

/// Wait (bounded) for both per-connection maps to drain; return what is left.
fn settle(pin_dir: &Path) -> (usize, usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = (
            pinned_map_len(&pin_dir.join("map_ORIG_DST")),
            pinned_map_len(&pin_dir.join("map_PENDING")),
        );
        if left == (0, 0) || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn attempts(cmd: std::process::Command) -> u64 {
    let out = process::run(cmd);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("attempts json");
    v["connected"].as_u64().unwrap()
}

#[test]
fn map_entries_do_not_leak() {
    let mut w = World::new(tools(), 2);
    let task = w.add_task(0, Host, 1);
    let target = w.instances[1].addr(9000);
    let closed = w.instances[1].addr(9999);
    let sink = w.instances[1].addr(9001);
    let sink_out = w.workdir.join("sink.txt");
    w.instances[1].echo_server(&[target]);
    w.instances[1].server(&[
        "sink".into(),
        "--out".into(),
        sink_out.display().to_string(),
        sink.to_string(),
    ]);
    w.instances[0].start_proxy(&ProxyOptions::default());
    let a = &w.instances[0];
    let t = &a.tasks[task];
    let pins = a.pin_dir.clone();

    // 1,000 short connections, one after another.
    let mut args = client_args(&[target], 1000, 64);
    args.push("--sequential".into());
    let reports = harness::world::run_client(t.meshtool(0, &args));
    assert_eq!(reports.len(), 1000);
    assert_redirected(&reports, a.outbound_v4(Host));
    assert_eq!(settle(&pins), (0, 0), "after 1,000 completed connections");

    // 1,000 connections to a closed destination port: the proxy accepts, its upstream
    // connect is refused, it closes the client.
    let att = |target: std::net::SocketAddr, n: usize| {
        t.meshtool(
            0,
            &[
                "attempts".into(),
                target.to_string(),
                "--count".into(),
                n.to_string(),
            ],
        )
    };
    assert_eq!(attempts(att(closed, 1000)), 1000);
    assert_eq!(
        settle(&pins),
        (0, 0),
        "after 1,000 connections to a closed port"
    );

    let proxy_pid = nix::unistd::Pid::from_raw(a.proxy.as_ref().unwrap().proc.pid());
    let stop = |sig| nix::sys::signal::kill(proxy_pid, sig).unwrap();
    use nix::sys::signal::Signal::{SIGCONT, SIGKILL, SIGSTOP};

    // Fire-and-forget clients that write and close before the proxy accepts (it is
    // stopped): their entries must outlive the client socket, and their bytes arrive.
    stop(SIGSTOP);
    let send = t.meshtool(
        0,
        &[
            "send".into(),
            sink.to_string(),
            "--count".into(),
            "100".into(),
            "--bytes".into(),
            "1000".into(),
        ],
    );
    let sent: serde_json::Value = serde_json::from_slice(&process::run(send).stdout).unwrap();
    assert_eq!(sent["sent"], 100);
    assert_eq!(
        pinned_map_len(&pins.join("map_ORIG_DST")),
        100,
        "kept for the proxy to claim"
    );
    stop(SIGCONT);
    assert_eq!(
        settle(&pins),
        (0, 0),
        "claimed once the proxy accepts again"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let lines = loop {
        let text = std::fs::read_to_string(&sink_out).unwrap_or_default();
        if text.lines().count() >= 100 || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let expected = format!("1000 {}", sent["checksum"]);
    assert_eq!(
        lines.lines().filter(|l| *l == expected).count(),
        100,
        "{lines}"
    );

    // Connections queued while the proxy is stopped, then the proxy dies without ever
    // accepting them: the resets remove their entries.
    stop(SIGSTOP);
    let hold = t.meshtool(
        0,
        &[
            "attempts".into(),
            target.to_string(),
            "--count".into(),
            "200".into(),
            "--hold-ms".into(),
            "3000".into(),
        ],
    );
    let holder = std::thread::spawn(move || attempts(hold));
    let deadline = Instant::now() + Duration::from_secs(10);
    while pinned_map_len(&pins.join("map_ORIG_DST")) < 200 {
        assert!(
            Instant::now() < deadline,
            "200 queued connections should be published"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    stop(SIGKILL);
    assert_eq!(
        settle(&pins),
        (0, 0),
        "after connections the proxy never accepted"
    );
    assert_eq!(holder.join().unwrap(), 200);

    // With the listener gone (kill -9 leaves the redirect pinned), 1,000 refused connects.
    assert_eq!(attempts(att(target, 1000)), 0);
    assert_eq!(settle(&pins), (0, 0), "after 1,000 refused connects");
}
