//! ECS integration on the harness: a fixture ECS agent (real HTTP inside the instance's
//! netns) and a fixture Docker Engine API (real HTTP on a Unix socket), serving documents
//! shaped like the real APIs (built from the fixture files in
//! proxy-user/tests/fixtures/ecs), drive enrolment, health gating and draining.
mod common;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use common::{mesh::TRUST_DOMAIN, *};
use harness::{
    NetworkMode::Host,
    ProxyOptions, World,
    aws::{AgentTask, fixture},
    fixture::HttpFixture,
    metrics::counter,
    process,
    world::{client_args, run_client},
};
use serde_json::{Value, json};

struct FakeTask {
    id: &'static str,
    family: &'static str,
    desired: &'static str,
    known: &'static str,
    container: &'static str,
    /// Docker health status; None = no health check.
    health: Option<&'static str>,
    awsvpc: bool,
}

fn agent_tasks(tasks: &[&FakeTask]) -> String {
    let list: Vec<AgentTask> = tasks
        .iter()
        .map(|t| AgentTask {
            arn: format!("arn:aws:ecs:us-east-1:123456789012:task/test/{}", t.id),
            family: t.family,
            desired: t.desired,
            known: t.known,
            container: t.container,
            awsvpc: t.awsvpc,
        })
        .collect();
    harness::aws::agent_tasks(&list)
}

fn docker_inspect(t: &FakeTask) -> String {
    let mut d = fixture("docker-inspect-host-mode.json");
    d["Id"] = json!(t.container);
    match t.health {
        Some(h) => d["State"]["Health"] = json!({ "Status": h, "FailingStreak": 0, "Log": [] }),
        None => {
            d["State"].as_object_mut().unwrap().remove("Health");
        }
    }
    d.to_string()
}

struct Cluster {
    w: World,
    agent: HttpFixture,
    docker: HttpFixture,
    eps: [SocketAddr; 3],
    /// Instance 1's proxy options (for restarts).
    opts: ProxyOptions,
}

/// Starts instance 1's proxy without waiting for ready (which needs the agent).
fn spawn_unready(w: &mut World, opts: &ProxyOptions) {
    w.instances[1].spawn_proxy(opts);
}

const T1: FakeTask = FakeTask {
    id: "a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1",
    family: "orders",
    desired: "RUNNING",
    known: "RUNNING",
    container: "c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1",
    health: Some("healthy"),
    awsvpc: false,
};
const T2: FakeTask = FakeTask {
    id: "b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2",
    family: "orders",
    desired: "RUNNING",
    known: "RUNNING",
    container: "c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2",
    health: Some("unhealthy"),
    awsvpc: false,
};
const T3: FakeTask = FakeTask {
    id: "c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3",
    family: "billing",
    desired: "RUNNING",
    known: "RUNNING",
    container: "c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3",
    health: None,
    awsvpc: false,
};
const T5: FakeTask = FakeTask {
    id: "e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5",
    family: "vpcapp",
    desired: "RUNNING",
    known: "RUNNING",
    container: "c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5",
    health: None,
    awsvpc: true,
};

const T6: FakeTask = FakeTask {
    id: "f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6",
    family: "stray",
    desired: "RUNNING",
    known: "RUNNING",
    container: "c6c6c6c6c6c6c6c6c6c6c6c6c6c6c6c6c6c6c6c6c6c6c6c6c6c6c6c6c6c6c6c6",
    health: None,
    awsvpc: false,
};

/// Instance 1's tasks come from the fixture agent; instance 0 runs a static client task.
/// Without `wait_ready` the agent answers 500 until the test changes it.
fn cluster(initial: &[&FakeTask], wait_ready: bool) -> Cluster {
    cluster_with(initial, wait_ready, ProxyOptions::default())
}

/// [`cluster`], with instance 1's options starting from `base` (strict mode, another
/// attach point).
fn cluster_with(initial: &[&FakeTask], wait_ready: bool, base: ProxyOptions) -> Cluster {
    let mut w = World::new(tools(), 2);
    w.enable_mesh(TRUST_DOMAIN);
    w.add_task(0, Host, 1);
    let b = &w.instances[1];
    let eps = [b.addr(9000), b.addr(9001), b.addr(9002)];
    let agent = HttpFixture::tcp_in(&b.netns, "127.0.0.1:51678".parse().unwrap());
    let sock = w.workdir.join("docker-inst1.sock");
    let docker = HttpFixture::unix(&sock);
    agent.set(
        "/v1/metadata",
        200,
        fixture("agent-metadata.json").to_string(),
    );
    // T6's container only exists where Docker puts it without the agent's parent
    // (`system.slice/docker-<cid>.scope`): the resolver's last fallback.
    w.cgroups
        .dir(&format!("inst1/system.slice/docker-{}.scope", T6.container));
    docker.set(
        &format!("/containers/{}/json", T6.container),
        200,
        docker_inspect(&T6),
    );
    for t in [&T1, &T2, &T3, &T5] {
        // The agent's cgroup v2 layout on AL2023, below the instance's cgroup root.
        w.cgroups.dir(&format!(
            "inst1/ecstasks.slice/ecstasks-{}.slice/docker-{}.scope",
            t.id, t.container
        ));
        docker.set(
            &format!("/containers/{}/json", t.container),
            200,
            docker_inspect(t),
        );
    }
    if wait_ready {
        agent.set("/v1/tasks", 200, agent_tasks(initial));
    } else {
        // The agent is still starting: the proxy must not report ready yet.
        agent.set("/v1/tasks", 500, "{\"error\":\"agent starting\"}");
    }
    // Endpoints name their task (as Cloud Map instance ids of ECS services do).
    let discovery = w.instances[1].mesh.as_ref().unwrap().discovery.clone();
    let mut text = String::new();
    for (ep, t) in eps.iter().zip([&T1, &T2, &T3]) {
        text += &format!(
            "[[services]]\nname = \"{}\"\n[[services.endpoints]]\naddress = \"{ep}\"\nfamily = \"{}\"\ntask = \"{}\"\n\n",
            t.family, t.family, t.id
        );
    }
    std::fs::write(&discovery, text).unwrap();
    w.instances[1].echo_server(&eps);
    let extra = format!(
        "\n[ecs]\ndocker_socket = \"{}\"\ncgroup_root = \"{}\"\nlayout = \"v2\"\npoll_interval_ms = 200\n",
        sock.display(),
        w.instances[1].cgroup_root.display()
    );
    // The base's own TOML (e.g. `[metrics]`) goes to both instances.
    let shared = base.extra_toml.clone();
    let opts = ProxyOptions {
        enrol: Some(vec![]),
        extra_toml: extra + &shared,
        ..base
    };
    if wait_ready {
        w.instances[1].start_proxy(&opts);
    } else {
        spawn_unready(&mut w, &opts);
    }
    w.instances[0].start_proxy(&ProxyOptions {
        extra_toml: shared,
        ..Default::default()
    });
    Cluster {
        w,
        agent,
        docker,
        eps,
        opts,
    }
}

fn identities(c: &Cluster) -> String {
    let b = &c.w.instances[1];
    b.netns
        .http_get(b.admin, "/identities")
        .map(|r| r.1)
        .unwrap_or_default()
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn connect_ok(c: &Cluster, ep: SocketAddr) -> bool {
    c.w.instances[0].tasks[0].client(&[ep], 1, 256)[0].ok
}

#[test]
fn agent_tasks_are_enrolled_gated_by_health_and_unenrolled_when_gone() {
    let c = cluster(&[&T1, &T2, &T5], true);
    let b = &c.w.instances[1];
    // Healthy task serves; its unhealthy sibling of the same family gets no new connections.
    assert!(connect_ok(&c, c.eps[0]), "healthy task reachable");
    assert!(!connect_ok(&c, c.eps[1]), "unhealthy task refused");
    let mb = b.metrics();
    assert!(
        counter(
            &mb,
            "ecsmesh_tunnel_rejected_total",
            &[("reason", "not_serving")]
        ) >= 1.0
    );
    assert_eq!(
        counter(&mb, "ecsmesh_ecs_tasks", &[("state", "enrolled")]),
        2.0
    );
    assert_eq!(
        counter(&mb, "ecsmesh_ecs_tasks", &[("state", "serving")]),
        1.0
    );
    assert_eq!(
        counter(&mb, "ecsmesh_ecs_tasks", &[("state", "not_meshed_awsvpc")]),
        1.0
    );
    assert!(b.proxy_log().contains("awsvpc task: not meshed yet"));

    // Enrolled means redirected: a process in T1's container cgroup goes through the proxy.
    let t1_cgroup = b.cgroup_root.join(format!(
        "ecstasks.slice/ecstasks-{}.slice/docker-{}.scope",
        T1.id, T1.container
    ));
    let mut cmd = std::process::Command::new(&tools().meshtool);
    cmd.args(client_args(&[c.eps[0]], 1, 64));
    process::place(
        &mut cmd,
        &process::Placement {
            netns: b.netns.path(),
            cgroup: t1_cgroup,
            cpu: None,
        },
    );
    let r = run_client(cmd);
    assert!(r[0].ok, "{r:?}");
    assert_eq!(
        r[0].peer,
        Some("127.0.0.1:15001".parse().unwrap()),
        "T1's connection redirected: {r:?}"
    );

    // A task started later: enrolled (certificate issued) and reachable.
    assert!(!identities(&c).contains("/billing"));
    c.agent
        .set("/v1/tasks", 200, agent_tasks(&[&T1, &T2, &T3, &T5]));
    wait_until("billing certificate issued", || {
        identities(&c).contains("/billing")
    });
    assert!(connect_ok(&c, c.eps[2]), "new task reachable");

    // Unhealthy → healthy: the sibling starts taking connections.
    let healed = FakeTask {
        health: Some("healthy"),
        ..T2
    };
    c.docker.set(
        &format!("/containers/{}/json", T2.container),
        200,
        docker_inspect(&healed),
    );
    wait_until("healed task serving", || connect_ok(&c, c.eps[1]));

    // The task stops: unenrolled, certificate gone, endpoint refused.
    c.agent.set("/v1/tasks", 200, agent_tasks(&[&T1, &T2, &T5]));
    wait_until("billing certificate dropped", || {
        !identities(&c).contains("/billing")
    });
    assert!(!connect_ok(&c, c.eps[2]), "stopped task not reachable");
    assert!(b.proxy_log().contains("task unenrolled"));
}

/// A client in the cgroup of container `t` on instance 1 (what the task itself runs).
fn from_task(c: &Cluster, t: &FakeTask, target: SocketAddr) -> Vec<harness::world::ConnReport> {
    let b = &c.w.instances[1];
    let cgroup = b.cgroup_root.join(format!(
        "ecstasks.slice/ecstasks-{}.slice/docker-{}.scope",
        t.id, t.container
    ));
    let mut cmd = std::process::Command::new(&tools().meshtool);
    cmd.args(client_args(&[target], 1, 64));
    process::place(
        &mut cmd,
        &process::Placement {
            netns: b.netns.path(),
            cgroup,
            cpu: None,
        },
    );
    run_client(cmd)
}

const PROXY: &str = "127.0.0.1:15001";

#[test]
fn a_stopping_task_stays_meshed_while_it_drains() {
    let c = cluster(&[&T1, &T3], true);
    // A long-lived connection to T1's endpoint: one ping every 200 ms, 4 s in all.
    let args: Vec<String> = [
        "pingpong",
        &c.eps[0].to_string(),
        "--count",
        "20",
        "--size",
        "16",
        "--interval-ms",
        "200",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let cmd = c.w.instances[0].tasks[0].meshtool(0, &args);
    let long = std::thread::spawn(move || process::run(cmd));
    std::thread::sleep(Duration::from_secs(1));
    let stopping = FakeTask {
        desired: "STOPPED",
        ..T1
    };
    c.agent
        .set("/v1/tasks", 200, agent_tasks(&[&stopping, &T3]));
    wait_until("the stopping task takes no new connections", || {
        !connect_ok(&c, c.eps[0])
    });
    // Its own connections still go through the mesh, and its certificate is kept.
    let out = from_task(&c, &T1, c.eps[2]);
    assert!(out[0].ok, "{out:?}");
    assert_eq!(out[0].peer, Some(PROXY.parse().unwrap()), "{out:?}");
    assert!(identities(&c).contains("/orders"));
    // The open stream finishes.
    let pp = long.join().unwrap();
    let report: Value = serde_json::from_slice(&pp.stdout).unwrap_or_default();
    assert!(
        pp.status.success() && report["count"] == 20,
        "the open connection finished: {report} {}",
        String::from_utf8_lossy(&pp.stderr)
    );
    assert!(!c.w.instances[1].proxy_log().contains("task unenrolled"));
    // Gone for good (known STOPPED): unenrolled, certificate dropped.
    let stopped = FakeTask {
        known: "STOPPED",
        ..stopping
    };
    c.agent.set("/v1/tasks", 200, agent_tasks(&[&stopped, &T3]));
    wait_until("unenrolled once stopped", || {
        c.w.instances[1].proxy_log().contains("task unenrolled")
    });
    wait_until("certificate dropped", || {
        !identities(&c).contains("/orders")
    });
}

#[test]
fn in_strict_mode_a_task_the_agent_has_not_reported_is_refused_until_enrolled() {
    let c = cluster_with(
        &[&T1],
        true,
        ProxyOptions {
            strict: true,
            ..Default::default()
        },
    );
    // T3's container exists (its cgroup is there) but the agent does not list it yet.
    let before = from_task(&c, &T3, c.eps[0]);
    assert!(!before[0].ok, "refused before enrolment: {before:?}");
    let mb = c.w.instances[1].metrics();
    assert!(
        counter(
            &mb,
            "ecsmesh_kernel_connects_total",
            &[("verdict", "unenrolled_denied")]
        ) >= 1.0
    );
    c.agent.set("/v1/tasks", 200, agent_tasks(&[&T1, &T3]));
    wait_until("billing certificate issued", || {
        identities(&c).contains("/billing")
    });
    let after = from_task(&c, &T3, c.eps[0]);
    assert!(after[0].ok, "{after:?}");
    assert_eq!(
        after[0].peer,
        Some(PROXY.parse().unwrap()),
        "meshed: {after:?}"
    );
}

#[test]
fn a_task_whose_cgroup_is_outside_the_attach_point_is_reported_not_meshed() {
    // The programs attach to the ECS tasks slice, as on a real instance; T6's container
    // sits in system.slice, where nothing redirects it.
    let attach = ProxyOptions {
        attach_below: Some("ecstasks.slice".into()),
        ..Default::default()
    };
    let c = cluster_with(&[&T1, &T6], true, attach);
    let mb = c.w.instances[1].metrics();
    assert_eq!(
        counter(
            &mb,
            "ecsmesh_ecs_tasks",
            &[("state", "not_meshed_outside_cgroup_root")]
        ),
        1.0
    );
    assert_eq!(
        counter(&mb, "ecsmesh_ecs_tasks", &[("state", "enrolled")]),
        1.0,
        "only T1"
    );
    assert!(!identities(&c).contains("/stray"));
    assert!(
        c.w.instances[1]
            .proxy_log()
            .contains("outside cgroup_root: not meshed")
    );
    // T1, inside the slice, is meshed.
    let out = from_task(&c, &T1, c.eps[0]);
    assert_eq!(out[0].peer, Some(PROXY.parse().unwrap()), "{out:?}");
}

/// The node proxy crashes and comes back while the ECS agent is down: the task it had
/// enrolled stays meshed throughout — refused while no proxy runs, redirected as soon as
/// the new one is up, never direct.
#[test]
fn a_restart_with_the_agent_down_keeps_every_task_meshed() {
    let mut c = cluster(&[&T1], true);
    let proxy: SocketAddr = PROXY.parse().unwrap();
    let before = from_task(&c, &T1, c.eps[0]);
    assert_eq!(before[0].peer, Some(proxy), "{before:?}");
    c.agent.set("/v1/tasks", 500, "{\"error\":\"agent down\"}");
    let old = c.w.instances[1].proxy.take().expect("proxy running");
    old.proc.signal(nix::sys::signal::Signal::SIGKILL);
    let gap = from_task(&c, &T1, c.eps[0]);
    assert!(!gap[0].ok, "no proxy: refused, not direct: {gap:?}");
    let opts = c.opts.clone();
    spawn_unready(&mut c.w, &opts);
    let mut last = Vec::new();
    wait_until("T1 meshed by the new proxy", || {
        last = from_task(&c, &T1, c.eps[0]);
        assert!(
            !last[0].ok || last[0].peer == Some(proxy),
            "a connection went out directly: {last:?}"
        );
        last[0].ok
    });
    // The outbound listener serves restored tasks while the first agent poll is
    // still in flight, so its failure is logged concurrently: wait for it.
    wait_until("the failed agent poll is logged", || {
        c.w.instances[1]
            .proxy_log()
            .contains("waiting for the ECS agent")
    });
    let log = c.w.instances[1].proxy_log();
    assert!(log.contains("taking over"), "{log}");
    assert!(
        log.contains("ECS tasks of the last run enrolled before attaching"),
        "{log}"
    );
    assert!(
        identities(&c).contains("/orders"),
        "its certificate was issued again"
    );
}

#[test]
fn ready_waits_for_the_first_successful_agent_poll() {
    let c = cluster(&[&T1], false);
    let b = &c.w.instances[1];
    std::thread::sleep(Duration::from_secs(2));
    let (status, _) = b
        .netns
        .http_get(b.admin, "/ready")
        .expect("admin answers while not ready");
    assert_eq!(status, 503, "not ready while the agent fails");
    assert_eq!(b.netns.http_get(b.admin, "/live").unwrap().0, 200);
    c.agent.set("/v1/tasks", 200, agent_tasks(&[&T1]));
    wait_until("ready after the agent answers", || {
        b.netns
            .http_get(b.admin, "/ready")
            .is_ok_and(|r| r.0 == 200)
    });
    assert!(b.proxy_log().contains("waiting for the ECS agent"));
}

#[test]
fn a_connection_to_a_stopping_task_of_a_balanced_service_goes_to_another() {
    let c = {
        let mut c = cluster(&[&T1, &T3], true);
        // The client's node balances `orders` per connection.
        c.w.instances[0].stop_proxy();
        c.w.instances[0].start_proxy(&ProxyOptions {
            extra_toml: "[services.orders]\nbalance = true\n".into(),
            ..Default::default()
        });
        c
    };
    let serving = |c: &Cluster| {
        counter(
            &c.w.instances[1].metrics(),
            "ecsmesh_ecs_tasks",
            &[("state", "serving")],
        )
    };
    // T2 (also `orders`) passes its health check and serves...
    let running = FakeTask {
        health: Some("healthy"),
        ..T2
    };
    c.docker.set(
        &format!("/containers/{}/json", running.container),
        200,
        docker_inspect(&running),
    );
    c.agent
        .set("/v1/tasks", 200, agent_tasks(&[&T1, &running, &T3]));
    wait_until("T2 serves", || serving(&c) == 3.0);
    // ...until ECS stops it.
    let stopping = FakeTask {
        desired: "STOPPED",
        ..running
    };
    c.agent
        .set("/v1/tasks", 200, agent_tasks(&[&T1, &stopping, &T3]));
    wait_until("T2 no longer serves", || serving(&c) == 2.0);
    // Every connection dialled to the stopping task reaches T1 instead.
    let served = c.eps[0].to_string();
    for r in c.w.instances[0].tasks[0].client(&[c.eps[1]], 10, 256) {
        assert!(r.ok, "{r:?}");
        assert_eq!(r.served_by.as_deref(), Some(served.as_str()), "{r:?}");
    }
}

/// Every series (name and labels) in an instance's `/metrics`.
fn series(c: &Cluster, inst: usize) -> std::collections::BTreeSet<String> {
    let i = &c.w.instances[inst];
    let (status, body) = i.netns.http_get(i.admin, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200);
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' ').map(|(k, _)| k.to_owned()))
        .collect()
}

/// Churn task `k`. Its names are generated, so leaked to fit `FakeTask`'s `&'static str`
/// (a hundred short strings, for the test's lifetime).
fn churn_task(k: usize) -> FakeTask {
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    FakeTask {
        id: leak(format!("{k:032x}")),
        family: leak(format!("churn{k}")),
        desired: "RUNNING",
        known: "RUNNING",
        container: leak(format!("{k:064x}")),
        health: None,
        awsvpc: false,
    }
}

#[test]
fn series_of_stopped_tasks_are_removed_and_the_count_returns_to_its_baseline() {
    const BATCH: usize = 20;
    const BATCHES: usize = 5;
    let base = ProxyOptions {
        extra_toml: "\n[metrics]\nseries_grace_secs = 1\n".into(),
        ..Default::default()
    };
    let mut c = cluster_with(&[&T1], true, base);
    let ports: Vec<SocketAddr> = (0..BATCH)
        .map(|i| c.w.instances[1].addr(9100 + i as u16))
        .collect();
    c.w.instances[1].echo_server(&ports);
    let discovery = c.w.instances[1].mesh.as_ref().unwrap().discovery.clone();
    let write_discovery = |tasks: &[(SocketAddr, &FakeTask)]| {
        let mut text = String::new();
        for (ep, t) in tasks {
            text += &format!(
                "[[services]]\nname = \"{f}\"\n[[services.endpoints]]\naddress = \"{ep}\"\nfamily = \"{f}\"\ntask = \"{id}\"\n\n",
                f = t.family,
                id = t.id
            );
        }
        std::fs::write(&discovery, text).unwrap();
    };
    // A batch comes (enrolled on instance 1, in discovery, each called once through the
    // mesh from instance 0) and goes (stopped, out of discovery).
    let run_batch = |c: &Cluster, batch: &[FakeTask]| {
        for t in batch {
            c.w.cgroups.dir(&format!(
                "inst1/ecstasks.slice/ecstasks-{}.slice/docker-{}.scope",
                t.id, t.container
            ));
            c.docker.set(
                &format!("/containers/{}/json", t.container),
                200,
                docker_inspect(t),
            );
        }
        let mut listed: Vec<(SocketAddr, &FakeTask)> = vec![(c.eps[0], &T1)];
        listed.extend(ports.iter().copied().zip(batch));
        write_discovery(&listed);
        let mut running = vec![&T1];
        running.extend(batch);
        c.agent.set("/v1/tasks", 200, agent_tasks(&running));
        let last = batch.last().unwrap().family;
        wait_until("batch enrolled", || {
            identities(c).contains(&format!("/{last}\""))
        });
        let a = &c.w.instances[0];
        wait_until("batch in instance 0's discovery", || {
            a.netns
                .http_get(a.admin, "/endpoints")
                .is_ok_and(|(_, body)| body.contains(&format!("\"{last}\"")))
        });
        let reports = c.w.instances[0].tasks[0].client(&ports[..batch.len()], 1, 64);
        assert_all_ok(&reports);
        let peak = [series(c, 0).len(), series(c, 1).len()];
        write_discovery(&[(c.eps[0], &T1)]);
        c.agent.set("/v1/tasks", 200, agent_tasks(&[&T1]));
        peak
    };
    let settled = |c: &Cluster, baseline: &[std::collections::BTreeSet<String>; 2]| {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let now = [series(c, 0), series(c, 1)];
            if now == *baseline {
                return;
            }
            if Instant::now() > deadline {
                for i in 0..2 {
                    let extra: Vec<_> = now[i].difference(&baseline[i]).take(10).collect();
                    let missing: Vec<_> = baseline[i].difference(&now[i]).take(10).collect();
                    eprintln!("instance {i}: extra {extra:#?}\nmissing {missing:#?}");
                }
                panic!("series did not return to their baseline");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // Warm-up: one task comes and goes, so series that exist once anything has happened
    // (sweep gauges, counters of events) are part of the baseline.
    run_batch(&c, &[churn_task(1000)]);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left: Vec<String> = [series(&c, 0), series(&c, 1)]
            .into_iter()
            .flatten()
            .filter(|s| s.contains("churn1000"))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the warm-up task's series stayed: {left:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let baseline = [series(&c, 0), series(&c, 1)];

    let mut peaks = Vec::new();
    for n in 0..BATCHES {
        let batch: Vec<FakeTask> = (0..BATCH).map(|i| churn_task(n * BATCH + i)).collect();
        peaks.push(run_batch(&c, &batch));
    }
    // Each batch added series on both sides (Istio's TCP series and the TCP duration
    // histogram at the source; tunnel stream series at the destination) ...
    for (n, peak) in peaks.iter().enumerate() {
        for i in 0..2 {
            assert!(
                peak[i] >= baseline[i].len() + BATCH,
                "batch {n}, instance {i}: {} series at the peak, baseline {}",
                peak[i],
                baseline[i].len()
            );
        }
    }
    // ... and with every task gone, both instances are back to exactly the series they
    // had before, and say so.
    settled(&c, &baseline);
    let m = c.w.instances[0].metrics();
    assert!(counter(&m, "ecsmesh_metric_series_removed_total", &[]) >= (BATCHES * BATCH) as f64);
}

/// A template naming what the ECS agent does not report (`{task_role}`): the task is
/// still enrolled and redirected, never left to go around the mesh, and its meshed
/// connections fail closed — said in the log, the task gauge and the failure counter.
#[test]
fn an_ecs_task_whose_identity_cannot_be_rendered_stays_redirected_and_fails_closed() {
    let base = ProxyOptions {
        identity_template: Some("spiffe://{trust_domain}/role/{task_role}".into()),
        ..Default::default()
    };
    let c = cluster_with(&[&T1], true, base);
    let b = &c.w.instances[1];
    let m = b.metrics();
    assert_eq!(
        counter(&m, "ecsmesh_ecs_tasks", &[("state", "enrolled")]),
        1.0
    );
    assert_eq!(
        counter(&m, "ecsmesh_ecs_tasks", &[("state", "no_identity")]),
        1.0
    );
    let log = b.proxy_log();
    assert!(
        log.contains("no identity for this task") && log.contains(T1.id),
        "{log}"
    );
    // T3's endpoint is meshed and its echo server answers anyone who reaches it directly:
    // T1's connection fails, so it went to the proxy and was refused there.
    let r = from_task(&c, &T1, c.eps[2]);
    assert!(!r[0].ok, "{r:?}");
    assert!(
        counter(
            &b.metrics(),
            "ecsmesh_tcp_connections_failed_total",
            &[("reason", "no_identity")]
        ) >= 1.0
    );
}
