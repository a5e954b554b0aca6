//! Cloud Map discovery and the `ecsmesh.ready` attribute end to end: moto (the AWS API
//! emulator, installed in the project's venv) runs inside instance 1's netns; both node
//! proxies discover the meshed endpoint from it, and instance 1's proxy publishes its
//! readiness attribute there.
mod common;

use std::time::{Duration, Instant};

use common::{mesh::TRUST_DOMAIN, *};
use harness::{
    NetworkMode::Host,
    ProxyOptions, World,
    aws::{MOTO_PORT, Moto},
    metrics::counter,
};
use serde_json::json;

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn cloudmap_endpoints_drive_the_tunnel_and_the_ready_attribute_is_published() {
    let mut w = World::new(tools(), 2);
    w.enable_mesh(TRUST_DOMAIN);
    w.add_task(0, Host, 1);
    w.add_task(1, Host, 1);
    w.instances[1].tasks[0].family = "orders".into();
    let ep = w.instances[1].addr(9000);
    w.instances[1].echo_server(&[ep]);

    // moto inside instance 1, reachable by both instances.
    let moto = Moto::start(&w, 1);

    // Cloud Map: namespace, service, one instance registered the way ECS registers tasks.
    moto.servicediscovery("CreateHttpNamespace", json!({ "Name": "mesh.local" }));
    let ns = moto.servicediscovery("ListNamespaces", json!({}))["Namespaces"][0]["Id"]
        .as_str()
        .unwrap()
        .to_owned();
    let svc = moto.servicediscovery(
        "CreateService",
        json!({ "Name": "orders", "NamespaceId": ns }),
    )["Service"]["Id"]
        .as_str()
        .unwrap()
        .to_owned();
    let attrs = json!({ "AWS_INSTANCE_IPV4": "10.0.0.2", "AWS_INSTANCE_PORT": "9000", "ECS_TASK_DEFINITION_FAMILY": "orders" });
    // ECS registers a service's tasks under their task id.
    let task_id = w.instances[1].tasks[0].id.clone();
    moto.servicediscovery(
        "RegisterInstance",
        json!({ "ServiceId": svc, "InstanceId": task_id, "Attributes": attrs }),
    );

    // ECS: a cluster and a container instance (moto wants an EC2 instance behind it).
    moto.ecs("CreateCluster", json!({ "clusterName": "prod" }));
    let ec2_id = moto.run_instance();
    let ci_arn = moto.register_container_instance("prod", &ec2_id);

    // The ECS agent of instance 1 reports that cluster and container instance.
    let agent = harness::fixture::HttpFixture::tcp_in(
        &w.instances[1].netns,
        "127.0.0.1:51678".parse().unwrap(),
    );
    agent.set("/v1/metadata", 200, json!({ "Cluster": "prod", "ContainerInstanceArn": ci_arn, "Version": "Amazon ECS Agent - v1.89.2" }).to_string());
    agent.set("/v1/tasks", 200, json!({ "Tasks": [] }).to_string());

    let cloudmap = |endpoint: &str| {
        format!(
            "\n[cloudmap]\nnamespace = \"mesh.local\"\nservices = [\"orders\"]\nrefresh_ms = 300\nendpoint = \"{endpoint}\"\nregion = \"us-east-1\"\n"
        )
    };
    let b_extra = format!(
        "{}\n[ecs]\ncgroup_root = \"{}\"\nlayout = \"v2\"\npoll_interval_ms = 500\npublish_ready_attribute = true\naws_endpoint = \"http://127.0.0.1:{MOTO_PORT}\"\nregion = \"us-east-1\"\n",
        cloudmap(&format!("http://127.0.0.1:{MOTO_PORT}")),
        w.instances[1].cgroup_root.display()
    );
    w.instances[1].start_proxy(&ProxyOptions {
        extra_toml: b_extra,
        ..Default::default()
    });
    w.instances[0].start_proxy(&ProxyOptions {
        extra_toml: cloudmap(&format!("http://10.0.0.2:{MOTO_PORT}")),
        ..Default::default()
    });

    // Ready published the attribute.
    let listed = moto.ecs(
        "ListAttributes",
        json!({ "cluster": "prod", "targetType": "container-instance", "attributeName": "ecsmesh.ready", "attributeValue": "true" }),
    );
    assert_eq!(
        listed["attributes"].as_array().map_or(0, Vec::len),
        1,
        "{listed}"
    );

    // The Cloud Map instance is a meshed endpoint: the task's connection is tunnelled.
    let a = &w.instances[0];
    assert_redirected(&a.tasks[0].client(&[ep], 1, 1000), a.outbound_v4(Host));
    let handshakes = |m: &prometheus_parse::Scrape| {
        counter(m, "ecsmesh_tls_handshakes_total", &[("role", "client")])
    };
    assert_eq!(handshakes(&a.metrics()), 1.0);

    // API outage: the last good set stays, the errors are counted.
    drop(moto);
    wait_until("refresh errors counted", || {
        counter(
            &a.metrics(),
            "ecsmesh_cloudmap_refresh_total",
            &[("result", "error")],
        ) >= 1.0
    });
    assert_eq!(
        counter(&a.metrics(), "ecsmesh_cloudmap_endpoints", &[]),
        1.0
    );
    let streams_before = counter(
        &w.instances[1].metrics(),
        "ecsmesh_tunnel_inbound_streams_total",
        &[],
    );
    assert!(a.tasks[0].client(&[ep], 1, 100)[0].ok);
    let streams_after = counter(
        &w.instances[1].metrics(),
        "ecsmesh_tunnel_inbound_streams_total",
        &[],
    );
    assert_eq!(
        streams_after,
        streams_before + 1.0,
        "still tunnelled during the outage"
    );
}
