//! End-to-end tests over real HTTP against the fixture servers (`fixture_server.rs`),
//! which answer with the real-shaped fixture files in `tests/fixtures/ecs/`.
use std::{sync::Arc, time::Duration};

use super::{
    fixture_server::{Reply, Server, TempTree, agent_server, docker_server},
    *,
};

const ORDERS: &str = "4d2c0a8f0b6e4b8c9a1e2f3a4b5c6d7e";
const WEB: &str = "1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f809";
const LOG_ROUTER: &str = "2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a";
const PAYMENTS: &str = "9e8d7c6b5a4f4e3d8c2b1a0f9e8d7c6b";
const MIGRATE: &str = "3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b";
const REPORTS: &str = "5f6e7d8c9b0a4b1c8d2e3f4a5b6c7d8e";
const WORKER: &str = "4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c";
const BILLING: &str = "7a1b9c3d5e7f4a2b8c6d0e1f3a5b7c9d";
const APP: &str = "5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d";
const STOPPED_CID: &str = "6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e";

fn agent_fixtures() -> Arc<Server> {
    Server::new(&[
        ("/v1/metadata", Reply::File("agent-metadata.json")),
        ("/v1/tasks", Reply::File("agent-tasks.json")),
    ])
}

fn inspect(id: &str) -> String {
    format!("/containers/{id}/json")
}

/// Docker routes for the fixture tasks, with the orders/web container's answer chosen.
fn docker_fixtures(web: &'static str) -> Arc<Server> {
    Server::new(&[
        (&inspect(WEB), Reply::File(web)),
        (
            &inspect(LOG_ROUTER),
            Reply::File("docker-inspect-no-healthcheck.json"),
        ),
        (
            &inspect(WORKER),
            Reply::File("docker-inspect-host-mode.json"),
        ),
        (&inspect(APP), Reply::File("docker-inspect-awsvpc.json")),
        // MIGRATE (pending task) is unknown to this Docker: 404.
    ])
}

/// An AL2023 cgroup v2 tree holding the running containers of the fixture tasks.
fn v2_tree() -> TempTree {
    let t = TempTree::new();
    t.touch("cgroup.controllers");
    for (task, cid) in [
        (ORDERS, WEB),
        (ORDERS, LOG_ROUTER),
        (REPORTS, WORKER),
        (BILLING, APP),
    ] {
        t.mkdir(&format!(
            "ecstasks.slice/ecstasks-{task}.slice/docker-{cid}.scope"
        ));
    }
    t
}

fn by_family<'a>(tasks: &'a [LocalTask], family: &str) -> &'a LocalTask {
    tasks
        .iter()
        .find(|t| t.family == family)
        .unwrap_or_else(|| panic!("no {family} in {tasks:#?}"))
}

#[tokio::test]
async fn snapshot_joins_agent_cgroups_and_docker() {
    let agent = agent_server(&agent_fixtures()).await;
    let docker_routes = docker_fixtures("docker-inspect-healthy.json");
    let (_sock_dir, docker) = docker_server(&docker_routes).await;
    let tree = v2_tree();
    let layout = CgroupLayout::detect(tree.path()).unwrap();
    assert_eq!(layout, CgroupLayout::V2);

    let tasks = snapshot(&agent, Some(&docker), tree.path(), layout)
        .await
        .unwrap();
    let mut families: Vec<&str> = tasks.iter().map(|t| t.family.as_str()).collect();
    families.sort_unstable();
    // The known-STOPPED task is gone, and Docker was never asked about it.
    assert_eq!(families, ["billing", "orders", "payments", "reports"]);
    assert!(!docker_routes.seen().contains(&inspect(STOPPED_CID)));

    let orders = by_family(&tasks, "orders");
    assert_eq!(orders.task_id.as_str(), ORDERS);
    assert_eq!(
        orders.arn,
        format!("arn:aws:ecs:us-east-1:123456789012:task/prod/{ORDERS}")
    );
    assert_eq!(orders.version, "7");
    assert_eq!(orders.network_mode, LocalNetworkMode::Bridge);
    assert_eq!(orders.gate, Gate::Serve);
    let slice = tree
        .path()
        .join(format!("ecstasks.slice/ecstasks-{ORDERS}.slice"));
    assert_eq!(
        orders.containers,
        vec![
            LocalContainer {
                name: "web".into(),
                docker_id: WEB.into(),
                cgroup: Some(slice.join(format!("docker-{WEB}.scope"))),
                health: Health::Healthy,
            },
            LocalContainer {
                name: "log-router".into(),
                docker_id: LOG_ROUTER.into(),
                cgroup: Some(slice.join(format!("docker-{LOG_ROUTER}.scope"))),
                health: Health::None,
            },
        ]
    );

    let payments = by_family(&tasks, "payments");
    assert_eq!(payments.task_id.as_str(), PAYMENTS);
    assert_eq!(payments.gate, Gate::NotYet("pending"));
    assert_eq!(payments.network_mode, LocalNetworkMode::Unknown);
    let names: Vec<_> = payments
        .containers
        .iter()
        .map(|c| (c.name.as_str(), c.cgroup.is_none(), c.health))
        .collect();
    assert_eq!(
        names,
        [
            ("migrate", true, Health::Unknown),
            ("api", true, Health::None)
        ]
    );
    assert_eq!(payments.containers[0].docker_id, MIGRATE);

    let reports = by_family(&tasks, "reports");
    assert_eq!(reports.gate, Gate::Drain("stopping"));
    assert_eq!(reports.network_mode, LocalNetworkMode::Host);

    let billing = by_family(&tasks, "billing");
    assert_eq!(billing.network_mode, LocalNetworkMode::Awsvpc);
    assert_eq!(billing.gate, Gate::Serve);
    assert!(billing.containers[0].cgroup.is_some());
}

#[tokio::test]
async fn web_health_decides_the_orders_gate() {
    let agent = agent_server(&agent_fixtures()).await;
    let tree = v2_tree();
    for (fixture, health, want) in [
        ("docker-inspect-healthy.json", Health::Healthy, Gate::Serve),
        (
            "docker-inspect-starting.json",
            Health::Starting,
            Gate::NotYet("starting"),
        ),
        (
            "docker-inspect-unhealthy.json",
            Health::Unhealthy,
            Gate::NotYet("unhealthy"),
        ),
        (
            "docker-inspect-no-healthcheck.json",
            Health::None,
            Gate::Serve,
        ),
    ] {
        let (_dir, docker) = docker_server(&docker_fixtures(fixture)).await;
        let tasks = snapshot(&agent, Some(&docker), tree.path(), CgroupLayout::V2)
            .await
            .unwrap();
        let orders = by_family(&tasks, "orders");
        assert_eq!(orders.containers[0].health, health, "{fixture}");
        assert_eq!(orders.gate, want, "{fixture}");
        // The direct call agrees with the snapshot.
        assert_eq!(docker.health(WEB).await.unwrap(), health, "{fixture}");
    }
}

#[tokio::test]
async fn docker_unreachable_holds_back_checked_tasks_and_none_disables_gating() {
    let agent = agent_server(&agent_fixtures()).await;
    let tree = v2_tree();
    let gone = DockerHealth::new(tree.path().join("no-docker.sock"));
    let tasks = snapshot(&agent, Some(&gone), tree.path(), CgroupLayout::V2)
        .await
        .unwrap();
    assert_eq!(
        by_family(&tasks, "orders").gate,
        Gate::NotYet("health unknown")
    );
    assert_eq!(
        by_family(&tasks, "orders").network_mode,
        LocalNetworkMode::Unknown
    );

    let tasks = snapshot(&agent, None, tree.path(), CgroupLayout::V2)
        .await
        .unwrap();
    let orders = by_family(&tasks, "orders");
    assert_eq!(orders.gate, Gate::Serve);
    assert!(orders.containers.iter().all(|c| c.health == Health::None));
    // Without Docker only the agent's own awsvpc marker tells the mode.
    assert_eq!(orders.network_mode, LocalNetworkMode::Unknown);
    assert_eq!(
        by_family(&tasks, "billing").network_mode,
        LocalNetworkMode::Awsvpc
    );
}

#[tokio::test]
async fn unresolvable_cgroups_are_reported_not_dropped() {
    let agent = agent_server(&agent_fixtures()).await;
    let tree = TempTree::new();
    tree.touch("cgroup.controllers");
    tree.mkdir(&format!(
        "ecstasks.slice/ecstasks-{ORDERS}.slice/docker-{WEB}.scope"
    ));
    let tasks = snapshot(&agent, None, tree.path(), CgroupLayout::V2)
        .await
        .unwrap();
    let orders = by_family(&tasks, "orders");
    assert_eq!(orders.containers.len(), 2);
    assert!(orders.containers[0].cgroup.is_some());
    assert_eq!(orders.containers[1].name, "log-router");
    assert_eq!(orders.containers[1].cgroup, None);
    assert_eq!(by_family(&tasks, "billing").containers[0].cgroup, None);
}

#[tokio::test]
async fn snapshot_on_an_al2_hybrid_tree() {
    let agent = agent_server(&agent_fixtures()).await;
    let tree = TempTree::new();
    for ctl in ["memory", "systemd", "unified"] {
        tree.mkdir(&format!("{ctl}/ecs/{ORDERS}/{WEB}"));
        tree.mkdir(&format!("{ctl}/ecs/{ORDERS}/{LOG_ROUTER}"));
    }
    let layout = CgroupLayout::detect(tree.path()).unwrap();
    assert_eq!(layout, CgroupLayout::V1);
    let tasks = snapshot(&agent, None, tree.path(), layout).await.unwrap();
    let orders = by_family(&tasks, "orders");
    assert_eq!(
        orders.containers[0].cgroup.as_deref(),
        Some(
            tree.path()
                .join(format!("unified/ecs/{ORDERS}/{WEB}"))
                .as_path()
        )
    );
}

#[tokio::test]
async fn agent_metadata_and_tasks_parse_as_documented() {
    let agent = agent_server(&agent_fixtures()).await;
    let m = agent.metadata().await.unwrap();
    assert_eq!(m.cluster, "prod");
    assert_eq!(
        m.container_instance_arn.as_deref(),
        Some(
            "arn:aws:ecs:us-east-1:123456789012:container-instance/prod/8f1c2b3a4d5e4f708192a3b4c5d6e7f8"
        )
    );
    assert!(m.version.starts_with("Amazon ECS Agent - v1."));
    let tasks = agent.tasks().await.unwrap();
    assert_eq!(tasks.len(), 5);
    let web = &tasks[0].containers[0];
    assert_eq!((web.name.as_str(), web.docker_id.as_str()), ("web", WEB));
    assert_eq!(web.docker_name, "ecs-orders-7-web-e4b2f8c6a1d3b5f79a01");
    assert_eq!(
        (web.ports[0].container_port, web.ports[0].host_port),
        (8080, 32768)
    );
    let app = &tasks[3].containers[0];
    assert_eq!(app.networks[0].network_mode, "awsvpc");
    assert_eq!(app.networks[0].ipv4_addresses, ["10.0.12.37"]);
}

#[tokio::test]
async fn agent_unreachable_is_an_error() {
    // A port that was just free: nothing listens there.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let agent = EcsAgent::new(format!("http://127.0.0.1:{port}").parse().unwrap()).unwrap();
    let err = agent.tasks().await.unwrap_err();
    assert!(matches!(err, EcsError::Connect { .. }), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("http://127.0.0.1:{port}/v1/tasks")),
        "{err}"
    );
    let tree = v2_tree();
    assert!(
        snapshot(&agent, None, tree.path(), CgroupLayout::V2)
            .await
            .is_err()
    );
}

#[tokio::test]
async fn agent_that_never_answers_times_out() {
    let server = Server::new(&[("/v1/tasks", Reply::Hang)]);
    let agent = agent_server(&server)
        .await
        .with_timeout(Duration::from_millis(200));
    let err = agent.tasks().await.unwrap_err();
    assert!(matches!(err, EcsError::Timeout { .. }), "{err}");
}

#[tokio::test]
async fn malformed_answers_name_the_endpoint() {
    let server = Server::new(&[
        (
            "/v1/tasks",
            Reply::Body(
                200,
                r#"{"Tasks":[{"Arn":"arn:aws:ecs:us-east-1:1:task/c/x","#,
            ),
        ),
        (
            "/v1/metadata",
            Reply::Body(200, r#"{"Cluster":["not","a","string"]}"#),
        ),
    ]);
    let agent = agent_server(&server).await;
    let err = agent.tasks().await.unwrap_err();
    assert!(matches!(err, EcsError::Json { .. }), "{err}");
    assert!(
        err.to_string()
            .starts_with("ECS agent GET http://127.0.0.1:"),
        "{err}"
    );
    assert!(
        err.to_string().contains("/v1/tasks: malformed response"),
        "{err}"
    );
    let err = agent.metadata().await.unwrap_err();
    assert!(
        err.to_string().contains("/v1/metadata: malformed response"),
        "{err}"
    );

    let server = Server::new(&[("/v1/tasks", Reply::Body(500, "agent not ready"))]);
    let err = agent_server(&server).await.tasks().await.unwrap_err();
    assert!(matches!(err, EcsError::Status { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("HTTP 500 Internal Server Error: agent not ready"),
        "{err}"
    );
}

#[tokio::test]
async fn docker_errors_are_errors() {
    let server = Server::new(&[
        (
            &inspect("weird"),
            Reply::Body(200, r#"{"State":{"Health":{"Status":"sleepy"}}}"#),
        ),
        (&inspect("broken"), Reply::Body(200, r#"{"State":"#)),
    ]);
    let (_dir, docker) = docker_server(&server).await;
    let err = docker.health(WEB).await.unwrap_err();
    assert!(
        matches!(err, EcsError::Status { status, .. } if status == 404),
        "{err}"
    );
    assert!(err.to_string().contains("No such container"), "{err}");
    let err = docker.health("weird").await.unwrap_err();
    assert!(err.to_string().contains("sleepy"), "{err}");
    let err = docker.health("broken").await.unwrap_err();
    assert!(matches!(err, EcsError::Json { .. }), "{err}");
    assert!(
        err.to_string()
            .starts_with("docker GET /containers/broken/json"),
        "{err}"
    );
    assert!(docker.health("../images/json").await.is_err());
    assert_eq!(
        server.seen().len(),
        3,
        "the hostile id never reached the socket"
    );
    let gone = DockerHealth::new("/nonexistent/docker.sock");
    assert!(matches!(
        gone.health(WEB).await,
        Err(EcsError::Connect { .. })
    ));
}

#[test]
fn task_ids_come_from_the_arn() {
    let ok = |arn: &str| task_id_from_arn(arn).map(|t| t.to_string());
    assert_eq!(
        ok(&format!(
            "arn:aws:ecs:us-east-1:123456789012:task/prod/{ORDERS}"
        ))
        .unwrap(),
        ORDERS
    );
    assert_eq!(
        ok("arn:aws:ecs:us-east-1:123456789012:task/090eff9b-1ce3-4db6-848a-a8d14064fd24").unwrap(),
        "090eff9b-1ce3-4db6-848a-a8d14064fd24"
    );
    assert_eq!(
        ok("arn:aws-cn:ecs:cn-north-1:123456789012:task/c/abc").unwrap(),
        "abc"
    );
    for bad in [
        "",
        "4d2c0a8f0b6e4b8c9a1e2f3a4b5c6d7e",
        "arn:aws:ecs:us-east-1:123456789012:container-instance/prod/abc",
        "arn:aws:ec2:us-east-1:123456789012:task/prod/abc",
        "arn:aws:ecs:us-east-1:123456789012:task/prod/",
        "arn:aws:ecs:us-east-1:123456789012:task/prod/a b",
        "arn:aws:ecs:us-east-1",
    ] {
        assert!(
            matches!(task_id_from_arn(bad), Err(EcsError::Arn { .. })),
            "{bad:?} accepted"
        );
    }
}
